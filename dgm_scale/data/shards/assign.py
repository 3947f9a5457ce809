"""Which samples of an epoch each (rank, worker) reads, as pure functions, so that a stream can
be re-dealt to another world size mid-epoch and tests can deal to simulated ranks.

With known sample counts (a manifest) an epoch of one source is a sequence of positions: its
shards in the epoch's order, concatenated. What is left of the epoch is a list of position
ranges (the whole epoch: one range). Dealing cuts that list into `world` contiguous pieces
whose lengths differ by at most one, and each rank's piece into `workers` pieces the same way:

    slot_ranges(left, world, rank, workers, worker)

So ranks differ by at most one sample per source, and a resumed epoch on another world size is
the same function applied to what was left. What was left after an interruption is a function
of the old deal and each old (rank, worker)'s count of delivered samples (`leftover`): a worker
delivers its items in the order its pipeline makes them - the sources mixed by weight, then
the shuffle buffer, both seeded by (seed, epoch, rank, worker) - so replaying that pipeline on
positions alone says which positions it delivered: everything it pulled from its ranges except
what still waited in the shuffle buffer. The replay is index arithmetic, no I/O; its cost grows
with the samples the interrupted epoch consumed, once per rank at load.
"""
from __future__ import annotations

import bisect
import itertools
import random
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

from .mixing import Shuffler, mix
from .urls import Shard

Range = Tuple[int, int]  # [start, stop) positions in one source's epoch sequence
Ranges = List[Range]


def rng_for(*parts: object) -> random.Random:
    """A generator seeded by a tuple of values (string seeds are hashed with SHA-512)."""
    return random.Random("/".join(map(str, parts)))


def length(ranges: Sequence[Range]) -> int:
    return sum(stop - start for start, stop in ranges)


class Span:
    """Position ranges with their running lengths, so that cutting a piece costs O(log n): the
    deal of a large leftover (many ranges) to many slots stays cheap."""

    def __init__(self, ranges: Sequence[Range]):
        self.ranges = [tuple(r) for r in ranges]
        self.ends = list(itertools.accumulate(stop - start for start, stop in self.ranges))

    def __len__(self) -> int:
        return self.ends[-1] if self.ends else 0

    def between(self, begin: int, end: int) -> Ranges:
        """The positions from the `begin`-th to before the `end`-th, as ranges."""
        out: Ranges = []
        i = bisect.bisect_right(self.ends, begin)
        while begin < end and i < len(self.ranges):
            start, stop = self.ranges[i]
            offset = self.ends[i] - (stop - start)
            hi = min(end, self.ends[i])
            out.append((start + begin - offset, start + hi - offset))
            begin, i = hi, i + 1
        return out


def cut(ranges: Union[Sequence[Range], Span], parts: int, index: int) -> Ranges:
    """Piece `index` of `parts` contiguous pieces of the concatenated ranges; piece lengths
    differ by at most one (the first ones are longer)."""
    span = ranges if isinstance(ranges, Span) else Span(ranges)
    size, extra = divmod(len(span), parts)
    begin = index * size + min(index, extra)
    return span.between(begin, begin + size + (index < extra))


def slot_ranges(left: Union[Sequence[Range], Span], world: int, rank: int, workers: int, worker: int) -> Ranges:
    """The positions (of one source) that `worker` of `rank` reads: the rank's piece of what is
    left of the epoch, then the worker's piece of that (`left` as a Span when dealing it often)."""
    return cut(cut(left, world, rank), workers, worker)


def positions(ranges: Sequence[Range]) -> Iterator[int]:
    for start, stop in ranges:
        yield from range(start, stop)


def merged(ranges: Sequence[Range]) -> Ranges:
    """Sorted, with touching or overlapping ranges joined."""
    out: Ranges = []
    for start, stop in sorted(r for r in ranges if r[0] < r[1]):
        if out and start <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], stop))
        else:
            out.append((start, stop))
    return out


def undelivered(slot: Sequence[Ranges], delivered: int, weights: Sequence[float], buffer: int,
                seed: int, epoch: int, rank: int, worker: int) -> List[Ranges]:
    """Per source, the positions of a worker's ranges (`slot`, per source) that it had not
    delivered after `delivered` items: replays its mixing and shuffle buffer on positions."""
    pulled = [0] * len(slot)

    def source(k: int) -> Iterator[Tuple[int, int]]:
        for position in positions(slot[k]):
            pulled[k] += 1
            yield k, position

    streams = [source(k) for k in range(len(slot))]
    shuffler = Shuffler(buffer, rng_for(seed, epoch, rank, worker, "shuffle"))
    outputs = shuffler.run(mix(streams, list(weights), rng_for(seed, epoch, rank, worker, "mix")))
    for _ in range(delivered):
        if next(outputs, None) is None:
            return [[] for _ in slot]  # all of it delivered (a worker that wrapped around, too)
    left: List[Ranges] = []
    for k, ranges in enumerate(slot):
        waiting = [(position, position + 1) for j, position in shuffler.buffer if j == k]
        left.append(merged(waiting + after(ranges, pulled[k])))
    return left


def after(ranges: Sequence[Range], count: int) -> Ranges:
    """`ranges` without their first `count` positions."""
    out: Ranges = []
    for start, stop in ranges:
        skip = min(count, stop - start)
        count -= skip
        if start + skip < stop:
            out.append((start + skip, stop))
    return out


def leftover(left: Sequence[Ranges], world: int, workers: int, delivered: Dict[Tuple[int, int], int],
             weights: Sequence[float], buffer: int, seed: int, epoch: int) -> List[Ranges]:
    """Per source, what is left of the epoch after each (rank, worker) of the deal of `left`
    (per source) over world x workers delivered `delivered[rank, worker]` items (0 if absent)."""
    out: List[Ranges] = [[] for _ in left]
    spans = [Span(ranges) for ranges in left]
    for rank in range(world):
        for worker in range(workers):
            slot = [slot_ranges(span, world, rank, workers, worker) for span in spans]
            count = delivered.get((rank, worker), 0)
            rest = undelivered(slot, count, weights, buffer, seed, epoch, rank, worker) if count else slot
            for k, ranges in enumerate(rest):
                out[k] += ranges
    return [merged(ranges) for ranges in out]


@dataclass(frozen=True)
class Piece:
    """Samples [start, stop) of a shard (stop None: to its end, its count perhaps unknown)."""

    shard: Shard
    start: int = 0
    stop: Optional[int] = None


def shard_offsets(order: Sequence[Shard]) -> List[int]:
    """Where each shard's samples start in the concatenation of `order`."""
    return [0, *itertools.accumulate(shard.num_samples for shard in order)][:-1]


def pieces_for(order: Sequence[Shard], left: Union[Ranges, Span], world: int, rank: int, workers: int, worker: int,
               offsets: Optional[List[int]] = None) -> List[Piece]:
    """What `worker` of `rank` reads of one source (ranged mode): its slot of the positions `left`
    (assign.slot_ranges) as pieces of the shards in their epoch `order` (`offsets`: their
    shard_offsets, when dealing often). Pure: tests deal to simulated ranks with it."""
    offsets = shard_offsets(order) if offsets is None else offsets
    pieces: List[Piece] = []
    for start, stop in slot_ranges(left, world, rank, workers, worker):
        i = bisect.bisect_right(offsets, start) - 1
        while start < stop:
            end = min(stop, offsets[i] + order[i].num_samples)
            pieces.append(Piece(order[i], start - offsets[i], end - offsets[i]))
            start, i = end, i + 1
    return pieces
