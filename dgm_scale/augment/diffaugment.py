"""DiffAugment (Zhao et al. 2020): differentiable colour, translation and cutout of every image D
sees, real and fake alike, so D cannot memorise a small training set and G still gets gradients.

Written here rather than taken from kornia: the three ops are a few tensor expressions each, and
their randomness must come from the caller (a tensor of uniform numbers keyed to the iteration),
so that a resumed run augments exactly as the uninterrupted one did; kornia's augmentations draw
from the global RNG, whose state a checkpoint does not hold.

Every op takes images x [N, C, H, W] and uniforms u [N, k] in [0, 1) (k = `UNIFORMS[op]`) and
is differentiable w.r.t. x (translation and cutout move or mask pixels: their gradient is the
same move or mask).
"""
from __future__ import annotations

from typing import Callable, Dict, Sequence

import torch
from torch import Tensor

TRANSLATION_RATIO = 0.125  # shift by up to 1/8 of the side (the paper's setting)
CUTOUT_RATIO = 0.5  # a square of half the side


def brightness(x: Tensor, u: Tensor) -> Tensor:
    """x + b, b ~ U[-0.5, 0.5) per image."""
    return x + (u[:, 0] - 0.5).view(-1, 1, 1, 1).to(x.dtype)


def saturation(x: Tensor, u: Tensor) -> Tensor:
    """Deviation from the per-pixel channel mean times s ~ U[0, 2) (no-op for one channel)."""
    mean = x.mean(dim=1, keepdim=True)
    return (x - mean) * (u[:, 0] * 2).view(-1, 1, 1, 1).to(x.dtype) + mean


def contrast(x: Tensor, u: Tensor) -> Tensor:
    """Deviation from the image mean times c ~ U[0.5, 1.5)."""
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * (u[:, 0] + 0.5).view(-1, 1, 1, 1).to(x.dtype) + mean


def integer_shift(x: Tensor, dy: Tensor, dx: Tensor, fill: float = 0.0) -> Tensor:
    """Shift each image by whole pixels (dy, dx [N], int64), filling the uncovered border with
    `fill`: out[n, :, i, j] = x[n, :, i - dy, j - dx]."""
    n, _, h, w = x.shape
    rows = torch.arange(h, device=x.device).view(1, h, 1) - dy.view(n, 1, 1)
    cols = torch.arange(w, device=x.device).view(1, 1, w) - dx.view(n, 1, 1)
    inside = ((rows >= 0) & (rows < h) & (cols >= 0) & (cols < w)).unsqueeze(1)
    index = (rows.clamp(0, h - 1) * w + cols.clamp(0, w - 1)).view(n, 1, h * w).expand(-1, x.shape[1], -1)
    moved = x.flatten(2).gather(2, index).view_as(x)
    return torch.where(inside, moved, torch.full_like(moved, fill))


def translation(x: Tensor, u: Tensor) -> Tensor:
    """Shift by up to TRANSLATION_RATIO of the side in each direction, zero (mid-grey) padding."""
    h, w = x.shape[2:]
    max_y, max_x = int(h * TRANSLATION_RATIO + 0.5), int(w * TRANSLATION_RATIO + 0.5)
    dy = (u[:, 0] * (2 * max_y + 1)).long().clamp(max=2 * max_y) - max_y
    dx = (u[:, 1] * (2 * max_x + 1)).long().clamp(max=2 * max_x) - max_x
    return integer_shift(x, dy, dx)


def cutout_mask(shape: Sequence[int], u: Tensor, ratio: float, device) -> Tensor:
    """[N, 1, H, W]: 0 inside a square of side ratio * H centred at a uniform position, else 1."""
    n, _, h, w = shape
    size_y, size_x = int(h * ratio + 0.5), int(w * ratio + 0.5)
    cy = (u[:, 0] * (h + 1 - size_y % 2)).long().view(n, 1, 1)
    cx = (u[:, 1] * (w + 1 - size_x % 2)).long().view(n, 1, 1)
    rows = torch.arange(h, device=device).view(1, h, 1)
    cols = torch.arange(w, device=device).view(1, 1, w)
    inside = (rows >= cy - size_y // 2) & (rows < cy - size_y // 2 + size_y) & \
             (cols >= cx - size_x // 2) & (cols < cx - size_x // 2 + size_x)
    return (~inside).unsqueeze(1)


def cutout(x: Tensor, u: Tensor) -> Tensor:
    """Zero (mid-grey) a square of CUTOUT_RATIO of the side at a uniform position."""
    return x * cutout_mask(x.shape, u, CUTOUT_RATIO, x.device).to(x.dtype)


#: policy -> its ops in order (the paper's `color`, `translation`, `cutout`)
POLICIES: Dict[str, Sequence[Callable[[Tensor, Tensor], Tensor]]] = {
    "color": (brightness, saturation, contrast),
    "translation": (translation,),
    "cutout": (cutout,),
}
UNIFORMS = {brightness: 1, saturation: 1, contrast: 1, translation: 2, cutout: 2}


def uniforms_needed(policies: Sequence[str]) -> int:
    """How many uniform numbers per image `diff_augment` consumes for `policies`."""
    return sum(UNIFORMS[op] for name in policies for op in POLICIES[name])


def diff_augment(x: Tensor, policies: Sequence[str], u: Tensor) -> Tensor:
    """Apply the ops of `policies` in order; u [N, uniforms_needed(policies)] in [0, 1)."""
    used = 0
    for name in policies:
        for op in POLICIES[name]:
            x = op(x, u[:, used:used + UNIFORMS[op]])
            used += UNIFORMS[op]
    return x
