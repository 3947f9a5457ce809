"""VAE objective: ELBO = E_q[log p(x|z)] - beta * KL(q(z|x) || N(0, I)), in nats per image."""
from __future__ import annotations

import math
from typing import Callable, Dict

import torch
import torch.nn.functional as F
from torch import Tensor

from dgm_scale.data.transforms import from_8bit, to_8bit


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


def discretized_gaussian_log_likelihood(decoder_means: Tensor, images: Tensor, std: float | Tensor = 0.1) -> Tensor:
    """log P(x|z) per sample of 8-bit images under a Gaussian discretised to the 256 levels:
    P(k) = Phi((x_k + d - mean) / std) - Phi((x_k - d - mean) / std), with the first and last
    level taking the tails (Salimans et al. 2017, PixelCNN++, with one Gaussian). x_k are the
    levels in [-1, 1] (d = 1/255, half a level); `images` are rounded to them. A probability
    mass, so the ELBO is a bound on log P(x) of the 8-bit data (bits/dim). `std`: a float or a
    tensor broadcastable to the images (e.g. one learned std per channel [C, 1, 1]).
    [N, C, H, W] -> [N]."""
    levels = to_8bit(images)
    x = from_8bit(levels)
    std = torch.as_tensor(std, dtype=decoder_means.dtype, device=decoder_means.device)
    half = 1.0 / 255.0
    upper = (x + half - decoder_means) / std
    lower = (x - half - decoder_means) / std
    log_cdf_upper = torch.special.log_ndtr(upper)  # log P(below the upper edge)
    log_sf_lower = torch.special.log_ndtr(-lower)  # log P(above the lower edge)
    # Inner levels: log(Phi(upper) - Phi(lower)), in the tail where they cancel the density at the
    # centre times the bin width.
    mass = (torch.special.ndtr(upper) - torch.special.ndtr(lower)).clamp_min(1e-12)
    centre = -0.5 * ((x - decoder_means) / std) ** 2 - torch.log(std) - 0.5 * math.log(2 * math.pi) + math.log(2 * half)
    inner = torch.where(mass > 1e-5, mass.log(), centre)
    log_p = torch.where(levels == 0, log_cdf_upper, torch.where(levels == 255, log_sf_lower, inner))
    return log_p.flatten(1).sum(dim=1)


LIKELIHOODS: Dict[str, Callable[..., Tensor]] = {
    "bernoulli": bernoulli_log_likelihood,
    "gaussian": gaussian_log_likelihood,
    "discretized_gaussian": discretized_gaussian_log_likelihood,
}


def decoder_mean(decoder_out: Tensor, likelihood: str) -> Tensor:
    """The image the decoder predicts, in [-1, 1] for bernoulli; the raw mean otherwise."""
    return torch.sigmoid(decoder_out) * 2.0 - 1.0 if likelihood == "bernoulli" else decoder_out


def elbo_terms(
    decoder_out: Tensor, images: Tensor, mu: Tensor, logvar: Tensor,
    likelihood: str = "bernoulli", beta: float = 1.0, gaussian_std: float | Tensor = 0.1,
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
