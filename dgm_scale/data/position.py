"""Where the training stream stands, so that a resumed run reads what an uninterrupted one would.

For map-style datasets the order of an epoch is a permutation seeded by (seed, epoch), dealt to
the ranks the way torch's DistributedSampler deals it: rank r takes positions r, r + W, ... So
after every rank consumed s samples, exactly the first s * W positions of the permutation have
been read. The position is therefore two numbers, (epoch, samples consumed by all ranks), and a
resumed epoch deals out the rest of the same permutation:
- same world size and batch size: the stream continues exactly as the uninterrupted run's;
- a different world size: no sample of the epoch is repeated or lost, but the batches (and the
  epoch's end) fall differently.
`DataPosition` counts consumed batches (on_train_batch_end, after the step used them: the
loaders' prefetching does not count) and lives in the checkpoint as callback state.
"""
from __future__ import annotations

import math
from typing import Any, Dict, Iterator, Optional

import lightning as L
import torch
from torch.utils.data import DistributedSampler, Sampler


class ResumableDistributedSampler(DistributedSampler):
    """DistributedSampler (same permutation, same dealing, same padding) that can resume mid-epoch.

    `resume(epoch, consumed)`: in `epoch`, skip the first `consumed` positions of the permutation
    (samples all ranks together already trained on) and deal the rest. Other epochs are whole.
    """

    def __init__(self, dataset, num_replicas: int, rank: int, shuffle: bool = True, seed: int = 0):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=False)
        self.resume_epoch: Optional[int] = None
        self.resume_consumed = 0

    def resume(self, epoch: int, consumed: int) -> None:
        self.resume_epoch, self.resume_consumed = epoch, consumed

    def _skipped(self) -> int:
        return self.resume_consumed if self.epoch == self.resume_epoch else 0

    def _epoch_order(self) -> list:
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            return torch.randperm(len(self.dataset), generator=generator).tolist()
        return list(range(len(self.dataset)))

    def __iter__(self) -> Iterator[int]:
        order = self._epoch_order()[self._skipped():]
        if not order:
            return iter([])
        # Pad by wrapping around (as DistributedSampler does) so every rank gets as many samples.
        total = math.ceil(len(order) / self.num_replicas) * self.num_replicas
        order = (order * math.ceil(total / len(order)))[:total]
        return iter(order[self.rank:total:self.num_replicas])

    def __len__(self) -> int:
        return math.ceil((len(self.dataset) - self._skipped()) / self.num_replicas)


class DataPosition(L.Callback):
    """Counts the samples all ranks consumed in the current epoch; restores the sampler's position.

    Its state (epoch, consumed) is saved in every checkpoint; it is the same on every rank.
    """

    def __init__(self) -> None:
        self.epoch = 0
        self.consumed = 0  # samples of `epoch` that all ranks together trained on
        self._restored = False

    @staticmethod
    def _sampler(trainer) -> Optional[Sampler]:
        loader = trainer.train_dataloader
        sampler = getattr(loader, "sampler", None)
        return sampler if isinstance(sampler, ResumableDistributedSampler) else None

    def on_train_start(self, trainer, pl_module) -> None:
        sampler = self._sampler(trainer)
        if self._restored and sampler is not None:
            sampler.resume(self.epoch, self.consumed)

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if trainer.current_epoch != self.epoch:  # a new epoch (a restarted one keeps its count)
            self.epoch, self.consumed = trainer.current_epoch, 0

    def on_train_batch_end(self, trainer, pl_module, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.consumed += len(batch[0]) * trainer.world_size

    def state_dict(self) -> Dict[str, int]:
        return {"epoch": self.epoch, "consumed": self.consumed}

    def load_state_dict(self, state_dict: Dict[str, int]) -> None:
        self.epoch, self.consumed = int(state_dict["epoch"]), int(state_dict["consumed"])
        self._restored = True
