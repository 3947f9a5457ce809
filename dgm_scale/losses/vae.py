"""VAE objective: ELBO = E_q[log p(x|z)] - beta * KL(q(z|x) || N(0, I)), in nats per image."""
from __future__ import annotations

import math
from typing import Callable, Dict

import torch
import torch.nn.functional as F
from torch import Tensor


def gaussian_kl(mu: Tensor, logvar: Tensor) -> Tensor:
    """Analytic KL(N(mu, diag(exp(logvar))) || N(0, I)) per sample: [N, D] -> [N]."""
    return 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).sum(dim=1)


def bernoulli_log_likelihood(decoder_logits: Tensor, images: Tensor, std: float = 0.0) -> Tensor:
    """log p(x|z) per sample for pixel intensities in [-1, 1] read as probabilities in [0, 1].

    Grey levels are used as soft targets (the usual practice for non-binary MNIST-like data).
    decoder_logits, images: [N, C, H, W] -> [N].
    """
    targets = (images + 1.0) / 2.0
    nll = F.binary_cross_entropy_with_logits(decoder_logits, targets, reduction="none")
    return -nll.flatten(1).sum(dim=1)


def gaussian_log_likelihood(decoder_means: Tensor, images: Tensor, std: float = 0.1) -> Tensor:
    """log N(x; mean, std^2 I) per sample, constant included: [N, C, H, W] -> [N]."""
    log_density = -0.5 * ((images - decoder_means) / std) ** 2 - math.log(std) - 0.5 * math.log(2 * math.pi)
    return log_density.flatten(1).sum(dim=1)


LIKELIHOODS: Dict[str, Callable[..., Tensor]] = {
    "bernoulli": bernoulli_log_likelihood,
    "gaussian": gaussian_log_likelihood,
}


def decoder_mean(decoder_out: Tensor, likelihood: str) -> Tensor:
    """The image the decoder predicts, in [-1, 1] for bernoulli; the raw mean for gaussian."""
    return torch.sigmoid(decoder_out) * 2.0 - 1.0 if likelihood == "bernoulli" else decoder_out


def elbo_terms(
    decoder_out: Tensor, images: Tensor, mu: Tensor, logvar: Tensor,
    likelihood: str = "bernoulli", beta: float = 1.0, gaussian_std: float = 0.1,
) -> Dict[str, Tensor]:
    """Batch means of the ELBO pieces (all in nats per image). `loss` is what the optimiser minimises."""
    log_likelihood = LIKELIHOODS[likelihood](decoder_out, images, gaussian_std).mean()
    kl = gaussian_kl(mu, logvar).mean()
    return {
        "loss": -(log_likelihood - beta * kl),
        "elbo": log_likelihood - kl,  # the true bound, beta = 1, whatever beta is trained with
        "reconstruction": log_likelihood,
        "kl": kl,
    }
