"""NaN/Inf checks over many tensors at once."""
from __future__ import annotations

from typing import Iterable

import torch
from torch import Tensor


def nonfinite_flag(tensors: Iterable[Tensor], device: torch.device | None = None) -> Tensor:
    """1.0 if any element of any tensor is NaN/Inf, else 0.0: a float32 tensor [1] on `device`
    (default: the first checked tensor's; CPU if none), computed without a host sync.

    Gradients go through torch's GradScaler check (`_amp_foreach_non_finite_check_and_unscale_`,
    with a scale of exactly 1, so their values stay as they are), one fused pass per device and
    dtype: ~20x faster on CPU than an `isfinite().all()` per tensor, which cost ~3% of a small
    GAN's step. Tensors in an autograd graph (a loss) are checked apart, never written to.
    """
    groups: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
    flags: list[Tensor] = []
    for tensor in tensors:
        if not tensor.is_floating_point() or tensor.numel() == 0:
            continue
        device = tensor.device if device is None else device
        if tensor.requires_grad:
            flags.append(tensor.detach().isfinite().all().logical_not().float().reshape(1))
        else:
            groups.setdefault((tensor.device, tensor.dtype), []).append(tensor)
    for (group_device, _), group in groups.items():
        found = torch.zeros(1, device=group_device)
        torch._amp_foreach_non_finite_check_and_unscale_(group, found, torch.ones(1, device=group_device))
        flags.append(found)
    device = device if device is not None else torch.device("cpu")
    if not flags:
        return torch.zeros(1, device=device)
    if len(flags) == 1:
        return flags[0].to(device)
    return torch.stack([flag.to(device) for flag in flags]).amax(0)


def all_finite(tensors: Iterable[Tensor]) -> bool:
    """Whether every element of every tensor is finite (one host sync for all of them)."""
    return not bool(nonfinite_flag(tensors))


def first_nonfinite(named: Iterable[tuple[str, Tensor]]) -> str | None:
    """The name of the first floating tensor with a NaN/Inf element, or None."""
    for name, tensor in named:
        if tensor.is_floating_point() and not bool(tensor.detach().isfinite().all()):
            return name
    return None
