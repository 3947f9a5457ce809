"""Lightning data module: wraps `build_dataset` with data loaders.

It knows nothing about particular datasets; a streaming (iterable) dataset from the registry
works as well, it just cannot be shuffled or sized by the loader.
"""
from __future__ import annotations

from typing import Any, Optional, Tuple

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset

from .datasets import TOY_DATASETS, DataError, build_dataset
from .position import ResumableDistributedSampler


class ImageDataModule(L.LightningDataModule):
    """Train / val loaders for one DataConfig.

    `batch_size` overrides cfg.batch_size (the GAN module draws n_critic batches at once).
    The training loader deals a (seed, epoch) permutation to the ranks and can resume mid-epoch
    (see position.py); run the Trainer with `use_distributed_sampler=False` so Lightning keeps it.
    """

    def __init__(self, cfg: Any, batch_size: Optional[int] = None, seed: int = 0):
        super().__init__()
        self.cfg = cfg
        self.seed = seed
        self.batch_size = int(batch_size if batch_size is not None else cfg.batch_size)
        self.train_set: Optional[Dataset] = None
        self.val_set: Optional[Dataset] = None

    # ------------------------------------------------------------------ setup
    def setup(self, stage: Optional[str] = None) -> None:
        """Build both splits once (later calls are no-ops); for fitting, check the batch fits."""
        self._build()
        if stage in (None, "fit"):  # fail before training starts, not on the first step
            self._check_batch_size()

    def _build(self) -> None:
        """Build both splits on first use."""
        if self.train_set is None:
            self.train_set = build_dataset(self.cfg, "train")
            self.val_set = build_dataset(self.cfg, "val")

    def _check_batch_size(self) -> None:
        # drop_last=True with a too-small dataset would give zero batches and a silent no-op run.
        if self.batch_size < 1:
            raise DataError(f"config key 'data.batch_size': must be >= 1, got {self.batch_size}")
        if isinstance(self.train_set, IterableDataset):
            return
        n = len(self.train_set)
        if n < self.batch_size:
            raise DataError(
                f"config key 'data.batch_size': batch of {self.batch_size} exceeds the {n} "
                f"training samples of dataset '{self.cfg.name}'"
            )

    # ------------------------------------------------------------------ loaders
    def _train_sampler(self, dataset: Dataset) -> Optional[ResumableDistributedSampler]:
        if isinstance(dataset, IterableDataset):  # streams shuffle and split themselves
            return None
        trainer = self.trainer  # None outside a Trainer (e.g. a loader built by hand)
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        return ResumableDistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=self.seed)

    def _loader(self, dataset: Dataset, train: bool) -> DataLoader:
        workers = int(self.cfg.num_workers)
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=self._train_sampler(dataset) if train else None,
            drop_last=train,  # fixed batch shapes for G/D steps
            num_workers=workers,
            persistent_workers=workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled, drop_last batches of (x [B, ...], label [B])."""
        self.setup("fit")
        return self._loader(self.train_set, train=True)

    def val_dataloader(self) -> DataLoader:
        """Ordered batches over the held-out split (may be empty when val_fraction=0)."""
        self.setup("validate")
        return self._loader(self.val_set, train=False)

    # ------------------------------------------------------------------ shape info
    @property
    def sample_shape(self) -> Tuple[int, ...]:
        """Shape of one x: (2,) for toy mixtures, (C, R, R) for images."""
        if self.cfg.name in TOY_DATASETS:
            return (2,)
        res = int(self.cfg.resolution)
        return (int(self.cfg.channels), res, res)

    @property
    def num_classes(self) -> int:
        """Number of label classes (0 = unlabelled data, every label is 0)."""
        self._build()
        return int(getattr(self.train_set, "num_classes", 0))
