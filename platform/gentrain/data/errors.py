"""Errors of the data reading side, each saying which setting or command fixes it.

Kept apart from the modules that raise them so that `remote`, `reader`, `augment`
and `pipeline` can share them without importing each other.
"""

from __future__ import annotations


class DataConfigError(ValueError):
    """Batch size, world size, worker counts or data.* settings that this data set cannot serve."""


class ShardReadError(OSError):
    """A shard that is missing, truncated or corrupt, raised where it is read (data.on_error: fail).

    Takes one message argument only: PyTorch re-raises errors from DataLoader
    workers by calling the class with a single string, and any other signature
    would turn this into a bare RuntimeError in the training process.
    """


class UnsafeURLError(ValueError):
    """A shard URL the spec has not allowed: `pipe:` commands, or names escaping the index's folder."""


class MissingExtraError(ImportError):
    """A URL scheme whose optional backend (s3fs, gcsfs, ...) is not installed."""


class SkippedDataWarning(UserWarning):
    """A shard or sample was skipped because data.on_error is `skip`."""
