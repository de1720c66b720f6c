"""Every evaluation logs the eval grid's sampling throughput (`sample/samples_per_second`,
rank 0) under the spec's job.sampling, so sampler settings can be compared in MLflow."""

from __future__ import annotations

from gentrain.data.index import load_index
from gentrain.engine import Engine
from gentrain.registry import DataInfo
from gentrain.validation import from_dict


class RecordingLogger:
    """The logger surface the engine calls, keeping what it is given."""

    def __init__(self):
        self.metrics: list[tuple[dict, int]] = []
        self.artifacts: list[str] = []

    def log_metrics(self, metrics, step):
        self.metrics.append((dict(metrics), step))

    def log_artifact(self, path, folder=None):
        self.artifacts.append(path)

    def set_tag(self, key, value):
        pass


def test_evaluation_logs_the_grids_samples_per_second(tmp_path):
    digits = load_index("builtin:digits")
    spec = from_dict({"job": {"type": "rbm", "config": {"hidden": 8, "ais_betas": 20, "ais_chains": 4},
                              "sampling": {"steps": 5}},
                      "data": {"source": "builtin:digits"}, "eval": {"num_samples": 16, "max_batches": 1},
                      "train": {"steps": 2}, "storage_path": str(tmp_path)})
    logger = RecordingLogger()
    engine = Engine(spec, data_info=DataInfo(tuple(digits.shape)), logger=logger, print_fn=None)
    engine.evaluate()
    rates = [m["sample/samples_per_second"] for m, step in logger.metrics if "sample/samples_per_second" in m]
    assert len(rates) == 1 and rates[0] > 0
    assert any(str(p).endswith(".png") for p in logger.artifacts)
