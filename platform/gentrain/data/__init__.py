"""Packed data sets: built-in sources, shard packing, the index, and per-rank batches.

    gentrain data pack digits --out data/digits
"""

from gentrain.data.index import DatasetIndex, load_index, resolve_builtin
from gentrain.data.pack import pack_source
from gentrain.data.pipeline import batches_per_epoch, eval_batches, train_batches
from gentrain.data.sources import known_sources

__all__ = [
    "DatasetIndex",
    "batches_per_epoch",
    "eval_batches",
    "known_sources",
    "load_index",
    "pack_source",
    "resolve_builtin",
    "train_batches",
]
