"""Mode coverage on 2-D Gaussian mixtures (the protocol of Metz et al. 2017; Srivastava et al. 2017)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class ModeCoverage:
    modes_recovered: int  # modes holding at least `min_share` of their fair share of good samples
    num_modes: int
    high_quality_fraction: float  # samples within `num_stds` standard deviations of their nearest mode
    samples_per_mode: list[int]  # high-quality samples at each mode


def mode_coverage(samples: Tensor, centers: Tensor, std: float, num_stds: float = 3.0,
                  min_share: float = 0.25) -> ModeCoverage:
    """Score 2-D samples [N, 2] against mixture centres [K, 2] with component std `std`.

    A sample is high quality when it lies within `num_stds * std` of its nearest centre. A mode
    counts as recovered when it holds at least `min_share * N / K` high-quality samples, which
    ignores a handful of stray points landing near a mode the generator never learned.
    """
    distances = torch.cdist(samples.float(), centers.float())  # [N, K]
    nearest_distance, nearest_mode = distances.min(dim=1)
    good = nearest_distance <= num_stds * std
    counts = torch.bincount(nearest_mode[good], minlength=centers.shape[0])
    threshold = min_share * samples.shape[0] / centers.shape[0]
    return ModeCoverage(
        modes_recovered=int((counts >= threshold).sum()),
        num_modes=centers.shape[0],
        high_quality_fraction=float(good.float().mean()),
        samples_per_mode=counts.tolist(),
    )
