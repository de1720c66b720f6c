"""Progress lines of a training run: metric windows, one-line summaries, clock times."""

from __future__ import annotations

import math
import time


class Window:
    """Metrics summed over the steps since the last progress line."""

    def __init__(self):
        self.start = time.perf_counter()
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}
        self.count = 0
        self.data_wait_seconds = 0.0  # of the steps added: waiting for their batches
        self.step_seconds = 0.0  # of the steps added: the whole steps, the wait included

    def add(self, metrics: dict[str, float], data_wait: float = 0.0, seconds: float = 0.0) -> None:
        """One step's metrics (and, when timed, the seconds it waited for data and took in
        all); non-finite values (a step that train.nonfinite=skip dropped) are left out of
        the means, not averaged in."""
        self.count += 1
        self.data_wait_seconds += data_wait
        self.step_seconds += seconds
        for key, value in metrics.items():
            finite = math.isfinite(value)
            self.sums[key] = self.sums.get(key, 0.0) + (value if finite else 0.0)
            self.counts[key] = self.counts.get(key, 0) + finite

    def means(self) -> dict[str, float]:
        # The same keys on every rank (they are all-reduced in order): nan where none was finite.
        return {key: value / self.counts[key] if self.counts[key] else math.nan
                for key, value in self.sums.items()}

    def elapsed(self) -> float:
        return time.perf_counter() - self.start


def metrics_line(head: str, metrics: dict[str, float], width: int = 100, first=()) -> str:
    """`head | name value | ...` in about `width` characters, the top-level metrics first
    (per-dimension breakdowns such as kl_dim/03 are left to MLflow, which has all), and
    among them the names in `first` (the job type's likelihoods: the numbers its README
    rows quote, such as the RBM's nll, which alphabetical order would cut off)."""
    names = sorted(metrics, key=lambda key: ("/" in key[5:], key[5:] not in first, key))
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
