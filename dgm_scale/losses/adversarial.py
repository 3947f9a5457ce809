"""Adversarial losses as paired pure functions `d_*(real_logits, fake_logits)` / `g_*(fake_logits)`.

Logits are raw discriminator outputs of shape [N] (no sigmoid). Every function returns the batch
mean, a scalar to *minimise*. A GAN variant is a choice of pair plus regularisers (see
`regularizers.py`), never a class of its own. Adding a loss = two functions + one registry line.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable, Dict

import torch.nn.functional as F
from torch import Tensor


def d_logistic(real_logits: Tensor, fake_logits: Tensor) -> Tensor:
    """-log D(x) - log(1 - D(G(z))), with D = sigmoid(logit) (Goodfellow et al. 2014)."""
    return F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean()


def g_minimax(fake_logits: Tensor) -> Tensor:
    """The original saturating objective: minimise log(1 - D(G(z))) = -softplus(logit)."""
    return -F.softplus(fake_logits).mean()


def g_nonsaturating(fake_logits: Tensor) -> Tensor:
    """-log D(G(z)): same fixed point as minimax, strong gradients when D wins early."""
    return F.softplus(-fake_logits).mean()


def d_least_squares(real_logits: Tensor, fake_logits: Tensor, a: float = 0.0, b: float = 1.0) -> Tensor:
    """LSGAN (Mao et al. 2017): 1/2 E[(D(x) - b)^2] + 1/2 E[(D(G(z)) - a)^2]."""
    return 0.5 * ((real_logits - b) ** 2).mean() + 0.5 * ((fake_logits - a) ** 2).mean()


def g_least_squares(fake_logits: Tensor, c: float = 1.0) -> Tensor:
    """LSGAN generator: 1/2 E[(D(G(z)) - c)^2]."""
    return 0.5 * ((fake_logits - c) ** 2).mean()


def d_wasserstein(real_logits: Tensor, fake_logits: Tensor) -> Tensor:
    """Critic loss E[f(G(z))] - E[f(x)]; its negation estimates the Wasserstein-1 distance."""
    return fake_logits.mean() - real_logits.mean()


def g_wasserstein(fake_logits: Tensor) -> Tensor:
    """-E[f(G(z))]; also the hinge generator loss (Lim & Ye 2017; Miyato et al. 2018)."""
    return -fake_logits.mean()


def d_hinge(real_logits: Tensor, fake_logits: Tensor) -> Tensor:
    """E[relu(1 - D(x))] + E[relu(1 + D(G(z)))]."""
    return F.relu(1.0 - real_logits).mean() + F.relu(1.0 + fake_logits).mean()


@dataclass(frozen=True)
class AdversarialLoss:
    d_loss: Callable[[Tensor, Tensor], Tensor]
    g_loss: Callable[[Tensor], Tensor]


ADVERSARIAL_LOSSES: Dict[str, AdversarialLoss] = {
    "minimax": AdversarialLoss(d_logistic, g_minimax),
    "nonsaturating": AdversarialLoss(d_logistic, g_nonsaturating),
    "lsgan": AdversarialLoss(d_least_squares, g_least_squares),
    "wasserstein": AdversarialLoss(d_wasserstein, g_wasserstein),
    "hinge": AdversarialLoss(d_hinge, g_wasserstein),
}


def build_adversarial_loss(loss_cfg) -> AdversarialLoss:
    """Pick the registry pair named by `loss.name`, binding loss-specific constants."""
    pair = ADVERSARIAL_LOSSES[loss_cfg.name]
    if loss_cfg.name == "lsgan":
        return AdversarialLoss(
            partial(d_least_squares, a=loss_cfg.lsgan_a, b=loss_cfg.lsgan_b),
            partial(g_least_squares, c=loss_cfg.lsgan_c),
        )
    return pair


def wasserstein_estimate(real_logits: Tensor, fake_logits: Tensor) -> Tensor:
    """E[f(x)] - E[f(G(z))]: the critic's estimate of W1 (meaningful for Lipschitz critics)."""
    return (real_logits.mean() - fake_logits.mean()).detach()

