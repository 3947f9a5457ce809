"""Noising processes: x_t = alpha(t) x0 + sigma(t) noise on each objective's own time axis t.

- `VPDiscrete` (eps, v with loss.timesteps = T > 0): DDPM's T steps, t an index 0 .. T-1 with
  alpha_bar from the linear betas of Ho et al. 2020 or the cosine of Nichol & Dhariwal 2021.
- `VPContinuous` (eps, v with loss.timesteps = 0): t in [0, 1]; the linear beta(t) of Song et
  al. 2021, or the cosine as a log-SNR, lambda(t) = -2 log tan(...), truncated to [-20, 20].
- `EDM` (edm): alpha = 1, sigma = t; training levels log-normal, the sampling levels Karras'
  rho grid.
- `Flow` (flow): the straight path alpha = 1 - t, sigma = t; training t uniform or logit-normal.

What a process answers: (alpha, sigma) at t, the network's noise-level input at t (`noise_input`:
1000 t, 1000 i / T, or EDM's ln(sigma) / 4), the training times from one uniform and one normal
draw per sample, the sampling times for N steps (descending; the samplers end at the clean data,
alpha = 1, sigma = 0), the time of a given noise-to-signal ratio sigma / alpha (EDM's churn) and
the range of ratios it has (`ratio_range`: the likelihood's ODE stays within it).
Grids and ratios are float64.
"""
from __future__ import annotations

import math
from typing import Tuple

import torch
from torch import Tensor

#: the log-SNR range of the continuous cosine schedule (Kingma et al. 2021's truncation)
LOGSNR_MAX, LOGSNR_MIN = 20.0, -20.0
#: the linear continuous VP's beta(t) range (Song et al. 2021) and its smallest training / sampling time
BETA_MIN, BETA_MAX, VP_T_MIN = 0.1, 20.0, 1e-3


def _alpha_sigma_of_logsnr(logsnr: Tensor) -> Tuple[Tensor, Tensor]:
    return torch.sigmoid(logsnr).sqrt(), torch.sigmoid(-logsnr).sqrt()


def discrete_alpha_bar(schedule: str, steps: int) -> Tensor:
    """alpha_bar_i, i = 0 .. steps - 1 (float64): linear betas 1e-4 .. 0.02 (scaled by 1000 /
    steps, Nichol & Dhariwal's rescaling), or the cosine schedule with betas clipped at 0.999."""
    if schedule == "linear":
        scale = 1000.0 / steps
        betas = torch.linspace(scale * 1e-4, scale * 0.02, steps, dtype=torch.float64)
    else:
        f = lambda t: torch.cos((t / steps + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
        i = torch.arange(steps + 1, dtype=torch.float64)
        betas = (1 - f(i[1:]) / f(i[:-1])).clamp(max=0.999)
    return torch.cumprod(1 - betas, dim=0)


class VPDiscrete:
    """DDPM's discrete process: t is a step index 0 .. T-1 (fractional between steps: log-SNR
    interpolated), the network sees 1000 t / T."""

    def __init__(self, schedule: str, steps: int):
        self.steps = steps
        bar = discrete_alpha_bar(schedule, steps)
        self.logsnr = (bar / (1 - bar)).log()  # decreasing in i

    def logsnr_at(self, t: Tensor) -> Tensor:
        t = t.double().clamp(0, self.steps - 1)
        low = t.floor().long().clamp(max=self.steps - 2) if self.steps > 1 else t.long()
        high = (low + 1).clamp(max=self.steps - 1)
        table = self.logsnr.to(t.device)
        return table[low] + (t - low) * (table[high] - table[low])

    def alpha_sigma(self, t: Tensor) -> Tuple[Tensor, Tensor]:
        alpha, sigma = _alpha_sigma_of_logsnr(self.logsnr_at(t))
        return alpha.to(t.dtype), sigma.to(t.dtype)

    def noise_input(self, t: Tensor) -> Tensor:
        return t * (1000.0 / self.steps)

    def training_times(self, uniform: Tensor, normal: Tensor) -> Tensor:
        return (uniform * self.steps).floor().clamp(max=self.steps - 1)

    def sampling_times(self, steps: int) -> Tensor:
        return torch.linspace(self.steps - 1, 0, steps, dtype=torch.float64).round()

    def time_of(self, ratio: Tensor) -> Tensor:
        """The (fractional) index whose sigma / alpha is `ratio`."""
        logsnr = -2 * ratio.double().log()
        table = self.logsnr.flip(0)  # increasing
        high = torch.searchsorted(table, logsnr).clamp(1, self.steps - 1)
        low = high - 1
        fraction = ((logsnr - table[low]) / (table[high] - table[low])).clamp(0, 1)
        return (self.steps - 1) - (low + fraction)

    def ratio_range(self) -> Tuple[float, float]:
        """sigma / alpha at the first and the last step."""
        return math.exp(-float(self.logsnr[0]) / 2), math.exp(-float(self.logsnr[-1]) / 2)


class VPContinuous:
    """The continuous VP process on t in [0, 1]; the network sees 1000 t."""

    def __init__(self, schedule: str):
        self.schedule = schedule
        self.t_min = VP_T_MIN if schedule == "linear" else 0.0
        self._a = math.atan(math.exp(-LOGSNR_MAX / 2))
        self._b = math.atan(math.exp(-LOGSNR_MIN / 2)) - self._a

    def logsnr_at(self, t: Tensor) -> Tensor:
        t = t.double()
        if self.schedule == "linear":  # -log alpha_bar = beta_min t + (beta_max - beta_min) t^2 / 2
            return -torch.special.expm1(BETA_MIN * t + (BETA_MAX - BETA_MIN) * t ** 2 / 2).log()
        return -2 * torch.tan(self._a + self._b * t).log()

    def alpha_sigma(self, t: Tensor) -> Tuple[Tensor, Tensor]:
        alpha, sigma = _alpha_sigma_of_logsnr(self.logsnr_at(t))
        return alpha.to(t.dtype), sigma.to(t.dtype)

    def noise_input(self, t: Tensor) -> Tensor:
        return t * 1000.0

    def training_times(self, uniform: Tensor, normal: Tensor) -> Tensor:
        return self.t_min + (1 - self.t_min) * uniform

    def sampling_times(self, steps: int) -> Tensor:
        return torch.linspace(1.0, self.t_min, steps, dtype=torch.float64)

    def time_of(self, ratio: Tensor) -> Tensor:
        logsnr = -2 * ratio.double().log()
        if self.schedule == "linear":  # solve (beta_max - beta_min) / 2 t^2 + beta_min t = log(1 + e^-logsnr)
            q, half = torch.log1p(torch.exp(-logsnr)), (BETA_MAX - BETA_MIN) / 2
            return (-BETA_MIN + (BETA_MIN ** 2 + 4 * half * q).sqrt()) / (2 * half)
        return ((torch.atan(torch.exp(-logsnr / 2)) - self._a) / self._b).clamp(0, 1)

    def ratio_range(self) -> Tuple[float, float]:
        """sigma / alpha at the smallest training time and at t = 1."""
        ends = self.logsnr_at(torch.tensor([self.t_min, 1.0], dtype=torch.float64))
        return math.exp(-float(ends[0]) / 2), math.exp(-float(ends[1]) / 2)


class EDM:
    """Karras et al. 2022: t = sigma, alpha = 1; training ln sigma ~ N(p_mean, p_std^2); the
    sampling grid (sigma_max^(1/rho) + i / (N - 1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho."""

    def __init__(self, p_mean: float, p_std: float, sigma_min: float, sigma_max: float, rho: float):
        self.p_mean, self.p_std = p_mean, p_std
        self.sigma_min, self.sigma_max, self.rho = sigma_min, sigma_max, rho

    def alpha_sigma(self, t: Tensor) -> Tuple[Tensor, Tensor]:
        return torch.ones_like(t), t

    def noise_input(self, t: Tensor) -> Tensor:
        return t.log() / 4.0

    def training_times(self, uniform: Tensor, normal: Tensor) -> Tensor:
        return (self.p_mean + self.p_std * normal).exp()

    def sampling_times(self, steps: int) -> Tensor:
        inverse = 1.0 / self.rho
        ramp = torch.linspace(0, 1, steps, dtype=torch.float64) if steps > 1 else torch.zeros(1, dtype=torch.float64)
        first, last = self.sigma_max ** inverse, self.sigma_min ** inverse
        return (first + ramp * (last - first)) ** self.rho

    def time_of(self, ratio: Tensor) -> Tensor:
        return ratio.double()

    def ratio_range(self) -> Tuple[float, float]:
        return 0.0, math.inf


class Flow:
    """The straight path of rectified flow: alpha = 1 - t, sigma = t; the network sees 1000 t;
    training t uniform, or logit-normal (t = sigmoid(m + s n), Esser et al. 2024); sampling
    from t = 1 (pure noise) in N equal steps."""

    def __init__(self, time_sampling: str, logit_mean: float, logit_std: float):
        self.time_sampling, self.logit_mean, self.logit_std = time_sampling, logit_mean, logit_std

    def alpha_sigma(self, t: Tensor) -> Tuple[Tensor, Tensor]:
        return 1 - t, t

    def noise_input(self, t: Tensor) -> Tensor:
        return t * 1000.0

    def training_times(self, uniform: Tensor, normal: Tensor) -> Tensor:
        if self.time_sampling == "logit_normal":
            return torch.sigmoid(self.logit_mean + self.logit_std * normal)
        return uniform

    def sampling_times(self, steps: int) -> Tensor:
        return torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)[:-1]

    def time_of(self, ratio: Tensor) -> Tensor:
        ratio = ratio.double()
        return ratio / (1 + ratio)

    def ratio_range(self) -> Tuple[float, float]:
        return 0.0, math.inf


def build_process(loss_cfg, sampler_cfg):
    """The process of `loss.objective` (eps / v: discrete when loss.timesteps > 0)."""
    if loss_cfg.objective == "edm":
        return EDM(loss_cfg.p_mean, loss_cfg.p_std, sampler_cfg.sigma_min, sampler_cfg.sigma_max, sampler_cfg.rho)
    if loss_cfg.objective == "flow":
        return Flow(loss_cfg.time_sampling, loss_cfg.logit_mean, loss_cfg.logit_std)
    if loss_cfg.timesteps > 0:
        return VPDiscrete(loss_cfg.schedule, loss_cfg.timesteps)
    return VPContinuous(loss_cfg.schedule)
