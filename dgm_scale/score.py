"""Score a trained model: the sample metrics of each of its samplers and, for families with a
likelihood, the held-out bits per dim / char. Under torchrun the processes split the work."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch

from dgm_scale.core.errors import ConfigError

#: evaluate()'s keyword arguments that set an `eval.*` value of the run's config
EVAL_SETTINGS = ("real", "extractor", "num_samples", "num_real", "seed", "batch_size", "cache_dir",
                 "inception_weights", "metrics")


def init_distributed_from_env() -> None:
    """Join torchrun's process group (WORLD_SIZE > 1) so that the processes split the work."""
    import torch.distributed as dist

    from dgm_scale.distributed import launch_env

    if launch_env().world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")


def heldout_batches(module) -> Optional[Any]:
    """The run's held-out split (the same one training evaluates on), for families with a likelihood."""
    if not module.has_likelihood:
        return None
    from dgm_scale.data import DataModule

    datamodule = DataModule(module.cfg.data, seed=module.cfg.run.seed)
    datamodule.setup("validate")
    return datamodule.val_dataloader()


def evaluate(checkpoint: str | Path, out: Optional[str | Path] = None, device: Optional[str] = None,
             **settings: Any) -> dict[str, float]:
    """Score the model of `checkpoint` and return {metric: value} (a GAN's raw generator as
    `raw/<metric>`). `settings` replace the run's `eval.*` values: real, extractor, num_samples,
    num_real, seed, batch_size, cache_dir, inception_weights, metrics (a list or "fid,kid").
    Rank 0 writes the JSON report to `out` (default: CHECKPOINT.eval.json)."""
    from dgm_scale.metrics.evaluation import Evaluator, eval_settings, evaluate_module, scores_samples
    from dgm_scale.metrics.report import write_report
    from dgm_scale.modules import load_module

    unknown = sorted(set(settings) - set(EVAL_SETTINGS))
    if unknown:
        raise ConfigError(f"evaluate(): unknown setting(s) {unknown}; known: {list(EVAL_SETTINGS)}")
    init_distributed_from_env()
    module = load_module(checkpoint)
    cfg = module.cfg
    for key, value in settings.items():
        if value is None:
            continue
        if key == "metrics" and isinstance(value, str):
            value = [name.strip() for name in value.split(",") if name.strip()]
        setattr(cfg.eval, key, value)
    target = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if target.type == "cuda" and torch.distributed.is_initialized():
        target = torch.device("cuda", torch.cuda.current_device())
    evaluator, eval_config = None, None
    if scores_samples(cfg):
        eval_config = eval_settings(cfg)
        try:
            evaluator = Evaluator(eval_config, module.sample_shape, target)
        except ValueError as error:  # a bad extractor spec / weights file / option: one line, named
            raise ConfigError(str(error)) from None
    results = evaluate_module(module.to(target), evaluator, heldout_batches(module))
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        path = Path(out) if out is not None else Path(checkpoint).with_suffix(".eval.json")
        write_report(path, results, eval_config, Path(checkpoint), module.checkpoint_iteration,
                     evaluator.extractor.key() if evaluator is not None else None)
    return results
