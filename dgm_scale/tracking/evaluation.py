"""Evaluation during training: every `eval.every` iterations and at the end.

Every rank takes part (each generates and scores its share, see metrics/evaluation.py): the
sample metrics of each of the family's samplers (a GAN with an EMA: `eval/*` for the EMA
generator, `eval_raw/*` for the raw one), for families scored on the held-out split the
held-out bits per dim / char or their held-out scores (a classifier's `eval/test_accuracy`),
and with `probe` in eval.metrics the model's `eval/probe_*` (see metrics/probe_metric.py; rank 0
also writes its 2-D projection to `RUN/eval/projection.npz`, drawn by the report and sent to W&B
as the image `projection`). Rank 0 logs them, appends a line to `RUN/eval/metrics.jsonl`, and -
when `eval.best_metric` (of the default sampler) improved - every rank joins in writing
`checkpoints/best.ckpt` (a collective under DDP / DeepSpeed), with `best.json` beside it naming
the iteration and the metrics. The best value so far is saved in checkpoints, so a resumed run
keeps comparing against it.
"""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any, Optional

import lightning as L

from dgm_scale.core.checkpoints import save_checkpoint_atomic
from dgm_scale.core.files import append_text, write_json_atomic
from dgm_scale.core.lightning_internals import last_batch_step
from dgm_scale.core.logs import log_media_now, log_now
from dgm_scale.distributed.interface import step_interface

log = logging.getLogger(__name__)

#: what eval.best_metric=auto means: the first of these the evaluation reports
AUTO_BEST = ("fid", "bits_per_dim", "bits_per_char")


def logged_name(result: str) -> str:
    """`fid` -> `eval/fid`; a sampler variant's `raw/fid` -> `eval_raw/fid`."""
    variant, _, name = result.rpartition("/")
    return f"eval_{variant}/{name}" if variant else f"eval/{name}"


def best_metric_of(setting: str, results: dict[str, float]) -> Optional[str]:
    if setting != "auto":
        return setting or None
    return next((name for name in AUTO_BEST if name in results), None)


class PeriodicEvaluation(L.Callback):
    """Evaluate every `every` iterations (0: never), and at the end when training reached
    `final_iteration` (None: no final evaluation; a run stopped early, say for a SLURM requeue,
    is evaluated when it finishes). `settings`: the sample metrics' EvalSettings, None where the
    samples are not scored (text); `extractor`: one built beforehand from them
    (prepare_evaluation, on rank 0), so it is not loaded twice."""

    def __init__(self, settings, run_dir: str | Path, every: int, final_iteration: Optional[int] = None,
                 best_metric: str = "auto", extractor=None):
        self.settings, self.run_dir, self.prepared_extractor = settings, Path(run_dir), extractor
        self.every, self.final_iteration, self.best_metric = every, final_iteration, best_metric
        self.evaluator = None  # built at train start, when the device and process group exist
        self.probe = None  # likewise, with `probe` in eval.metrics
        self.best: Optional[float] = None
        self.best_iteration: Optional[int] = None
        self.last_evaluated: Optional[int] = None

    def on_train_start(self, trainer: L.Trainer, pl_module) -> None:
        from dgm_scale.metrics.evaluation import Evaluator
        from dgm_scale.metrics.probe_metric import ProbeEvaluator

        wanted = self.every > 0 or self.final_iteration is not None
        if self.settings is None or not wanted:
            return
        if self.evaluator is None and self.settings.has_sample_metrics:
            self.evaluator = Evaluator(self.settings, pl_module.sample_shape, pl_module.device,
                                       extractor=self.prepared_extractor)
            self.prepared_extractor = None  # the evaluator holds it now
        if self.probe is None and self.settings.has_probe:
            self.probe = ProbeEvaluator(self.settings, pl_module.sample_shape)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, *args) -> None:
        if self.every > 0 and pl_module.iteration % self.every == 0:
            self.run(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module) -> None:
        done = self.final_iteration is not None and pl_module.iteration >= self.final_iteration
        if done and self.last_evaluated != pl_module.iteration:
            self.run(trainer, pl_module, step=last_batch_step(trainer))

    def run(self, trainer: L.Trainer, pl_module, step: Optional[int] = None) -> dict[str, float]:
        from dgm_scale.metrics.evaluation import evaluate_module

        iteration = pl_module.iteration
        datamodule = getattr(trainer, "datamodule", None)
        heldout = datamodule.val_dataloader() if pl_module.uses_heldout and datamodule is not None else None
        with step_interface(trainer).full_weights(pl_module):  # collective: every rank runs evaluations
            results = evaluate_module(pl_module, self.evaluator, heldout, self.probe)
        self.last_evaluated = iteration
        log_now(trainer, {logged_name(name): value for name, value in results.items()}, step)
        if trainer.is_global_zero and self.probe is not None:
            self.save_projection(trainer, iteration)
        if trainer.is_global_zero:
            append_text(self.run_dir / "eval" / "metrics.jsonl", json.dumps({"iteration": iteration, **results}) + "\n")
            log.info("iteration %d: %s", iteration,
                     ", ".join(f"{k} {v:.4g}" for k, v in results.items() if not k.endswith("eval_seconds")))
        metric = best_metric_of(self.best_metric, results)
        value = results.get(metric) if metric else None
        if value is not None and math.isfinite(value) and (self.best is None or value < self.best):
            self.best, self.best_iteration = value, iteration
            save_checkpoint_atomic(trainer, self.run_dir / "checkpoints" / "best.ckpt")
            if trainer.is_global_zero:
                write_json_atomic(self.run_dir / "checkpoints" / "best.json",
                                  {"iteration": iteration, "metric": metric, **results})
        return results

    def save_projection(self, trainer: L.Trainer, iteration: int) -> None:
        """RUN/eval/projection.npz (the report draws it) and the picture for W&B (rank 0)."""
        from dgm_scale.tracking.report import projection_image, read_projection, save_projection

        save_projection(self.run_dir, self.probe.projection, iteration)
        log_media_now(trainer, "projection", image=projection_image(read_projection(self.run_dir)),
                      caption=f"iteration {iteration}")

    def setup(self, trainer: L.Trainer, pl_module, stage: str) -> None:
        if trainer.is_global_zero:
            (self.run_dir / "eval").mkdir(parents=True, exist_ok=True)

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "best_iteration": self.best_iteration, "last_evaluated": self.last_evaluated}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.best = state_dict.get("best")
        self.best_iteration = state_dict.get("best_iteration")
        self.last_evaluated = state_dict.get("last_evaluated")
