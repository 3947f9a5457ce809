"""The one place where experiment loggers are built (W&B joins here in the production issue)."""
from __future__ import annotations

from pathlib import Path
from typing import List

from lightning.pytorch.loggers import CSVLogger, Logger


def build_loggers(cfg, run_dir: str | Path) -> List[Logger]:
    """Metrics go to `RUN/metrics.csv`: one row per logged iteration."""
    return [CSVLogger(save_dir=str(run_dir), name="", version="")]
