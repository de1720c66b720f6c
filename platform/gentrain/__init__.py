"""gentrain: train generative models from one YAML spec, on a laptop or a Ray cluster."""

__version__ = "0.1.0"

_API = ("Engine", "load", "open_run", "run")


def __getattr__(name: str):
    """gentrain.load / run / open_run / Engine (gentrain.api), imported when first used so
    that `import gentrain` stays cheap for the CLI and Ray workers."""
    if name in _API:
        from gentrain import api

        return getattr(api, name)
    raise AttributeError(f"module 'gentrain' has no attribute {name!r}")
