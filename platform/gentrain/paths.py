"""Where a path points: this machine's file system, or a URL (s3://, gs://, http(s)://...).

A leaf module (imports nothing from gentrain): the spec's checks, checkpoints and the
launchers all ask it, so the rule is written once.
"""

from __future__ import annotations


def is_remote(path: str) -> bool:
    """A URL with a scheme (s3://bucket/runs, gs://..., http://...), not a local path."""
    return "://" in path


def is_local_path(value: str) -> bool:
    """A local file or folder: not a URL, not `builtin:NAME`, not a `pipe:` command."""
    return not is_remote(value) and not value.startswith(("builtin:", "pipe:"))
