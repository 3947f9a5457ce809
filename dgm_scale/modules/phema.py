"""Power-function EMA and post-hoc EMA (Karras et al. 2024, "Analyzing and Improving the Training
Dynamics of Diffusion Models", sec. 3 and app. C; NVlabs/edm2's training/phema.py).

**The profile.** A power-function EMA of exponent gamma at training time t averages the weights
theta(tau) of all earlier times with density p_t(tau) = (gamma + 1) tau^gamma / t^(gamma + 1) on
[0, t]: a fixed *shape* relative to the run's length, whatever that length is. Its width is
named by the relative standard deviation of tau / t under p_t,
    sigma_rel^2 = (gamma + 1) / ((gamma + 2)^2 (gamma + 3)),
decreasing in gamma >= 0 from 1 / sqrt(12) (gamma = 0: the plain average of everything).

**Tracking it.** Iteration k (1-based) holds the weights theta_k over (k - 1, k]. The update
ema_k = beta_k ema_{k-1} + (1 - beta_k) theta_k with beta_k = (1 - 1/k)^(gamma + 1) (beta_1 = 0:
no dependence on a starting value) gives theta_k the weight (k^(gamma+1) - (k-1)^(gamma+1)) /
t^(gamma+1), exactly the integral of p_t over (k - 1, k]: the tracked average *is* the
continuous profile over the piecewise-constant trajectory, with no approximation.

**Post-hoc reconstruction.** Snapshots of a few tracked profiles (two widths, saved every few
iterations) span a space of averages. Any other profile (width sigma_rel, time T) is approached
by the combination of snapshots whose profile is closest in L2: the normal equations
A x = b with A_ij = <p_i, p_j>, b_i = <p_i, p_out>, whose inner products have a closed form
(`profile_inner_products`). Applied to the snapshots' weights, the same combination gives the
averaged network, since every profile is linear in the trajectory.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

#: the widest power-function profile (gamma = 0, the uniform average of the whole run)
MAX_SIGMA_REL = 1.0 / math.sqrt(12.0)


def sigma_rel_of(exponent: float) -> float:
    """The relative standard deviation of the profile of exponent `exponent` (>= 0)."""
    gamma = float(exponent)
    return math.sqrt((gamma + 1.0) / ((gamma + 2.0) ** 2 * (gamma + 3.0)))


def exponent_of(sigma_rel: float) -> float:
    """The exponent gamma >= 0 of the profile of width `sigma_rel` in (0, 1/sqrt(12)]: the inverse
    of `sigma_rel_of`, found by bisection on ln(gamma + 1) (sigma_rel_of decreases there)."""
    if not 0.0 < sigma_rel <= MAX_SIGMA_REL:
        raise ValueError(f"sigma_rel must be in (0, {MAX_SIGMA_REL:.4f}], got {sigma_rel}")
    low, high = 0.0, 80.0  # ln(gamma + 1): gamma up to ~5e34, far past any float32 average
    for _ in range(200):
        middle = 0.5 * (low + high)
        if sigma_rel_of(math.expm1(middle)) > sigma_rel:
            low = middle
        else:
            high = middle
    return math.expm1(0.5 * (low + high))


def beta(exponent: float, iteration: int) -> float:
    """The decay of update number `iteration` (1-based) of the profile of exponent `exponent`."""
    return (1.0 - 1.0 / iteration) ** (exponent + 1.0)


def profile_inner_products(times_a, exponents_a, times_b, exponents_b) -> np.ndarray:
    """<p_a, p_b> = integral of p_a(tau) p_b(tau) d tau for profiles a (at time t_a, exponent g_a)
    and b, broadcast over the arrays: (g_a + 1)(g_b + 1) / (g_a + g_b + 1) * (t_min / t_max)^g_max / t_max,
    where g_max is the exponent of the profile at the later time t_max (written as a ratio, which
    stays finite for large exponents)."""
    t_a, g_a, t_b, g_b = (np.asarray(v, dtype=np.float64) for v in (times_a, exponents_a, times_b, exponents_b))
    t_min, t_max = np.minimum(t_a, t_b), np.maximum(t_a, t_b)
    g_late = np.where(t_a < t_b, g_b, g_a)
    return (g_a + 1) * (g_b + 1) / (g_a + g_b + 1) * (t_min / t_max) ** g_late / t_max


def solve_weights(times: Sequence[float], exponents: Sequence[float], time: float, exponent: float) -> np.ndarray:
    """The weights [n] of the n snapshot profiles (times[i], exponents[i]) whose combination is
    the least-squares closest to the profile (time, exponent), scaled to sum to 1 (an average of
    averages: a constant trajectory stays that constant)."""
    times, exponents = np.asarray(times, dtype=np.float64), np.asarray(exponents, dtype=np.float64)
    gram = profile_inner_products(times[:, None], exponents[:, None], times[None, :], exponents[None, :])
    target = profile_inner_products(times, exponents, time, exponent)
    weights = np.linalg.lstsq(gram, target, rcond=None)[0]  # (solve(), unless snapshots repeat)
    return weights / weights.sum()


def profile_error(times: Sequence[float], exponents: Sequence[float], weights: Sequence[float], time: float,
                  exponent: float) -> float:
    """How far the combination `weights` of the snapshot profiles is from the profile (time,
    exponent): ||sum_i w_i p_i - p|| / ||p|| in L2 (0: exact). It bounds the error of every
    reconstructed weight by Cauchy-Schwarz, so it says how well the snapshots span a width."""
    times, exponents, weights = (np.asarray(v, dtype=np.float64) for v in (times, exponents, weights))
    gram = profile_inner_products(times[:, None], exponents[:, None], times[None, :], exponents[None, :])
    cross = profile_inner_products(times, exponents, time, exponent)
    norm = float(profile_inner_products(time, exponent, time, exponent))
    squared = norm - 2 * weights @ cross + weights @ gram @ weights
    return math.sqrt(max(float(squared), 0.0) / norm)


class PowerFunctionEMA:
    """Power-function EMAs of a list of tensors (a network's parameters), one per width in
    `sigma_rels`, kept in float32 beside the tensors (same device); `update` after every
    training iteration. Not a module: its averages are neither in the model's state dict (what
    sampling loads) nor broadcast by DDP; `state_dict` / `load_state_dict` carry them through
    the training checkpoint."""

    def __init__(self, sigma_rels: Sequence[float]):
        self.sigma_rels = [float(s) for s in sigma_rels]
        self.exponents = [exponent_of(s) for s in self.sigma_rels]
        self.averages: Optional[List[List[Tensor]]] = None  # [profile][tensor]
        self.iteration = 0  # of the last update

    @torch.no_grad()
    def update(self, tensors: Sequence[Tensor], iteration: int) -> None:
        """Average in the tensors' values after training iteration `iteration` (1-based); the
        first update must be iteration 1 (or the one after a loaded state's)."""
        if iteration != self.iteration + 1:
            raise RuntimeError(f"power-function EMA: update for iteration {iteration} after iteration {self.iteration}")
        values = [tensor.detach().float() for tensor in tensors]
        if self.averages is None:
            self.averages = [[value.clone() for value in values] for _ in self.exponents]  # beta_1 = 0: theta_1
        elif self.averages[0][0].device != values[0].device:  # loaded on the CPU
            self.averages = [[average.to(values[0].device) for average in profile] for profile in self.averages]
        if hasattr(values[0], "device_mesh") and not self.sharded:  # loaded whole under FSDP: keep this rank's slices
            from torch.distributed.tensor import distribute_tensor

            self.averages = [[distribute_tensor(average, value.device_mesh, value.placements, src_data_rank=None)
                              for average, value in zip(profile, values)] for profile in self.averages]
        for profile, exponent in zip(self.averages, self.exponents):
            torch._foreach_lerp_(profile, values, 1.0 - beta(exponent, iteration))
        self.iteration = iteration

    @property
    def sharded(self) -> bool:
        """Whether the averages are FSDP shards (DTensors, like the parameters they average: each
        rank updates its own slices); reading them whole is then a collective."""
        return bool(self.averages) and hasattr(self.averages[0][0], "full_tensor")

    def profiles(self, names: Sequence[str]) -> List[Dict[str, Tensor]]:
        """Each profile's averages by tensor name, on the CPU (a snapshot); sharded: gathered,
        every rank must call it."""
        if self.averages is None:
            raise RuntimeError("power-function EMA: nothing averaged yet")
        return [{name: _whole(average).detach().cpu().clone() for name, average in zip(names, profile)}
                for profile in self.averages]

    def state_dict(self) -> dict:
        """The averages whole (sharded: gathered, every rank must call it), so that a checkpoint
        resumes on any number of processes and under any strategy."""
        return {"sigma_rels": list(self.sigma_rels), "iteration": self.iteration,
                "averages": [[_whole(average) for average in profile] for profile in self.averages or []]}

    def load_state_dict(self, state: dict) -> None:
        if [float(s) for s in state["sigma_rels"]] != self.sigma_rels:
            raise ValueError(f"the checkpoint's power-function EMAs have sigma_rels {state['sigma_rels']}, "
                             f"this model {self.sigma_rels}")
        self.iteration = int(state["iteration"])
        self.averages = [[tensor.float().clone() for tensor in profile] for profile in state["averages"]] or None


def _whole(tensor: Tensor) -> Tensor:
    """A sharded tensor (an FSDP DTensor) gathered whole (a collective); a plain one as it is."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor
