"""`gentrain sweep` without Ray: the --param grammar, the checks every value passes before
any trial (the same gentrain.validation.check_job as `gentrain run`), trial specs, how many
trials run at once, the results table."""

from __future__ import annotations

import math

import pytest

from gentrain.cli import main
from gentrain.schema import SpecError
from gentrain.spec import apply_overrides, read_yaml
from gentrain.sweep.results import TrialRow, best_spec_text, short_error, table
from gentrain.sweep.run import SweepRequest, check_space, concurrency, request_problems, trial_resources
from gentrain.sweep.space import ParamError, parse_param, parse_params
from gentrain.sweep.trial import trial_data
from gentrain.validation import find_spec_file


@pytest.mark.parametrize("text, kind, values", [
    ("train.optimizer.lr=loguniform(1e-4,1e-2)", "loguniform", (1e-4, 1e-2)),
    ("job.config.beta=uniform(0, 4.5)", "uniform", (0.0, 4.5)),
    ("job.config.latent_dim=randint(4,16)", "randint", (4, 16)),
    ("train.optimizer.name=choice(adamw, sgd)", "choice", ("adamw", "sgd")),
    # numbers in YAML 1.1's string form are numbers; a quoted value stays a string
    ("train.batch_size=grid(16,32,1e2,'1e-4',true)", "grid", (16, 32, 100.0, "1e-4", True)),
    ("job.config.channels=choice([16,32],[32,64])", "choice", ([16, 32], [32, 64])),
    ('data.source=choice("a,b",c)', "choice", ("a,b", "c")),
])
def test_distributions_parse_to_their_values(text, kind, values):
    param = parse_param(text)
    assert (param.key, param.kind, param.values) == (text.partition("=")[0], kind, values)
    assert [type(v) for v in param.values] == [type(v) for v in values]


def test_each_distribution_becomes_its_tune_domain():
    from ray.tune.search.sample import Categorical, Float, Integer

    lr = parse_param("a=loguniform(1e-4,1e-2)").to_tune()
    assert isinstance(lr, Float) and (lr.lower, lr.upper) == (1e-4, 1e-2)
    assert isinstance(lr.get_sampler(), Float._LogUniform)
    steps = parse_param("a=randint(4,16)").to_tune()
    assert isinstance(steps, Integer) and (steps.lower, steps.upper) == (4, 17)  # 16 included
    assert isinstance(parse_param("a=choice(1,2)").to_tune(), Categorical)
    assert parse_param("a=grid(1,2)").to_tune() == {"grid_search": [1, 2]}


@pytest.mark.parametrize("text, says", [
    ("train.optimizer.lr", "expected KEY=DIST, e.g. --param train.optimizer.lr=loguniform(1e-4,1e-2)"),
    ("=choice(1)", "expected KEY=DIST"),
    ("train..lr=choice(1)", "not a spec path; write the field as in overrides"),
    ("train.optimizer.lr=0.1", "is not a distribution; write one of"),
    ("train.optimizer.lr=0.1", "(a fixed value is an override: train.optimizer.lr=VALUE)"),
    ("a=normal(0,1)", "unknown distribution 'normal'; known: loguniform, uniform, randint, choice, grid"),
    ("a=loguniform(1e-2,1e-4)", "needs low < high; write loguniform(0.0001,0.01)"),
    ("a=uniform(1,1)", "needs low < high"),
    ("a=loguniform(0,1)", "loguniform bounds must be > 0 (got 0.0); use uniform(0.0,1.0)"),
    ("a=loguniform(1e-4)", "loguniform takes two bounds (low,high), got 1"),
    ("a=uniform(0,1,2)", "takes two bounds (low,high), got 3"),
    ("a=uniform(0,x)", "uniform bound 'x' is not a number"),
    ("a=uniform(0,inf)", "uniform bound 'inf' is not finite"),
    ("a=uniform(nan,1)", "is not finite"),
    ("a=randint(1.5,4)", "randint bound '1.5' is not an integer"),
    ("a=randint(9,4)", "randint(9,4) has low > high; write randint(4,9)"),
    ("a=choice(1,,2)", "an empty value in (1,,2)"),
    ("a=choice(1,2,1)", "lists a value twice"),
    ("a=choice('x,y)", "unbalanced quote or bracket"),
    ("a=choice([1,2)", "unbalanced quote or bracket"),
    ("a=choice(1,.nan)", "value '.nan' is not finite"),
    ("a=choice(1, {x: [)", "unbalanced"),
])
def test_bad_params_name_the_param_and_the_fix(text, says):
    with pytest.raises(ParamError) as caught:
        parse_param(text)
    assert says in str(caught.value) and str(caught.value).startswith("--param ")


def test_the_values_are_never_evaluated(tmp_path):
    marker = tmp_path / "touched"
    param = parse_param(f"a=choice(__import__('os').mkdir('{marker}'),2)")
    assert param.values[0] == f"__import__('os').mkdir('{marker}')" and not marker.exists()


def test_all_bad_params_are_reported_at_once_and_a_key_only_once():
    with pytest.raises(ParamError) as caught:
        parse_params(["a=normal(0,1)", "b=choice(1)", "b=choice(2)", "c=uniform(2,1)"])
    lines = str(caught.value).splitlines()
    assert lines == [line for line in lines if line.startswith("--param ")] and len(lines) == 3
    assert "--param b: given twice; keep one" in lines


def test_a_trial_spec_sets_each_param_at_its_path_and_leaves_the_base_alone():
    base = {"train": {"optimizer": {"lr": 1e-3}}, "name": "x"}
    data = trial_data(base, {"train.optimizer.lr": 0.5, "job.config.beta": 4}, name="t1", storage_path="/s/w")
    assert data == {"train": {"optimizer": {"lr": 0.5}}, "job": {"config": {"beta": 4}},
                    "name": "t1", "storage_path": "/s/w"}
    assert base == {"train": {"optimizer": {"lr": 1e-3}}, "name": "x"}


def _base(tmp_path, *overrides):
    path = find_spec_file("vae/debug")
    return apply_overrides(read_yaml(path), [f"storage_path={tmp_path}", *overrides]), str(path)


def test_every_value_is_validated_as_gentrain_run_validates_before_any_trial(tmp_path):
    base, source = _base(tmp_path)
    space = parse_params(["train.optimizer.lr=grid(1e-3,-1)", "train.batch_size=randint(8,64)",
                          "train.schedule.warmup_steps=choice(0,500)"])
    with pytest.raises(SpecError) as caught:
        check_space(base, space, source)
    assert caught.value.problems == [  # each value with the others at their first
        "--param train.optimizer.lr=grid(1e-3,-1): at -1: train.optimizer.lr: -1.0 must be > 0",
        "--param train.schedule.warmup_steps=choice(0,500): at 500: train.schedule.warmup_steps: "
        "500 must be < train.steps (300)",
    ]
    # The first values together (lr 1e-3, batch size 0): named once, not again with each other value.
    with pytest.raises(SpecError) as caught:
        check_space(base, parse_params(["train.optimizer.lr=grid(1e-3,1e-2)", "train.batch_size=randint(0,8)"]),
                    source)
    assert caught.value.problems == ["--param train.batch_size=randint(0,8): at 0: train.batch_size: 0 must be "
                                     ">= 1 (samples per worker per step)"]
    ok = check_space(base, parse_params(["train.optimizer.lr=loguniform(1e-4,1e-2)",
                                         "scaling.num_workers=choice(1,3)"]), source)
    # first values; lr's high end; num_workers 3
    assert [job.spec.train.optimizer.lr for job in ok] == [1e-4, 1e-2, 1e-4]
    assert [job.spec.scaling.num_workers for job in ok] == [1, 1, 3]
    assert trial_resources(ok) == {"CPU": 3.0}


def test_a_secret_in_a_param_is_refused_as_in_a_spec(tmp_path):
    base, source = _base(tmp_path)
    space = parse_params(["tracking.uri=choice(http://u:hunter2@mlflow:5000,http://mlflow:5000)"])
    with pytest.raises(SpecError) as caught:
        check_space(base, space, source)
    text = str(caught.value)
    assert "tracking.uri" in text and "credentials" in text and "hunter2" not in text


def test_an_unknown_key_is_named_with_its_param(tmp_path):
    base, source = _base(tmp_path)
    with pytest.raises(SpecError) as caught:
        check_space(base, parse_params(["train.optimizr.lr=choice(1e-3)"]), source)
    assert caught.value.problems == ["--param train.optimizr.lr=choice(1e-3): at 0.001: train.optimizr: "
                                     "unknown key; did you mean 'optimizer'?"]


def test_trials_at_once_are_what_the_cluster_holds_at_most_the_limit():
    assert concurrency({"CPU": 2.0}, {"CPU": 8.0, "memory": 1e9}, None) == 4
    assert concurrency({"CPU": 2.0}, {"CPU": 8.0}, 3) == 3
    assert concurrency({"CPU": 2.0, "GPU": 2.0}, {"CPU": 16.0, "GPU": 3.0}, None) == 1
    with pytest.raises(ValueError, match=r"one trial needs GPU 2 \(cluster: 1\); lower scaling.num_workers"):
        concurrency({"CPU": 2.0, "GPU": 2.0}, {"CPU": 16.0, "GPU": 1.0}, None)


def test_request_problems_name_the_option():
    request = SweepRequest("vae/debug", [], [], metric=" ", mode="best", samples=0, scheduler="pbt",
                           max_concurrent=0, reduction_factor=1.0)
    assert [problem.split(":")[0] for problem in request_problems(request)] == [
        "--mode", "--scheduler", "--samples", "--max-concurrent", "--reduction-factor", "--metric", "--param"]


def test_a_bad_param_stops_the_command_before_ray_starts(tmp_path, capsys):
    import ray

    code = main(["sweep", "vae/debug", f"storage_path={tmp_path}", "--param", "train.optimizer.lr=grid(1e-3,0)",
                 "--metric", "eval/elbo", "--mode", "max"])
    err = capsys.readouterr().err
    assert code == 2 and "--param train.optimizer.lr=grid(1e-3,0): at 0: train.optimizer.lr: 0.0 must be > 0" in err
    assert not ray.is_initialized() and list(tmp_path.iterdir()) == []


def test_the_table_lists_trials_best_first_with_params_metric_steps_and_status():
    rows = [TrialRow("t1", {"lr": 0.003}, -29.5, 40, "completed"),
            TrialRow("t2", {"lr": 1e-06}, -44.84, 10, "stopped early"),
            TrialRow("t3", {"lr": 1e30}, None, 0, "failed", "NonFiniteError: non-finite values at step 2")]
    assert table(rows, ["lr"], "eval/elbo").splitlines() == [
        "trial  lr     eval/elbo  steps  status",
        "t1     0.003  -29.5      40     completed",
        "t2     1e-06  -44.84     10     stopped early",
        "t3     1e+30  -          0      failed: NonFiniteError: non-finite values at step 2",
    ]


def test_a_failed_trial_shows_its_own_exception_line():
    wrapped = RuntimeError("ray.exceptions.RayTaskError(NonFiniteError): ray::ImplicitFunc.train()\n"
                           "Traceback (most recent call last):\n  File \"x.py\", line 1\n"
                           "gentrain.nonfinite.NonFiniteError: non-finite values at step 2\n"
                           "(not retried: the same steps would fail the same way)")
    assert short_error(wrapped) == "gentrain.nonfinite.NonFiniteError: non-finite values at step 2"


def test_the_best_spec_is_the_base_with_the_params_and_runs_through_validation(tmp_path):
    from gentrain.validation import check_job

    base, source = _base(tmp_path, "train.steps=40")
    text = best_spec_text(base, {"train.optimizer.lr": 0.003, "job.config.latent_dim": 4}, "s-best", source)
    path = tmp_path / "best.yaml"
    path.write_text(text)
    spec = check_job(read_yaml(path), str(path)).spec
    assert (spec.name, spec.train.optimizer.lr, spec.job.config["latent_dim"], spec.train.steps) == (
        "s-best", 0.003, 4, 40)
    assert spec.storage_path == str(tmp_path) and math.isclose(spec.train.schedule.min_lr_ratio, 0.1)
