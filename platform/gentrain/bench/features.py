"""Evaluation feature extraction, images/s: gentrain's path against the same network by hand.

    gentrain bench features                       # 200 CIFAR-sized images per run, 3 rounds
    gentrain bench features --images 500 --batch-size 100 --size 64

FID, KID, IS and precision/recall spend their time in the FID Inception network's forward
passes (every image resized to 299x299). Per round, alternating which goes first:

- gentrain: `gentrain.evaluation.work.summarize_generated`, the call `gentrain eval` and
  the periodic sample metrics make on every worker: images drawn unit by unit, 8-bit
  quantised, `InceptionFeatures` in chunks of `batch_size`, pool features and logits to
  numpy, the running FID statistics and the rows KID/PR keep (`FeatureSummary`);
- plain: the same network and the same images, `torch.inference_mode()`, one forward
  per chunk, the pool features to numpy; no quantisation and no statistics.

The network has random weights (the FID weights file cannot be downloaded here, and the
work per image does not depend on the values). Images are uniform noise drawn before the
clock starts, so neither side pays for sampling a model.
"""

from __future__ import annotations

import os
import statistics
import time

import torch

from gentrain.bench.common import machine_line, measured_machine, publish, timestamp

SIDES = ("gentrain", "plain")


def run_features_bench(images: int = 200, batch_size: int = 50, size: int = 32, rounds: int = 3,
                       json_path: str | None = "bench-features.json") -> dict:
    from gentrain.evaluation.work import generated_units
    from gentrain.metrics.features import InceptionFeatures
    from gentrain.metrics.inception import FIDInceptionV3

    if images < 2 or batch_size < 1 or size < 8 or rounds < 1:
        raise SystemExit("bench features: --images must be >= 2, --batch-size >= 1, --size >= 8, --rounds >= 1")
    load_before = os.getloadavg()
    torch.manual_seed(0)
    network = FIDInceptionV3().eval()
    extractor = InceptionFeatures(device="cpu", batch_size=batch_size, network=network)
    units = generated_units(images, batch_size)
    pixels = [torch.rand(unit.rows, 3, size, size, generator=torch.Generator().manual_seed(unit.number))
              for unit in units]
    _log(f"FID Inception (random weights), {images} images of 3x{size}x{size} in chunks of {batch_size}, "
         f"{torch.get_num_threads()} torch threads, {rounds} round(s)")
    _side(SIDES[0], network, extractor, pixels, units, images)  # warm-up: first-call allocations, not timed
    rows = []
    for round_index in range(rounds):
        order = SIDES if round_index % 2 == 0 else SIDES[::-1]
        for side in order:
            seconds = _side(side, network, extractor, pixels, units, images)
            rows.append({"round": round_index, "side": side, "seconds": seconds, "images_per_s": images / seconds})
            _log(f"round {round_index + 1}/{rounds} {side}: {images / seconds:.2f} images/s")
    ratios = []
    for round_index in range(rounds):
        rates = {row["side"]: row["images_per_s"] for row in rows if row["round"] == round_index}
        ratios.append(rates["gentrain"] / rates["plain"])
    result = {
        "benchmark": "features",
        "command": f"gentrain bench features --images {images} --batch-size {batch_size} --size {size} "
                   f"--rounds {rounds}",
        "timestamp": timestamp(),
        "machine": measured_machine(load_before),
        "settings": {"images": images, "batch_size": batch_size, "image_size": size, "rounds": rounds,
                     "torch_threads": torch.get_num_threads(), "network": "FIDInceptionV3, random weights"},
        "rows": rows,
        "ratio_per_round": ratios,
        "ratio_median": statistics.median(ratios),
    }
    return publish(result, format_table, json_path, _log)


def _side(side: str, network, extractor, pixels: list, units: list, total: int) -> float:
    from gentrain.evaluation.work import summarize_generated

    start = time.perf_counter()
    if side == "gentrain":
        chunks = iter(pixels)  # units are drawn in order: unit i gets chunk i
        summarize_generated(lambda n, generator: next(chunks), extractor, units, total, seed=0)
    else:
        with torch.inference_mode():
            for chunk in pixels:
                pool, _ = network(chunk)
                pool.numpy()
    return time.perf_counter() - start


def format_table(result: dict) -> str:
    lines = [f"{'side':<10} {'round':>5} {'seconds':>8} {'images/s':>9}"]
    for row in result["rows"]:
        lines.append(f"{row['side']:<10} {row['round'] + 1:>5} {row['seconds']:>8.2f} {row['images_per_s']:>9.2f}")
    settings = result["settings"]
    per_round = ", ".join(f"{ratio:.2f}x" for ratio in result["ratio_per_round"])
    lines.append(f"gentrain / plain images/s: {result['ratio_median']:.2f}x median (per round {per_round})")
    lines.append(f"{settings['images']} images 3x{settings['image_size']}x{settings['image_size']} in chunks of "
                 f"{settings['batch_size']}, {settings['torch_threads']} torch threads; " +
                 machine_line(result["machine"]))
    return "\n".join(lines)


def _log(message: str) -> None:
    print(f"[bench features] {message}", flush=True)
