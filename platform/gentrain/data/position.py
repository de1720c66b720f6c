"""Where the training data continues, in terms that survive a change of world size.

    position = DataPosition(epoch=3, deal_world=2, global_batch=10)
    batches = continue_batches(index, "train", 16, rank=0, world_size=1, seed=0, position=position)

An epoch is dealt by the world that starts it (`deal_world` ranks, `pipeline.train_batches`):
rank q of that world yields its stream of `per_epoch(deal_world)` batches. Those streams,
interleaved round-robin, are the epoch's *global batch sequence*: global batch g is batch
g // deal_world of stream g % deal_world. A world of the same size consumes it in order
(after k batches per rank it has consumed global batches [0, k * deal_world)), so the
position of a run is (epoch, deal_world, global_batch), whatever world made it.

The rule on a change of world size (any resume whose world differs from the epoch's deal):
the new world of W ranks finishes the epoch in progress on the old deal, rank r taking
global batches g + r, g + r + W, ... (every rank re-reads the old streams and keeps its
share), as long as every rank still gets one: the last (T - g) mod W global batches of the
epoch (T = deal_world x per_epoch(deal_world)), fewer than W, are dropped. So within that
epoch no sample is seen twice and none is skipped, except those < W batches at its end
(and what the pipeline itself drops or repeats for unbalanced shards, as in any epoch).
The next epoch is dealt by the new world. `train.batch_size` (per rank) must stay the same
across such a resume: a global batch is a batch of one rank.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable, Iterator


@dataclass(frozen=True)
class DataPosition:
    epoch: int = 0
    deal_world: int = 1  # the world size whose deal the epoch uses
    global_batch: int = 0  # global batches of the epoch consumed

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "DataPosition":
        return cls(int(data["epoch"]), int(data["deal_world"]), int(data["global_batch"]))

    @classmethod
    def of_rank_count(cls, batches: int, world_size: int, per_epoch: int) -> "DataPosition":
        """A world of `world_size` ranks that has drawn `batches` per rank from the start."""
        epoch, within = divmod(batches, per_epoch)
        return cls(epoch, world_size, within * world_size)


def advance(position: DataPosition, batches: int, world_size: int,
            per_epoch: Callable[[int], int]) -> DataPosition:
    """The position after each of `world_size` ranks drew `batches` more from `position`
    (`per_epoch(w)`: batches per rank per epoch in a world of w ranks)."""
    epoch, deal, done = position.epoch, position.deal_world, position.global_batch
    if deal != world_size or done % world_size:
        left = (deal * per_epoch(deal) - done) // world_size  # this world's share of the rest
        if batches < left:
            return DataPosition(epoch, deal, done + batches * world_size)
        batches -= left
        epoch, deal, done = epoch + 1, world_size, 0
    per = per_epoch(world_size)
    full, within = divmod(done // world_size + batches, per)
    return DataPosition(epoch + full, world_size, within * world_size)


class Handover:
    """This rank's batches of an epoch dealt by another world, then the stream of its own
    world (`following`, a callable giving the pipeline from the next epoch on). Counts the
    skipped samples (data.on_error=skip) of the batches it yields, as `pipeline.Batches`."""

    def __init__(self, old_streams: list, start: int, end: int, rank: int, world_size: int,
                 following: Callable[[], Iterator[dict]]):
        self._old, self._following_factory = old_streams, following
        self._next_global, self._end = start, end
        self._rank, self._world = rank, world_size
        self._taken = [0] * len(old_streams)  # batches drawn from each old stream
        self._following = None
        self._skipped_before = 0

    @property
    def skipped_samples(self) -> int:
        following = self._following.skipped_samples if self._following is not None else 0
        return self._skipped_before + following

    def __iter__(self) -> "Handover":
        return self

    def __next__(self) -> dict:
        if self._following is None:
            mine = self._next_global + self._rank
            if mine < self._end:
                self._next_global += self._world
                return self._global(mine)
            self._old = []  # the handed-over epoch is done: its readers go
            self._following = self._following_factory()
        return next(self._following)

    def _global(self, number: int) -> dict:
        deal = len(self._old)
        stream, local = number % deal, number // deal
        source = self._old[stream]
        while self._taken[stream] < local:  # another rank's share (or consumed before)
            next(source)
            self._taken[stream] += 1
        before = source.skipped_samples
        batch = next(source)
        self._taken[stream] += 1
        self._skipped_before += source.skipped_samples - before
        return batch


def continue_batches(position: DataPosition, rank: int, world_size: int, per_epoch: Callable[[int], int],
                     stream: Callable[..., Iterator[dict]]) -> Iterator[dict]:
    """This rank's batches from `position`. `stream(rank, world_size, start_epoch, start_batch)`
    is `pipeline.train_batches` with the run's other settings bound."""
    if position.deal_world == world_size and position.global_batch % world_size == 0:
        return stream(rank, world_size, position.epoch, position.global_batch // world_size)
    deal = position.deal_world
    old = [stream(q, deal, position.epoch, 0) for q in range(deal)]
    total = deal * per_epoch(deal)
    end = position.global_batch + (total - position.global_batch) // world_size * world_size
    return Handover(old, position.global_batch, end, rank, world_size,
                    lambda: stream(rank, world_size, position.epoch + 1, 0))
