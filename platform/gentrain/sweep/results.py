"""The end of a sweep: its trials as rows (best first), the table printed, results.csv /
results.md, and the best trial's spec as a runnable YAML (gentrain.sweep.run writes them)."""

from __future__ import annotations

import csv
import io
import math
import re
from dataclasses import dataclass
from pathlib import Path

from gentrain.spec import dump_yaml
from gentrain.sweep.trial import trial_data
from gentrain.validation import validate


@dataclass
class TrialRow:
    trial: str
    params: dict
    metric: float | None
    steps: int | None
    status: str  # completed | stopped early | failed | not run
    error: str | None = None


def trial_rows(results, keys: list[str], metric: str, mode: str, steps: int) -> list[TrialRow]:
    """Tune's results as rows: failed ones last, the others best first by `metric`."""
    rows = []
    for result in results:
        metrics = result.metrics or {}
        trial = metrics.get("trial_id") or Path(result.path).name
        params = {key: (result.config or {}).get(key) for key in keys}
        value = metrics.get(metric)
        step = metrics.get("step")
        if result.error is not None:
            status, error = "failed", short_error(result.error)
        elif step is None:
            status, error = "not run", None
        else:
            status, error = ("completed" if step >= steps else "stopped early"), None
        value = float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None
        rows.append(TrialRow(trial, params, value, int(step) if step is not None else None, status, error))
    sign = 1.0 if mode == "min" else -1.0
    rows.sort(key=lambda row: (row.status == "failed", row.metric is None,
                               sign * row.metric if row.metric is not None else 0.0, row.trial))
    return rows


_ERROR_LINE = re.compile(r"^([A-Za-z_][\w.]*(Error|Exception|Interrupt)):\s")


def short_error(error: BaseException) -> str:
    """The line of the trial's own exception (Tune wraps it with its traceback)."""
    lines = str(error).strip().splitlines()
    found = [line for line in lines if _ERROR_LINE.match(line)]
    text = found[-1] if found else (lines[-1] if lines else type(error).__name__)
    return text if len(text) <= 300 else text[:297] + "..."


def params_text(config: dict) -> str:
    return ", ".join(f"{key}={value_text(value)}" for key, value in config.items())


def table(rows: list[TrialRow], keys: list[str], metric: str, limit: int | None = None) -> str:
    """The trials as a fixed-width text table, best first."""
    header = ["trial", *keys, metric, "steps", "status"]
    body = [[row.trial, *(value_text(row.params.get(key)) for key in keys),
             value_text(row.metric), value_text(row.steps), row.status + (f": {row.error}" if row.error else "")]
            for row in rows[:limit]]
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header) - 1)]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(line[:-1], widths)) + "  " + line[-1]
             for line in [header, *body]]
    return "\n".join(lines)


def value_text(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def csv_text(rows: list[TrialRow], keys: list[str], metric: str) -> str:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["trial", *keys, metric, "steps", "status", "error"])
    for row in rows:
        writer.writerow([row.trial, *(row.params.get(key) for key in keys),
                         "" if row.metric is None else row.metric, "" if row.steps is None else row.steps,
                         row.status, row.error or ""])
    return out.getvalue()


def markdown_text(rows: list[TrialRow], keys: list[str], metric: str) -> str:
    header = ["trial", *keys, metric, "steps", "status"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        status = row.status + (f": {row.error}" if row.error else "")
        cells = [row.trial, *(value_text(row.params.get(key)) for key in keys), value_text(row.metric),
                 value_text(row.steps), status.replace("|", "\\|")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def best_spec_text(base: dict, params: dict, name: str, source: str) -> str:
    """The best trial's spec as a runnable YAML: the base with its params, named <sweep>-best,
    storing where the base spec stores; validated as a run's spec is."""
    data = trial_data(base, params, name=name)
    return dump_yaml(validate(data, source).spec)
