"""A user's own job type, installed as a package not named after it, and the config field
types its dataclass may use: found by `gentrain list` / `validate`, checked field by field."""

import enum
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import pytest

import gentrain.registry
from gentrain.cli import main
from gentrain.registry import Registry, job_config
from gentrain.schema import SpecError, build, to_dict
from gentrain.validation import find_spec_file, load_spec

TOYFLOW = textwrap.dedent('''\
    from dataclasses import dataclass, field
    from pathlib import Path

    from gentrain.registry import JobType


    @dataclass
    class ToyFlowConfig:
        image_shape: tuple[int, int] = (8, 8)
        widths: tuple[int, ...] = (16, 32)
        {extra}


    JOB = JobType(name="toyflow", config=ToyFlowConfig, build=lambda config, info: {{}},
                  train_step=lambda ctx, batch: {{}}, sample=lambda modules, n, generator: None,
                  spec_dir=str(Path(__file__).parent / "bundled"), description="a toy flow")
    ''')


@pytest.fixture
def toyflow(tmp_path, monkeypatch):
    """Install `toyflow_gentrain` (entry point toyflow = toyflow_gentrain:JOB) on sys.path,
    as pip would, and load the registry afresh from the entry points."""
    def install(extra: str = "") -> Path:
        package = tmp_path / "toyflow_gentrain"
        (package / "bundled").mkdir(parents=True)
        (package / "__init__.py").write_text(TOYFLOW.format(extra=extra))
        (package / "bundled" / "debug.yaml").write_text(
            "name: toyflow-debug\njob:\n  type: toyflow\n  config: {image_shape: [4, 4]}\n")
        dist = tmp_path / "toyflow_gentrain-0.1.dist-info"
        dist.mkdir()
        (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: toyflow-gentrain\nVersion: 0.1\n")
        (dist / "entry_points.txt").write_text("[gentrain.jobs]\ntoyflow = toyflow_gentrain:JOB\n")
        monkeypatch.syspath_prepend(str(tmp_path))
        monkeypatch.delitem(__import__("sys").modules, "toyflow_gentrain", raising=False)
        registry = Registry()
        registry.load_entry_points()
        monkeypatch.setattr(gentrain.registry, "_default", registry)
        return package

    return install


def test_plugin_specs_resolve_through_the_declared_spec_dir(toyflow, capsys):
    package = toyflow()
    assert find_spec_file("toyflow/debug") == package / "bundled" / "debug.yaml"
    assert main(["list"]) == 0
    listing = capsys.readouterr().out
    assert "toyflow" in listing and "  toyflow/debug" in listing
    assert main(["validate", "toyflow/debug", "job.config.widths=[8, 8, 8]"]) == 0
    assert "toyflow/debug: ok (toyflow," in capsys.readouterr().out
    config = job_config(load_spec("toyflow/debug"))
    assert config.image_shape == (4, 4) and config.widths == (16, 32)


def test_plugin_tuple_fields_give_clear_errors(toyflow, capsys):
    toyflow()
    assert main(["validate", "toyflow/debug", "job.config.image_shape=[4, 4, 4]", "job.config.widths=[8, x]"]) == 2
    err = capsys.readouterr().err
    assert "job.config.image_shape: [4, 4, 4] has 3 items; expected a list of 2 (int, int), e.g. [1, 1]" in err
    assert "job.config.widths[1]: 'x' is not int" in err


def test_an_unsupported_field_type_is_a_spec_error_naming_field_and_type(toyflow, capsys):
    toyflow(extra="tags: set[str] = field(default_factory=set)")
    assert main(["validate", "toyflow/debug"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    assert "job.config.tags: type set[str] (in ToyFlowConfig) is not supported in a spec; use bool, int" in err


class Mode(enum.Enum):
    FAST = "fast"
    EXACT = "exact"


@dataclass
class Inner:
    depth: int = 2


@dataclass
class PlainTypes:
    size: tuple[int, int] = (2, 3)
    scales: tuple[float, ...] = (1.0,)
    maybe: tuple[int | None, ...] = ()
    limit: Optional[int] = None
    names: list[str] = field(default_factory=list)
    weights: dict[str, float] = field(default_factory=dict)
    kind: Literal["a", "b"] = "a"
    inner: Inner = field(default_factory=Inner)
    flag: bool = False
    anything: Any = None
    path: Path = Path(".")
    mode: Mode = Mode.FAST


def built(data: dict):
    problems: list[str] = []
    value = build(PlainTypes, data, "job.config", problems)
    if problems:
        raise SpecError(problems)
    return value


def test_plain_types_a_user_writes_convert_from_yaml_lists_and_back():
    config = built({"size": [4, 5], "scales": [1, 2.5], "maybe": [1, None], "limit": 3, "names": ["x"],
                    "weights": {"a": 1}, "kind": "b", "inner": {"depth": 4}, "flag": True,
                    "anything": {"k": [1]}, "path": "~/data", "mode": "exact"})
    assert config.size == (4, 5) and config.scales == (1.0, 2.5) and config.maybe == (1, None)
    assert (config.limit, config.names, config.weights, config.kind) == (3, ["x"], {"a": 1.0}, "b")
    assert config.inner == Inner(4) and config.path == Path("~/data") and config.mode is Mode.EXACT
    plain = to_dict(config)
    assert plain["size"] == [4, 5] and plain["path"] == "~/data" and plain["mode"] == "exact"
    assert built(plain) == config


def test_plain_types_report_each_problem_with_its_path():
    with pytest.raises(SpecError) as info:
        built({"size": [1], "scales": 3, "maybe": ["x"], "limit": 2**70, "weights": {1: 2.0},
               "kind": "c", "inner": {"depth": "deep"}, "flag": 1, "path": 5, "mode": "slow"})
    problems = info.value.problems
    assert "job.config.size: [1] has 1 items; expected a list of 2 (int, int), e.g. [1, 1]" in problems
    assert "job.config.scales: 3 is not a list of float" in problems
    assert "job.config.maybe[0]: 'x' is not int or null" in problems
    assert any(p.startswith(f"job.config.limit: {2**70} is out of range") for p in problems)
    assert "job.config.weights: key 1 is not a string; quote it" in problems
    assert "job.config.kind: 'c' is not one of 'a', 'b'" in problems
    assert "job.config.inner.depth: 'deep' is not int" in problems
    assert "job.config.flag: 1 is not bool" in problems
    assert "job.config.path: 5 is not a path" in problems
    assert "job.config.mode: 'slow' is not one of 'fast', 'exact'" in problems
    assert len(problems) == 10
