"""k-NN manifold metrics on feature sets, with distances computed in bounded [batch, batch] blocks.

Precision/recall (Kynkaanniemi et al. 2019; torch-fidelity's `prc`): each set's manifold is the
union of balls around its points with radius = distance to the k-th nearest other point of the same
set. Precision = share of fake points inside the real manifold; recall = share of real points
inside the fake manifold (membership test `<=`, as torch-fidelity).

Density/coverage (Naeem et al. 2020; the reference `prdc` package): with real k-NN radii r_i,
density = sum_j #{i: ||y_j - x_i|| < r_i} / (k M) and coverage = share of real balls holding at
least one fake point (strict `<`, as the reference).

Memory stays at O(batch_size^2 + N k) whatever the set sizes.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


def _as_float64_tensor(features: Tensor | np.ndarray) -> Tensor:
    x = torch.as_tensor(features).detach().cpu().double()
    if x.ndim != 2:
        raise ValueError(f"expected features [N, D], got shape {tuple(x.shape)}")
    return x


def knn_radii(x: Tensor, k: int, batch_size: int = 1024) -> Tensor:
    """x [N, D] -> [N] distance of each point to its k-th nearest other point (self excluded)."""
    if not 1 <= k < x.shape[0]:
        raise ValueError(f"k={k} needs 1 <= k < N={x.shape[0]}")
    radii = []
    for rows in x.split(batch_size):
        nearest = torch.empty(rows.shape[0], 0, dtype=x.dtype)  # running k + 1 smallest (self = 0)
        for cols in x.split(batch_size):
            merged = torch.cat([nearest, torch.cdist(rows, cols)], dim=1)
            nearest = merged.topk(min(k + 1, merged.shape[1]), dim=1, largest=False).values
        radii.append(nearest[:, k])
    return torch.cat(radii)


def _ball_counts(points: Tensor, centres: Tensor, radii: Tensor, strict: bool,
                 batch_size: int) -> tuple[Tensor, Tensor]:
    """-> (per point [P]: how many balls hold it, per centre [C]: how many points its ball holds)."""
    per_point = torch.zeros(points.shape[0], dtype=torch.long)
    per_centre = torch.zeros(centres.shape[0], dtype=torch.long)
    for p_start in range(0, points.shape[0], batch_size):
        p_rows = points[p_start:p_start + batch_size]
        for c_start in range(0, centres.shape[0], batch_size):
            dist = torch.cdist(p_rows, centres[c_start:c_start + batch_size])
            limit = radii[c_start:c_start + batch_size]
            inside = dist < limit if strict else dist <= limit
            per_point[p_start:p_start + batch_size] += inside.sum(dim=1)
            per_centre[c_start:c_start + batch_size] += inside.sum(dim=0)
    return per_point, per_centre


def precision_recall(real: Tensor | np.ndarray, fake: Tensor | np.ndarray, k: int = 3,
                     batch_size: int = 1024) -> tuple[float, float]:
    """real [N, D], fake [M, D] -> (precision, recall), Kynkaanniemi et al. 2019."""
    real, fake = _as_float64_tensor(real), _as_float64_tensor(fake)
    in_real, _ = _ball_counts(fake, real, knn_radii(real, k, batch_size), False, batch_size)
    in_fake, _ = _ball_counts(real, fake, knn_radii(fake, k, batch_size), False, batch_size)
    return float((in_real > 0).double().mean()), float((in_fake > 0).double().mean())


def density_coverage(real: Tensor | np.ndarray, fake: Tensor | np.ndarray, k: int = 5,
                     batch_size: int = 1024) -> tuple[float, float]:
    """real [N, D], fake [M, D] -> (density, coverage), Naeem et al. 2020."""
    real, fake = _as_float64_tensor(real), _as_float64_tensor(fake)
    per_fake, per_real = _ball_counts(fake, real, knn_radii(real, k, batch_size), True, batch_size)
    density = per_fake.sum().item() / (k * fake.shape[0])
    return float(density), float((per_real > 0).double().mean())
