"""The one place where experiment loggers are built (W&B joins here in the production issue)."""
from __future__ import annotations

from pathlib import Path
from typing import List

from lightning.pytorch.loggers import CSVLogger, Logger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment


class _AppendingWriter(ExperimentWriter):
    """Lightning's CSV writer deletes an existing metrics.csv when it starts; a resumed run
    (e.g. after a SLURM requeue) must append to it instead."""

    def _check_log_dir_exists(self) -> None:
        pass


class AppendingCSVLogger(CSVLogger):
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
