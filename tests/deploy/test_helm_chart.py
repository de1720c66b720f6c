"""The Helm chart: lint, render, validate every object, check the secure defaults.

    .venv/bin/pytest tests/deploy -q

Needs helm (`make setup` puts it in .venv/bin via tools/get_helm.py). Core objects are
validated with kubernetes-validate --strict for a fixed Kubernetes version, the KubeRay
objects against helm/schemas/kuberay-v1.json, and every pod template inside them as a
real Pod. No cluster is needed: `helm template` renders offline in about 0.1 s.
"""

from __future__ import annotations

import copy
import functools
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "gentrain"
FULL_VALUES = CHART / "ci" / "full-values.yaml"
KUBERAY_SCHEMA = json.loads((ROOT / "helm" / "schemas" / "kuberay-v1.json").read_text())
K8S_VERSION = "1.33.0"


def find_helm() -> str | None:
    for candidate in (os.environ.get("HELM"), str(Path(sys.prefix) / "bin" / "helm"), shutil.which("helm")):
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return candidate
    return None


HELM = find_helm()
if HELM is None:
    message = "helm not found: run `make setup` or `python tools/get_helm.py`"
    if os.environ.get("CI"):  # CI installs helm; a missing one there is a broken setup
        raise RuntimeError(message)
    pytest.skip(message, allow_module_level=True)


def helm(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([HELM, *args], capture_output=True, text=True, timeout=60)


@functools.lru_cache(maxsize=None)
def _render(values: tuple[str, ...], sets: tuple[str, ...]) -> tuple[dict, ...]:
    args = ["template", "gt", str(CHART), "--namespace", "ml"]
    for v in values:
        args += ["-f", v]
    for s in sets:
        args += ["--set", s]
    out = helm(*args)
    assert out.returncode == 0, out.stderr
    return tuple(d for d in yaml.safe_load_all(out.stdout) if d)


def render(*values: str, sets: tuple[str, ...] = ()) -> list[dict]:
    return copy.deepcopy(list(_render(values, sets)))


def of_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def pod_specs(docs: list[dict]) -> list[tuple[str, dict, dict]]:
    """(where, pod metadata, pod spec) of every pod the objects would create."""
    found = []
    for d in docs:
        name = f"{d['kind']}/{d['metadata']['name']}"
        if d["kind"] in ("Deployment", "Job", "StatefulSet"):
            t = d["spec"]["template"]
            found.append((name, t.get("metadata", {}), t["spec"]))
        if d["kind"] in ("RayCluster", "RayJob"):
            spec = d["spec"] if d["kind"] == "RayCluster" else d["spec"]["rayClusterSpec"]
            head = spec["headGroupSpec"]["template"]
            found.append((f"{name} head", head.get("metadata", {}), head["spec"]))
            for g in spec.get("workerGroupSpecs", []):
                t = g["template"]
                found.append((f"{name} {g['groupName']}", t.get("metadata", {}), t["spec"]))
        if d["kind"] == "RayJob" and "submitterPodTemplate" in d["spec"]:
            t = d["spec"]["submitterPodTemplate"]
            found.append((f"{name} submitter", t.get("metadata", {}), t["spec"]))
    return found


def k8s_validate(obj: dict) -> None:
    kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def validate_all(docs: list[dict]) -> None:
    for d in docs:
        if d["apiVersion"].startswith("ray.io/"):
            jsonschema.validate(d, KUBERAY_SCHEMA)
        else:
            k8s_validate(d)
    # Pod templates inside the KubeRay objects are plain Kubernetes pod specs: validate
    # them as Pods so a misspelt container field cannot hide inside a custom resource.
    for where, meta, spec in pod_specs(docs):
        pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "check", **meta}, "spec": spec}
        try:
            k8s_validate(pod)
        except kubernetes_validate.ValidationError as e:
            raise AssertionError(f"{where}: {e}") from e


# ---------------------------------------------------------------- lint


@pytest.mark.parametrize("values", [(), (str(FULL_VALUES),)], ids=["default", "full"])
def test_helm_lint_strict(values):
    args = ["lint", "--strict", str(CHART)]
    for v in values:
        args += ["-f", v]
    out = helm(*args)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "0 chart(s) failed" in out.stdout


# ---------------------------------------------------------------- default values


def test_default_render_is_valid_and_has_the_core_objects():
    docs = render()
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == sorted(
        ["RayCluster", "Deployment", "Service", "PersistentVolumeClaim", "Secret", "Secret", "ConfigMap"]
    )
    validate_all(docs)


def test_default_raycluster_autoscales_gpu_workers_from_zero():
    (rc,) = of_kind(render(), "RayCluster")
    spec = rc["spec"]
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["rayVersion"] == "2.60.0"
    assert spec["authOptions"] == {"mode": "token", "secretName": "gt-gentrain-ray-token"}
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    (group,) = spec["workerGroupSpecs"]
    assert group["minReplicas"] == 0 and group["maxReplicas"] >= 1
    (worker,) = group["template"]["spec"]["containers"]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in group["template"]["spec"][
        "tolerations"
    ]


def test_secure_defaults():
    docs = render()
    for where, _, spec in pod_specs(docs):
        psc = spec["securityContext"]
        assert psc["runAsNonRoot"] is True, where
        assert psc["seccompProfile"]["type"] == "RuntimeDefault", where
        for c in spec["containers"]:
            sc = c["securityContext"]
            assert sc["runAsNonRoot"] is True, (where, c["name"])
            assert sc["allowPrivilegeEscalation"] is False, (where, c["name"])
            assert sc["capabilities"]["drop"] == ["ALL"], (where, c["name"])
            assert c["resources"]["requests"] and c["resources"]["limits"], (where, c["name"])
    # Nothing reachable from outside the cluster unless values say so.
    assert not of_kind(docs, "Ingress")
    for svc in of_kind(docs, "Service"):
        assert svc["spec"].get("type", "ClusterIP") == "ClusterIP", svc["metadata"]["name"]
    (rc,) = of_kind(docs, "RayCluster")
    assert rc["spec"]["headGroupSpec"]["serviceType"] == "ClusterIP"
    assert not rc["spec"]["headGroupSpec"].get("enableIngress", False)
    autoscaler_sc = rc["spec"]["autoscalerOptions"]["securityContext"]
    assert autoscaler_sc["allowPrivilegeEscalation"] is False and autoscaler_sc["runAsNonRoot"] is True
    # MLflow: basic auth on, credentials only through secretKeyRef, no API token mounted.
    (dep,) = of_kind(docs, "Deployment")
    pod = dep["spec"]["template"]["spec"]
    assert pod["automountServiceAccountToken"] is False
    (mlflow,) = pod["containers"]
    assert "--app-name=basic-auth" in mlflow["args"]
    assert mlflow["securityContext"]["readOnlyRootFilesystem"] is True
    env = {e["name"]: e for e in mlflow["env"]}
    for key in ("MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY"):
        assert "value" not in env[key] and env[key]["valueFrom"]["secretKeyRef"]["name"] == "gt-gentrain-mlflow-auth"


def test_generated_secrets_are_random_and_artifacts_on_the_pvc():
    docs = render()
    secrets = {s["metadata"]["name"]: s["data"] for s in of_kind(docs, "Secret")}
    assert set(secrets) == {"gt-gentrain-mlflow-auth", "gt-gentrain-ray-token"}
    assert set(secrets["gt-gentrain-mlflow-auth"]) == {"admin-username", "admin-password", "flask-secret-key"}
    # Two renders (no cluster to look up) must not share a password or a token.
    again = {s["metadata"]["name"]: s["data"] for s in of_kind(list(_render((), ("nameOverride=gentrain",))), "Secret")}
    assert again["gt-gentrain-mlflow-auth"]["admin-password"] != secrets["gt-gentrain-mlflow-auth"]["admin-password"]
    assert again["gt-gentrain-ray-token"]["auth_token"] != secrets["gt-gentrain-ray-token"]["auth_token"]
    (dep,) = of_kind(docs, "Deployment")
    args = dep["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--artifacts-destination=/mlflow/data/artifacts" in args
    (pvc,) = of_kind(docs, "PersistentVolumeClaim")
    assert pvc["metadata"]["name"] == "gt-gentrain-mlflow"


# ---------------------------------------------------------------- non-default values


def test_full_values_render_is_valid():
    docs = render(str(FULL_VALUES))
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == sorted(
        ["RayCluster", "RayJob", "Deployment", "Service", "ConfigMap", "ConfigMap", "Ingress", "Ingress", "ServiceAccount"]
    )
    validate_all(docs)


def test_existing_secrets_leave_no_credentials_in_the_manifests():
    docs = render(str(FULL_VALUES))
    assert not of_kind(docs, "Secret")
    text = yaml.safe_dump_all(docs)
    assert "admin-password:" not in text and "auth_token:" not in text
    for where, _, spec in pod_specs(docs) + [("mlflow", {}, of_kind(docs, "Deployment")[0]["spec"]["template"]["spec"])]:
        for c in spec["containers"]:
            for e in c.get("env", []):
                if any(w in e["name"] for w in ("PASSWORD", "SECRET", "TOKEN")):
                    assert "value" not in e, (where, e["name"])
                    assert e["valueFrom"]["secretKeyRef"]["name"] in ("mlflow-credentials", "ray-token"), e
    (rc,) = of_kind(docs, "RayCluster")
    assert rc["spec"]["authOptions"]["secretName"] == "ray-token"


def test_object_storage_artifacts_and_external_backend_store():
    docs = render(str(FULL_VALUES))
    assert not of_kind(docs, "PersistentVolumeClaim")
    (dep,) = of_kind(docs, "Deployment")
    pod = dep["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert "--artifacts-destination=s3://example-bucket/mlflow-artifacts" in c["args"]
    assert "--backend-store-uri=$(MLFLOW_BACKEND_STORE_URI)" in c["args"]
    backend = next(e for e in c["env"] if e["name"] == "MLFLOW_BACKEND_STORE_URI")
    assert backend["valueFrom"]["secretKeyRef"] == {"name": "mlflow-db", "key": "uri"}
    assert pod["serviceAccountName"] == "gt-gentrain-mlflow"
    assert all(v["name"] != "data" for v in pod["volumes"])


def test_ingresses_only_when_enabled_and_to_the_right_services():
    docs = render(str(FULL_VALUES))
    backends = {
        i["spec"]["rules"][0]["host"]: i["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
        for i in of_kind(docs, "Ingress")
    }
    assert backends["ray.example.com"] == {"name": "gt-gentrain-ray-head-svc", "port": {"number": 8265}}
    assert backends["mlflow.example.com"] == {"name": "gt-gentrain-mlflow", "port": {"name": "http"}}


def test_rayjob_runs_gentrain_on_the_configmap_spec(tmp_path):
    from gentrain.validation import load_spec

    docs = render(str(FULL_VALUES))
    (job,) = of_kind(docs, "RayJob")
    spec = job["spec"]
    assert spec["entrypoint"] == "gentrain run /spec/spec.yaml 'train.steps=5' 'scaling.num_workers=1'"
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] == 600
    assert spec["activeDeadlineSeconds"] == 3600
    head = spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    mount = next(m for m in head["containers"][0]["volumeMounts"] if m["name"] == "job-spec")
    assert mount["mountPath"] == "/spec"
    cm_name = next(v for v in head["volumes"] if v["name"] == "job-spec")["configMap"]["name"]
    (cm,) = [c for c in of_kind(docs, "ConfigMap") if c["metadata"]["name"] == cm_name]
    expected = yaml.safe_load(FULL_VALUES.read_text())["job"]["spec"]
    assert yaml.safe_load(cm["data"]["spec.yaml"]) == yaml.safe_load(expected)
    # The spec the cluster will run is one gentrain accepts, overrides applied.
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(cm["data"]["spec.yaml"])
    js = load_spec(str(spec_file), ["train.steps=5", "scaling.num_workers=1"])
    assert js.train.steps == 5 and js.scaling.use_gpu is True


def test_job_without_spec_and_bad_values_fail_with_the_field_named():
    out = helm("template", "gt", str(CHART), "--set", "job.enabled=true")
    assert out.returncode != 0 and "job.spec is empty" in out.stderr
    out = helm("template", "gt", str(CHART), "--set", "job.overrides[0]=a=b';rm -rf /")
    assert out.returncode != 0 and "/job/overrides/0" in out.stderr
    out = helm("template", "gt", str(CHART), "--set", "mlflow.backendStoreUri=postgresql://u:pw@db/mlflow")
    assert out.returncode != 0 and "backendStoreUri" in out.stderr
    out = helm("template", "gt", str(CHART), "--set", "containerSecurityContext.allowPrivilegeEscalation=true")
    assert out.returncode != 0 and "allowPrivilegeEscalation" in out.stderr


# ---------------------------------------------------------------- the checks can fail


def test_kuberay_schema_rejects_a_broken_raycluster():
    (rc,) = of_kind(render(), "RayCluster")
    jsonschema.validate(rc, KUBERAY_SCHEMA)
    typo = copy.deepcopy(rc)
    typo["spec"]["workerGroupSpecs"][0]["minReplica"] = typo["spec"]["workerGroupSpecs"][0].pop("minReplicas")
    with pytest.raises(jsonschema.ValidationError, match="minReplica"):
        jsonschema.validate(typo, KUBERAY_SCHEMA)
    no_head = copy.deepcopy(rc)
    del no_head["spec"]["headGroupSpec"]
    with pytest.raises(jsonschema.ValidationError, match="headGroupSpec"):
        jsonschema.validate(no_head, KUBERAY_SCHEMA)
    bad_mode = copy.deepcopy(rc)
    bad_mode["spec"]["autoscalerOptions"]["upscalingMode"] = "Fast"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad_mode, KUBERAY_SCHEMA)


def test_pod_template_inside_a_raycluster_is_checked_as_a_pod():
    docs = render()
    (rc,) = of_kind(docs, "RayCluster")
    rc["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["imagePullPolcy"] = "Always"
    jsonschema.validate(rc, KUBERAY_SCHEMA)  # the CR schema leaves pod specs to Kubernetes'
    with pytest.raises(AssertionError, match="imagePullPolcy"):
        validate_all([rc])


def test_kubernetes_validate_rejects_a_broken_core_object():
    (dep,) = of_kind(render(), "Deployment")
    dep["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["memroy"] = "1Gi"
    dep["spec"]["replicas"] = "one"
    with pytest.raises(kubernetes_validate.ValidationError):
        k8s_validate(dep)
