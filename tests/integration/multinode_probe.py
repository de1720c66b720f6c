"""Run on a Ray cluster: 2 Ray Train workers (one per node) read gentrain's training stream
for their rank and all-reduce across nodes; rank 0 reports what every rank saw as JSON.

    RAY_ADDRESS=HOST:GCS_PORT python -m multinode_probe   # prints one JSON line

A module of its own (not the test file) because Ray workers import the loop by name;
the test cluster's nodes have this folder on PYTHONPATH.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile

import ray
import ray.train
import torch
import torch.distributed as dist
from ray.train import RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from gentrain.data.index import default_cache_dir, load_index, resolve_builtin
from gentrain.data.pipeline import batches_per_epoch, train_batches

BATCH = 16


def probe_loop(config: dict) -> None:
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    index = load_index(config["source"])
    batches = train_batches(index, "train", BATCH, rank, world, seed=0, shuffle_buffer=0, with_keys=True)
    keys = [key for _ in range(batches_per_epoch(index, "train", BATCH, world)) for key in next(batches)["key"]]
    # A value only this rank has: the sum over ranks is known in advance.
    value = torch.tensor([float(rank + 1), float(len(keys))])
    dist.all_reduce(value)
    gathered = [None] * world
    dist.all_gather_object(gathered, {"rank": rank, "node": ray.get_runtime_context().get_node_id(),
                                      "keys": keys, "reduced": value.tolist()})
    # Train V2 keeps only reports that carry a checkpoint in the Result: rank 0 attaches one.
    with tempfile.TemporaryDirectory() as folder:
        checkpoint = ray.train.Checkpoint.from_directory(folder) if rank == 0 else None
        ray.train.report({"probe": json.dumps(gathered)}, checkpoint=checkpoint)


def main() -> None:
    ray.init(address=os.environ["RAY_ADDRESS"], logging_level="WARNING")
    source = resolve_builtin("builtin:digits", default_cache_dir())
    trainer = TorchTrainer(
        probe_loop, train_loop_config={"source": source}, torch_config=TorchConfig(backend="gloo"),
        scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1, "gentrain_test_slot": 1}),
        run_config=RunConfig(name="multinode-probe", storage_path=sys.argv[1]))
    result = trainer.fit()
    nodes = {node["NodeID"]: sorted(k for k in node["Resources"] if k.startswith("gentrain_test_node"))
             for node in ray.nodes() if node["Alive"]}
    per_split = load_index(source).split("train")
    print(json.dumps({"ranks": json.loads(result.metrics["probe"]), "nodes": nodes,
                      "train_samples": sum(per_split.counts)}))


if __name__ == "__main__":
    main()
