"""Samples/s of the data pipeline against plain tar reading of the same shards.

    gentrain bench data --samples 20000

Two shard sets are written from the same images (mnist5k, repeated to reach
the sample count), in the layout `gentrain data pack` writes (index.json plus
`train-NNNNNN.tar`): PNG, encoded exactly as the packer encodes it, and raw
uint8 arrays (`.npy` bytes of the [C, H, W] image). Each set is read by

- the pipeline: `train_batches` for rank 0 of 1 with 0, 1 and 2 DataLoader
  workers, i.e. shard deal, shuffle buffer, decoding and batching as in training;
- the baseline: Python's `tarfile` over the same files in order, decoding with
  numpy (and PIL for PNG) into the same float32 [B, C, H, W] batch, in this
  process, with no WebDataset, no DataLoader and no shuffling.

Every measurement first draws warm-up batches (worker start-up, filling the
shuffle buffer), then times `samples` samples. Pipeline and baseline runs
alternate, so a change in the machine's load hits both; each reported number
is the median of the runs. With 0 loader workers the rates per CPU second of this
process are reported too (CPU ratio): a busy machine moves them far less than wall-clock
rates. The shards sit in the page cache, so this measures
decoding and pipeline overhead, not the disk. A format the pipeline cannot
decode is reported as such (its baseline is still measured) rather than
aborting the benchmark.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import io
import itertools
import json
import math
import os
import platform
import statistics
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import PIL
import torch
import webdataset as wds
from PIL import Image

from gentrain.bench.common import machine_line, measured_machine, publish, timestamp
from gentrain.data.index import DatasetIndex, load_index
from gentrain.data.pack import INDEX_FORMAT, INDEX_NAME, INDEX_VERSION, content_hash, encode_png
from gentrain.data.pipeline import train_batches
from gentrain.data.sources import open_source

FORMATS = ("png", "npy")
SOURCE = "mnist5k"
SPLIT = "train"
REPEATS = 3
# Four batches cover two loader workers' start-up and first shuffle-buffer fill
# (the DataLoader takes batches from its workers in turn).
WARMUP_BATCHES = 4
MAX_PER_SHARD = 512


def run_data_bench(
    samples: int = 20000,
    json_path: str | None = "bench-data.json",
    workdir: str | None = None,
    loader_workers: tuple[int, ...] = (0, 1, 2),
    batch_size: int = 256,
) -> dict:
    """Build both shard sets, measure every (format, loader workers) row, print the table, write JSON.

    Shards go to `workdir` (kept) or to a temporary folder (removed afterwards).
    Returns what is written to `json_path`; `json_path=None` writes nothing.
    """
    _check_settings(samples, loader_workers, batch_size)
    measured_batches = max(1, round(samples / batch_size))
    settings = {
        "samples": samples,
        "batch_size": batch_size,
        "measured_batches": measured_batches,
        "samples_timed": measured_batches * batch_size,
        "warmup_batches": WARMUP_BATCHES,
        "repeats": REPEATS,
        "statistic": "median",
        "loader_workers": list(loader_workers),
        "source": SOURCE,
        "pipeline": "train_batches(rank=0, world_size=1, seed=0), default shuffle buffer",
        "baseline": "tarfile + numpy (+ PIL for png), shards in index order, one process, no shuffle",
    }
    load_before = os.getloadavg()
    with _work_folder(workdir) as root:
        # One epoch holds exactly warm-up + timed batches, so no timed batch waits
        # for the loader to restart its workers at an epoch boundary.
        total = (WARMUP_BATCHES + measured_batches) * batch_size
        indexes = build_shard_sets(root, total, min_shards=max(4, 2 * max(loader_workers)))
        datasets = {fmt: _describe(index) for fmt, index in indexes.items()}
        rows = []
        for fmt, index in indexes.items():
            pipeline_error = pipeline_cannot_read(index, batch_size)
            for workers in loader_workers:
                rows.append(_measure_row(index, fmt, workers, settings, pipeline_error))
    machine = measured_machine(load_before)
    result = {
        "benchmark": "data",
        "command": f"gentrain bench data --samples {samples}",
        "timestamp": timestamp(),
        "machine": machine,
        "settings": settings,
        "datasets": datasets,
        "rows": rows,
    }
    return publish(result, format_table, json_path, _progress)


def build_shard_sets(root, total: int, min_shards: int = 4) -> dict[str, DatasetIndex]:
    """Write `total` samples (the source's images, repeated) as root/png and root/npy shard sets."""
    data = open_source(SOURCE).data
    rows = np.arange(total) % len(data.images)
    per_shard = min(MAX_PER_SHARD, math.ceil(total / min_shards))
    indexes = {}
    for fmt in FORMATS:
        _progress(f"writing {fmt} shards: {total:,} samples, {per_shard} per shard")
        indexes[fmt] = load_index(str(_write_shard_set(Path(root) / fmt, fmt, data, rows, per_shard)))
    return indexes


def encode_sample(image: np.ndarray, fmt: str) -> bytes:
    """A uint8 [H, W, C] image as a shard stores it: PNG as the packer writes it, or .npy bytes."""
    if fmt == "png":
        return encode_png(image)
    buffer = io.BytesIO()
    # [C, H, W] is the index's `shape`, so a reader stacks arrays without transposing.
    np.save(buffer, np.ascontiguousarray(image.transpose(2, 0, 1)))
    return buffer.getvalue()


def plain_tar_batches(urls: list[str], fmt: str, shape, batch_size: int) -> Iterator[dict]:
    """The baseline: endless {"image": float32 [B, C, H, W] in [0, 1], "label": int64 [B]} batches
    read with tarfile + numpy (+ PIL), shard after shard in the given order."""
    images, labels = [], []
    for url in itertools.cycle(urls):
        for image, label in _plain_tar_samples(url, fmt, shape):
            images.append(image)
            labels.append(label)
            if len(images) == batch_size:
                # One numpy conversion per batch, in this thread: on a small busy machine
                # torch's intra-op thread pool costs more than the conversion itself.
                pixels = np.stack(images).astype(np.float32)
                np.divide(pixels, 255.0, out=pixels)
                yield {"image": torch.from_numpy(pixels), "label": torch.tensor(labels, dtype=torch.int64)}
                images, labels = [], []


def samples_per_second(batches: Iterator[dict], warmup: int, measured: int, batch_size: int, shape,
                       cpu_rates: list[float] | None = None) -> float:
    """Draw `warmup` batches untimed (checking their shape), then time `measured` batches.
    `cpu_rates`: also append the rate per second of this process's CPU time (all its
    threads; not loader worker processes), which a busy machine moves far less."""
    expected = (batch_size, *shape)
    for _ in range(warmup):
        batch = next(batches)
        # A reader that yields something else would make the comparison meaningless.
        if tuple(batch["image"].shape) != expected:
            raise RuntimeError(f"benchmark reader yielded images of shape {list(batch['image'].shape)}, "
                               f"expected {list(expected)}")
    started, cpu_started = time.perf_counter(), time.process_time()
    for _ in range(measured):
        next(batches)
    if cpu_rates is not None:
        cpu_rates.append(measured * batch_size / max(time.process_time() - cpu_started, 1e-9))
    return measured * batch_size / (time.perf_counter() - started)


def pipeline_cannot_read(index: DatasetIndex, batch_size: int) -> str | None:
    """None when `train_batches` decodes this shard set, else the error it raised."""
    try:
        next(train_batches(index, SPLIT, batch_size, rank=0, world_size=1, seed=0))
    except Exception as error:  # noqa: BLE001 - whatever it is, the row reports it and the other rows still run
        return f"{type(error).__name__}: {error}"
    return None


def format_table(result: dict) -> str:
    """The printed report: one line per (format, loader workers) with both rates and their ratio."""
    settings, machine = result["settings"], result["machine"]
    lines = [
        f"data pipeline vs plain tarfile reading: {settings['samples_timed']:,} samples per run, "
        f"batch {settings['batch_size']}, {settings['warmup_batches']} warm-up batches excluded, "
        f"{settings['statistic']} of {settings['repeats']} runs",
        f"{'format':<8}{'loader workers':>15}{'pipeline samples/s':>21}{'baseline samples/s':>21}{'ratio':>8}"
        f"{'CPU ratio':>10}",
    ]
    notes = []
    for row in result["rows"]:
        pipeline, ratio, cpu_ratio = row["pipeline_samples_per_second"], row["ratio"], row["cpu_ratio"]
        lines.append(
            f"{row['format']:<8}{row['loader_workers']:>15}"
            f"{_rate(pipeline):>21}{_rate(row['baseline_samples_per_second']):>21}"
            f"{'n/a' if ratio is None else f'{ratio:.2f}':>8}"
            f"{'n/a' if cpu_ratio is None else f'{cpu_ratio:.2f}':>10}"
        )
        if row["pipeline_error"] and row["pipeline_error"] not in notes:
            notes.append(row["pipeline_error"])
    lines.append("ratio = pipeline / baseline (above 1: the pipeline is faster); CPU ratio: the same per CPU "
                 "second of this process, steadier on a busy machine (0 loader workers only)")
    lines += [f"n/a: the pipeline could not read these shards ({note})" for note in notes]
    lines.append(machine_line(machine))
    return "\n".join(lines)


def machine_info() -> dict:
    """What the numbers depend on: CPUs, threads and library versions."""
    return {
        "cpu_count": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "cpu_model": _cpu_model(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "webdataset": importlib.metadata.version("webdataset"),
        "numpy": np.__version__,
        "pillow": PIL.__version__,
    }


def _measure_row(index: DatasetIndex, fmt: str, workers: int, settings: dict, pipeline_error: str | None) -> dict:
    timing = (WARMUP_BATCHES, settings["measured_batches"], settings["batch_size"], index.shape)
    pipeline_runs, baseline_runs = [], []
    # CPU-time rates only in-process (0 loader workers): workers' CPU is not this process's.
    pipeline_cpu, baseline_cpu = ([], []) if workers == 0 else (None, None)
    for run in range(1, REPEATS + 1):
        if pipeline_error is None:
            batches = train_batches(index, SPLIT, settings["batch_size"], rank=0, world_size=1, seed=0,
                                    loader_workers=workers)
            pipeline_runs.append(samples_per_second(batches, *timing, cpu_rates=pipeline_cpu))
            # Dropping the iterator closes its epoch, which shuts the loader's workers down now.
            del batches
        plain = plain_tar_batches(index.shard_urls(SPLIT), fmt, index.shape, settings["batch_size"])
        baseline_runs.append(samples_per_second(plain, *timing, cpu_rates=baseline_cpu))
        plain.close()
        pipeline_now = _rate(pipeline_runs[-1]) if pipeline_runs else "n/a"
        _progress(f"{fmt}, {workers} loader workers, run {run}/{REPEATS}: pipeline {pipeline_now} samples/s, "
                  f"baseline {_rate(baseline_runs[-1])} samples/s")
    pipeline = statistics.median(pipeline_runs) if pipeline_runs else None
    baseline = statistics.median(baseline_runs)
    cpu_ratio = None
    if pipeline_cpu and baseline_cpu:
        cpu_ratio = statistics.median(pipeline_cpu) / statistics.median(baseline_cpu)
    return {
        "format": fmt,
        "loader_workers": workers,
        "pipeline_samples_per_second": pipeline,
        "baseline_samples_per_second": baseline,
        "ratio": None if pipeline is None else pipeline / baseline,
        "pipeline_runs": pipeline_runs,
        "baseline_runs": baseline_runs,
        "pipeline_error": pipeline_error,
        # per CPU second of this process (0 loader workers only; None otherwise)
        "cpu_ratio": cpu_ratio,
        "pipeline_cpu_runs": pipeline_cpu or [],
        "baseline_cpu_runs": baseline_cpu or [],
    }


def _write_shard_set(out: Path, fmt: str, data, rows: np.ndarray, per_shard: int) -> Path:
    """Shards and an index.json that `load_index` reads, as `gentrain data pack` lays them out."""
    out.mkdir(parents=True, exist_ok=True)
    # ShardWriter formats the pattern with %, so a literal % in the folder must be escaped.
    pattern = os.path.join(str(out).replace("%", "%%"), f"{SPLIT}-%06d.tar")
    counts: dict[str, int] = {}
    with wds.ShardWriter(pattern, maxcount=per_shard, verbose=0, mtime=0) as writer:
        for position, row in enumerate(rows):
            writer.write({
                "__key__": f"{SPLIT}-{position:06d}",
                fmt: encode_sample(data.images[row], fmt),
                "cls": str(int(data.labels[row])).encode("ascii"),
            })
            shard = os.path.basename(writer.fname)
            counts[shard] = counts.get(shard, 0) + 1
    shards = sorted(counts)
    splits = {SPLIT: {"shards": shards, "counts": [counts[name] for name in shards], "total": len(rows)}}
    _, height, width, channels = data.images.shape
    index = {
        "format": INDEX_FORMAT,
        "version": INDEX_VERSION,
        "source": f"bench:{SOURCE}",
        "shape": [channels, height, width],
        "dtype": "uint8",
        "encoding": fmt,
        "num_classes": len(data.class_names),
        "class_names": list(data.class_names),
        "splits": splits,
        "content_hash": content_hash(out, splits),
    }
    (out / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    return out


def _plain_tar_samples(path: str, fmt: str, shape) -> Iterator[tuple[np.ndarray, int]]:
    """(uint8 [C, H, W], label) per sample of one shard; a sample's files are adjacent in the tar."""
    current, fields = None, {}
    with tarfile.open(path, "r:") as tar:
        for member in tar:
            stem, _, extension = member.name.partition(".")
            if stem != current:
                if current is not None:
                    yield _plain_decode(fields[fmt], fmt, shape), int(fields["cls"])
                current, fields = stem, {}
            fields[extension] = tar.extractfile(member).read()
    if current is not None:
        yield _plain_decode(fields[fmt], fmt, shape), int(fields["cls"])


def _plain_decode(payload: bytes, fmt: str, shape) -> np.ndarray:
    channels, height, width = shape
    if fmt == "npy":
        return np.load(io.BytesIO(payload))
    with Image.open(io.BytesIO(payload)) as image:
        pixels = np.asarray(image.convert("L" if channels == 1 else "RGB"))
    return pixels.reshape(height, width, channels).transpose(2, 0, 1)


def _check_settings(samples: int, loader_workers: tuple[int, ...], batch_size: int) -> None:
    if samples < 1:
        raise ValueError(f"samples must be at least 1 (--samples), got {samples}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if not loader_workers or min(loader_workers) < 0:
        raise ValueError(f"loader_workers must be a non-empty list of counts >= 0, got {list(loader_workers)}")


def _work_folder(workdir: str | None):
    if workdir is None:
        return tempfile.TemporaryDirectory(prefix="gentrain-bench-data-")
    Path(workdir).mkdir(parents=True, exist_ok=True)
    return contextlib.nullcontext(os.fspath(workdir))


def _describe(index: DatasetIndex) -> dict:
    paths = index.shard_urls(SPLIT)
    return {
        "samples": index.total(SPLIT),
        "shards": len(paths),
        "bytes": sum(os.path.getsize(path) for path in paths),
        "shape": list(index.shape),
    }


def _cpu_model() -> str:
    # /proc/cpuinfo names the model; platform.processor() on Linux usually says only "x86_64".
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _rate(value: float | None) -> str:
    return "n/a" if value is None else f"{value:,.0f}"


def _progress(message: str) -> None:
    print(f"bench data: {message}", file=sys.stderr, flush=True)
