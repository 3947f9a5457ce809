"""Held-out likelihood of a diffusion model on 8-bit images, in nats per image (the evaluation sums
them over the held-out split and reports bits per dim). Two estimators, both working in the
process's frame x_t = alpha x0 + sigma noise with a denoiser D(x, t) -> x0 estimate, so one code
serves the VP, EDM and flow processes:

- `vlb_terms` (the default for eps / v): the variational bound of the model that the `ddpm`
  sampler with K steps samples - prior N(0, sigma_0^2 I) at its first level, then the posterior
  steps q(x_s | x_t, x0 = D(x_t)) - with its last step (x = D) replaced by a Gaussian of mean D
  and std sigma / alpha at the smallest level, discretised to the 256 levels (the decoder of Ho
  et al. 2020; improved-diffusion's `_vb_terms_bpd`). In the SNR form of Kingma et al. 2021 each
  step's KL is 0.5 (SNR(s) - SNR(t)) |x0 - D(x_t)|^2 and the prior's 0.5 SNR(t_0) |x0|^2 (equal
  variances). It is an upper bound on -log P(x) of that K-step model's discrete distribution;
  one noise draw per level makes the estimate unbiased for it. With K = loss.timesteps on a
  discrete model it is DDPM's own bound.
- `ode_log_density` (the default for edm / flow): the probability-flow ODE in the frame of
  Karras et al. 2022, y = x / alpha and r = sigma / alpha: dy/dr = (y - D) / r, from the
  (dequantised) image at r_min to r_max, Heun's method on EDM's rho = 7 grid of r, and
  log p(y_0) = log N(y_R; 0, R^2 I) + integral of div_y (dy/dr) dr, the divergence
  (d - tr dD/dy) / r by Hutchinson's estimator with Rademacher probes (Grathwohl et al. 2019;
  score_sde's likelihood.py). The model: y_R ~ N(0, R^2 I) (the prior the samplers start from,
  in this frame), then the ODE back to r_min; D is not clamped (dequantised pixels reach
  1/255 beyond [-1, 1]). With uniform dequantisation, -log p(x + u) + D log(255 / 2) averaged
  over u is an upper bound on -log P(x) of the model's density integrated over each pixel's
  bin; the probes make it an unbiased estimate of that bound, up to the error of N Heun steps
  (which has no sign: a solver error, not a bound).
"""
from __future__ import annotations

import math
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch
from torch import Tensor

from dgm_scale.families.diffusion.processes import EDM
from dgm_scale.losses.vae import discretized_gaussian_log_likelihood

Denoiser = Callable[[Tensor, float], Tensor]  # (x [N, ...], t) -> D(x, t) [N, ...]
#: -log of the width 2 / 255 of an 8-bit level in [-1, 1]: a dequantised density per dim + this = bits
LOG_LEVELS_PER_UNIT = math.log(255.0 / 2.0)
#: the spacing of the ODE's grid of r = sigma / alpha (EDM's, dense near the data)
RHO = 7.0


def _summed(values: Tensor) -> Tensor:
    """[N, ...] -> [N] (float64): the sum over each sample's dimensions."""
    return values.double().flatten(1).sum(dim=1)


# ----------------------------------------------------------------------------- the VLB
def vlb_terms(denoise: Denoiser, process, images: Tensor, steps: int,
              noise: Callable[[int], Tensor]) -> Dict[str, Tensor]:
    """The bound's terms in nats per image, each [N] float64: `prior`, `diffusion` (the K - 1
    steps' KLs) and `decoder` (-log of the discretised Gaussian), for 8-bit `images` [N, ...]
    in [-1, 1], on the `steps` levels process.sampling_times(steps); noise(k) is the standard
    normal draw [N, ...] of level k."""
    times = process.sampling_times(steps)  # descending: the ddpm sampler's levels
    alphas, sigmas = (values.tolist() for values in process.alpha_sigma(times))
    snrs = [(a / s) ** 2 for a, s in zip(alphas, sigmas)]
    x0 = images

    def estimate(k: int) -> Tensor:
        return denoise(alphas[k] * x0 + sigmas[k] * noise(k).to(x0), float(times[k]))

    prior = 0.5 * snrs[0] * _summed(x0.pow(2))
    diffusion = torch.zeros_like(prior)
    for k in range(steps - 1):
        diffusion += 0.5 * (snrs[k + 1] - snrs[k]) * _summed((x0 - estimate(k)).pow(2))
    last = steps - 1
    decoder = -discretized_gaussian_log_likelihood(estimate(last), x0, sigmas[last] / alphas[last]).double()
    return {"prior": prior, "diffusion": diffusion, "decoder": decoder}


# ----------------------------------------------------------------------------- the ODE
def hutchinson_trace(output: Tensor, inputs: Tensor, probes: Sequence[Tensor]) -> Tensor:
    """Hutchinson's estimate of the trace of d output / d inputs per sample [N] (float64): the
    mean over `probes` (each shaped like `inputs`) of z . (J^T z), one vector-Jacobian product
    each. Unbiased for probes with E[z z^T] = I (Rademacher: signs)."""
    estimates = []
    for probe in probes:
        (product,) = torch.autograd.grad(output, inputs, probe, retain_graph=True)
        estimates.append(_summed(product * probe))
    return torch.stack(estimates).mean(dim=0)


def ratio_grid(low: float, high: float, steps: int) -> Tensor:
    """steps + 1 ratios r = sigma / alpha from `low` up to `high` (float64): EDM's rho grid."""
    return EDM(0.0, 1.0, low, high, RHO).sampling_times(steps + 1).flip(0)


def ratio_bounds(process, low: float, high: float, key: str = "likelihood") -> Tuple[float, float]:
    """[low, high] within the ratios the process has (a discrete schedule's first and last
    level); a ValueError naming `key` when nothing is left."""
    least, most = process.ratio_range()
    low, high = max(low, least), min(high, most)
    if not low < high:
        raise ValueError(f"config key '{key}.ratio_min': the range [{low:g}, {high:g}] of sigma / alpha left "
                         f"within the model's [{least:g}, {most:g}] is empty")
    return low, high


def _drift(denoise: Denoiser, process, y: Tensor, ratio: float,
           probes: Sequence[Tensor]) -> Tuple[Tensor, Optional[Tensor]]:
    """dy/dr = (y - D(alpha y, t)) / r at r = `ratio`, and its divergence [N] by Hutchinson's
    estimator over `probes` (None without probes)."""
    t = process.time_of(torch.tensor(ratio, dtype=torch.float64))
    alpha = float(process.alpha_sigma(t)[0])
    with torch.enable_grad():
        y = y.detach().requires_grad_(bool(probes))
        estimate = denoise(alpha * y, float(t))
        drift = (y - estimate) / ratio
        if not probes:
            return drift.detach(), None
        divergence = (y[0].numel() - hutchinson_trace(estimate, y, probes)) / ratio
    return drift.detach(), divergence


def ode_log_density(denoise: Denoiser, process, y0: Tensor, ratios: Tensor,
                    probes: Sequence[Tensor] = ()) -> Tuple[Optional[Tensor], Tensor]:
    """(log p(y0) [N] in nats (float64; None without probes), y at the last ratio [N, ...]):
    the ODE dy/dr = (y - D) / r from y0 at ratios[0] up through the increasing `ratios` by
    Heun's method, the prior N(0, ratios[-1]^2 I) at the end."""
    y, change = y0, torch.zeros(y0.shape[0], dtype=torch.float64, device=y0.device)
    grid = ratios.tolist()
    for low, high in zip(grid[:-1], grid[1:]):
        first, first_div = _drift(denoise, process, y, low, probes)
        second, second_div = _drift(denoise, process, y + (high - low) * first, high, probes)
        y = y + 0.5 * (high - low) * (first + second)
        if probes:
            change += 0.5 * (high - low) * (first_div + second_div)
    if not probes:
        return None, y
    scale, dims = grid[-1], y[0].numel()
    prior = -0.5 * _summed(y.pow(2)) / scale ** 2 - dims * (math.log(scale) + 0.5 * math.log(2 * math.pi))
    return prior + change, y


def rademacher(normal: Tensor) -> Tensor:
    """Random signs from standard normal draws (keyed noise in, keyed signs out)."""
    return torch.where(normal >= 0, torch.ones_like(normal), -torch.ones_like(normal))


def dequantised(images: Tensor, uniform: Tensor) -> Tensor:
    """8-bit images in [-1, 1] spread uniformly over their levels' bins (`uniform` in [0, 1))."""
    return images + (uniform.to(images) - 0.5) * (2.0 / 255.0)


def ode_nll(denoise: Denoiser, process, images: Tensor, ratios: Tensor, uniform: Tensor,
            probes: Sequence[Tensor]) -> Tensor:
    """-log p(x + u) + D log(255 / 2) [N] (nats): the dequantisation bound on -log P(x) of the
    8-bit `images` (see the module docstring), one dequantisation `uniform` [N, ...] in [0, 1)."""
    log_density, _ = ode_log_density(denoise, process, dequantised(images, uniform), ratios, probes)
    return -log_density + images[0].numel() * LOG_LEVELS_PER_UNIT
