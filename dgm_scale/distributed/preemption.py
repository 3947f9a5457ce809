"""SLURM preemption: on SIGUSR1, checkpoint at the next iteration boundary, requeue, stop.

Lightning's own handler (SLURMEnvironment auto_requeue) saves the checkpoint inside the signal
handler. Under DDP each rank runs that handler wherever its main thread happens to be, so one
rank's checkpoint collectives (barriers, gathers) can meet another rank's gradient all-reduce:
a hang, seen under CPU load. Here the handler only sets a flag; after each iteration the ranks
agree (one boolean all-reduce: any rank signalled) and all of them save
`RUN/hpc_ckpt_N.ckpt` together, at the same point, and training stops. Only after `fit`
returns - the loggers finalized, so the W&B run is finished and flushed - does rank 0 call
`scontrol requeue` (`requeue()`, called by train.py): SLURM ends the job's processes right after
it, and a W&B run cut off mid-stream cannot be continued cleanly by the requeued job. The
requeued job continues from that checkpoint (see resume.py).
"""
from __future__ import annotations

import logging
import signal
import subprocess
from pathlib import Path
from typing import Optional

import lightning as L

from dgm_scale.core.checkpoints import save_checkpoint_atomic

log = logging.getLogger(__name__)


def requeue_checkpoint(run_dir: Path) -> Optional[Path]:
    """The newest requeue checkpoint of a run (`hpc_ckpt_N.ckpt`, the name Lightning uses), if any."""
    candidates = sorted(run_dir.glob("hpc_ckpt_*.ckpt"), key=lambda p: int(p.stem.rsplit("_", 1)[1]))
    return candidates[-1] if candidates else None


def next_requeue_path(run_dir: Path) -> Path:
    """RUN/hpc_ckpt_{N+1}.ckpt after the newest existing one (the name Lightning uses)."""
    newest = requeue_checkpoint(run_dir)
    number = int(newest.stem.rsplit("_", 1)[1]) + 1 if newest else 1
    return run_dir / f"hpc_ckpt_{number}.ckpt"


class RequeueOnSignal(L.Callback):
    """Checkpoint + stop one iteration after SIGUSR1 reached any rank; then `requeue()`."""

    def __init__(self, run_dir: str | Path, slurm_job: Optional[str], signum: int = signal.SIGUSR1):
        self.run_dir, self.slurm_job, self.signum = Path(run_dir), slurm_job, signum
        self.signalled = False
        self.requeued_at: Optional[int] = None  # the iteration it stopped at, once it did

    def on_train_start(self, trainer: L.Trainer, pl_module) -> None:
        signal.signal(self.signum, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        self.signalled = True  # nothing else here: see the module docstring

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, *args) -> None:
        if not trainer.strategy.reduce_boolean_decision(self.signalled, all=False):
            return
        path = next_requeue_path(self.run_dir)
        save_checkpoint_atomic(trainer, path)
        self.requeued_at = pl_module.iteration
        if trainer.is_global_zero:
            log.info("signal %d: saved %s at iteration %d", self.signum, path, pl_module.iteration)
        trainer.should_stop = True

    def requeue(self) -> None:
        """`scontrol requeue JOB` once training stopped for the signal; call it on rank 0 after `fit`."""
        if self.requeued_at is None or not self.slurm_job:
            return
        result = subprocess.run(["scontrol", "requeue", self.slurm_job], capture_output=True, text=True)
        if result.returncode != 0:
            log.warning("scontrol requeue %s failed: %s", self.slurm_job, result.stderr.strip())
