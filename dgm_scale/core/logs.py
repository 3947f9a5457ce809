"""Write values and images straight to a trainer's loggers, at the step of the current batch."""
from __future__ import annotations

from typing import Any, Optional

from dgm_scale.core.lightning_internals import logger_step


def log_now(trainer, metrics: dict[str, float], step: Optional[int] = None) -> None:
    """Write metrics straight to the loggers on rank 0, at Lightning's step for this batch
    (or `step`).

    For values logged every k iterations from callbacks. Not `pl_module.log_dict`: Lightning
    keeps a value logged in on_train_batch_end and writes it again with every later batch's row
    until the epoch ends, so it would show up in up to k rows per window.
    """
    if not trainer.is_global_zero:
        return
    step = logger_step(trainer) if step is None else step
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=step)


def log_media_now(trainer, key: str, image: Any = None, text: Optional[list[str]] = None,
                  caption: Optional[str] = None) -> None:
    """Send an image (PIL) or text samples to the loggers that take them (W&B) on rank 0; the
    CSV logger has no place for either, so the callbacks that make them stay logger-agnostic."""
    if not trainer.is_global_zero:
        return
    from lightning.pytorch.loggers import WandbLogger

    step = logger_step(trainer)
    for logger in trainer.loggers:
        if not isinstance(logger, WandbLogger):
            continue
        if image is not None:
            logger.log_image(key, [image], step=step, **({"caption": [caption]} if caption else {}))
        if text is not None:
            logger.log_text(key, columns=["sample"], data=[[line] for line in text], step=step)
