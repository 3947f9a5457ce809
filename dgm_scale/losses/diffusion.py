"""Diffusion and flow-matching objectives as pure functions of the clean data x0, the noise and the
noise level: the noisy sample is x = alpha * x0 + sigma * noise, with (alpha, sigma) of the
objective's process (variance-preserving: alpha^2 + sigma^2 = 1; EDM: alpha = 1; the linear
flow path: alpha = 1 - t, sigma = t; see families/diffusion/processes.py).

An objective is what the network is trained to predict (`target`), how that prediction maps
back to the denoised x0 (`denoised`, what every sampler uses) and how the noisy input is scaled
before the network sees it (`input_scale`, EDM's c_in; 1 for the others). The loss is the plain
mean squared error of the prediction against the target: for EDM that is the EDM-weighted loss
lambda(sigma) * |D(x) - x0|^2 of Karras et al. 2022 (lambda * c_out^2 = 1). Adding an
objective = three functions and one registry line.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable, Dict, Tuple

import torch
from torch import Tensor


# ----------------------------------------------------------------------------- eps (Ho et al. 2020)
def eps_target(x0: Tensor, noise: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    """The noise itself."""
    return noise


def eps_denoised(prediction: Tensor, x: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    return (x - sigma * prediction) / alpha


# ----------------------------------------------------------------------------- v (Salimans & Ho 2022)
def v_target(x0: Tensor, noise: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    """v = alpha * noise - sigma * x0 (variance-preserving processes)."""
    return alpha * noise - sigma * x0


def v_denoised(prediction: Tensor, x: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    # x0 = alpha * x - sigma * v, because alpha^2 + sigma^2 = 1
    return alpha * x - sigma * prediction


# ----------------------------------------------------------------------------- flow (Liu et al. 2022; Lipman et al. 2022)
def flow_target(x0: Tensor, noise: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    """The velocity dx/dt = noise - x0 of the straight path x_t = (1 - t) x0 + t noise."""
    return noise - x0


def flow_denoised(prediction: Tensor, x: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    # x0 = x_t - t * v, with t = sigma
    return x - sigma * prediction


# ----------------------------------------------------------------------------- edm (Karras et al. 2022)
def edm_preconditioning(sigma: Tensor, sigma_data: float) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """(c_skip, c_out, c_in, c_noise) of EDM's Table 1: D(x) = c_skip x + c_out F(c_in x, c_noise)."""
    total = sigma ** 2 + sigma_data ** 2
    return sigma_data ** 2 / total, sigma * sigma_data / total.sqrt(), 1.0 / total.sqrt(), sigma.log() / 4.0


def edm_weight(sigma: Tensor, sigma_data: float) -> Tensor:
    """EDM's loss weight lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma * sigma_data)^2."""
    return (sigma ** 2 + sigma_data ** 2) / (sigma * sigma_data) ** 2


def edm_target(x0: Tensor, noise: Tensor, alpha: Tensor, sigma: Tensor, sigma_data: float = 0.5) -> Tensor:
    """The F-target (x0 - c_skip x) / c_out: the network's error against it is the EDM-weighted error of D."""
    c_skip, c_out, _, _ = edm_preconditioning(sigma, sigma_data)
    return (x0 - c_skip * (x0 + sigma * noise)) / c_out


def edm_denoised(prediction: Tensor, x: Tensor, alpha: Tensor, sigma: Tensor, sigma_data: float = 0.5) -> Tensor:
    c_skip, c_out, _, _ = edm_preconditioning(sigma, sigma_data)
    return c_skip * x + c_out * prediction


def edm_input_scale(alpha: Tensor, sigma: Tensor, sigma_data: float = 0.5) -> Tensor:
    return edm_preconditioning(sigma, sigma_data)[2]


def unit_scale(alpha: Tensor, sigma: Tensor) -> Tensor:
    return torch.ones_like(sigma)


def denoising_loss(prediction: Tensor, target: Tensor) -> Tensor:
    """Mean squared error per sample over its dimensions: [N, ...] -> [N] (float32)."""
    return (prediction.float() - target.float()).pow(2).flatten(1).mean(dim=1)


@dataclass(frozen=True)
class Objective:
    target: Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]  # (x0, noise, alpha, sigma) -> what F predicts
    denoised: Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]  # (F's output, x, alpha, sigma) -> x0 estimate
    input_scale: Callable[[Tensor, Tensor], Tensor] = unit_scale  # (alpha, sigma) -> c_in


OBJECTIVES: Dict[str, Objective] = {
    "eps": Objective(eps_target, eps_denoised),
    "v": Objective(v_target, v_denoised),
    "edm": Objective(edm_target, edm_denoised, edm_input_scale),
    "flow": Objective(flow_target, flow_denoised),
}


def build_objective(loss_cfg) -> Objective:
    """The registry's objective named by `loss.objective`, its constants (EDM's sigma_data) bound."""
    objective = OBJECTIVES[loss_cfg.objective]
    if loss_cfg.objective == "edm":
        data_std = loss_cfg.sigma_data
        return Objective(partial(edm_target, sigma_data=data_std), partial(edm_denoised, sigma_data=data_std),
                         partial(edm_input_scale, sigma_data=data_std))
    return objective
