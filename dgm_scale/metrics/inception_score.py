"""Inception Score (Salimans et al. 2016) from classifier logits, as torch-fidelity computes it.

Per split: exp(mean_x KL(p(y|x) || p(y))) with p(y|x) = softmax(logits) in float64 and p(y) the
split's mean prediction; returns the mean and std (ddof=0) over splits. Split i holds rows
[i N // splits, (i + 1) N // splits). No shuffle by default; `shuffle_seed=2020` permutes rows
exactly as torch-fidelity's default (`samples_shuffle=True`, `rng_seed=2020`) does.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


def inception_score(logits: Tensor | np.ndarray, splits: int = 10,
                    shuffle_seed: int | None = None) -> tuple[float, float]:
    """Logits [N, C] -> (mean, std) of the per-split scores."""
    logits = torch.as_tensor(logits).detach().cpu().double()
    if logits.ndim != 2 or logits.shape[0] < splits:
        raise ValueError(f"inception_score needs logits [N >= splits={splits}, C], got {tuple(logits.shape)}")
    n = logits.shape[0]
    if shuffle_seed is not None:
        logits = logits[np.random.RandomState(shuffle_seed).permutation(n), :]
    p, log_p = logits.softmax(dim=1), logits.log_softmax(dim=1)
    scores = []
    for i in range(splits):
        rows = slice(i * n // splits, (i + 1) * n // splits)
        p_split, log_p_split = p[rows], log_p[rows]
        log_marginal = p_split.mean(dim=0, keepdim=True).log()
        kl = (p_split * (log_p_split - log_marginal)).sum(dim=1)
        scores.append(kl.mean().exp().item())
    return float(np.mean(scores)), float(np.std(scores))
