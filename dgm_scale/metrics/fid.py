"""Frechet Inception Distance on feature arrays, in float64 (the pytorch-fid / TTUR formula).

    FID = ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2))

`frechet_distance` follows pytorch-fid line for line: `scipy.linalg.sqrtm(S1 @ S2)`; when that is
not finite, retry with `eps` added to both diagonals; drop a negligible imaginary part. Where
pytorch-fid raises on a large imaginary part (near-singular products, e.g. fewer samples than
feature dimensions) we warn and use the eigenvalue trace `sum(sqrt(eig(S1 S2)))` instead, which is
exactly what torch-fidelity 0.4 computes in every case, so evaluation inside training never dies.
"""
from __future__ import annotations

import warnings

import numpy as np
import scipy.linalg
from torch import Tensor


def as_float64(features: np.ndarray | Tensor) -> np.ndarray:
    """Any [N, D] tensor/array -> a float64 numpy array [N, D] (on the CPU)."""
    if isinstance(features, Tensor):
        features = features.detach().cpu().double().numpy()
    return np.asarray(features, dtype=np.float64)


def feature_statistics(features: np.ndarray | Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Features [N, D] -> (mu [D], sigma [D, D]): float64 mean and unbiased covariance (np.cov)."""
    x = as_float64(features)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"feature_statistics needs features [N >= 2, D], got shape {x.shape}")
    return x.mean(axis=0), np.atleast_2d(np.cov(x, rowvar=False))


def _trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray, eps: float) -> float:
    """Tr((S1 S2)^(1/2)) as pytorch-fid computes it (see the module docstring for the fallback)."""
    covmean = scipy.linalg.sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
        warnings.warn(f"FID: singular covariance product; adding {eps} to the diagonals", RuntimeWarning)
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = scipy.linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            warnings.warn(f"FID: sqrtm has an imaginary part {np.max(np.abs(covmean.imag)):.3g}; "
                          "using the eigenvalue trace (torch-fidelity 0.4)", RuntimeWarning)
            return trace_sqrt_product_eig(sigma1, sigma2)
        covmean = covmean.real
    return float(np.trace(covmean))


def trace_sqrt_product_eig(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """Tr((S1 S2)^(1/2)) = sum of sqrt(eigenvalues of S1 S2), as torch-fidelity 0.4 computes it."""
    eigenvalues = np.linalg.eigvals(sigma1.dot(sigma2)).astype("complex128")
    return float(np.sum(np.sqrt(eigenvalues)).real)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     eps: float = 1e-6) -> float:
    """FID between Gaussians N(mu1 [D], sigma1 [D, D]) and N(mu2 [D], sigma2 [D, D]), in float64."""
    mu1, mu2 = np.atleast_1d(as_float64(mu1)), np.atleast_1d(as_float64(mu2))
    sigma1, sigma2 = np.atleast_2d(as_float64(sigma1)), np.atleast_2d(as_float64(sigma2))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise ValueError(f"FID: shapes differ: mu {mu1.shape} vs {mu2.shape}, "
                         f"sigma {sigma1.shape} vs {sigma2.shape}")
    diff = mu1 - mu2
    tr_covmean = _trace_sqrt_product(sigma1, sigma2, eps)
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)


def fid_from_features(a: np.ndarray | Tensor, b: np.ndarray | Tensor) -> float:
    """FID between two feature sets a [N, D] and b [M, D]."""
    return frechet_distance(*feature_statistics(a), *feature_statistics(b))
