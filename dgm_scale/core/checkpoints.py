"""Writing the full training state: atomically, never with NaN/Inf weights."""
from __future__ import annotations

from pathlib import Path

from dgm_scale.core.errors import NonFiniteError
from dgm_scale.core.files import commit_file, temporary_path
from dgm_scale.core.finite import first_nonfinite


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
    """The full training state to `path` via a temporary name, fsync and a rename (collective:
    every rank calls it under DDP / DeepSpeed; rank 0 writes), so a crash never leaves half a
    file. Weights with a NaN/Inf are refused (NonFiniteError) before anything is written."""
    check_weights_finite(trainer.lightning_module, path)
    tmp = temporary_path(path)
    trainer.save_checkpoint(tmp, weights_only=False)
    if trainer.is_global_zero:
        commit_file(tmp, path)
