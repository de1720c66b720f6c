"""What the Ray this process is connected to offers."""

from __future__ import annotations


def state_api_available() -> bool:
    """Whether this process's Ray has a dashboard, which serves the state API (an embedded
    Ray of `gentrain run` starts without one unless GENTRAIN_RAY_DASHBOARD=1)."""
    import ray

    if not ray.is_initialized():
        return False
    try:
        # What the dashboard wrote into the cluster's store as it started ("" without one);
        # a worker's own idea of the address is a default, whether or not one runs.
        return bool(ray._private.services.get_webui_url_from_internal_kv())  # noqa: SLF001
    except Exception:  # noqa: BLE001 - an unknown answer: keep Ray Train's own components
        return True
