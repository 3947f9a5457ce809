"""Optimizers from an OptimizerConfig block (`optim.g`, `optim.d`, or a family's single `optim`)."""
from __future__ import annotations

from typing import Any

import torch

from dgm_scale.core.checks import choice, require

OPTIMIZERS = ("adam", "rmsprop")
#: how the update runs: torch's choice (auto: foreach on CUDA), one kernel per parameter tensor
#: (for_loop), one per op over all tensors (foreach), or one fused kernel (fused: Adam only)
IMPLEMENTATIONS = {"auto": {}, "for_loop": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}
FUSED = ("adam",)  # torch 2.13: Adam has a fused kernel on CPU and CUDA, RMSprop has none


def validate_optimizer(key: str, opt: Any) -> None:
    choice(f"{key}.name", opt.name, list(OPTIMIZERS))
    require(opt.lr > 0, f"config key '{key}.lr' must be > 0, got {opt.lr}")
    require(len(opt.betas) == 2, f"config key '{key}.betas' needs 2 values, got {list(opt.betas)}")
    choice(f"{key}.impl", opt.impl, list(IMPLEMENTATIONS))
    require(opt.impl != "fused" or opt.name in FUSED,
            f"config key '{key}.impl': torch has no fused {opt.name} (fused: {', '.join(FUSED)}; use foreach)")


def build_optimizer(params, opt_cfg: Any) -> torch.optim.Optimizer:
    """Adam or RMSprop from an optimizer config block.

    Adam under `impl: auto` is torch's fused one (CPU and CUDA): one kernel per step instead of a
    dozen ops per tensor, and it takes a NaN guard's skip flag as `found_inf`, so a skipped step needs no host
    sync (modules/guards.py). RMSprop has no fused form: its guarded steps decide on the host."""
    impl = IMPLEMENTATIONS[getattr(opt_cfg, "impl", "auto")]  # a family's own optimizer block may lack it
    if opt_cfg.name == "adam":
        return torch.optim.Adam(params, lr=opt_cfg.lr, betas=tuple(opt_cfg.betas), eps=opt_cfg.eps,
                                weight_decay=opt_cfg.weight_decay, **(impl or {"fused": True}))
    if opt_cfg.name == "rmsprop":
        return torch.optim.RMSprop(params, lr=opt_cfg.lr, eps=opt_cfg.eps, weight_decay=opt_cfg.weight_decay, **impl)
    raise ValueError(f"unknown optimizer '{opt_cfg.name}'")
