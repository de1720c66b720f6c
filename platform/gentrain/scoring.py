"""Per-sample anomaly scores of a packed data set under a trained job (`gentrain score`).

    gentrain score runs/vae-debug builtin:digits --split test --out scores.csv

The job type's `score(modules, config, batch)` returns per-sample tensors (for a VAE: the
negative ELBO and the reconstruction error); each becomes a CSV column beside the
sample's key and label. Lower means more typical of the training data.
"""

from __future__ import annotations

import csv
from pathlib import Path

import torch

from gentrain.data.index import load_index
from gentrain.data.pipeline import eval_batches


def score_dataset(trained, data: str, split: str, out: str, batch_size: int = 256) -> tuple[int, list[str]]:
    if trained.job.score is None:
        raise ValueError(f"job type {trained.job.name!r} defines no anomaly score; "
                         "`gentrain score` needs a job type with `score`")
    index = load_index(data)
    rows, columns = 0, None
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="") as handle, torch.no_grad():
        writer = csv.writer(handle)
        for batch in eval_batches(index, split, batch_size, 0, 1):
            scores = {name: value.detach().float().cpu() for name, value in
                      trained.job.score(trained.modules, trained.config, batch).items()}
            if columns is None:
                columns = sorted(scores)
                writer.writerow(["key", "label", *columns])
            for i, key in enumerate(batch["key"]):
                label = int(batch["label"][i]) if "label" in batch else ""  # token data has none
                writer.writerow([key, label, *(f"{float(scores[c][i]):.6g}" for c in columns)])
            rows += len(batch["key"])
    return rows, columns or []
