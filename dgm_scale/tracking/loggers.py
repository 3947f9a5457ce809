"""The one place where experiment loggers are built (W&B joins here in the production issue)."""
from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any, List, Optional

import lightning as L
from lightning.pytorch.loggers import CSVLogger, Logger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment
from lightning.pytorch.utilities import rank_zero_only


class _AppendingWriter(ExperimentWriter):
    """Lightning's CSV writer deletes an existing metrics.csv when it starts; a resumed run
    (e.g. after a SLURM requeue) must append to it instead. A new column (say, a metric first
    logged after the resume) rewrites the file with the wider header, atomically."""

    def __init__(self, log_dir: str) -> None:
        super().__init__(log_dir)
        path = Path(self.metrics_file_path)
        if path.is_file():  # continue with the columns the file already has
            with open(path, newline="") as handle:
                self.metrics_keys = sorted(next(csv.reader(handle), []))

    def _check_log_dir_exists(self) -> None:
        pass

    def log_metrics(self, metrics_dict: dict, step: int | None = None) -> None:
        """Values logged at the same step (training values, perf/*, data/*, eval/*) share one row."""
        pending = self.metrics[-1] if self.metrics else None
        super().log_metrics(metrics_dict, step)
        if pending is not None and pending.get("step") == self.metrics[-1]["step"] \
                and not (set(pending) & set(self.metrics[-1])) - {"step"}:
            pending.update(self.metrics.pop())

    def _rewrite_with_new_header(self, fieldnames: list[str], before_step: Optional[int] = None) -> None:
        """Rewrite the file with `fieldnames`, atomically; with `before_step`, keep only the rows
        of earlier steps (and drop a last line cut short by a kill: it has no newline)."""
        path = Path(self.metrics_file_path)
        text = path.read_text()
        if before_step is not None and not text.endswith("\n"):
            text = text[:text.rfind("\n") + 1]
        rows = list(csv.DictReader(text.splitlines()))
        if before_step is not None:
            rows = [row for row in rows if row.get("step") and int(float(row["step"])) < before_step]
        tmp = path.with_name(f".{path.name}.tmp")
        with open(tmp, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=fieldnames)
            writer.writeheader()
            writer.writerows(rows)
        os.replace(tmp, path)  # a crash mid-rewrite leaves the old file whole

    def flush_before(self, step: int) -> list[dict]:
        """Write the pending rows of steps < `step`; return (and keep pending) the rest."""
        later = [row for row in self.metrics if row.get("step", -1) >= step]
        self.metrics = [row for row in self.metrics if row.get("step", -1) < step]
        self.save()
        self.metrics = later
        return [dict(row) for row in later]

    def rewind(self, step: int, pending: list[dict]) -> None:
        """Continue as at a checkpoint of `step`: rows of steps >= `step` on disk (written after
        that checkpoint by a run that was then killed) go; the rows pending then come back."""
        if Path(self.metrics_file_path).is_file():
            self._rewrite_with_new_header(self.metrics_keys, before_step=step)
        self.metrics = [dict(row) for row in pending] + self.metrics


class AppendingCSVLogger(CSVLogger):
    @rank_zero_only
    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        """As CSVLogger's, but flushes only when a new step begins, so that values logged later
        at the same step (callbacks) still join the step's row instead of starting a new one."""
        experiment = self.experiment
        pending = experiment.metrics
        if pending and step is not None and pending[-1].get("step") != step \
                and len(pending) >= self._flush_logs_every_n_steps:
            self.save()
        experiment.log_metrics(metrics, step if step is not None else len(pending))

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment


class MetricsResumePoint(L.Callback):
    """Keeps metrics.csv in step with the checkpoints, so a run killed at any moment and resumed
    logs every iteration exactly once.

    Rows are buffered in memory and appended in batches. With every checkpoint, rank 0 writes
    the rows of earlier steps and stores the current step's (still open) rows in the checkpoint;
    a run resumed from it drops the rows the killed run wrote after that checkpoint and reopens
    the stored ones.
    """

    def __init__(self) -> None:
        self._restore: Optional[dict] = None
        self._trainer = None

    @staticmethod
    def _writer(trainer) -> Optional[_AppendingWriter]:
        if trainer is None or not trainer.is_global_zero:
            return None
        loggers = [lg for lg in trainer.loggers if isinstance(lg, AppendingCSVLogger)]
        return loggers[0].experiment if loggers else None

    def setup(self, trainer, pl_module, stage: str) -> None:
        self._trainer = trainer  # state_dict() gets no trainer

    def state_dict(self) -> dict[str, Any]:
        writer = self._writer(self._trainer)
        if writer is None:
            return {}
        step = self._trainer.fit_loop.epoch_loop._batches_that_stepped
        return {"step": step, "pending": writer.flush_before(step)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._restore = state_dict or None

    def on_train_start(self, trainer, pl_module) -> None:
        writer = self._writer(trainer)
        if writer is not None and self._restore is not None:
            writer.rewind(self._restore["step"], self._restore["pending"])
        self._restore = None


def build_loggers(cfg, run_dir: str | Path) -> List[Logger]:
    """Metrics go to `RUN/metrics.csv`: one row per logged iteration, appended across resumes."""
    return [AppendingCSVLogger(save_dir=str(run_dir), name="", version="")]


def log_now(trainer, metrics: dict[str, float]) -> None:
    """Write metrics straight to the loggers on rank 0, at Lightning's step for this batch.

    For values logged every k iterations from callbacks. Not `pl_module.log_dict`: Lightning
    keeps a value logged in on_train_batch_end and writes it again with every later batch's row
    until the epoch ends, so it would show up in up to k rows per window.
    """
    if not trainer.is_global_zero:
        return
    step = trainer.fit_loop.epoch_loop._batches_that_stepped  # the step self.log in this batch uses
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=step)
