"""Ray cluster launcher configs in cluster/: valid for the installed Ray, safe, pinned.

    .venv/bin/pytest tests/unit/test_cluster_configs.py -q

Each config goes through what `ray up` does before it calls a cloud API: Ray's
prepare_config (defaults merged, node types filled) and validate_config (the JSON schema
ray/autoscaler/ray-schema.json that ships inside the ray package, plus Ray's own checks).
"""

from __future__ import annotations

import copy
import re
import tomllib
from pathlib import Path

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = {name: ROOT / "cluster" / f"{name}.yaml" for name in ("aws", "gcp", "onprem")}
CLOUD = ("aws", "gcp")

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PINS = dict(
    re.match(r"^([A-Za-z0-9_.\-]+)(?:\[[^\]]*\])?==(.+)$", d).groups()
    for d in PYPROJECT["project"]["dependencies"]
)
VERSION = PYPROJECT["project"]["version"]


def load(name: str) -> dict:
    return yaml.safe_load(CONFIGS[name].read_text())


def ray_up_validate(config: dict) -> dict:
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def install_commands(config: dict) -> list[list[str]]:
    """Each list of shell commands one kind of node runs to install software."""
    common = config.get("setup_commands", [])
    lists = [common + config.get("head_setup_commands", []), common + config.get("worker_setup_commands", [])]
    return [cmds for cmds in lists if any("pip install" in c for c in cmds)]


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_config_passes_rays_own_validation(name):
    prepared = ray_up_validate(load(name))
    assert prepared["head_node_type"] in prepared["available_node_types"]


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_validation_rejects_a_broken_copy(name):
    broken = load(name)
    broken["max_wokers"] = 4  # a typo: the schema allows no unknown top-level field
    with pytest.raises(jsonschema.ValidationError, match="max_wokers"):
        ray_up_validate(broken)
    if "available_node_types" in broken:
        broken = load(name)
        node = next(iter(broken["available_node_types"].values()))
        node["resources"] = {"GPU": "one"}
        with pytest.raises(jsonschema.ValidationError):
            ray_up_validate(broken)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_no_secrets_in_configs(name):
    text = CONFIGS[name].read_text()
    assert not re.search(r"AKIA[0-9A-Z]{16}|-----BEGIN|\"private_key\"|aws_secret_access_key", text)

    def walk(node, path=""):
        if isinstance(node, dict):
            for key, value in node.items():
                here = f"{path}.{key}"
                if key == "ssh_private_key":
                    assert isinstance(value, str) and value.startswith(("~", "/")), f"{here}: a path, not a key"
                elif re.search(r"password|secret|token|credential", str(key), re.I):
                    pytest.fail(f"{name}.yaml {here}: credentials never go in a cluster config")
                walk(value, here)
        elif isinstance(node, list):
            for i, value in enumerate(node):
                walk(value, f"{path}[{i}]")

    walk(load(name))


@pytest.mark.parametrize("name", CLOUD)
def test_cloud_configs_have_a_cpu_head_and_gpu_workers_from_zero(name):
    config = load(name)
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0 and head["resources"].get("CPU") == 0
    workers = {k: v for k, v in types.items() if k != config["head_node_type"]}
    gpus = sorted(v["resources"]["GPU"] for v in workers.values())
    assert gpus == [1, 8], gpus
    for key, node in workers.items():
        assert node["min_workers"] == 0, f"{key}: GPU nodes start only when a job asks"
        assert node["max_workers"] >= 1
        assert node["resources"]["CPU"] >= 1


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_installs_are_pinned_to_pyproject(name):
    config = load(name)
    lists = install_commands(config)
    assert lists, f"{name}: no install commands"
    for cmds in lists:
        torch = [i for i, c in enumerate(cmds) if re.search(r"pip install .*\btorch==", c)]
        gentrain = [i for i, c in enumerate(cmds) if "'gentrain==" in c]
        assert len(torch) == 1 and len(gentrain) == 1, cmds
        torch_cmd, gentrain_cmd = cmds[torch[0]], cmds[gentrain[0]]
        # torch first and from PyTorch's own index, so gentrain's install never swaps it.
        assert torch[0] < gentrain[0]
        assert f"torch=={PINS['torch']}" in torch_cmd
        assert "--index-url https://download.pytorch.org/whl/" in torch_cmd
        assert f"'gentrain=={VERSION}'" in gentrain_cmd
        assert f"'ray[default,train]=={PINS['ray']}'" in gentrain_cmd
    if "docker" in config:
        for key in ("head_image", "worker_image"):
            assert config["docker"][key].startswith(f"rayproject/ray:{PINS['ray']}-py311-"), key


@pytest.mark.parametrize("name", CLOUD)
def test_gpu_workers_get_cuda_torch_and_the_head_cpu_torch(name):
    config = load(name)
    (head_torch,) = [c for c in config["head_setup_commands"] if "torch==" in c]
    (worker_torch,) = [c for c in config["worker_setup_commands"] if "torch==" in c]
    assert head_torch.endswith("/whl/cpu")
    assert re.search(r"/whl/cu\d+$", worker_torch)
    assert config["docker"]["worker_image"].endswith("-gpu")
