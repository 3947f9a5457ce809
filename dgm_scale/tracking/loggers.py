"""The one place where experiment loggers are built (W&B joins here in the production issue)."""
from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import List

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

    def _rewrite_with_new_header(self, fieldnames: list[str]) -> None:
        path = Path(self.metrics_file_path)
        with open(path, newline="") as handle:
            rows = list(csv.DictReader(handle))
        tmp = path.with_name(f".{path.name}.tmp")
        with open(tmp, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=fieldnames)
            writer.writeheader()
            writer.writerows(rows)
        os.replace(tmp, path)  # a crash mid-rewrite leaves the old file whole


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


def unsaved_metric_rows(trainer) -> list[dict]:
    """Metric rows the CSV logger holds in memory, not yet in metrics.csv (it writes every 100
    rows and at the end), so that a report made during training shows the newest values."""
    rows: list[dict] = []
    for logger in trainer.loggers:
        if isinstance(logger, AppendingCSVLogger) and logger._experiment is not None:
            rows += [dict(row) for row in logger.experiment.metrics]
    return rows
