"""Samplers: from noise to data through a process's levels, with a denoiser D(x, t) -> x0 estimate.

Each works in the process's own frame (x_t = alpha x0 + sigma noise), on the times t_0 > ... >
t_{N-1} of `process.sampling_times(N)` and then the clean data (alpha = 1, sigma = 0), so one
code serves the VP, EDM and flow processes. Written with the denoised estimate D and the noise
estimate eps = (x - alpha D) / sigma, the steps are:

- `ddim` (Song et al. 2021): x' = alpha' D + sqrt(sigma'^2 - c^2) eps + c z, with
  c = eta * sigma' * sqrt(1 - r^2) and r = (sigma' / alpha') / (sigma / alpha), the ratio of
  the noise-to-signal ratios. eta = 0 is deterministic; `euler` is eta = 0: in sigma / alpha
  and x / alpha it is Euler's step of the probability-flow ODE (EDM's Euler), and on the flow
  path it is x' = x + (t' - t) v.
- `ddpm`: eta = 1, DDPM's ancestral step (its posterior q(x_{t-1} | x_t, x0 = D)).
- `heun` (Karras et al. 2022, Algorithm 2): Euler, then the trapezoid correction with the
  derivative at the new level, in the sigma / alpha frame; optional churn (S_churn, S_tmin,
  S_tmax, S_noise) raises the level by gamma first. No correction into the clean data, nor from
  a ratio sigma / alpha above HEUN_RATIO_MAX: EDM's grid starts at 80, but the cosine
  schedules' first levels reach 10^4 and beyond (pure noise, alpha = 0, for flow), and the
  trapezoid over such a long step overshoots (sample std of Gaussian data 7x too large at 10
  steps), where Euler's step from there is nearly exact.
- `dpmpp_2m` (Lu et al. 2022, DPM-Solver++(2M)): the multistep second-order solver in
  lambda = log(alpha / sigma): x' = (sigma' / sigma) x + alpha' (1 - e^-h) D~, D~ extrapolated
  from this and the previous step's D. The steps into the smallest level and into the clean
  data are first order (diffusers' `lower_order_final`): on a uniform time grid the step into
  the smallest level is long, and extrapolating D over it overshoots.

`step_noise(k)` gives the fresh noise of step k (keyed to the seed and sample index by the caller).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, replace
from typing import Any, Callable, Tuple

import torch
from torch import Tensor

#: heun: steps from a larger sigma / alpha are Euler's (see above)
HEUN_RATIO_MAX = 100.0

Denoiser = Callable[[Tensor, float], Tensor]  # (x [N, ...], t) -> D(x, t) [N, ...]
#: `settings`: the `sampler` section (SamplerConfig): steps, eta, churn, churn_min, churn_max, churn_noise
Settings = Any


@dataclass(frozen=True)
class Level:
    t: float
    alpha: float
    sigma: float

    @property
    def ratio(self) -> float:
        """sigma / alpha (inf at pure noise)."""
        return self.sigma / self.alpha if self.alpha > 0 else math.inf


@functools.lru_cache(maxsize=64)
def levels(process, steps: int) -> Tuple[Level, ...]:
    """The N sampling levels of `process` and the clean data last (t = nan: never evaluated).
    Cached: computed once, plain numbers afterwards (so torch.export of a sampler sees no tensor
    turned into a number)."""
    times = process.sampling_times(steps)
    alphas, sigmas = process.alpha_sigma(times)
    found = [Level(float(t), float(a), float(s)) for t, a, s in zip(times, alphas, sigmas)]
    return tuple(found + [Level(math.nan, 1.0, 0.0)])


def eps_of(x: Tensor, denoised: Tensor, level: Level) -> Tensor:
    return (x - level.alpha * denoised) / level.sigma


def ratio_of_ratios(current: Level, following: Level) -> float:
    """(sigma' / alpha') / (sigma / alpha) = e^-h, h the step in log-SNR / 2; 0 from pure noise."""
    if current.alpha == 0 or following.sigma == 0:
        return 0.0
    return (following.sigma * current.alpha) / (following.alpha * current.sigma)


def ddim(denoise: Denoiser, process, x: Tensor, settings: Settings, step_noise: Callable[[int], Tensor]) -> Tensor:
    grid = levels(process, settings.steps)
    for k, (current, following) in enumerate(zip(grid[:-1], grid[1:])):
        denoised = denoise(x, current.t)
        eps = eps_of(x, denoised, current)
        up = settings.eta * following.sigma * math.sqrt(max(0.0, 1 - ratio_of_ratios(current, following) ** 2))
        x = following.alpha * denoised + math.sqrt(max(0.0, following.sigma ** 2 - up ** 2)) * eps
        if up > 0:
            x = x + up * step_noise(k)
    return x


def ddpm(denoise: Denoiser, process, x: Tensor, settings: Settings, step_noise: Callable[[int], Tensor]) -> Tensor:
    return ddim(denoise, process, x, replace(settings, eta=1.0), step_noise)


def euler(denoise: Denoiser, process, x: Tensor, settings: Settings, step_noise: Callable[[int], Tensor]) -> Tensor:
    return ddim(denoise, process, x, replace(settings, eta=0.0), step_noise)


def _churned(process, x: Tensor, current: Level, settings: Settings, k: int,
             step_noise: Callable[[int], Tensor]) -> tuple[Tensor, Level]:
    """EDM's churn: sigma/alpha raised by gamma = min(S_churn / N, sqrt 2 - 1) inside [S_tmin,
    S_tmax], with the matching fresh noise added (S_noise times)."""
    ratio = current.ratio
    if settings.churn <= 0 or not settings.churn_min <= ratio <= settings.churn_max or math.isinf(ratio):
        return x, current
    gamma = min(settings.churn / settings.steps, math.sqrt(2) - 1)
    raised = torch.tensor(ratio * (1 + gamma), dtype=torch.float64)
    t = process.time_of(raised)
    alpha, sigma = (float(v) for v in process.alpha_sigma(t))
    hat = Level(float(t), alpha, sigma)
    added = math.sqrt(max(0.0, hat.ratio ** 2 - ratio ** 2)) * settings.churn_noise
    return hat.alpha * (x / current.alpha + added * step_noise(k)), hat


def heun(denoise: Denoiser, process, x: Tensor, settings: Settings, step_noise: Callable[[int], Tensor]) -> Tensor:
    grid = levels(process, settings.steps)
    for k, (current, following) in enumerate(zip(grid[:-1], grid[1:])):
        x, current = _churned(process, x, current, settings, k, step_noise)
        denoised = denoise(x, current.t)
        eps = eps_of(x, denoised, current)
        euler_step = following.alpha * denoised + following.sigma * eps
        if following.sigma == 0 or current.ratio > HEUN_RATIO_MAX:
            x = euler_step
            continue
        mean_eps = 0.5 * (eps + eps_of(euler_step, denoise(euler_step, following.t), following))
        # the trapezoid step in the sigma / alpha frame: x'/alpha' = x/alpha + (r' - r) * mean_eps
        x = following.alpha * (x / current.alpha + (following.ratio - current.ratio) * mean_eps)
    return x


def dpmpp_2m(denoise: Denoiser, process, x: Tensor, settings: Settings, step_noise: Callable[[int], Tensor]) -> Tensor:
    grid = levels(process, settings.steps)
    previous, last_h = None, math.inf
    for k, (current, following) in enumerate(zip(grid[:-1], grid[1:])):
        denoised = denoise(x, current.t)
        decay = ratio_of_ratios(current, following)  # e^-h
        h = -math.log(decay) if decay > 0 else math.inf
        combined = denoised
        final = k >= len(grid) - 3  # into the smallest level or the clean data
        if previous is not None and not final and math.isfinite(last_h) and math.isfinite(h):
            half_inverse = h / (2 * last_h)  # 1 / (2 r), r = h_last / h
            combined = (1 + half_inverse) * denoised - half_inverse * previous
        scale = following.sigma / current.sigma
        x = scale * x + following.alpha * (1 - decay) * combined
        previous, last_h = denoised, h
    return x


SAMPLERS = {"ddpm": ddpm, "ddim": ddim, "euler": euler, "heun": heun, "dpmpp_2m": dpmpp_2m}



def generate(settings: Settings, denoise: Denoiser, process, noise: Tensor, step_noise: Callable[[int], Tensor]) -> Tensor:
    """Samples [N, ...] from standard normal `noise` [N, ...] by sampler `settings.name`: the
    noise scaled to the first level's sigma (its alpha x0 part, ~0, left out), then the steps."""
    first = levels(process, settings.steps)[0]
    return SAMPLERS[settings.name](denoise, process, first.sigma * noise, settings, step_noise)
