"""Built-in gentrain job types (model families).

Each family is a folder with `__init__.py` defining `JOB = JobType(...)`, its networks
(`model.py`), its objective (`objective.py`) and `specs/` (a `debug.yaml` that trains in
seconds on a CPU, plus real specs). Adding a family: docs/job-types.md (the contract,
the checklist and a complete example); in short

1. Create `jobs/gentrain_jobs/<name>/` with a config dataclass, `build`, `train_step`,
   `sample` (and `evaluate` with declared `likelihoods` if it has a likelihood).
2. Register it in pyproject.toml under `[project.entry-points."gentrain.jobs"]`.
3. Add `specs/debug.yaml`, tests of its mathematics and a test that it learns.
"""
