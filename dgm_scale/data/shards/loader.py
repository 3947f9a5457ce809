"""The DataLoader around a `ShardStream`, and the position of the batches actually trained on.

    loader = make_stream_loader(stream, num_workers=2)
    for epoch in ...:
        loader.set_epoch(epoch)            # Lightning does this via `loader.sampler.set_epoch`
        for x, labels, info in loader:
            train_step(x, labels)
            loader.consumed(info)           # after the step: this batch counts as delivered
    state = loader.state_dict()             # into the checkpoint; later:
    loader.load_state_dict(state)           # before iterating: continues after `consumed`

Why `consumed(info)` and not counting in `__iter__`: the DataLoader and Lightning prefetch
batches that are never trained on if the run stops; only the training loop knows which batch
it finished. In Lightning, call it from `on_train_batch_end` (`StreamPositionCallback`).

State format ("dgm_scale.stream/1"): {"format", "ranks": {"<rank>": {"epoch", "world_size",
"num_workers", "next_worker", "workers": {"<worker>": {"batches", "samples", "faults"}}}}}.
In an epoch re-dealt after a change of world size or worker count, also "left": {"epoch",
"ranges" (per source, the position ranges being dealt), "batches_before"}. Every rank's position
differs, so `state_dict` gathers all ranks (all_gather_object when a process group is running:
call it on every rank, as Lightning's checkpointing does); on the same layout each rank loads its
own entry, on another every rank derives the epoch's rest from all entries (assign.leftover).
"""
from __future__ import annotations

import logging
import weakref
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader

from ..datasets import DataError
from ..device import prefetched
from .samples import FAULT_KINDS
from .assign import leftover, length
from .stream import ResumePoint, ShardStream, WorkerPosition

STATE_FORMAT = "dgm_scale.stream/1"
log = logging.getLogger("dgm_scale.data.shards")


class StreamTracker:
    """Per-worker position of the consumed batches of one rank in the current epoch."""

    def __init__(self, rank: int, world_size: int, num_workers: int):
        self.rank, self.world_size, self.num_workers = rank, world_size, num_workers
        self.epoch, self.next_worker = 0, 0
        self.workers: Dict[int, WorkerPosition] = {}

    def begin_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self.next_worker, self.workers = epoch, 0, {}

    def update(self, info: Dict[str, Any]) -> Dict[str, int]:
        """Record a batch's `info` as consumed (batches arrive in order per worker); returns the
        faults met since that worker's previous batch, by kind."""
        worker = int(info["worker"])
        self.begin_epoch(int(info["epoch"]))
        before = self.workers.get(worker, WorkerPosition()).faults
        faults = {k: int(v) for k, v in info["faults"].items()}
        self.workers[worker] = WorkerPosition(int(info["batches"]), int(info["samples"]), faults)
        self.next_worker = (worker + 1) % max(1, self.num_workers)
        return {k: v - int(before.get(k, 0)) for k, v in faults.items()}

    def faults(self) -> Dict[str, int]:
        """Skipped data of this rank in the current epoch, summed over workers, by kind."""
        return {k: sum(p.faults.get(k, 0) for p in self.workers.values()) for k in FAULT_KINDS}

    def state(self) -> Dict[str, Any]:
        workers = {str(w): {"batches": p.batches, "samples": p.samples, "faults": dict(p.faults)}
                   for w, p in self.workers.items()}
        return {"epoch": self.epoch, "world_size": self.world_size, "rank": self.rank,
                "num_workers": self.num_workers, "next_worker": self.next_worker,
                "workers": workers}

    def restore(self, state: Dict[str, Any]) -> ResumePoint:
        self.epoch, self.next_worker = int(state["epoch"]), int(state["next_worker"])
        self.workers = {int(w): WorkerPosition(int(p["batches"]), int(p["samples"]),
                                               dict(p["faults"]))
                        for w, p in state["workers"].items()}
        return ResumePoint(self.epoch, self.num_workers, self.next_worker, dict(self.workers))


def all_gather_objects(obj: Any) -> List[Any]:
    """[obj of every rank] under a running process group, else [obj]."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return [obj]
    out: List[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


class _EpochSetter:
    """`loader.sampler`: Lightning calls `sampler.set_epoch(epoch)` on any train loader."""

    def __init__(self, loader: "StreamLoader"):
        # A weak reference: a cycle would keep dead loaders (and their workers) alive until gc.
        self.loader = weakref.ref(loader)

    def set_epoch(self, epoch: int) -> None:
        loader = self.loader()
        if loader is not None:
            loader.set_epoch(epoch)


def _stop_workers(iterator: Any) -> None:
    if hasattr(iterator, "_shutdown_workers"):  # a DataLoader iterator with worker processes
        iterator._shutdown_workers()


class StreamLoader:
    """Iterable of (x, labels, info) batches with epoch control and a resumable position."""

    def __init__(self, stream: ShardStream, loader: DataLoader,
                 gather: Callable[[Any], List[Any]] = all_gather_objects):
        self.stream, self.loader, self.gather = stream, loader, gather
        workers = max(1, loader.num_workers)
        self.tracker = StreamTracker(stream.rank, stream.world_size, workers)
        self.sampler = _EpochSetter(self)
        self._next_epoch = self._len_epoch = 0  # next to iterate; current (for len)
        self.prefetch_device: Optional[torch.device] = None  # batches copied there one ahead (data/device.py)
        # A re-dealt epoch: Lightning's count of its batches before the current deal (it counts
        # the restored ones as part of the epoch)
        self.batches_before = 0
        self._loaded: Optional[Dict[str, Any]] = None  # the state last loaded
        self._live: Optional[weakref.ref] = None  # the epoch being iterated

    def set_epoch(self, epoch: int) -> None:
        """Epoch of the next `iter(loader)`; without calls, iterations count 0, 1, 2, ..."""
        self._next_epoch = self._len_epoch = int(epoch)

    def __iter__(self) -> Iterator[Tuple[Tensor, Tensor, Dict[str, Any]]]:
        batches = self._epoch_batches()
        # Weakly: its frame holds this loader, and a cycle would leave the workers to the garbage
        # collector, which closes their queues before it stops them (then waits seconds on each).
        self._live = weakref.ref(batches)
        return batches

    def shutdown(self) -> None:
        """Stop the workers now. Left to garbage collection, they stop at some later moment of
        the process (a next training, an import), which then waits seconds on each worker."""
        batches = self._live() if self._live is not None else None
        if batches is not None:
            batches.close()
        self._live = None
        _stop_workers(getattr(self.loader, "_iterator", None))  # a persistent DataLoader keeps its workers there
        self.loader._iterator = None

    def _epoch_batches(self) -> Iterator[Tuple[Tensor, Tensor, Dict[str, Any]]]:
        # A generator: nothing happens until the first batch is asked for. Lightning calls
        # iter() once just to check the loader is iterable, and for the first epoch before its
        # `sampler.set_epoch`; neither may start workers or consume an epoch number.
        epoch = self._len_epoch = self._next_epoch
        self._next_epoch = epoch + 1
        self.stream.set_epoch(epoch)
        self.tracker.begin_epoch(epoch)
        resumed = self.stream.resuming(epoch)  # its batches may all have been delivered already
        batches = 0
        workers = iter(self.loader)
        source = workers if self.prefetch_device is None else prefetched(workers, self.prefetch_device)
        try:
            for batch in source:
                batches += 1
                yield batch
        except Exception:
            # A failed read (a strict stream's bad sample): the traceback keeps the workers in a
            # cycle, for the garbage collector to stop slowly, later.
            _stop_workers(workers)
            raise
        if batches == 0 and self.stream.drop_last and not resumed:
            # Training would loop over empty epochs forever (and another rank would wait on this one).
            raise DataError(f"shards '{self.stream.sources[0].shards[0].url}'...: epoch {epoch} gave rank "
                            f"{self.stream.rank} no full batch of {self.stream.batch_size} readable samples "
                            "(see the skipped-data warnings)")

    def __len__(self) -> int:
        batches = self.stream.batches_per_epoch(self._len_epoch, self.loader.num_workers)
        if batches is None:
            raise TypeError("batch count unknown before reading (no manifest counts)")
        if self.stream.ranged and self.stream.epoch_left(self._len_epoch) != self.stream.epoch_left(self._len_epoch, True):
            # Lightning sizes every epoch from this once, at the resumed one, counting its restored
            # batches: the restored ones plus this deal's, or a whole epoch's if more.
            return max(self.batches_before + batches, self.stream.whole_epoch_batches(self._len_epoch, self.loader.num_workers))
        return batches

    def consumed(self, info: Dict[str, Any]) -> Dict[str, int]:
        """Mark the batch that carried `info` as trained on; returns the faults (by kind) met
        while making it."""
        return self.tracker.update(info)

    def state_dict(self) -> Dict[str, Any]:
        states = self.gather(self.tracker.state())
        state = {"format": STATE_FORMAT, "ranks": {str(s["rank"]): s for s in states}}
        left = self.stream._left
        if left is not None and left[0] == self.tracker.epoch:
            state["left"] = {"epoch": left[0], "ranges": left[1], "batches_before": self.batches_before}
        return state

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Continue after the saved position (call before iterating): exactly, on the layout that
        saved it; re-dealt (ranged streams), on another world size or worker count."""
        # Lightning restores a stateful train loader itself too (its fit loop saves our state_dict),
        # and the DataPosition callback does, earlier: a re-deal must happen once.
        if state == self._loaded:
            return
        self._loaded = state
        ranks = state.get("ranks", {}) if state.get("format") == STATE_FORMAT else {}
        if not ranks:
            log.warning("stream state has no positions: starting the epoch afresh")
            return
        first = ranks[min(ranks, key=int)]
        epoch, layout = int(first["epoch"]), (int(first["world_size"]), int(first["num_workers"]))
        left = state.get("left")
        if left is not None and int(left["epoch"]) == epoch:
            self.stream.deal_from(epoch, left["ranges"])
            self.batches_before = int(left["batches_before"])
        self.set_epoch(epoch)
        if layout == (self.stream.world_size, self.tracker.num_workers) and str(self.stream.rank) in ranks:
            self.stream.resume_from(self.tracker.restore(ranks[str(self.stream.rank)]))
        elif self.stream.ranged and len(ranks) == layout[0]:
            self._redeal(epoch, layout, ranks)
        else:
            log.warning("stream state saved with world size %s x %s workers, now %s x %s, and its sample "
                        "counts are unknown (no manifest) or resampled: epoch %s restarts from its beginning",
                        *layout, self.stream.world_size, self.tracker.num_workers, epoch)
            self.tracker.begin_epoch(epoch)

    def _redeal(self, epoch: int, layout: Tuple[int, int], ranks: Dict[str, Any]) -> None:
        """Deal what the saved layout had not delivered of `epoch` to this one (assign.py)."""
        s = self.stream
        delivered = {(int(rank), int(worker)): int(position["samples"])
                     for rank, saved in ranks.items() for worker, position in saved["workers"].items()}
        left = leftover(s.epoch_left(epoch), *layout, delivered, [source.weight for source in s.sources],
                        s.shuffle_buffer, s.seed, epoch)
        # Every rank took the same number of steps: any rank's batches are Lightning's count.
        self.batches_before += sum(int(p["batches"]) for p in next(iter(ranks.values()))["workers"].values())
        s.deal_from(epoch, left)
        self.tracker.begin_epoch(epoch)
        log.info("stream: epoch %d re-dealt from %d x %d workers to %d x %d (%d samples left)", epoch, *layout,
                 s.world_size, self.tracker.num_workers, sum(length(ranges) for ranges in left))


def make_stream_loader(stream: ShardStream, num_workers: int = 2, prefetch_factor: int = 2,
                       persistent_workers: bool = True, pin_memory: Optional[bool] = None,
                       gather: Callable[[Any], List[Any]] = all_gather_objects) -> StreamLoader:
    """A StreamLoader: DataLoader(batch_size=None) over worker-made batches; pinned memory when
    CUDA is available (unless `pin_memory` says otherwise)."""
    loader = DataLoader(
        stream,
        batch_size=None,  # the workers batch: far cheaper than collating single samples
        num_workers=num_workers,
        persistent_workers=persistent_workers and num_workers > 0,
        pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,
        prefetch_factor=prefetch_factor if num_workers > 0 else None,
    )
    return StreamLoader(stream, loader, gather)


class StreamPositionCallback(L.Callback):
    """Lightning glue: marks each trained batch consumed, logs the skip counts, and stops the
    workers when the fit ends."""

    def __init__(self, loader: StreamLoader):
        self.loader = loader

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        self.loader.consumed(batch[2])
        if trainer.global_step % max(1, trainer.log_every_n_steps) == 0:  # same steps on all ranks
            faults = self.loader.tracker.faults()
            pl_module.log_dict({f"data/skipped_{k}": float(v) for k, v in faults.items()},
                               on_step=True, on_epoch=False, reduce_fx="sum", sync_dist=True)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.loader.shutdown()  # Lightning stops a DataLoader's persistent workers, not a StreamLoader's
