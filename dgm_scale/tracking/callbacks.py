"""Training callbacks: sample grids from a fixed latent batch, atomic checkpoints, progress bar."""
from __future__ import annotations

import os
import re
import time
from pathlib import Path
from typing import Optional

import lightning as L
from lightning.pytorch.utilities import rank_zero_only
from tqdm.auto import tqdm

from dgm_scale.modules.guards import NonFiniteError, first_nonfinite
from dgm_scale.tracking.images import samples_to_image, save_png_atomic
from dgm_scale.tracking.loggers import log_image_now

ITERATION_CHECKPOINT = re.compile(r"iter_(\d+)\.ckpt")


class SampleGrids(L.Callback):
    """Every `every` iterations (and at the end) save a grid from the same latents: seed fixed."""

    def __init__(self, out_dir: str | Path, every: int, num_samples: int, seed: int = 1234, reference=None):
        self.out_dir, self.every, self.num_samples, self.seed = Path(out_dir), every, num_samples, seed
        self.reference = reference  # optional [K, 2] mode centres drawn on toy scatter plots

    def save(self, trainer, pl_module, name: str) -> Path:
        """Write samples/NAME.png and latest.png, and send the grid to image-taking loggers."""
        image = samples_to_image(pl_module.sample(self.num_samples, seed=self.seed), self.reference)
        save_png_atomic(image, self.out_dir / "latest.png")
        path = save_png_atomic(image, self.out_dir / f"{name}.png")
        log_image_now(trainer, "samples", image, caption=f"{name} (iteration {pl_module.iteration})")
        return path

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        if pl_module.iteration % self.every == 0 and trainer.is_global_zero:
            self.save(trainer, pl_module, f"iter_{pl_module.iteration:07d}")

    def on_train_end(self, trainer, pl_module) -> None:
        if trainer.is_global_zero:
            self.save(trainer, pl_module, "final")


def check_weights_finite(pl_module, path: Path) -> None:
    """Refuse to write `path` when a weight or buffer (EMA included: it is a submodule) is NaN/Inf,
    so the last good checkpoint is never replaced by a broken one. Every rank checks its own
    replica (identical under our DDP), so under DDP all ranks refuse together, before the
    collective save."""
    bad = first_nonfinite(pl_module.state_dict().items())
    if bad is not None:
        raise NonFiniteError(f"refusing to write checkpoint '{path.name}' at iteration {pl_module.iteration}: "
                             f"'{bad}' is not finite (the previous checkpoints are kept)")


def save_checkpoint_atomic(trainer, path: Path) -> None:
    """The full training state to `path` via a temporary name and a rename (collective: every
    rank calls it under DDP / DeepSpeed; rank 0 writes), so a crash never leaves half a file.
    Weights with a NaN/Inf are refused (NonFiniteError) before anything is written."""
    check_weights_finite(trainer.lightning_module, path)
    tmp = path.with_name(f".{path.name}.tmp")
    trainer.save_checkpoint(tmp, weights_only=False)
    if trainer.is_global_zero:
        os.replace(tmp, path)


class PeriodicCheckpoint(L.Callback):
    """`last.ckpt` every `every` iterations and at the end, plus a kept `iter_XXXXXXX.ckpt` copy.

    Written to a temporary name then renamed, so a crash mid-write never destroys the previous
    good checkpoint (the stock ModelCheckpoint writes in place). Only the newest `keep`
    iter_*.ckpt files stay (0: all).
    """

    def __init__(self, dirpath: str | Path, every: int, keep: int = 0):
        self.dirpath, self.every, self.keep = Path(dirpath), every, keep

    def _save(self, trainer, name: str) -> None:
        save_checkpoint_atomic(trainer, self.dirpath / name)

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        if pl_module.iteration % self.every == 0:
            self._save(trainer, f"iter_{pl_module.iteration:07d}.ckpt")
            self._save(trainer, "last.ckpt")
            if trainer.is_global_zero:  # after both new files are in place
                prune_iteration_checkpoints(self.dirpath, self.keep)

    def on_train_end(self, trainer, pl_module) -> None:
        if pl_module.iteration % self.every != 0:  # else on_train_batch_end just wrote it
            self._save(trainer, "last.ckpt")


def prune_iteration_checkpoints(dirpath: Path, keep: int) -> list[Path]:
    """Delete all but the `keep` highest-iteration iter_*.ckpt files in `dirpath` (0: keep all);
    last.ckpt, best.ckpt and other files are never touched. Returns the deleted paths."""
    if keep <= 0:
        return []
    found = [(int(m.group(1)), path) for path in dirpath.iterdir() if (m := ITERATION_CHECKPOINT.fullmatch(path.name))]
    doomed = [path for _, path in sorted(found)[:-keep]]
    for path in doomed:
        path.unlink(missing_ok=True)
    return doomed


class IterationProgress(L.Callback):
    """One progress bar over all iterations (Lightning's resets every epoch, of ~25 batches here)."""

    def __init__(self, total: int):
        self.total = total
        self.bar: Optional[tqdm] = None
        self.start_time = 0.0
        self.start_iteration = 0

    @rank_zero_only
    def on_train_start(self, trainer, pl_module) -> None:
        self.start_time, self.start_iteration = time.perf_counter(), pl_module.iteration
        self.bar = tqdm(total=self.total, initial=pl_module.iteration, desc="train", unit="it", dynamic_ncols=True)

    @rank_zero_only
    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        self.bar.update(pl_module.iteration - self.bar.n)
        if pl_module.iteration % 10 == 0:
            metrics = {k: f"{float(v):.3f}" for k, v in trainer.progress_bar_metrics.items()}
            self.bar.set_postfix(metrics, refresh=False)

    @rank_zero_only
    def on_train_end(self, trainer, pl_module) -> None:
        if self.bar is not None:
            self.bar.close()
