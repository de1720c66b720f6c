"""Free TCP ports for the servers and process groups the tests start.

    from ports import free_port      # tests/ is on sys.path (its conftest.py)
"""

from __future__ import annotations

import random
import socket
from pathlib import Path

_handed_out: set[int] = set()
_rng = random.Random()


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now and that the kernel will not
    hand out meanwhile.

    A port from `bind(0)` lies in the ephemeral range, where every outgoing connection and
    every other `bind(0)` (Ray's workers, gRPC clients) draws its own: between our probe and
    the server's bind, one of them can take it (a raylet that cannot bind its port times out
    at start-up). Ports below that range are only ever taken on purpose. No port is handed
    out twice in one test session.
    """
    high, _ = _ephemeral_range()
    low = min(15000, high // 2)
    for _ in range(200):
        port = _rng.randrange(low, high)
        if port in _handed_out:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    raise RuntimeError(f"no free TCP port in {low}-{high} on 127.0.0.1")
