"""`gentrain eval RUN --metrics nll` on the exact-likelihood families (PixelCNN, the flow,
the transformer): the report holds every likelihood the job type declares, in its declared
units, and the numbers are those the run's own held-out evaluation logged for the same
weights. Each run is a few steps of the bundled debug spec in this process (the Engine,
world size 1, no Ray), saved as `gentrain run` saves it.

    .venv/bin/python -m pytest -q tests/unit/test_likelihood_eval.py
"""

import json
import math
import tempfile

import pytest

from gentrain.cli import main
from gentrain.engine import Engine
from gentrain.registry import get_job_type
from gentrain.validation import load_spec

pytestmark = pytest.mark.usefixtures("one_thread")

# family -> (units gentrain eval must report, how close the two evaluations must agree).
# The flow draws its dequantization noise from the evaluation's own generator, so its two
# single-draw estimates differ by that noise; PixelCNN and the transformer are deterministic,
# up to float32 sums over batches cut differently (gentrain eval: 250 a batch; the run's
# evaluation: its data loader's batches).
FAMILIES = {
    "pixelcnn": ({"nll": "nats", "bits_per_dim": "bits/dim"}, 1e-4),
    "flow": ({"nll": "nats", "bits_per_dim": "bits/dim"}, 2e-3),
    "transformer": ({"nll": "nats", "bits_per_byte": "bits/byte", "perplexity": "perplexity"}, 1e-4),
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_gentrain_eval_nll_reports_the_declared_likelihoods_in_their_units(family, tmp_path, capsys, monkeypatch):
    units, rel = FAMILIES[family]
    assert get_job_type(family).likelihoods == units  # the declaration this test holds the report to
    spec = load_spec(f"{family}/debug", ["train.steps=3", "train.log_every=3", "train.schedule.warmup_steps=1",
                                         "scaling.num_workers=1", "eval.every=0", "checkpoint.every=3", f"storage_path={tmp_path}",
                                         "tracking.enabled=false", "eval.num_samples=4"])
    engine = Engine(spec, print_fn=None)
    engine.fit()
    logged = engine.evaluate()  # the training-time held-out evaluation of the final weights
    capsys.readouterr()

    out = tmp_path / "report.json"
    scratch = tmp_path / "scratch"  # where tempfile puts gentrain eval's temporary report copy
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    assert main(["eval", str(tmp_path / spec.name), "--metrics", "nll", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert not list(scratch.iterdir())  # no temporary folder left behind by each call
    assert json.loads(capsys.readouterr().out) == report  # what the user sees is the report
    likelihood = report["likelihood"]
    assert (report["job_type"], report["step"], likelihood["split"]) == (family, 3, "test")
    assert likelihood["units"] == units and set(likelihood["metrics"]) == set(units)
    for key, value in likelihood["metrics"].items():
        assert math.isfinite(value)
        assert value == pytest.approx(logged[f"eval/{key}"], rel=rel), key
    metrics = likelihood["metrics"]
    if "bits_per_dim" in metrics:  # nats per image and bits per dimension of the same number
        dims = math.prod(engine.data_info.shape)
        assert metrics["nll"] == pytest.approx(metrics["bits_per_dim"] * dims * math.log(2), rel=1e-5)
    else:  # bytes: bits per byte is nats per token / ln 2; perplexity is exp of the mean NLL
        assert metrics["bits_per_byte"] == pytest.approx(metrics["nll"] / math.log(2), rel=1e-6)
        assert metrics["perplexity"] == pytest.approx(math.exp(metrics["nll"]), rel=1e-6)
