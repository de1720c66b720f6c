"""What the Ray this process is connected to offers."""

from __future__ import annotations


def state_api_available() -> bool:
    """Whether this process's Ray has a dashboard, which serves the state API (an embedded
    Ray of `gentrain run` starts without one unless GENTRAIN_RAY_DASHBOARD=1)."""
    import ray

    if not ray.is_initialized():
        return False
    return bool(ray._private.worker.get_dashboard_url())  # noqa: SLF001 - no public accessor
