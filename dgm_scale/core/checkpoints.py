"""Writing the full training state: atomically, never with NaN/Inf weights."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from dgm_scale.core.errors import NonFiniteError
from dgm_scale.core.files import atomic_path, temporary_path
from dgm_scale.core.finite import first_nonfinite


class DirectCheckpointIO(TorchCheckpointIO):
    """Writes the checkpoint straight to the path it is given (save_checkpoint_atomic's temporary
    name). Lightning's own IO first writes a whole copy to the system temp folder and then copies
    it over: twice the writing, a checkpoint-sized need for room in /tmp, and a full /tmp failing
    with an error that names neither file."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Optional[Any] = None) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as handle:  # a handle: a full disk is an OSError (a path: a RuntimeError)
            torch.save(checkpoint, handle)


def check_weights_finite(trainer, path: Path) -> None:
    """Refuse to write `path` when a weight or buffer (EMA included: it is a submodule) is NaN/Inf,
    so the last good checkpoint is never replaced by a broken one. Every rank checks its own
    replica (under FSDP: its shards), and one decision over all ranks makes them all refuse
    together, before the collective save."""
    pl_module = trainer.lightning_module
    bad = first_nonfinite(pl_module.state_dict().items())
    if trainer.world_size > 1 and trainer.strategy.reduce_boolean_decision(bad is not None, all=False):
        bad = bad or "a weight on another rank"
    if bad is not None:
        raise NonFiniteError(f"refusing to write checkpoint '{path.name}' at iteration {pl_module.iteration}: "
                             f"'{bad}' is not finite (the previous checkpoints are kept)")


def save_checkpoint_atomic(trainer, path: Path) -> None:
    """The full training state to `path` via a temporary name, fsync and a rename (collective:
    every rank calls it under DDP / DeepSpeed; rank 0 writes), so a crash never leaves half a
    file, and a full disk leaves the previous `path` whole and raises a one-line DiskFullError
    (core.files.atomic_path). Weights with a NaN/Inf are refused (NonFiniteError) before anything
    is written."""
    check_weights_finite(trainer, path)
    if getattr(trainer.strategy, "writes_checkpoint_files", False):  # FSDP: atomically, once its shards are written
        trainer.save_checkpoint(path, weights_only=False)
        return
    if not trainer.is_global_zero:  # only joins the collective save: rank 0 names, commits, cleans up
        trainer.save_checkpoint(temporary_path(path), weights_only=False)
        return
    with atomic_path(path) as tmp:
        trainer.save_checkpoint(tmp, weights_only=False)
