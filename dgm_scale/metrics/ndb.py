"""Number of statistically different bins (NDB), Richardson & Weiss 2018, "On GANs and GMMs".

A mode-collapse indicator: k-means with K bins on the REAL features, then each real and fake
feature goes to its nearest centroid, and every bin's real and fake proportions are compared with
a two-sided two-proportion z-test (pooled proportion). NDB is the number of bins whose p-value is
below alpha; a model that drops modes empties some bins and overfills others, so NDB / K rises
well above the alpha that two samples of one distribution give. The Jensen-Shannon divergence
(natural log, so at most ln 2) between the two bin histograms is reported with it.

Everything runs in float64 on the CPU, and the features are converted block by block (rows of
`batch_size`), so memory stays O(batch_size * D + K * D) beyond the caller's own arrays: 50k x
2048 float32 features need no float64 copy.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

Features = Tensor | np.ndarray


def _as_2d_tensor(features: Features) -> Tensor:
    """Features [N, D] as a CPU tensor in their own dtype (no float64 copy of the whole set)."""
    x = torch.as_tensor(features).detach().cpu()
    if x.ndim != 2:
        raise ValueError(f"expected features [N, D], got shape {tuple(x.shape)}")
    return x


def _blocks(x: Tensor, batch_size: int):
    """Yield (start, rows [B, D] float64) over x [N, D]: the float64 copy is one block at a time."""
    for start in range(0, x.shape[0], batch_size):
        yield start, x[start:start + batch_size].double()


def _squared_distances(rows: Tensor, centroids: Tensor) -> Tensor:
    """rows [B, D], centroids [K, D] (float64) -> squared Euclidean distances [B, K], >= 0."""
    dist = (rows * rows).sum(1, keepdim=True) - 2 * rows @ centroids.T + (centroids * centroids).sum(1)
    return dist.clamp_min_(0.0)  # the expansion can dip below 0 by rounding


def assign_to_centroids(x: Features, centroids: Tensor, batch_size: int = 1024) -> Tensor:
    """x [N, D], centroids [K, D] -> [N] index of each row's nearest centroid (ties: lowest index)."""
    x, centroids = _as_2d_tensor(x), centroids.double()
    labels = torch.empty(x.shape[0], dtype=torch.long)
    for start, rows in _blocks(x, batch_size):
        labels[start:start + rows.shape[0]] = _squared_distances(rows, centroids).argmin(1)
    return labels


def _kmeans_plus_plus(x: Tensor, k: int, generator: torch.Generator, batch_size: int) -> Tensor:
    """k-means++ seeding (Arthur & Vassilvitskii 2007): x [N, D] -> centroids [K, D] float64.

    Each new centre is a data point drawn with probability proportional to its squared distance
    to the nearest centre chosen so far; the [N] running minimum is updated block by block.
    """
    n = x.shape[0]
    first = int(torch.randint(n, (1,), generator=generator))
    centroids = [x[first].double()]
    nearest = torch.full((n,), math.inf, dtype=torch.float64)
    for _ in range(1, k):
        newest = centroids[-1].unsqueeze(0)
        for start, rows in _blocks(x, batch_size):
            block = nearest[start:start + rows.shape[0]]
            torch.minimum(block, _squared_distances(rows, newest)[:, 0], out=block)
        total = nearest.sum()
        # All points coincide with chosen centres (fewer distinct points than K): draw uniformly.
        weights = nearest if total > 0 else torch.ones(n, dtype=torch.float64)
        index = int(torch.multinomial(weights, 1, generator=generator))
        centroids.append(x[index].double())
    return torch.stack(centroids)


def _centroid_update(x: Tensor, labels: Tensor, previous: Tensor, batch_size: int) -> Tensor:
    """Mean of each cluster's rows -> [K, D]; an empty cluster keeps its previous centroid."""
    k, d = previous.shape
    sums = torch.zeros(k, d, dtype=torch.float64)
    for start, rows in _blocks(x, batch_size):
        sums.index_add_(0, labels[start:start + rows.shape[0]], rows)
    counts = torch.bincount(labels, minlength=k)
    filled = counts > 0
    updated = previous.clone()
    updated[filled] = sums[filled] / counts[filled].unsqueeze(1).double()
    return updated


def kmeans(x: Features, k: int, seed: int = 2020, max_iter: int = 100,
           batch_size: int = 1024) -> tuple[Tensor, Tensor]:
    """Lloyd's k-means with k-means++ seeding from `torch.Generator().manual_seed(seed)`.

    x [N, D] -> (centroids [K, D] float64, labels [N] long). Iterates until no assignment changes
    or `max_iter` updates; the same seed gives the same result.
    """
    x = _as_2d_tensor(x)
    if not 1 <= k <= x.shape[0]:
        raise ValueError(f"k-means needs 1 <= k={k} <= N={x.shape[0]}")
    generator = torch.Generator().manual_seed(seed)
    centroids = _kmeans_plus_plus(x, k, generator, batch_size)
    labels = assign_to_centroids(x, centroids, batch_size)
    for _ in range(max_iter):
        centroids = _centroid_update(x, labels, centroids, batch_size)
        new_labels = assign_to_centroids(x, centroids, batch_size)
        if torch.equal(new_labels, labels):
            break
        labels = new_labels
    return centroids, labels


def two_proportion_p_values(p1: Tensor, n1: int, p2: Tensor, n2: int) -> Tensor:
    """Two-sided p-values [K] of the pooled two-proportion z-test, for proportions p1, p2 [K].

    z = (p1 - p2) / sqrt(p (1 - p) (1/n1 + 1/n2)) with p = (n1 p1 + n2 p2) / (n1 + n2), and
    p-value = 2 * (1 - Phi(|z|)) = erfc(|z| / sqrt 2). A bin empty (or full) in both sets has
    no variance and no difference: its p-value is 1.
    """
    p1, p2 = torch.as_tensor(p1).double(), torch.as_tensor(p2).double()
    pooled = (n1 * p1 + n2 * p2) / (n1 + n2)
    se = torch.sqrt(pooled * (1 - pooled) * (1.0 / n1 + 1.0 / n2))
    z = torch.where(se > 0, (p1 - p2).abs() / torch.where(se > 0, se, 1.0), 0.0)
    return torch.special.erfc(z / math.sqrt(2.0))


def js_divergence(p: Tensor, q: Tensor) -> float:
    """Jensen-Shannon divergence (nats) of histograms p, q [K], each normalised to sum 1.

    JS = KL(p || m) / 2 + KL(q || m) / 2 with m = (p + q) / 2, and 0 log 0 = 0: 0 for equal
    histograms, ln 2 for disjoint ones.
    """
    p, q = torch.as_tensor(p).double(), torch.as_tensor(q).double()
    p, q = p / p.sum(), q / q.sum()
    m = (p + q) / 2

    def kl_to_m(a: Tensor) -> Tensor:
        inside = a > 0  # where a > 0, m > 0 too
        return (a[inside] * torch.log(a[inside] / m[inside])).sum()

    return float(0.5 * kl_to_m(p) + 0.5 * kl_to_m(q))


@dataclass
class NDBResult:
    """NDB and the per-bin detail behind it (K = number of bins)."""

    ndb: int                   # bins whose real and fake proportions differ significantly
    ndb_fraction: float        # ndb / K
    js: float                  # Jensen-Shannon divergence (nats) of the two bin histograms
    real_proportions: Tensor   # [K] share of real rows per bin
    fake_proportions: Tensor   # [K] share of fake rows per bin
    p_values: Tensor           # [K] two-sided z-test p-values
    different: Tensor          # [K] bool, p_value < alpha
    centroids: Tensor          # [K, D] float64 bin centres (k-means on the real features)

    def as_metrics(self) -> dict[str, float]:
        return {"ndb": float(self.ndb), "ndb_fraction": self.ndb_fraction, "ndb_js": self.js}


def ndb(real: Features, fake: Features, bins: int = 20, alpha: float = 0.05, seed: int = 2020,
        max_iter: int = 100, batch_size: int = 1024) -> NDBResult:
    """NDB of fake [M, D] against real [N, D] with `bins` k-means bins fitted on real."""
    real, fake = _as_2d_tensor(real), _as_2d_tensor(fake)
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"NDB needs features of one width, got {tuple(real.shape)} and {tuple(fake.shape)}")
    if not 2 <= bins <= real.shape[0]:
        raise ValueError(f"NDB needs 2 <= bins={bins} <= number of real rows {real.shape[0]}")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"NDB significance alpha={alpha} must lie in (0, 1)")
    if fake.shape[0] == 0:
        raise ValueError("NDB needs at least one fake row")
    centroids, real_labels = kmeans(real, bins, seed, max_iter, batch_size)
    fake_labels = assign_to_centroids(fake, centroids, batch_size)
    n, m = real.shape[0], fake.shape[0]
    real_props = torch.bincount(real_labels, minlength=bins).double() / n
    fake_props = torch.bincount(fake_labels, minlength=bins).double() / m
    p_values = two_proportion_p_values(real_props, n, fake_props, m)
    different = p_values < alpha
    count = int(different.sum())
    return NDBResult(count, count / bins, js_divergence(real_props, fake_props), real_props,
                     fake_props, p_values, different, centroids)
