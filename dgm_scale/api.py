"""The Python API: `import dgm_scale` and call these (see docs/python-api.md).

    cfg = dgm_scale.load_config("configs/vae.yaml", {"trainer.max_steps": 500})
    result = dgm_scale.train(cfg)                      # a RunResult: run_dir, checkpoint, ...
    model = dgm_scale.load_module(result.checkpoint)   # any family; then .sample(...)
    images = model.sample(16, seed=0)                  # [16, C, H, W] in [-1, 1], on the CPU
    scores = dgm_scale.evaluate(result.checkpoint, num_samples=1000)
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

from dgm_scale.config import load_config
from dgm_scale.score import evaluate


def train(config: Any = None, overrides: Sequence[str] | Mapping[str, Any] = ()):
    """Train a model: `config` is a loaded config, a YAML path, or None (the default job, with
    `overrides`). Returns a RunResult (run_dir, iterations, seconds, checkpoint, samples, module)."""
    from omegaconf import DictConfig

    from dgm_scale.training import quiet_lightning, train as train_config

    quiet_lightning()
    cfg = config if isinstance(config, DictConfig) else load_config(config, overrides)
    if isinstance(config, DictConfig) and overrides:
        raise ValueError("train(): pass overrides to load_config, or a config path with overrides")
    return train_config(cfg)


def load_module(checkpoint: str | Path, map_location: str = "cpu", trust_code: bool = False):
    """The trained module of a checkpoint (its family's class, your code imported again), with
    `.sample(num, seed=..., labels=..., variant=..., **options)` and `.sample_batch(...)`.
    A checkpoint whose config names code outside dgm_scale (your networks, module, family,
    run.imports) loads only with `trust_code=True`: loading it imports and runs that code."""
    from dgm_scale.modules import load_module as load

    return load(checkpoint, map_location, trust_code=trust_code)


__all__ = ["evaluate", "load_config", "load_module", "train"]


