"""A run across two Ray nodes on this machine (fixture `ray_cluster`: a head plus a second
`ray start --address` node): one worker per node, disjoint shards, a correct all-reduce;
and a storage_path that one node lacks refused before training starts.

    .venv/bin/pytest tests/integration/test_multinode.py -q

The full product path on two nodes (`gentrain submit` training 2 workers, one per node,
the shared-storage check passing on a folder both nodes see) is in test_submit.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest

pytestmark = pytest.mark.slow
HERE = Path(__file__).resolve().parent
GENTRAIN = str(Path(sys.executable).parent / "gentrain")


def test_one_worker_per_node_with_disjoint_shards_and_a_correct_all_reduce(ray_cluster, tmp_path):
    env = dict(ray_cluster.env, RAY_ADDRESS=ray_cluster.gcs_address)
    probe = subprocess.run([sys.executable, "-m", "multinode_probe", str(tmp_path / "runs")], cwd=HERE,
                           env=env, capture_output=True, text=True, timeout=300)
    # Ray echoes the workers' reports into the log: leave the long key lists out of a failure.
    assert probe.returncode == 0, "\n".join(line for line in (probe.stdout + probe.stderr).splitlines()
                                            if "train-0" not in line)[-6000:]
    report = json.loads(probe.stdout.strip().splitlines()[-1])
    ranks, nodes = report["ranks"], report["nodes"]
    assert sorted(nodes.values()) == [["gentrain_test_node_a"], ["gentrain_test_node_b"]]
    assert sorted(nodes[rank["node"]][0] for rank in ranks) == ["gentrain_test_node_a", "gentrain_test_node_b"]
    keys = [set(rank["keys"]) for rank in ranks]
    assert all(keys) and not keys[0] & keys[1], "each rank reads its own samples"
    assert len(keys[0] | keys[1]) > report["train_samples"] // 2
    expected = [1.0 + 2.0, float(len(ranks[0]["keys"]) + len(ranks[1]["keys"]))]
    assert [rank["reduced"] for rank in ranks] == [expected, expected]


def test_a_storage_path_one_node_lacks_is_refused_before_training(ray_cluster, mlflow_server):
    if ray_cluster.node_local_dir is None:
        pytest.skip("no mount namespace here (needs root or user namespaces): both nodes see every path")
    storage = ray_cluster.node_local_dir / "runs"
    env = dict(ray_cluster.env, RAY_ADDRESS=ray_cluster.gcs_address, MLFLOW_TRACKING_URI=mlflow_server)
    result = subprocess.run([GENTRAIN, "run", "vae/debug", f"storage_path={storage}", "scaling.num_workers=2",
                             "scaling.resources_per_worker={CPU: 1, gentrain_test_slot: 1}",
                             "tracking.experiment=multinode-refused"],
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"storage_path: {storage} is not shared by all 2 nodes of this Ray cluster" in result.stderr
    assert "s3://bucket/prefix" in result.stderr
    assert "[gentrain] step" not in result.stdout
    assert list(storage.iterdir()) == [], "the marker is removed and nothing else was written"
    assert mlflow.MlflowClient(mlflow_server).get_experiment_by_name("multinode-refused") is None
