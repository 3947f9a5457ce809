"""A model family defined outside the package: a diagonal Gaussian over pixels, fitted by maximum
likelihood. Registered on import (`--import tests/toy_family.py`, `run.imports`), then trained
with `model.kind=toy_gaussian` like any built-in family."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor, nn

from dgm_scale import Family, register_family
from dgm_scale.config.schema import OptimizerConfig
from dgm_scale.core.checks import require
from dgm_scale.losses.vae import discretized_gaussian_log_likelihood
from dgm_scale.modules.base import GenerativeModule
from dgm_scale.modules.optim import build_optimizer
from dgm_scale.modules.sampling import keyed_noise


@dataclass
class ToyModelConfig:
    kind: str = "toy_gaussian"
    module: Optional[str] = None
    init_std: float = 1.0


@dataclass
class ToyLossConfig:
    pass


class PixelGaussian(nn.Module):
    def __init__(self, shape, init_std: float):
        super().__init__()
        self.mean = nn.Parameter(torch.zeros(shape))
        self.log_std = nn.Parameter(torch.full(shape, math.log(init_std)))


class ToyGaussianModule(GenerativeModule):
    has_likelihood = True

    def __init__(self, config: dict):
        super().__init__(config)
        self.automatic_optimization = False
        self.density = PixelGaussian(self.sample_shape, self.cfg.model.init_std)

    def networks(self) -> dict:
        return {"density": self.density}

    def configure_optimizers(self):
        return build_optimizer(self.density.parameters(), self.cfg.optim)

    def training_step(self, batch, batch_idx: int) -> None:
        opt = self.optimizers()
        std = self.density.log_std.exp()
        nll = (0.5 * ((batch[0] - self.density.mean) / std) ** 2 + self.density.log_std).flatten(1).sum(1).mean()
        opt.zero_grad(set_to_none=True)
        self.manual_backward(nll, opt)
        self.guarded_step(nll, opt, self.density, "density")
        if self.logging_due():
            self.log_train({"nll_loss": nll.detach()})

    def sample_batch(self, num: int, seed: int = 0, start: int = 0, labels: Optional[Tensor] = None,
                     variant: str = "", **options: Any) -> Tensor:
        noise = keyed_noise(seed, start, num, self.sample_shape).to(self.device)
        return (self.density.mean + noise * self.density.log_std.exp()).clamp(-1, 1).detach()

    @torch.no_grad()
    def heldout_nll(self, batch, seed: int = 0):
        images = batch[0].to(self.device)
        log_p = discretized_gaussian_log_likelihood(self.density.mean.expand_as(images), images,
                                                    self.density.log_std.exp())
        return -log_p.sum(), images.numel()


def validate(cfg: Any) -> None:
    require(cfg.model.init_std > 0, f"config key 'model.init_std' must be > 0, got {cfg.model.init_std}")


FAMILY = register_family(Family(
    name="toy_gaussian", description="a diagonal Gaussian over pixels (a test family)",
    model=ToyModelConfig, loss=ToyLossConfig, optim=OptimizerConfig,
    module=f"{__file__}:ToyGaussianModule", validate=validate,
))
