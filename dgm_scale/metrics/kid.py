"""Kernel Inception Distance (Binkowski et al. 2018) as torch-fidelity computes it, in float64.

Unbiased MMD^2 with the polynomial kernel k(x, y) = (gamma <x, y> + coef0)^degree (gamma None ->
1 / D), averaged over `subsets` random subsets of `subset_size` rows drawn without replacement from
each set. The subsets come from `np.random.RandomState(seed)`, drawn in torch-fidelity's order
(set 1, then set 2, per subset), so the same seed picks the same rows as torch-fidelity.
"""
from __future__ import annotations

import numpy as np
from torch import Tensor

from dgm_scale.metrics.fid import as_float64


def polynomial_kernel(x: np.ndarray, y: np.ndarray, degree: int = 3, gamma: float | None = None,
                      coef0: float = 1.0) -> np.ndarray:
    """x [N, D], y [M, D] -> kernel matrix [N, M]."""
    gamma = 1.0 / x.shape[1] if gamma is None else gamma
    return (x @ y.T * gamma + coef0) ** degree


def mmd2_unbiased(k_xx: np.ndarray, k_xy: np.ndarray, k_yy: np.ndarray) -> float:
    """Unbiased MMD^2 from square kernel matrices [m, m]: diagonals of K_XX and K_YY dropped."""
    m = k_xx.shape[0]
    if m < 2 or k_xx.shape != (m, m) or k_xy.shape != (m, m) or k_yy.shape != (m, m):
        raise ValueError(f"mmd2_unbiased needs [m, m] kernels with m >= 2, got {k_xx.shape}, "
                         f"{k_xy.shape}, {k_yy.shape}")
    within = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
    return float(within - 2 * k_xy.sum() / (m * m))


def kid(a: np.ndarray | Tensor, b: np.ndarray | Tensor, subsets: int = 100, subset_size: int = 1000,
        degree: int = 3, gamma: float | None = None, coef0: float = 1.0,
        seed: int = 2020) -> tuple[float, float]:
    """KID between a [N, D] and b [M, D] -> (mean, std) over subsets (std with ddof=0, as np.std)."""
    x, y = as_float64(a), as_float64(b)
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"KID needs [N, D] and [M, D] features, got {x.shape} and {y.shape}")
    if min(len(x), len(y)) < subset_size:
        raise ValueError(f"KID subset_size {subset_size} is larger than a feature set "
                         f"({len(x)} and {len(y)} rows); lower kid_subset_size")
    rng = np.random.RandomState(seed)
    mmds = np.zeros(subsets)
    kernel = lambda p, q: polynomial_kernel(p, q, degree, gamma, coef0)
    for i in range(subsets):
        xs = x[rng.choice(len(x), subset_size, replace=False)]
        ys = y[rng.choice(len(y), subset_size, replace=False)]
        mmds[i] = mmd2_unbiased(kernel(xs, xs), kernel(xs, ys), kernel(ys, ys))
    return float(np.mean(mmds)), float(np.std(mmds))
