"""Order-making pieces of the stream, generic over the items they move (so the resume logic
can replay them on plain indices): weighted mixing, the shuffle buffer, even per-rank caps."""
from __future__ import annotations

import random
from typing import Iterable, Iterator, List, Sequence, TypeVar

T = TypeVar("T")


def mix(iterators: Sequence[Iterator[T]], weights: Sequence[float],
        rng: random.Random) -> Iterator[T]:
    """Interleave iterators, drawing the next one with probability proportional to its weight
    among those not yet exhausted; ends when all are exhausted."""
    if len(iterators) == 1:
        yield from iterators[0]
        return
    active = list(range(len(iterators)))
    while active:
        k = rng.choices(active, [weights[i] for i in active])[0]
        try:
            yield next(iterators[k])
        except StopIteration:
            active.remove(k)


class Shuffler:
    """Shuffle buffer of `size` items: once full, each new item replaces a random slot whose
    old item is emitted; at the end the rest is emitted in random order. `buffer` stays
    inspectable (the resume replay reads which items were still waiting)."""

    def __init__(self, size: int, rng: random.Random):
        self.size, self.rng = size, rng
        self.buffer: List = []

    def run(self, items: Iterable[T]) -> Iterator[T]:
        if self.size <= 1:
            yield from items
            return
        buffer, size, rng = self.buffer, self.size, self.rng
        for item in items:
            if len(buffer) < size:
                buffer.append(item)
                continue
            slot = rng.randrange(size)
            out, buffer[slot] = buffer[slot], item
            yield out
        rng.shuffle(buffer)
        while buffer:
            yield buffer.pop()


def trim_to(row: Sequence[int], target: int) -> List[int]:
    """Per-worker batch caps summing to `target` (<= sum(row); row[w] = batches available).

    Excess batches are taken one at a time from the worker with the most remaining (the highest
    index among ties): only the tails of the longest workers are cut. Deterministic, so every
    process computes the same caps.
    """
    caps = list(row)
    for _ in range(sum(caps) - target):
        j = max(range(len(caps)), key=lambda w: (caps[w], w))
        caps[j] -= 1
    return caps
