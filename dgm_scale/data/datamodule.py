"""Lightning data module: the loaders for a DataConfig.

Map-style datasets come from the registry (`build_dataset`) and are dealt to the ranks by a
resumable sampler; `data.name=shards` streams tar shards (data/shards/), split by rank and
worker inside the stream. Both report their position to the DataPosition callback.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, List, Optional, Tuple

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset

from dgm_scale.core.chain import callbacks_of

from .device import DevicePrefetchLoader, pin_memory_for
from .datasets import STREAM_DATASETS, TOY_DATASETS, DataError, build_dataset, kept_subset
from .labels import hide_labels
from .shards.manifest import read_manifest
from .shards.urls import expand_urls
from .position import DataPosition, ResumableDistributedSampler


class DataModule(L.LightningDataModule):
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
        self._stream_loaders: List[Any] = []  # shut down at teardown (their workers outlive an epoch)
        self._checked_specs = False

    # ------------------------------------------------------------------ setup
    def setup(self, stage: Optional[str] = None) -> None:
        """Build both splits once (later calls are no-ops); for fitting, check the batch fits."""
        self._build()
        if stage in (None, "fit"):  # fail before training starts, not on the first step
            self._check_batch_size()

    @property
    def streaming(self) -> bool:
        return self.cfg.name in STREAM_DATASETS

    def _build(self) -> None:
        """Build both splits on first use (shards: check that every spec expands to shards)."""
        if self.streaming:
            if not self._checked_specs:
                for spec in self._stream_specs() + ([self.cfg.val_path] if self.cfg.val_path else []):
                    expand_urls(spec)  # a DataError naming the path, before training starts
                self._checked_specs = True
            return
        if self.train_set is None:
            train_set = kept_subset(build_dataset(self.cfg, "train"), float(self.cfg.subset))
            self.train_set = hide_labels(train_set, self.cfg.labels_per_class, self.seed, self.cfg.name)
            self.val_set = build_dataset(self.cfg, "val")

    def _check_batch_size(self) -> None:
        # drop_last=True with a too-small dataset would give zero batches and a silent no-op run.
        if self.batch_size < 1:
            raise DataError(f"config key 'data.batch_size': must be >= 1, got {self.batch_size}")
        if self.streaming or isinstance(self.train_set, IterableDataset):
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
        sampler = ResumableDistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=self.seed)
        for position in callbacks_of(trainer, DataPosition) if trainer is not None else []:
            position.apply_to(sampler, self.batch_size)  # a resumed run: start the loader where it stopped
        return sampler

    @property
    def device(self) -> Optional[torch.device]:
        """Where training runs (None outside a Trainer)."""
        return self.trainer.strategy.root_device if self.trainer is not None else None

    def _prefetch_device(self, train: bool) -> Optional[torch.device]:
        return self.device if train and self.cfg.prefetch_to_device else None

    def _loader(self, dataset: Dataset, train: bool) -> DataLoader:
        workers = int(self.cfg.num_workers)
        loader = DevicePrefetchLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=self._train_sampler(dataset) if train else None,
            drop_last=train,  # fixed batch shapes for G/D steps
            num_workers=workers,
            persistent_workers=workers > 0,
            pin_memory=pin_memory_for(self.device, self.cfg.pin_memory),
        )
        loader.prefetch_device = self._prefetch_device(train)
        return loader

    # ------------------------------------------------------------------ shard streams
    def _stream_specs(self) -> List[str]:
        return [self.cfg.path, *self.cfg.mix]

    def _stream_loader(self, specs: List[str], train: bool):
        """A StreamLoader over tar shards: batches of (x, label, position info) made in workers."""
        from .shards.loader import make_stream_loader
        from .shards.stream import ShardStream

        cfg, trainer = self.cfg, self.trainer
        # Validation: every rank reads the whole held-out set in order (like the map-style split).
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None and train else (0, 1)
        resampled = bool(cfg.resampled) and train
        stream = ShardStream(
            specs, batch_size=self.batch_size, resolution=cfg.resolution, channels=cfg.channels,
            weights=list(cfg.weights) or None, hflip=cfg.hflip and train, seed=self.seed, rank=rank,
            world_size=world, shuffle_buffer=cfg.shuffle_buffer if train else 1, resampled=resampled,
            steps_per_epoch=cfg.steps_per_epoch if resampled else None, strict=cfg.strict, drop_last=train)
        loader = make_stream_loader(stream, num_workers=int(cfg.num_workers),
                                    pin_memory=pin_memory_for(self.device, cfg.pin_memory))
        loader.prefetch_device = self._prefetch_device(train)
        self._stream_loaders.append(loader)
        for position in callbacks_of(trainer, DataPosition) if trainer is not None and train else []:
            position.apply_to_stream(loader)  # a resumed run: start the stream where it stopped
        return loader

    def teardown(self, stage: str) -> None:
        # Lightning stops a DataLoader's persistent workers itself, but not a StreamLoader's.
        for loader in self._stream_loaders:
            loader.shutdown()
        self._stream_loaders.clear()

    # ------------------------------------------------------------------ loaders
    def train_dataloader(self):
        """Shuffled, drop_last batches of (x [B, ...], label [B]) (+ position info for shards)."""
        self.setup("fit")
        if self.streaming:
            return self._stream_loader(self._stream_specs(), train=True)
        return self._loader(self.train_set, train=True)

    def val_dataloader(self):
        """Ordered batches over the held-out split (may be empty when val_fraction=0 / no data.val_path)."""
        self.setup("validate")
        if self.streaming:
            return self._stream_loader([self.cfg.val_path], train=False) if self.cfg.val_path else []
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
        if self.streaming:  # known from our manifest; shards from other tools: unlabelled unless said
            manifest_path = Path(self.cfg.path) / "manifest.json"
            return int(read_manifest(manifest_path)["labels"]["num_classes"]) if manifest_path.is_file() else 0
        return int(getattr(self.train_set, "num_classes", 0))
