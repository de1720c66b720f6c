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


def test_each_named_sampler_setting_is_drawn_and_its_rate_logged(tmp_path):
    """eval.sampler_rates: one metric per named setting (over job.sampling), beside the grid's."""
    digits = load_index("builtin:digits")
    spec = from_dict({"job": {"type": "rbm", "config": {"hidden": 8, "ais_betas": 20, "ais_chains": 4},
                              "sampling": {"steps": 5}},
                      "data": {"source": "builtin:digits"},
                      "eval": {"num_samples": 16, "max_batches": 1,
                               "sampler_rates": {"gibbs-2": {"steps": 2}, "gibbs-50.mean": {"steps": 50,
                                                                                          "mean_field": True}}},
                      "train": {"steps": 2}, "storage_path": str(tmp_path)})
    logger, lines = RecordingLogger(), []
    engine = Engine(spec, data_info=DataInfo(tuple(digits.shape)), logger=logger, print_fn=lines.append)
    engine.evaluate()
    logged = {key: value for metrics, _ in logger.metrics for key, value in metrics.items()
              if key.startswith("sample/")}
    assert set(logged) == {"sample/samples_per_second", "sample/gibbs-2/samples_per_second",
                           "sample/gibbs-50.mean/samples_per_second"}
    assert all(value > 0 for value in logged.values())
    assert any(line.startswith("sampling rates at step 0 | gibbs-2 ") and "gibbs-50.mean" in line for line in lines)


def test_sampler_rates_are_checked_like_job_sampling():
    import pytest

    from gentrain.schema import SpecError
    from gentrain.validation import load_spec

    with pytest.raises(SpecError) as error:
        load_spec("diffusion/debug", ["eval.sampler_rates.ddim20.stepz=20", "eval.sampler_rates.pc.sampler=euler"])
    text = str(error.value)
    assert "eval.sampler_rates.ddim20.stepz: unknown key; did you mean 'steps'?" in text
    assert "eval.sampler_rates.pc.sampler" in text
    with pytest.raises(SpecError, match=r"eval.sampler_rates.ddim 20: name the setting with letters"):
        from_dict({"job": {"type": "diffusion"}, "eval": {"sampler_rates": {"ddim 20": {"steps": 20}}}})
    spec = load_spec("diffusion/debug", ["eval.sampler_rates.ode20.sampler=ode", "eval.sampler_rates.ode20.steps=20"])
    assert spec.eval.sampler_rates == {"ode20": {"sampler": "ode", "steps": 20}}
