"""The private Lightning trainer internals dgm_scale calls, in one place.

Lightning (2.4-2.6) offers no public way to do either; tests/test_lightning_internals.py checks
both against the installed version, so a Lightning release that changes them fails there, by
name, rather than as wrong step numbers somewhere in a run. (The logger subclasses in
tracking/loggers.py also use protected attributes of the loggers they extend.)
"""
from __future__ import annotations

from typing import Any


def logger_step(trainer: Any) -> int:
    """The step Lightning's loggers get for values `self.log`-ged in the current batch.

    Callbacks that write to the loggers themselves (evaluations, throughput, images) use it so
    that their values land in the same metrics.csv row / W&B step as the batch's training values;
    it counts batches in which an optimizer stepped (our iterations), unlike `global_step`,
    which counts optimizer steps.
    """
    return trainer.fit_loop.epoch_loop._batches_that_stepped


def last_batch_step(trainer: Any) -> int:
    """`logger_step` of the last batch, for values logged after the loop (on_train_end), where
    Lightning's counter has already moved past that batch: an evaluation at the end then shares
    the last iteration's row instead of claiming one more iteration."""
    return max(logger_step(trainer) - 1, 0)


def count_skipped_optimizer_step(lightning_optimizer: Any) -> None:
    """Advance Lightning's optimizer-step counter (`global_step`) as a real `opt.step()` would,
    without stepping: the hooks its manual-optimisation loop runs around a step."""
    lightning_optimizer._on_before_step()
    lightning_optimizer._on_after_step()
