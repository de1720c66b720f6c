"""Progress lines of a training run: metric windows, one-line summaries, clock times."""

from __future__ import annotations

import time


class Window:
    """Metrics summed over the steps since the last progress line."""

    def __init__(self):
        self.start = time.perf_counter()
        self.sums: dict[str, float] = {}
        self.count = 0

    def add(self, metrics: dict[str, float]) -> None:
        self.count += 1
        for key, value in metrics.items():
            self.sums[key] = self.sums.get(key, 0.0) + value

    def means(self) -> dict[str, float]:
        return {key: value / self.count for key, value in self.sums.items()}

    def elapsed(self) -> float:
        return time.perf_counter() - self.start


def metrics_line(head: str, metrics: dict[str, float], width: int = 100) -> str:
    """`head | name value | ...` in about `width` characters, the top-level metrics first
    (per-dimension breakdowns such as kl_dim/03 are left to MLflow, which has all)."""
    names = sorted(metrics, key=lambda key: ("/" in key[5:], key))
    line, shown = head, 0
    for key in names:
        part = f" | {key[5:]} {metrics[key]:.4f}"
        if len(line) + len(part) > width or "/" in key[5:]:
            break
        line, shown = line + part, shown + 1
    if shown < len(metrics):
        line += f" | +{len(metrics) - shown} more in MLflow"
    return line


def clock(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
