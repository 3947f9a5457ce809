"""Where the training stream stands, so that a resumed run reads what an uninterrupted one would.

For map-style datasets the order of an epoch is a permutation seeded by (seed, epoch), dealt to
the ranks the way torch's DistributedSampler deals it: rank r takes positions r, r + W, ... So
after every rank consumed s samples, exactly the first s * W positions of the permutation have
been read. The position is therefore two numbers, (epoch, samples consumed by all ranks), and a
resumed epoch deals out the rest of the same permutation:
- same world size and batch size: the stream continues exactly as the uninterrupted run's;
- a different world size (or batch size): no sample of the epoch is repeated or lost (beyond the
  fewer than W padding repeats and the drop_last remainder that any epoch has), but the batches
  (and the epoch's end) fall differently. The dealing is a pure function (`rank_samples`) of
  (seed, epoch, world size, rank, consumed), so tests deal to simulated ranks with it.
`DataPosition` counts consumed batches (on_train_batch_end, after the step used them: the
loaders' prefetching does not count) and lives in the checkpoint as callback state.

Skipped data. It also counts the unreadable data the consumed batches skipped (an image
folder's replaced files, a shard stream's faults), by kind, over the whole run: every
`log_every` iterations the counts of all ranks are summed and logged as `data/skipped_<kind>`;
checkpoints carry that sum, so a resumed run continues it; `final_skipped` is the total at the
end (the run summary prints it). A file met again in a later epoch counts again.
"""
from __future__ import annotations

import math
from typing import Any, Dict, Iterator, List, Optional, Sequence, Union

import lightning as L
import torch
from torch.utils.data import DistributedSampler

from dgm_scale.core.logs import log_now


def epoch_order(num_samples: int, seed: int, epoch: int, shuffle: bool = True) -> List[int]:
    """The order of an epoch's samples: a permutation seeded by (seed, epoch), as DistributedSampler's."""
    if shuffle:
        return torch.randperm(num_samples, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
    return list(range(num_samples))


def deal(rest: Sequence[int], world: int, rank: int) -> List[int]:
    """Rank `rank`'s share of `rest`: its positions rank, rank + world, ... (DistributedSampler's
    dealing), padded by wrapping around so that every rank gets ceil(len / world) samples (DDP
    needs as many steps on every rank; the padding repeats fewer than `world` samples)."""
    if not rest:
        return []
    share = math.ceil(len(rest) / world)
    mine = list(rest[rank::world])
    return mine + [rest[(rank + j * world) % len(rest)] for j in range(len(mine), share)]


def rank_samples(num_samples: int, seed: int, epoch: int, world: int, rank: int, consumed: int = 0,
                 shuffle: bool = True) -> List[int]:
    """The samples `rank` of `world` reads in `epoch` after all ranks together consumed `consumed`
    (whatever world size consumed them): the rest of the epoch's order, dealt. Pure, like `deal`:
    tests deal to simulated ranks with them (tests/test_elastic.py)."""
    return deal(epoch_order(num_samples, seed, epoch, shuffle)[consumed:], world, rank)


class ResumableDistributedSampler(DistributedSampler):
    """DistributedSampler (same permutation, same dealing, same padding) that can resume mid-epoch,
    on any world size.

    `resume(epoch, consumed, rank_consumed)`: in `epoch`, skip the first `consumed` positions of
    the permutation (samples all ranks together already trained on, under whatever world size) and
    deal the rest (`rank_samples`); `rank_consumed`: Lightning's restored batch count of the epoch
    times today's batch size (see __len__). Other epochs are whole.
    """

    def __init__(self, dataset, num_replicas: int, rank: int, shuffle: bool = True, seed: int = 0):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=False)
        self.resume_epoch: Optional[int] = None
        self.resume_consumed = self.resume_rank_consumed = 0

    def resume(self, epoch: int, consumed: int, rank_consumed: Optional[int] = None) -> None:
        self.resume_epoch, self.resume_consumed = epoch, consumed
        self.resume_rank_consumed = consumed // self.num_replicas if rank_consumed is None else rank_consumed

    def _skipped(self) -> int:
        return self.resume_consumed if self.epoch == self.resume_epoch else 0

    def __iter__(self) -> Iterator:
        mine = rank_samples(len(self.dataset), self.seed, self.epoch, self.num_replicas, self.rank,
                            self._skipped(), self.shuffle)
        if getattr(self.dataset, "keyed_items", False):  # random augmentation keyed to (seed, epoch, index)
            epoch_key = self.seed * 1_000_003 + self.epoch
            return iter([(index, epoch_key) for index in mine])
        return iter(mine)

    def __len__(self) -> int:
        # Lightning sizes every epoch from this, once, when the loader is built (for a resumed run:
        # in the resumed epoch), and counts the batches restored from the checkpoint as part of the
        # epoch, ending it at this length even if the iterator has more. So: the whole epoch's share,
        # or - if more - the restored batches plus what this rank still reads (after a change of
        # world size, the rest of the epoch splits differently); an iterator that runs out first
        # simply ends its epoch.
        whole = math.ceil(len(self.dataset) / self.num_replicas)
        if self.resume_epoch is None:
            return whole
        rest = math.ceil((len(self.dataset) - self.resume_consumed) / self.num_replicas)
        return max(whole, self.resume_rank_consumed + rest)


class DataPosition(L.Callback):
    """Where the training data stands; saved in every checkpoint, restored before training.

    Map-style data: (epoch, samples all ranks consumed in it), the same on every rank, handed to
    the ResumableDistributedSampler. Shard streams: the StreamLoader's per-rank, per-worker
    position (see data/shards/loader.py), which also counts skipped (damaged) data; those counts
    are logged as data/skipped_* with the training metrics.
    """

    def __init__(self, log_every: int = 1) -> None:
        self.log_every = log_every
        self.epoch = 0
        self.consumed = 0  # map-style: samples of `epoch` that all ranks together trained on
        # map-style: batches of `epoch` as Lightning counts them (the same on every rank, whatever
        # world sizes and batch sizes trained them); None = unknown (older checkpoints)
        self.batches: Optional[int] = 0
        # Skipped data of this rank since this process started, by kind (rank 0: plus the saved run
        # total); empty for data that cannot skip. Values may be device tensors (summed without a sync).
        self.skipped: Dict[str, Union[int, torch.Tensor]] = {}
        self.final_skipped: Dict[str, int] = {}  # the run's total over all ranks, at the end
        self._restored: Optional[Dict[str, Any]] = None
        self._stream_applied = False

    @staticmethod
    def _stream(trainer):
        from .shards.loader import StreamLoader

        loader = trainer.train_dataloader
        return loader if isinstance(loader, StreamLoader) else None

    @staticmethod
    def _sampler(trainer) -> Optional[ResumableDistributedSampler]:
        sampler = getattr(trainer.train_dataloader, "sampler", None)
        return sampler if isinstance(sampler, ResumableDistributedSampler) else None

    def _resume(self, sampler: ResumableDistributedSampler, batch_size: int) -> None:
        sampler.set_epoch(self.epoch)
        sampler.resume(self.epoch, self.consumed, None if self.batches is None else self.batches * batch_size)

    def apply_to(self, sampler: ResumableDistributedSampler, batch_size: int) -> None:
        """Put a new sampler at the restored position (epoch, consumed samples), if any.

        Called by the data module when it builds the training loader: Lightning starts a
        multi-worker loader's iterator (its workers prefetch indices) before on_train_start,
        so a position applied only there would come too late.
        """
        if self._restored is not None and "stream" not in self._restored:
            self._resume(sampler, batch_size)

    def apply_to_stream(self, loader) -> None:
        """Put a new StreamLoader at the restored position, if any (called by the data module when
        it builds the training loader: Lightning sizes the epoch from it before on_train_start)."""
        if self._restored is not None and "stream" in self._restored and not self._stream_applied:
            loader.load_state_dict(self._restored["stream"])
            self._stream_applied = True

    def on_train_start(self, trainer, pl_module) -> None:
        if self._restored is None:
            return
        # Every rank holds the same kinds (so the sums line up); the saved run total lives on rank 0.
        saved = self._restored.get("skipped", {})
        self.skipped = {kind: int(count) if trainer.global_rank == 0 else 0 for kind, count in saved.items()}
        stream, sampler = self._stream(trainer), self._sampler(trainer)
        if stream is not None:
            self.apply_to_stream(stream)
        elif sampler is not None:
            self._resume(sampler, trainer.train_dataloader.batch_size)

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if trainer.current_epoch != self.epoch:  # a new epoch (a restarted one keeps its count)
            self.epoch, self.consumed, self.batches = trainer.current_epoch, 0, 0

    def on_train_batch_end(self, trainer, pl_module, outputs: Any, batch: Any, batch_idx: int) -> None:
        stream = self._stream(trainer)
        if stream is None:
            self.consumed += len(batch[0]) * trainer.world_size
            self.batches = None if self.batches is None else self.batches + 1
            # The image folder's items carry a third field: 1 where an unreadable file was replaced.
            met = {"bad_image": batch[2].sum()} if len(batch) > 2 else {}
        else:
            met = stream.consumed(batch[2])  # the batch's position info (worker, samples delivered, faults)
        for kind, count in met.items():
            self.skipped[kind] = self.skipped.get(kind, 0) + count
        if self.skipped and pl_module.iteration % self.log_every == 0:  # the same iterations on every rank
            log_now(trainer, {f"data/skipped_{kind}": float(total) for kind, total in self.run_totals(trainer).items()})

    def run_totals(self, trainer) -> Dict[str, int]:
        """Skipped data of the run by kind, summed over ranks (a collective: every rank calls it)."""
        kinds = sorted(self.skipped)
        device = trainer.lightning_module.device
        counts = torch.stack([torch.as_tensor(self.skipped[kind], dtype=torch.float64, device=device) for kind in kinds])
        totals = trainer.strategy.reduce(counts, reduce_op="sum")
        return {kind: int(total) for kind, total in zip(kinds, totals.tolist())}

    def on_train_end(self, trainer, pl_module) -> None:
        if self.skipped:
            self.final_skipped = self.run_totals(trainer)

    def state_dict(self) -> Dict[str, Any]:
        # Called on every rank (Lightning's checkpoint dump); the stream gathers all ranks' positions
        # and the skip counts are summed over ranks (both collectives).
        state: Dict[str, Any] = {"epoch": self.epoch, "consumed": self.consumed, "batches": self.batches}
        trainer = getattr(self, "_trainer", None)
        stream = self._stream(trainer) if trainer is not None else None
        if stream is not None:
            state["stream"] = stream.state_dict()
        if self.skipped and trainer is not None:
            state["skipped"] = self.run_totals(trainer)
        return state

    def setup(self, trainer, pl_module, stage: str) -> None:
        self._trainer = trainer

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        self.epoch, self.consumed = int(state_dict["epoch"]), int(state_dict["consumed"])
        self.batches = state_dict.get("batches")
        self._restored = dict(state_dict)


def skipped_summary(totals: Dict[str, int]) -> str:
    """'none' or e.g. '3 bad images, 1 bad shard' (counts by kind, as `data/skipped_<kind>`)."""
    parts = [f"{count} {kind.replace('_', ' ')}{'' if count == 1 else 's'}" for kind, count in sorted(totals.items()) if count]
    return ", ".join(parts) or "none"
