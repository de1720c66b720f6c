"""The folder `gentrain submit` uploads: a copy of the project without what never belongs on
a cluster, plus the resolved spec.

    with stage_working_dir(Path("."), {"spec.yaml": text}, excludes=["data/raw"]) as folder:
        runtime_env = {"working_dir": str(folder)}

A copy (not the project itself) so the resolved spec can sit at its root without
writing into the user's folder. Ray still applies the project's .gitignore/.rayignore
to the copy; a line added to the copy's own ignore files keeps the spec from being
matched by them.
"""

from __future__ import annotations

import contextlib
import fnmatch
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from gentrain.paths import is_remote

# Environments, caches, VCS data and run outputs: large, machine-specific or both.
DEFAULT_EXCLUDES = (".git", ".hg", ".venv", "venv", ".tox", "__pycache__", "*.pyc", ".pytest_cache",
                    ".mypy_cache", ".ruff_cache", "node_modules", "*.egg-info", ".ipynb_checkpoints",
                    "runs", "mlruns", "mlartifacts", "mlflow.db", "mlflow.db-journal", ".cache")
# Ray refuses packages over its gRPC message limit (about 512 MiB); fail earlier and clearer.
MAX_BYTES = 256 * 1024 * 1024


class WorkingDirTooLarge(ValueError):
    pass


def _ignore(root: Path, excludes: list[str], skip: list[Path], budget: list[int]):
    patterns = list(DEFAULT_EXCLUDES) + [e.strip("/") for e in excludes]

    def ignore(directory: str, names: list[str]) -> set[str]:
        ignored = set()
        for name in names:
            path = Path(directory) / name
            relative = path.relative_to(root).as_posix()
            if any(fnmatch.fnmatch(name, p) or fnmatch.fnmatch(relative, p) for p in patterns) or \
                    any(path == s or s in path.parents for s in skip):
                ignored.add(name)
                continue
            if path.is_file() and not path.is_symlink():
                budget[0] += path.stat().st_size
                if budget[0] > MAX_BYTES:
                    raise WorkingDirTooLarge(
                        f"--working-dir {root}: more than {MAX_BYTES >> 20} MiB to upload (reached at "
                        f"{relative}); exclude large folders with --exclude PATH, or put data on "
                        "storage the cluster reads (data.source=s3://... or a shared path)")
        return ignored

    return ignore


@contextlib.contextmanager
def stage_working_dir(project: Path, extra_files: dict[str, str], excludes: list[str],
                      skip: list[str] | None = None) -> Iterator[Path]:
    project = project.expanduser().resolve()
    if not project.is_dir():
        raise FileNotFoundError(f"--working-dir {project}: no such folder")
    skip_paths = [Path(p).expanduser().resolve() for p in (skip or []) if not is_remote(p)]
    with tempfile.TemporaryDirectory(prefix="gentrain-submit-") as temp:
        staged = Path(temp) / project.name
        shutil.copytree(project, staged, symlinks=True, ignore=_ignore(project, excludes, skip_paths, [0]))
        for name, text in extra_files.items():
            (staged / name).write_text(text, encoding="utf-8")
            for ignore_file in (".gitignore", ".rayignore"):
                if (staged / ignore_file).is_file():
                    with open(staged / ignore_file, "a", encoding="utf-8") as fh:
                        fh.write(f"\n!/{name}\n")
        yield staged
