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
    """The run's held-out split (the same one training evaluates on), for families scored on it
    (a likelihood, held-out scores such as a classifier's accuracy)."""
    if not module.uses_heldout:
        return None
    from dgm_scale.data import DataModule

    datamodule = DataModule(module.cfg.data, seed=module.cfg.run.seed)
    datamodule.setup("validate")
    return datamodule.val_dataloader()


def evaluate(checkpoint: str | Path, out: Optional[str | Path] = None, device: Optional[str] = None,
             trust_code: bool = False, **settings: Any) -> dict[str, float]:
    """Score the model of `checkpoint` and return {metric: value} (a GAN's raw generator as
    `raw/<metric>`). `settings` replace the run's `eval.*` values: real, extractor, num_samples,
    num_real, seed, batch_size, cache_dir, inception_weights, metrics (a list or "fid,kid").
    Rank 0 writes the JSON report to `out` (default: CHECKPOINT.eval.json). `trust_code`: as
    for load_module (the checkpoint's own code outside dgm_scale is imported only then)."""
    from dgm_scale.metrics.evaluation import Evaluator, eval_settings, evaluate_module, scores_samples
    from dgm_scale.metrics.probe_metric import ProbeEvaluator
    from dgm_scale.metrics.registry import known_metrics
    from dgm_scale.metrics.report import write_report
    from dgm_scale.modules import load_module

    unknown = sorted(set(settings) - set(EVAL_SETTINGS))
    if unknown:
        raise ConfigError(f"evaluate(): unknown setting(s) {unknown}; known: {list(EVAL_SETTINGS)}")
    init_distributed_from_env()
    module = load_module(checkpoint, trust_code=trust_code)
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
    evaluator, eval_config, probe = None, None, None
    if scores_samples(cfg):
        eval_config = eval_settings(cfg)
        unknown = [name for name in eval_config.metrics if name not in known_metrics()]
        if unknown:
            raise ConfigError(f"--metrics: unknown metric(s) {unknown}; known: {known_metrics()}")
        try:
            evaluator = Evaluator(eval_config, module.sample_shape, target) if eval_config.has_sample_metrics else None
        except ValueError as error:  # a bad extractor spec / weights file / option: one line, named
            raise ConfigError(str(error)) from None
        probe = ProbeEvaluator(eval_config, module.sample_shape) if eval_config.has_probe else None
    results = evaluate_module(module.to(target), evaluator, heldout_batches(module), probe)
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        path = Path(out) if out is not None else Path(checkpoint).with_suffix(".eval.json")
        write_report(path, results, eval_config, Path(checkpoint), module.checkpoint_iteration,
                     evaluator.extractor.key() if evaluator is not None else None)
    return results


def source_size(src: str) -> int:
    """How many samples a data source holds (images: decoded lazily, so counting is cheap)."""
    from dgm_scale.data.shards.sources import open_source

    source = open_source(src)
    return source.num_samples if source.num_samples is not None else sum(1 for _ in source.samples())


def first_image_shape(src: str) -> tuple[int, int]:
    """(channels, resolution) of a source's first image: the defaults of `fid`."""
    import io

    import numpy as np
    from PIL import Image

    from dgm_scale.data.shards.encode import Payload
    from dgm_scale.data.shards.sources import open_source

    if src == "builtin:digits":
        return 1, 16  # the project's digits: 8x8, upsampled to the default job's 16x16
    data = next(iter(open_source(src).samples())).data
    if isinstance(data, Payload):
        data = np.load(io.BytesIO(data.data)) if data.ext == "npy" else io.BytesIO(data.data)
    if isinstance(data, np.ndarray):
        return (3 if data.ndim == 3 and data.shape[-1] == 3 else 1), int(min(data.shape[:2]))
    with Image.open(data) as image:
        return (3 if image.mode in ("RGB", "RGBA", "P", "CMYK", "YCbCr") else 1), int(min(image.size))


def fid(a: str, b: str, *, num_a: int = 0, num_b: int = 0, resolution: Optional[int] = None,
        channels: Optional[int] = None, extractor: str = "auto", metrics: Any = None, seed: int = 0,
        batch_size: int = 250, cache_dir: str = "~/.cache/dgm_scale", inception_weights: Optional[str] = None,
        device: Optional[str] = None) -> dict[str, float]:
    """FID (and the other sample metrics) of source B against source A - any source the project
    reads (image folder, .npy / .npz, shards, builtin:NAME) - with evaluate's preprocessing,
    feature cache and extractors: B takes the place of generated samples (seeded subsets of
    `num_a` / `num_b` samples; 0 = all). Under torchrun the processes split the work."""
    from dgm_scale.metrics.evaluation import EvalSettings, Evaluator
    from dgm_scale.metrics.extractors import resolve_extractor_spec
    from dgm_scale.metrics.gather import rank_and_world
    from dgm_scale.metrics.real_data import real_batches
    from dgm_scale.metrics.registry import MODEL_METRICS

    init_distributed_from_env()
    rank, world = rank_and_world()
    guessed = first_image_shape(a)
    shape = (channels or guessed[0], resolution or guessed[1], resolution or guessed[1])
    spec = resolve_extractor_spec(extractor, "digits" if "builtin:digits" in (a, b) else "folder")
    names = [n.strip() for n in metrics.split(",")] if isinstance(metrics, str) else list(metrics or [])
    if set(names) & set(MODEL_METRICS):
        raise ConfigError(f"--metrics {','.join(names)}: {sorted(set(names) & set(MODEL_METRICS))} score a model, "
                          "not two data sources (dgm-scale evaluate CKPT --metrics probe, or dgm-scale probe)")
    num_b = num_b or source_size(b)
    settings = EvalSettings(real=a, extractor=spec, metrics=names, num_samples=num_b, num_real=num_a or source_size(a),
                            seed=seed, batch_size=batch_size, cache_dir=cache_dir, inception_weights=inception_weights)
    target = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        evaluator = Evaluator(settings, shape, target)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    return evaluator.score(real_batches(b, shape, num_b, seed, rank, world, batch_size))
