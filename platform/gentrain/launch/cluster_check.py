"""Before training on a Ray cluster of several nodes: every node must see `storage_path`
and a local `data.source`, or the run fails late (a worker cannot read its shards) or,
worse, silently (checkpoints scattered over nodes' local disks, so a restart cannot
resume).

    ray.init(address=...)
    check_shared_paths(spec)   # no-op on one node and for s3://, gs://, ... URIs

The driver writes a marker file with a random token under `storage_path` and a task
pinned to each alive node reads it back; for the data it reads `index.json`. A path is
shared only where every node sees the same bytes, which is what checkpoints need; a
path that merely exists on each node (same name, different disks) fails, as it must.
"""

from __future__ import annotations

import secrets
from pathlib import Path

from gentrain.paths import is_local_path
from gentrain.spec import JobSpec

MARKER_PREFIX = ".gentrain-shared-check-"
PROBE_TIMEOUT_S = 120.0


class NotSharedError(ValueError):
    """A path the job needs on every node is missing on some."""


def _read_on_node(paths: list[str]) -> list[str | None]:
    """Runs on one node: each file's text, or None where this node cannot read it."""
    texts = []
    for path in paths:
        try:
            texts.append(Path(path).read_text(encoding="utf-8"))
        except OSError:
            texts.append(None)
    return texts


def _alive_nodes() -> list[dict]:
    import ray

    return [node for node in ray.nodes() if node.get("Alive")]


def read_everywhere(paths: list[str]) -> dict[str, list[str | None]]:
    """{node address: [text of each path or None]} from a task pinned to every alive node."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    reader = ray.remote(num_cpus=0, max_retries=0)(_read_on_node)
    nodes = _alive_nodes()
    refs = [reader.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False))
            .remote(paths) for node in nodes]
    try:
        results = ray.get(refs, timeout=PROBE_TIMEOUT_S)
    except ray.exceptions.GetTimeoutError:
        raise NotSharedError(f"could not check that every node sees {', '.join(paths)}: a task on each of "
                             f"the {len(nodes)} nodes did not answer in {PROBE_TIMEOUT_S:.0f} s") from None
    labels = [f"{node.get('NodeManagerAddress', '?')} (node {node['NodeID'][:8]})" for node in nodes]
    return dict(zip(labels, results))


def check_shared_paths(spec: JobSpec) -> None:
    """Raise NotSharedError, naming the field, the nodes and the fix, when a path the job
    writes or reads is not the same on every node of a multi-node cluster."""
    if len(_alive_nodes()) <= 1:
        return
    checks = []  # (field, file to read, expected text or None for "any", fix)
    marker = None
    if is_local_path(spec.storage_path):
        folder = Path(spec.storage_path)
        folder.mkdir(parents=True, exist_ok=True)
        marker = folder / f"{MARKER_PREFIX}{secrets.token_hex(8)}"
        token = secrets.token_hex(16)
        marker.write_text(token, encoding="utf-8")
        checks.append(("storage_path", str(marker), token,
                       "every worker writes its checkpoint there and a restart reads it back. Use "
                       "storage_path=s3://bucket/prefix or gs://bucket/prefix, or a shared file system "
                       "(NFS, ...) mounted at the same path on every node"))
    if is_local_path(spec.data.source):
        index = Path(spec.data.source) / "index.json"
        checks.append(("data.source", str(index), index.read_text(encoding="utf-8") if index.is_file() else None,
                       "every worker reads its shards from there. Pack the data onto shared storage "
                       "(`gentrain data pack SOURCE --out /shared/path`, or an s3:// or gs:// folder); "
                       "for builtin: sources set GENTRAIN_CACHE to a shared folder on every node"))
    if not checks:
        return
    try:
        seen = read_everywhere([path for _, path, _, _ in checks])
    finally:
        if marker is not None:
            marker.unlink(missing_ok=True)
    problems = []
    for i, (field, path, expected, fix) in enumerate(checks):
        missing = [node for node, texts in seen.items()
                   if texts[i] is None or (expected is not None and texts[i] != expected)]
        if missing:
            value = spec.storage_path if field == "storage_path" else spec.data.source
            problems.append(f"{field}: {value} is not shared by all {len(seen)} nodes of this Ray cluster "
                            f"({path} is missing or different on {', '.join(missing)}); {fix}")
    if problems:
        raise NotSharedError("\n".join(problems))

