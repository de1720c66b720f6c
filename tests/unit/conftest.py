"""Data sets shared by the unit tests (packed once per session)."""

import pytest

from gentrain.data.index import load_index
from gentrain.data.pack import pack_source


@pytest.fixture(scope="session")
def small_dir(tmp_path_factory):
    """Digits with a 180-sample train split in 9 shards of 20: whole epochs stay quick."""
    out = tmp_path_factory.mktemp("small")
    pack_source("digits", out, per_shard=20, test_fraction=0.9, progress=False)
    return out


@pytest.fixture(scope="session")
def small(small_dir):
    return load_index(str(small_dir))
