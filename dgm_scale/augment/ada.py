"""Adaptive discriminator augmentation (ADA, Karras et al. 2020), the subset that fits small images.

Each op of the pipeline is applied to each image with probability p; p adapts so that D's
overfitting heuristic r_t = E[sign(D(real))] stays near a target (0.6): every `interval`
discriminator steps, p += sign(r_t - target) * (images seen) / (speed images), clamped to [0, 1].
With p < ~0.8 the augmentations do not "leak" into the generated images (the paper's
non-leaking argument), so G learns the un-augmented data.

Included ops (the paper's pixel blitting and colour groups, plus its cutout):
- `xflip`: a horizontal flip with probability 1/2;
- `rotate90`: a rotation by k x 90 degrees, k uniform in {0, 1, 2, 3} (square images);
- `translation`: an integer shift by up to 1/8 of the side, borders filled by reflection;
- `color`: brightness + N(0, 0.2), contrast x lognormal(0, 0.5 ln 2), and for RGB saturation
  x lognormal(0, ln 2) about the luma axis (each its own draw of p);
- `cutout`: a square of half the side set to 0 (mid-grey).
Left out: the general geometric group (isotropic / anisotropic scaling, arbitrary rotations,
fractional translation), which needs filtered resampling and matters less at 8-32 px, and hue
rotation and luma flip.

Randomness comes from the caller as uniforms u [N, uniforms_needed(ops)] (keyed to the
iteration, so a resumed run augments as the uninterrupted one did); p and the r_t statistics
are buffers, so they are in every checkpoint. Every op is differentiable w.r.t. the images, and
p = 0 leaves them exactly as they are.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, Sequence, Tuple

import torch
from torch import Tensor, nn

from dgm_scale.augment.diffaugment import cutout_mask

ADA_OPS = ("xflip", "rotate90", "translation", "color", "cutout")
BRIGHTNESS_STD, CONTRAST_STD, SATURATION_STD = 0.2, 0.5 * math.log(2), math.log(2)


def _where(apply: Tensor, changed: Tensor, x: Tensor) -> Tensor:
    return torch.where(apply.view(-1, 1, 1, 1), changed, x)


def _normal(u: Tensor) -> Tensor:
    """Standard normal numbers from uniforms in (0, 1) (inverse CDF)."""
    return torch.special.ndtri(u.clamp(1e-6, 1 - 1e-6))


def xflip(x: Tensor, apply: Tensor, u: Tensor) -> Tensor:
    return _where(apply & (u[:, 0] < 0.5), x.flip(3), x)


def rotate90(x: Tensor, apply: Tensor, u: Tensor) -> Tensor:
    quarter = (u[:, 0] * 4).long().clamp(max=3)
    out = x
    for k in (1, 2, 3):
        out = _where(apply & (quarter == k), torch.rot90(x, k, dims=(2, 3)), out)
    return out


def _reflect(index: Tensor, size: int) -> Tensor:
    period = 2 * size - 2
    index = index.remainder(period)
    return torch.where(index >= size, period - index, index)


def translation(x: Tensor, apply: Tensor, u: Tensor) -> Tensor:
    n, c, h, w = x.shape
    dy = ((u[:, 0] * 2 - 1) * 0.125 * h).round().long() * apply
    dx = ((u[:, 1] * 2 - 1) * 0.125 * w).round().long() * apply
    rows = _reflect(torch.arange(h, device=x.device).view(1, h, 1) - dy.view(n, 1, 1), h)
    cols = _reflect(torch.arange(w, device=x.device).view(1, 1, w) - dx.view(n, 1, 1), w)
    index = (rows * w + cols).view(n, 1, h * w).expand(-1, c, -1)
    return x.flatten(2).gather(2, index).view_as(x)


def color(x: Tensor, apply: Tensor, u: Tensor) -> Tensor:
    """Brightness, contrast and (RGB) saturation, each applied with its own draw of p."""
    shape = (-1, 1, 1, 1)
    x = _where(apply[:, 0], x + (_normal(u[:, 0]) * BRIGHTNESS_STD).view(shape).to(x.dtype), x)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = _where(apply[:, 1], (x - mean) * torch.exp(_normal(u[:, 1]) * CONTRAST_STD).view(shape).to(x.dtype) + mean, x)
    if x.shape[1] == 3:
        luma = x.mean(dim=1, keepdim=True)
        factor = torch.exp(_normal(u[:, 2]) * SATURATION_STD).view(shape).to(x.dtype)
        x = _where(apply[:, 2], (x - luma) * factor + luma, x)
    return x


def cutout(x: Tensor, apply: Tensor, u: Tensor) -> Tensor:
    return _where(apply, x * cutout_mask(x.shape, u, 0.5, x.device).to(x.dtype), x)


#: op -> (function, draws of p it makes, uniforms it takes)
OPS: Dict[str, Tuple[Callable[[Tensor, Tensor, Tensor], Tensor], int, int]] = {
    "xflip": (xflip, 1, 1), "rotate90": (rotate90, 1, 1), "translation": (translation, 1, 2),
    "color": (color, 3, 3), "cutout": (cutout, 1, 2),
}


def uniforms_needed(ops: Sequence[str]) -> int:
    return sum(OPS[op][1] + OPS[op][2] for op in ops)


def ada_augment(x: Tensor, ops: Sequence[str], p: float | Tensor, u: Tensor) -> Tensor:
    """Apply each op of `ops` to each image with probability p; u [N, uniforms_needed(ops)]."""
    used = 0
    for name in ops:
        function, draws, uniforms = OPS[name]
        apply = u[:, used:used + draws] < p
        used += draws
        x = function(x, apply[:, 0] if draws == 1 else apply, u[:, used:used + uniforms])
        used += uniforms
    return x


class AdaptiveProbability(nn.Module):
    """ADA's p and the r_t statistics since the last adjustment, as buffers (checkpointed)."""

    def __init__(self, target: float, speed_images: float, interval: int, initial_p: float = 0.0):
        super().__init__()
        self.target, self.speed_images, self.interval = target, speed_images, interval
        self.register_buffer("p", torch.tensor(float(initial_p), dtype=torch.float64))
        self.register_buffer("sign_sum", torch.zeros((), dtype=torch.float64))
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))
        self.register_buffer("steps", torch.zeros((), dtype=torch.int64))
        self.register_buffer("last_rt", torch.tensor(float("nan"), dtype=torch.float64))
        self._host_steps = 0  # `steps` on the host

    def accumulate(self, real_logits: Tensor) -> None:
        """Count sign(D(real)) of this rank's batch (one discriminator step)."""
        self.sign_sum += real_logits.detach().sign().sum().to(self.sign_sum)
        self.count += real_logits.numel()
        self.steps += 1
        self._host_steps += 1

    def adjust(self, reduce_sum: Callable[[Tensor], Tensor]) -> bool:
        """Every `interval` steps: r_t over all ranks' counts (`reduce_sum`: a sum over ranks), then
        p moves towards keeping r_t at the target; returns whether it adjusted. On the device:
        nothing here waits for it (the step count is mirrored on the host)."""
        if self._host_steps < self.interval:
            return False
        totals = reduce_sum(torch.stack([self.sign_sum, self.count]))
        rt = totals[0] / totals[1].clamp(min=1.0)
        if self.speed_images > 0:  # (float64 throughout, as the host arithmetic this replaced)
            self.p.copy_((self.p + torch.sign(rt - self.target) * totals[1] / self.speed_images).clamp(0.0, 1.0))
        self.last_rt.copy_(rt)
        self.sign_sum.zero_()
        self.count.zero_()
        self.steps.zero_()
        self._host_steps = 0
        return True

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._host_steps = int(self.steps)  # (a checkpoint load, not a training step)
