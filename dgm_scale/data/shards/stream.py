"""`ShardStream`: tar shards -> ready batches, split by rank and worker, resumable.

Pipeline inside each DataLoader worker, per epoch:

    shards of each source (split, or resampled)  ->  items (key, raw members)
      -> mix sources by weight  ->  shuffle buffer  ->  [skip what was delivered]
      -> decode + label  ->  batch of B: (x [B, C, R, R] in [-1, 1], labels [B] int64, info)

Splitting (non-resampled). Every epoch the shard list of each source is permuted with a
generator seeded by (seed, epoch, source) - identical on every rank. With sample counts (a
manifest) the epoch is the concatenation of those shards' samples, dealt by contiguous ranges
(assign.py): rank r takes the r-th of `world` near-equal ranges, its worker w the w-th of W
near-equal parts of that, so ranks differ by at most one sample per source and a shard may be
shared by two neighbouring slots (each reads its own part; the samples before it are passed over
unread). Without counts whole shards are dealt: rank r takes positions r, r + world, ...; its
worker w every W-th of those, i.e. global slot r + world * w of world * W (webdataset's
split_by_node then split_by_worker), and a source with fewer shards than ranks is a DataError
at construction (a rank without data would hang DDP). Either way every sample is seen exactly
once per epoch across ranks and workers. Per-rank batch counts can still differ; with counts,
world size > 1 and `even_ranks=True`, every rank is capped to the smallest rank's batch count of
that epoch (the tail batches of its longest workers are dropped), so DDP does not wait at the
epoch end. A worker that damaged samples leave short of its cap wraps around: it reads its share
of the epoch again, in the same order (its faults not counted twice), until the cap is met, as
DistributedSampler pads with repeats. Without counts, or for certainty, use the resampled mode.

Resampled. Each (rank, worker) draws shards with replacement from a generator seeded by
(seed, epoch, rank, worker, source); the rank yields exactly `steps_per_epoch` batches per
epoch, worker w yielding steps // W (+1 for w < steps % W). The order is deterministic given
(seed, epoch, rank) and the worker count.

Shuffle buffer: per worker, seeded by (seed, epoch, rank, worker); it holds raw bytes and
decoding happens after it, so the delivered order does not depend on which images fail. In the
resampled mode, which never runs out, BARREN_LIMIT undecodable samples in a row are a DataError
(data with no readable image would otherwise be drawn forever).

Position and resume (see `loader.StreamLoader`). Each batch carries `info` = {"epoch",
"worker" (logical id), "batches" and "samples" this worker has delivered this epoch including
this batch, "faults": its counts by kind}. `resume_from` hands a saved position to the
workers: each replays its pipeline without decoding and drops the first `samples` outputs;
whole shards whose samples were all delivered are skipped unopened when their sample count is
known (manifest, or a header-only scan of a local file), other shards are read (headers only
for the delivered samples). The DataLoader serves workers round robin starting at worker 0, so
on the resumed epoch worker ids are rotated to continue with the worker that was next.

Exact: with the same seed, sources, world size, worker count, batch size and shuffle buffer,
the keys (and images and flips) after resume equal those of an uninterrupted run, in both
modes; fault counts continue from the saved ones. Another world size or worker count, with
counts: the rest of the interrupted epoch - what no old (rank, worker) had delivered, found by
replaying their pipelines on positions - is dealt to the new layout (loader.StreamLoader,
assign.leftover): each sample once, but the order differs. Without counts, or resampled, the
saved position is ignored and the saved epoch restarts from its beginning (its samples are seen
again). A shard rewritten in between changes everything after it.
"""
from __future__ import annotations

import itertools
import multiprocessing
import random
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Set, Tuple, Union

from torch.utils.data import IterableDataset, get_worker_info

from ..datasets import DataError
from .assign import Piece, Ranges, Span, length, pieces_for, rng_for, slot_ranges
from .mixing import Shuffler, mix, trim_to
from .samples import FaultCounter, Item, count_samples, decode_into, make_batch, shard_items
from .urls import Shard, expand_urls


# Resampled mode: undecodable samples in a row after which the data counts as unreadable.
BARREN_LIMIT = 10_000


@dataclass(frozen=True)
class Source:
    """One dataset: its shards and its mixing weight (relative; weights need not sum to 1)."""

    shards: Tuple[Shard, ...]
    weight: float = 1.0


@dataclass
class WorkerPosition:
    """What one (logical) worker delivered in the current epoch."""

    batches: int = 0
    samples: int = 0  # items taken from the shuffle buffer, skipped ones included
    faults: Dict[str, int] = field(default_factory=dict)


@dataclass
class ResumePoint:
    """Where to continue: epoch, worker count it was saved with, the worker to serve first."""

    epoch: int
    num_workers: int
    first_worker: int
    workers: Dict[int, WorkerPosition]


def as_source(spec: Union[str, Source], weight: float = 1.0) -> Source:
    return spec if isinstance(spec, Source) else Source(tuple(expand_urls(spec)), float(weight))


class ShardStream(IterableDataset):
    """Batches from tar shards; see the module docstring. Use with DataLoader(batch_size=None).

    sources: URL specs (`expand_urls`) or `Source`s; weights: mixing weights (default equal).
    Yields (x [B, C, R, R] float32 in [-1, 1], labels [B] int64, info dict).
    """

    def __init__(self, sources: Union[str, Source, Sequence[Union[str, Source]]], *,
                 batch_size: int, resolution: int, channels: int = 3,
                 weights: Optional[Sequence[float]] = None, hflip: bool = False,
                 seed: int = 0, rank: int = 0, world_size: int = 1,
                 shuffle_buffer: int = 1000, resampled: bool = False,
                 steps_per_epoch: Optional[int] = None, strict: bool = False,
                 drop_last: bool = True, even_ranks: bool = True, return_keys: bool = False):
        if isinstance(sources, (str, Source)):
            sources = [sources]
        weights = list(weights) if weights is not None else [1.0] * len(sources)
        if len(weights) != len(sources) or not sources:
            raise DataError(f"data sources: {len(sources)} sources but {len(weights)} weights")
        self.sources = [as_source(s, w) for s, w in zip(sources, weights)]
        self.batch_size, self.resolution, self.channels = batch_size, resolution, channels
        self.hflip, self.seed, self.rank, self.world_size = hflip, seed, rank, world_size
        self.shuffle_buffer, self.resampled = shuffle_buffer, resampled
        self.steps_per_epoch = steps_per_epoch
        self.strict, self.drop_last, self.even_ranks = strict, drop_last, even_ranks
        self.return_keys = return_keys
        self._validate()
        # Shared with the worker processes (persistent workers keep their copy of `self`).
        self._epoch = multiprocessing.RawValue("q", 0)
        self._resume: Optional[ResumePoint] = None
        self._left: Optional[Tuple[int, List[Ranges]]] = None  # (epoch, per source): a re-dealt epoch

    def _validate(self) -> None:
        if self.batch_size < 1 or self.resolution < 1 or self.channels not in (1, 3):
            raise DataError(f"stream: need batch_size >= 1, resolution >= 1, channels 1 or 3; "
                            f"got {self.batch_size}, {self.resolution}, {self.channels}")
        if not 0 <= self.rank < self.world_size:
            raise DataError(f"stream: rank {self.rank} outside world size {self.world_size}")
        if any(s.weight <= 0 for s in self.sources):
            raise DataError("stream: mixing weights must be > 0")
        if self.resampled != (self.steps_per_epoch is not None) or (self.steps_per_epoch or 1) < 1:
            raise DataError("stream: steps_per_epoch >= 1 is required with resampled=True "
                            "and only allowed with it")
        for source in self.sources:
            if self.ranged and sum(shard.num_samples for shard in source.shards) < self.world_size:
                raise DataError(f"shards '{source.shards[0].url}'...: fewer samples than the {self.world_size} "
                                "ranks - a rank without data would hang DDP")
            if not self.resampled and not self.ranged and len(source.shards) < self.world_size:
                raise DataError(
                    f"shards '{source.shards[0].url}'...: {len(source.shards)} shards for "
                    f"{self.world_size} ranks - a rank without data would hang DDP; add shards "
                    "or use the resampled mode")

    # ------------------------------------------------------------------ epoch / resume
    @property
    def epoch(self) -> int:
        return int(self._epoch.value)

    def set_epoch(self, epoch: int) -> None:
        """Epoch of the next iteration (reaches already-running persistent workers)."""
        self._epoch.value = int(epoch)

    def resume_from(self, point: Optional[ResumePoint]) -> None:
        """Continue `point.epoch` after what was delivered (before the workers start)."""
        self._resume = point

    def deal_from(self, epoch: int, left: Optional[List[Ranges]]) -> None:
        """Deal only `left` (per source: position ranges, see assign.py) in `epoch` - what an
        interrupted epoch had left - instead of the whole epoch (before the workers start)."""
        self._left = None if left is None else (int(epoch), [[tuple(r) for r in ranges] for ranges in left])

    @property
    def ranged(self) -> bool:
        """Whether epochs are dealt by sample ranges (counts known, not resampled) rather than by
        whole shards; only a ranged epoch can be re-dealt to another world size."""
        return not self.resampled and self._known_counts() is not None

    def epoch_left(self, epoch: int, whole: bool = False) -> List[Ranges]:
        """Per source, the position ranges dealt in `epoch` (ranged mode): all, or a re-dealt rest
        (unless `whole`)."""
        if self._left is not None and self._left[0] == epoch and not whole:
            return self._left[1]
        return [[(0, sum(shard.num_samples for shard in source.shards))] for source in self.sources]

    def resuming(self, epoch: int) -> bool:
        """Whether `epoch` continues a saved position (rather than starting afresh)."""
        return self._resume is not None and self._resume.epoch == epoch

    # ------------------------------------------------------------------ sizes
    def shard_sequences(self, epoch: int, worker: int, num_workers: int) -> List[Iterable[Piece]]:
        """Per source, the pieces of shards this rank's `worker` reads in `epoch`, in order."""
        if self.resampled:
            return [map(Piece, _draw_forever(s.shards, rng_for(self.seed, epoch, self.rank, worker, k)))
                    for k, s in enumerate(self.sources)]
        if self.ranged:
            return [pieces_for(self._epoch_order(k, epoch), left, self.world_size, self.rank, num_workers, worker)
                    for k, left in enumerate(self.epoch_left(epoch))]
        slot, stride = self.rank + self.world_size * worker, self.world_size * num_workers
        return [[Piece(shard) for shard in self._epoch_order(k, epoch)[slot::stride]] for k in range(len(self.sources))]

    def _epoch_order(self, k: int, epoch: int) -> List[Shard]:
        shards = list(self.sources[k].shards)
        if self.shuffle_buffer > 0:  # shuffling off = plain shard order too
            rng_for(self.seed, epoch, "shards", k).shuffle(shards)
        return shards

    def batch_caps(self, epoch: int, num_workers: int) -> Optional[List[int]]:
        """Batches each worker of this rank may yield in `epoch`; None = until exhausted."""
        if self.resampled:
            steps = int(self.steps_per_epoch)
            return [steps // num_workers + (w < steps % num_workers) for w in range(num_workers)]
        counts_known = self._known_counts() is not None
        if not (counts_known and self.even_ranks and self.world_size > 1):
            return None
        table = self._batch_table(epoch, num_workers)
        return trim_to(table[self.rank], min(sum(row) for row in table))

    def _known_counts(self) -> Optional[List[List[int]]]:
        counts = [[sh.num_samples for sh in s.shards] for s in self.sources]
        return None if any(c is None for row in counts for c in row) else counts

    def _batch_table(self, epoch: int, num_workers: int, whole: bool = False) -> List[List[int]]:
        """[rank][worker] -> batches available in `epoch` (manifest counts required; `whole`: as if
        the epoch were not re-dealt)."""
        samples = [[0] * num_workers for _ in range(self.world_size)]
        if self.ranged:
            for left in map(Span, self.epoch_left(epoch, whole)):
                for rank, row in enumerate(samples):
                    for worker in range(num_workers):
                        row[worker] += length(slot_ranges(left, self.world_size, rank, num_workers, worker))
        else:
            stride = self.world_size * num_workers
            for k in range(len(self.sources)):
                for i, shard in enumerate(self._epoch_order(k, epoch)):
                    samples[i % self.world_size][(i % stride) // self.world_size] += shard.num_samples
        rounding = 0 if self.drop_last else self.batch_size - 1
        return [[(n + rounding) // self.batch_size for n in row] for row in samples]

    def batches_per_epoch(self, epoch: int, num_workers: int) -> Optional[int]:
        """Batches this rank yields in `epoch` (None when unknown without reading: no manifest).
        Damaged samples can make it fewer."""
        num_workers = max(1, num_workers)
        caps = self.batch_caps(epoch, num_workers)
        if caps is not None:
            return sum(caps)
        if self._known_counts() is None:
            return None
        return sum(self._batch_table(epoch, num_workers)[self.rank])

    def whole_epoch_batches(self, epoch: int, num_workers: int) -> int:
        """Batches this rank would yield in `epoch` were it not re-dealt (ranged mode)."""
        table = self._batch_table(epoch, max(1, num_workers), whole=True)
        return min(sum(row) for row in table) if self.even_ranks and self.world_size > 1 else sum(table[self.rank])

    # ------------------------------------------------------------------ iteration
    def __iter__(self) -> Iterator[Tuple]:
        info = get_worker_info()
        physical, num_workers = (info.id, info.num_workers) if info else (0, 1)
        epoch, point = self.epoch, self._resume
        if point is None or point.epoch != epoch or point.num_workers != num_workers:
            return WorkerEpoch(self, epoch, physical, num_workers, WorkerPosition()).batches()
        worker = (physical + point.first_worker) % num_workers
        start = point.workers.get(worker, WorkerPosition())
        return WorkerEpoch(self, epoch, worker, num_workers, start).batches()


def _draw_forever(shards: Sequence[Shard], rng: random.Random) -> Iterator[Shard]:
    while True:
        yield shards[rng.randrange(len(shards))]


@dataclass
class SkipPlan:
    """Which items of each source a resumed worker must load (the rest were delivered)."""

    frontier: List[int]  # items pulled from each source before the resume point
    needed: List[Set[int]]  # items still in the shuffle buffer at the resume point

    def keep(self, k: int, first: int) -> Callable[[int], bool]:
        frontier, needed = self.frontier[k], self.needed[k]
        return lambda i: first + i >= frontier or first + i in needed

    def skippable(self, k: int, first: int, count: int) -> bool:
        return first + count <= self.frontier[k] and not any(
            first <= s < first + count for s in self.needed[k])


class _UnknownCount(Exception):
    pass


class WorkerEpoch:
    """One worker's pass over one epoch (runs inside the DataLoader worker)."""

    def __init__(self, stream: ShardStream, epoch: int, worker: int, num_workers: int,
                 start: WorkerPosition):
        self.s, self.epoch, self.worker, self.num_workers = stream, epoch, worker, num_workers
        self.start = start
        self.faults = FaultCounter(stream.strict, start.faults)
        self._counts: Dict[str, Optional[int]] = {}

    def _rng(self, purpose: str) -> random.Random:
        return rng_for(self.s.seed, self.epoch, self.s.rank, self.worker, purpose)

    def _count(self, shard: Shard) -> Optional[int]:
        """Sample count of a shard: manifest, else a header scan of a local file (cached)."""
        if shard.num_samples is not None or shard.is_pipe:
            return shard.num_samples
        if shard.url not in self._counts:
            try:
                self._counts[shard.url] = count_samples(shard.url)
            except OSError:
                self._counts[shard.url] = None
        return self._counts[shard.url]

    # ------------------------------------------------------------------ items
    def _pipeline(self, sources: List[Iterator]) -> Tuple[Shuffler, Iterator]:
        """Mix the per-source item streams, then shuffle: (the shuffler, its output)."""
        mixed = mix(sources, [s.weight for s in self.s.sources], self._rng("mix"))
        shuffler = Shuffler(self.s.shuffle_buffer, self._rng("shuffle"))
        return shuffler, shuffler.run(mixed)

    def _source_items(self, k: int, pieces: Iterable[Piece],
                      plan: Optional[SkipPlan]) -> Iterator[Item]:
        first, empty_run = 0, 0
        for piece in pieces:
            count = self._piece_count(piece) if plan else None
            if plan and count is not None and plan.skippable(k, first, count):
                yield from (("", None, piece.shard.url) for _ in range(count))
                first += count
                continue
            before = first
            for item in self._piece_items(piece, plan.keep(k, first) if plan else (lambda i: True)):
                first += 1
                yield item
            empty_run = empty_run + 1 if first == before else 0
            if self.s.resampled and empty_run > 2 * len(self.s.sources[k].shards) + 8:
                raise DataError(f"source of '{piece.shard.url}': the last {empty_run} shards drawn "
                                "held no readable sample")

    def _piece_count(self, piece: Piece) -> Optional[int]:
        return self._count(piece.shard) if piece.stop is None else piece.stop - piece.start

    def _piece_items(self, piece: Piece, keep: Callable[[int], bool]) -> Iterator[Item]:
        """The items of a piece (`keep` by index within the piece); the shard's samples before it
        are passed over unread, and reading stops at its end."""
        start, stop = piece.start, piece.stop
        inside = lambda i: start <= i and (stop is None or i < stop) and keep(i - start)  # noqa: E731
        for index, item in enumerate(shard_items(piece.shard, self.faults, inside)):
            if index >= start:
                yield item
            if stop is not None and index + 1 >= stop:
                return

    def _simulate(self, delivered: int) -> Optional[SkipPlan]:
        """Replay the mixing and shuffling on sample indices only (no I/O beyond counts)."""
        pulled = [0] * len(self.s.sources)

        def indices(k: int, pieces: Iterable[Piece]) -> Iterator[Tuple[int, int]]:
            for piece in pieces:
                count = self._piece_count(piece)
                if count is None:
                    raise _UnknownCount
                for _ in range(count):
                    pulled[k] += 1
                    yield k, pulled[k] - 1

        seqs = self.s.shard_sequences(self.epoch, self.worker, self.num_workers)
        shuffler, outputs = self._pipeline([indices(k, q) for k, q in enumerate(seqs)])
        try:
            for _ in range(delivered):
                next(outputs)
        except _UnknownCount:
            return None
        except StopIteration:
            pass
        needed: List[Set[int]] = [set() for _ in self.s.sources]
        for k, s in shuffler.buffer:
            needed[k].add(s)
        return SkipPlan(pulled, needed)

    # ------------------------------------------------------------------ batches
    def batches(self) -> Iterator[Tuple]:
        s, start = self.s, self.start
        caps = s.batch_caps(self.epoch, self.num_workers)
        cap = None if caps is None else caps[self.worker]
        if cap is not None and start.batches >= cap:
            return
        plan = self._simulate(start.samples) if start.samples else None
        images, labels, keys = [], [], []
        done, consumed, barren = start.batches, 0, 0
        for wrap in itertools.count():  # pass 0: the epoch; later passes fill a cap that damage left unmet
            useful = False  # the pass gave an image or replayed delivered items (else wrapping cannot help)
            self.faults.muted = wrap > 0 or consumed < start.samples
            for item in self._items(plan if wrap == 0 else None):
                consumed += 1
                if consumed <= start.samples:  # delivered before the interruption: not decoded
                    self.faults.muted = wrap > 0 or consumed < start.samples
                    useful = True
                    continue
                # members None: a sample lost to a damaged shard (counted where it happened)
                decoded = item[1] is not None and decode_into(item, s.channels, s.resolution, self.faults,
                                                             images, labels, keys)
                useful |= decoded
                barren = 0 if decoded else barren + 1
                if s.resampled and barren >= BARREN_LIMIT:
                    raise DataError(f"shard '{item[2]}': the last {barren} samples drawn held no decodable image")
                if len(images) == s.batch_size:
                    done += 1
                    yield self._emit(images, labels, keys, done, consumed)
                    images, labels, keys = [], [], []
                    if cap is not None and done >= cap:
                        return
            partial = 1 if images and not s.drop_last else 0  # a last partial batch counts towards the cap
            if cap is None or done + partial >= cap or not useful:
                break
        if images and not s.drop_last:
            yield self._emit(images, labels, keys, done + 1, consumed)

    def _items(self, plan: Optional[SkipPlan]) -> Iterator[Item]:
        """This worker's items of the epoch, mixed and shuffled (`plan`: what a resume skips)."""
        seqs = self.s.shard_sequences(self.epoch, self.worker, self.num_workers)
        return self._pipeline([self._source_items(k, q, plan) for k, q in enumerate(seqs)])[1]

    def _emit(self, images: list, labels: list, keys: list, done: int, consumed: int) -> Tuple:
        flip_seed = self._rng(f"flip{done}").getrandbits(63) if self.s.hflip else None
        x, y = make_batch(images, labels, flip_seed)
        info = {"epoch": self.epoch, "worker": self.worker, "batches": done,
                "samples": consumed, "faults": dict(self.faults.counts)}
        if self.s.return_keys:
            info["keys"] = list(keys)
        return x, y, info
