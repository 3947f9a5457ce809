"""Preemption: on SIGUSR1 or SIGTERM, checkpoint at the next iteration boundary and stop; under
SLURM, requeue the job after the signals `run.requeue_on` names (USR1 by default).

SLURM sends SIGUSR1 before a time limit when asked (`#SBATCH --signal=USR1@120`), and SIGTERM on
`scancel`, at the time limit and on preemption (then SIGKILL after its KillWait); torchrun's agent
sends SIGTERM to its workers when it is stopped; `kill` sends SIGTERM. Lightning's own handlers
save a checkpoint inside the signal handler (SIGUSR1) or ignore the signal (SIGTERM, under
SLURM). Under DDP each rank runs a handler wherever its main thread happens to be, so one rank's
checkpoint collectives could meet another rank's gradient all-reduce: a hang, seen under CPU
load. Here the handler only records the signal; after each iteration (with several processes:
each logged one, every `trainer.log_every` iterations, since the agreement - one boolean
all-reduce: any rank signalled - is read on the host, which waits for the device) the ranks
agree and all of them save `RUN/hpc_ckpt_N.ckpt` together, at
the same point, and training stops; older `hpc_ckpt_*` files are pruned like `iter_*` ones.
Only after `fit` returns - the loggers finalized, so the W&B run is finished and flushed - does
rank 0 call `scontrol requeue` (`requeue()`, called by train.py) when the signal asks for it:
SLURM ends the job's processes right after it, and a W&B run cut off mid-stream cannot be
continued cleanly by the requeued job. The requeued job continues from that checkpoint (see
resume.py); without a requeue, `resume=auto` does.
"""
from __future__ import annotations

import logging
import signal
import subprocess
import threading
from pathlib import Path
from typing import Optional, Sequence

import lightning as L

from dgm_scale.core.checkpoints import save_checkpoint_atomic

log = logging.getLogger(__name__)

SIGNALS = {"USR1": signal.SIGUSR1, "TERM": signal.SIGTERM}
REQUEUE_CHECKPOINT = "hpc_ckpt_{}.ckpt"


def requeue_checkpoints(run_dir: Path) -> list[Path]:
    """The run's signal checkpoints (`hpc_ckpt_N.ckpt`, the name Lightning uses), oldest first."""
    return sorted(run_dir.glob("hpc_ckpt_*.ckpt"), key=lambda p: int(p.stem.rsplit("_", 1)[1]))


def requeue_checkpoint(run_dir: Path) -> Optional[Path]:
    """The newest signal checkpoint of a run, if any."""
    candidates = requeue_checkpoints(run_dir)
    return candidates[-1] if candidates else None


def next_requeue_path(run_dir: Path) -> Path:
    """RUN/hpc_ckpt_{N+1}.ckpt after the newest existing one."""
    newest = requeue_checkpoint(run_dir)
    number = int(newest.stem.rsplit("_", 1)[1]) + 1 if newest else 1
    return run_dir / REQUEUE_CHECKPOINT.format(number)


def prune_requeue_checkpoints(run_dir: Path, keep: int) -> list[Path]:
    """Delete all but the newest `keep` hpc_ckpt_* files (0: keep all); returns the deleted."""
    doomed = requeue_checkpoints(run_dir)[:-keep] if keep > 0 else []
    for path in doomed:
        path.unlink(missing_ok=True)
    return doomed


class StopOnSignal(L.Callback):
    """Checkpoint + stop at the end of the iteration in which SIGUSR1 or SIGTERM reached any rank
    (several processes: of the next iteration that is a multiple of `log_every`); then, under
    SLURM and for the signals in `requeue_on`, `requeue()`."""

    def __init__(self, run_dir: str | Path, slurm_job: Optional[str], requeue_on: Sequence[str] = ("USR1",),
                 keep: int = 5, log_every: int = 1):
        self.run_dir, self.slurm_job, self.keep, self.log_every = Path(run_dir), slurm_job, keep, log_every
        self.requeue_on = {SIGNALS[name] for name in requeue_on}
        self.received: Optional[int] = None
        self.stopped_at: Optional[int] = None  # the iteration it stopped at, once it did
        self._previous: dict[int, object] = {}

    def on_train_start(self, trainer: L.Trainer, pl_module) -> None:
        # Here, not earlier: Lightning installs its own SIGTERM handler after the fit-start hooks
        # (it would broadcast from inside the handler and raise in the loop); this one replaces it.
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set in the main thread
        for signum in SIGNALS.values():
            self._previous[signum] = signal.signal(signum, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        self.received = signum  # nothing else here: see the module docstring

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, *args) -> None:
        if trainer.world_size > 1 and pl_module.iteration % self.log_every != 0:
            return
        if not trainer.strategy.reduce_boolean_decision(self.received is not None, all=False):
            return
        path = next_requeue_path(self.run_dir)
        save_checkpoint_atomic(trainer, path)
        self.stopped_at = pl_module.iteration
        if trainer.is_global_zero:
            prune_requeue_checkpoints(self.run_dir, self.keep)
            log.info("signal %s: saved %s at iteration %d", self.received or "on another rank", path,
                     pl_module.iteration)
        trainer.should_stop = True

    def teardown(self, trainer: L.Trainer, pl_module, stage: str) -> None:
        """Give the process its previous handlers back where ours is still installed (Lightning's
        own teardown, which runs first, may already have restored the originals)."""
        for signum, handler in self._previous.items():
            if signal.getsignal(signum) == self._on_signal:
                signal.signal(signum, handler)
        self._previous = {}

    def requeue(self) -> None:
        """`scontrol requeue JOB` when training stopped for a signal `requeue_on` names, under
        SLURM; call it on rank 0 after `fit`. (Another rank's signal counts as USR1: SLURM
        signals every task alike.)"""
        signum = self.received if self.received is not None else signal.SIGUSR1
        if self.stopped_at is None or not self.slurm_job or signum not in self.requeue_on:
            return
        result = subprocess.run(["scontrol", "requeue", self.slurm_job], capture_output=True, text=True)
        if result.returncode != 0:
            log.warning("scontrol requeue %s failed: %s", self.slurm_job, result.stderr.strip())
