"""Continuing an epoch on another number of workers (gentrain.data.position), on the bundled
digits: the batches read before the change and after it, by every rank, are the epoch's global
batch sequence exactly once (no batch twice, none skipped but the stated < W batches at its end).

    PYTHONPATH=platform:jobs .venv/bin/python -m pytest tests/unit/test_data_position.py -q
"""

import functools
from collections import Counter

import pytest

from gentrain.data import load_index, train_batches
from gentrain.data.pipeline import batches_per_epoch
from gentrain.data.position import DataPosition, advance, continue_batches

BATCH = 16


@pytest.fixture(scope="module")
def index():
    return load_index("builtin:digits")


def stream(index, rank, world_size, start_epoch, start_batch):
    return train_batches(index, "train", BATCH, rank, world_size, seed=3, shuffle_buffer=64,
                         start_epoch=start_epoch, start_batch=start_batch, with_keys=True)


def keys(batches, count):
    return [tuple(next(batches)["key"]) for _ in range(count)]


def epoch_sequence(index, world, per_epoch):
    """An uninterrupted world's epoch 0 as global batches: stream g % world, batch g // world."""
    ranks = [keys(stream(index, q, world, 0, 0), per_epoch(world)) for q in range(world)]
    return [ranks[g % world][g // world] for g in range(world * per_epoch(world))]


@pytest.mark.parametrize("old, new, drawn", [(2, 1, 5), (1, 2, 7), (2, 3, 4), (3, 2, 1)])
def test_a_changed_world_finishes_the_epoch_on_the_old_deal(index, old, new, drawn):
    per_epoch = functools.partial(batches_per_epoch, index, "train", BATCH)
    sequence = epoch_sequence(index, old, per_epoch)
    before = [b for q in range(old) for b in keys(stream(index, q, old, 0, 0), drawn)]
    position = DataPosition(0, old, drawn * old)
    left = (len(sequence) - position.global_batch) // new  # each new rank's share of the epoch
    after = []
    following = []
    for rank in range(new):
        batches = continue_batches(position, rank, new, per_epoch, functools.partial(stream, index))
        after += keys(batches, left)
        following.append(keys(batches, 2))  # the next epoch, dealt by the new world
    seen = Counter(before + after)
    assert max(seen.values()) == 1  # no batch twice
    dropped = (len(sequence) - position.global_batch) % new
    assert set(seen) == set(sequence[:len(sequence) - dropped]) and dropped < new  # none skipped but those
    # And so each sample as often as in the uninterrupted epoch (once, but for what the
    # pipeline itself repeats for shards of unequal sizes: the digits' are).
    samples = Counter(key for batch in before + after for key in batch)
    assert samples == Counter(key for batch in sequence[:len(sequence) - dropped] for key in batch)
    for rank in range(new):  # epoch 1 exactly as a world of `new` ranks reads it from the start
        fresh = stream(index, rank, new, 0, 0)
        keys(fresh, per_epoch(new))
        assert following[rank] == keys(fresh, 2)


def test_advance_counts_a_handover_then_whole_epochs_of_the_new_world():
    per = {1: 10, 2: 5, 3: 3}.__getitem__  # batches per rank per epoch (30 samples, batch 3 say)
    start = DataPosition(4, 2, 6)  # epoch 4 dealt to 2 ranks, 6 of its 10 global batches read
    # One rank finishes the 4 left, then its own epochs of 10.
    assert advance(start, 3, 1, per) == DataPosition(4, 2, 9)
    assert advance(start, 4, 1, per) == DataPosition(5, 1, 0)
    assert advance(start, 4 + 23, 1, per) == DataPosition(7, 1, 3)
    # Three ranks: one round of 3 (1 batch dropped), then epochs of 3 per rank.
    assert advance(start, 1, 3, per) == DataPosition(5, 3, 0)
    assert advance(start, 1 + 4, 3, per) == DataPosition(6, 3, 3)
    one_at_a_time = start
    for _ in range(27):
        one_at_a_time = advance(one_at_a_time, 1, 1, per)
    assert one_at_a_time == advance(start, 27, 1, per)
    # The same world: the per-rank count, as before data positions existed.
    assert advance(DataPosition(0, 2, 0), 12, 2, per) == DataPosition.of_rank_count(12, 2, 5) == DataPosition(2, 2, 4)


def test_the_resume_line_names_a_change_of_world_or_strategy_and_only_then():
    import gentrain
    from gentrain.engine import resume_change

    spec = gentrain.load("vae/debug", [])  # ddp
    zero3 = {"name": "deepspeed", "zero_stage": 3}
    assert resume_change({"world_size": 2, "spec": {"strategy": zero3}}, spec, 1) == (
        "resuming 2 workers deepspeed-zero3 checkpoint on 1 worker ddp: optimizer state re-sharded from the "
        "strategy-neutral files")
    assert resume_change({"world_size": 1, "spec": spec.to_dict()}, spec, 2).startswith(
        "resuming 1 worker ddp checkpoint on 2 workers ddp:")
    assert resume_change({"world_size": 2, "spec": spec.to_dict()}, spec, 2) is None
    assert resume_change({"world_size": 2}, spec, 2) is None  # a checkpoint without its spec: as before
