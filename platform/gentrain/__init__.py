"""gentrain: train generative models from one YAML spec, on a laptop or a Ray cluster."""

__version__ = "0.1.0"
