"""Training callbacks: sample grids from a fixed latent batch, atomic checkpoints, progress bar."""
from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Optional

import lightning as L
from lightning.pytorch.utilities import rank_zero_only
from tqdm.auto import tqdm

from dgm_scale.core.checkpoints import save_checkpoint_atomic
from dgm_scale.core.files import save_png_atomic, write_text_atomic
from dgm_scale.core.logs import log_media_now
from dgm_scale.distributed.interface import step_interface
from dgm_scale.modules.sampling import STRIP
from dgm_scale.tracking.images import image_grid, samples_to_image, samples_to_text

ITERATION_CHECKPOINT = re.compile(r"iter_(\d+)\.ckpt")
TEXT_SAMPLES = 8  # text samples written per sample "grid"


class SampleGrids(L.Callback):
    """Every `every` iterations (and at the end) save samples of the same seed: an image grid
    (scatter plot for 2-D points) as samples/NAME.png, or text samples as samples/NAME.txt; for
    image models with a latent space also the interpolation strip `dgm-scale serve` draws first
    (sampling.STRIP) as samples/interpolation.png (the newest only)."""

    def __init__(self, out_dir: str | Path, every: int, num_samples: int, seed: int = 1234, reference=None):
        self.out_dir, self.every, self.num_samples, self.seed = Path(out_dir), every, num_samples, seed
        self.reference = reference  # optional [K, 2] mode centres drawn on toy scatter plots

    def draw(self, trainer, pl_module) -> tuple:
        """(samples, interpolation strip frames or None), drawn on every rank: with sharded
        weights (FSDP) the forwards are collective, and lazily refreshed sampling state (a GAN's
        EMA statistics) must stay the same on every rank."""
        with step_interface(trainer).full_weights(pl_module):
            if pl_module.modality == "text":
                return pl_module.sample(min(self.num_samples, TEXT_SAMPLES), seed=self.seed), None
            samples = pl_module.sample(self.num_samples, seed=self.seed)
            return samples, pl_module.interpolate(*STRIP) if pl_module.modality == "images" else None

    def save(self, trainer, pl_module, name: str) -> Optional[Path]:
        """Write samples/NAME.* and latest.*, and send them to the loggers that take media (rank 0;
        every rank calls it)."""
        samples, frames = self.draw(trainer, pl_module)
        if not trainer.is_global_zero:
            return None
        caption = f"{name} (iteration {pl_module.iteration})"
        if pl_module.modality == "text":
            texts = samples_to_text(samples)
            body = "\n\n".join(f"--- sample {i} ---\n{text}" for i, text in enumerate(texts)) + "\n"
            write_text_atomic(self.out_dir / "latest.txt", body)
            log_media_now(trainer, "samples", text=texts, caption=caption)
            return write_text_atomic(self.out_dir / f"{name}.txt", body)
        image = samples_to_image(samples, self.reference)
        save_png_atomic(image, self.out_dir / "latest.png")
        path = save_png_atomic(image, self.out_dir / f"{name}.png")
        log_media_now(trainer, "samples", image=image, caption=caption)
        if frames is not None:
            self.save_strip(trainer, frames, caption)
        return path

    def save_strip(self, trainer, frames, caption: str) -> None:
        """samples/interpolation.png (and W&B's `interpolation`) of the strip's frames."""
        seed_a, seed_b, steps = STRIP
        strip = image_grid(frames, nrow=steps, scale=max(1, 64 // frames.shape[-1]))
        save_png_atomic(strip, self.out_dir / "interpolation.png")
        log_media_now(trainer, "interpolation", image=strip, caption=f"seed {seed_a} -> {seed_b}, {caption}")

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        if pl_module.iteration % self.every == 0:
            self.save(trainer, pl_module, f"iter_{pl_module.iteration:07d}")

    def on_train_end(self, trainer, pl_module) -> None:
        self.save(trainer, pl_module, "final")


class PeriodicCheckpoint(L.Callback):
    """`last.ckpt` every `every` iterations and at the end, plus a kept `iter_XXXXXXX.ckpt` copy.

    Written to a temporary name then renamed, so a crash mid-write never destroys the previous
    good checkpoint (the stock ModelCheckpoint writes in place). Only the newest `keep`
    iter_*.ckpt files stay (0: all). A run that stops inside an epoch (its last iteration,
    `max_iterations`, or a signal: StopOnSignal runs first and sets `should_stop`) writes its
    last.ckpt at that batch's end: by `on_train_end` Lightning's loop counts the epoch as
    finished, and a run resumed from there would skip the rest of it.
    """

    def __init__(self, dirpath: str | Path, every: int, keep: int = 0, max_iterations: Optional[int] = None):
        self.dirpath, self.every, self.keep, self.max_iterations = Path(dirpath), every, keep, max_iterations
        self._last_saved_at: Optional[int] = None  # the iteration of the newest last.ckpt

    def _save(self, trainer, name: str) -> None:
        save_checkpoint_atomic(trainer, self.dirpath / name)

    def _stopping(self, trainer, iteration: int) -> bool:
        return trainer.should_stop or (self.max_iterations is not None and iteration >= self.max_iterations)

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        iteration = pl_module.iteration
        periodic = iteration % self.every == 0
        if periodic:
            self._save(trainer, f"iter_{iteration:07d}.ckpt")
        if periodic or self._stopping(trainer, iteration):
            self._save(trainer, "last.ckpt")
            self._last_saved_at = iteration
        if periodic and trainer.is_global_zero:  # after both new files are in place (or on their way)
            prune_iteration_checkpoints(self.dirpath, self.keep, saved=iteration)

    def on_train_end(self, trainer, pl_module) -> None:
        if self._last_saved_at != pl_module.iteration:  # the loop ended some other way
            self._save(trainer, "last.ckpt")


def prune_iteration_checkpoints(dirpath: Path, keep: int, saved: Optional[int] = None) -> list[Path]:
    """Delete all but the `keep` highest-iteration iter_*.ckpt files in `dirpath` (0: keep all);
    last.ckpt, best.ckpt and other files are never touched. Returns the deleted paths. `saved`:
    the iteration just saved counts among them even while its file is not there yet (written
    once its shards are, with trainer.fsdp.async_save)."""
    if keep <= 0:
        return []
    found = [(int(m.group(1)), path) for path in dirpath.iterdir() if (m := ITERATION_CHECKPOINT.fullmatch(path.name))]
    if saved is not None and saved not in {iteration for iteration, _ in found}:
        found.append((saved, dirpath / f"iter_{saved:07d}.ckpt"))
    doomed = [path for _, path in sorted(found)[:-keep]]
    for path in doomed:
        path.unlink(missing_ok=True)
    return doomed


class IterationProgress(L.Callback):
    """One progress bar over all iterations (Lightning's resets every epoch, of ~25 batches here);
    its values (the modules' `prog_bar` logs) are shown every `log_every` iterations."""

    def __init__(self, total: int, log_every: int = 10):
        self.total, self.log_every = total, log_every
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
        if pl_module.iteration % self.log_every == 0:  # the values' only iterations: reading them syncs
            metrics = {k: f"{float(v):.3f}" for k, v in trainer.progress_bar_metrics.items()}
            self.bar.set_postfix(metrics, refresh=False)

    @rank_zero_only
    def on_train_end(self, trainer, pl_module) -> None:
        if self.bar is not None:
            self.bar.close()
