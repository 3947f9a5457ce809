"""NaN/Inf checks over many tensors at once."""
from __future__ import annotations

from typing import Iterable

import torch
from torch import Tensor


def gradient_flag(tensors: Iterable[Tensor], found: Tensor, one: Tensor) -> None:
    """Set `found` (float32, 1 element, on `one`'s device) to 1.0 if any element of the floating
    tensors is NaN/Inf, without a host sync and without changing them (tensors outside an
    autograd graph, e.g. gradients).

    Torch's GradScaler check (`_amp_foreach_non_finite_check_and_unscale_`, with a scale of
    exactly 1 (`one`), so the values stay as they are), one fused pass per device and dtype:
    ~20x faster on CPU than an `isfinite().all()` per tensor, which cost ~3% of a small GAN's step.
    """
    groups: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
    for tensor in tensors:
        if tensor.is_floating_point() and tensor.numel() > 0:
            groups.setdefault((tensor.device, tensor.dtype), []).append(tensor)
    for (device, _), group in groups.items():
        if device == found.device:
            torch._amp_foreach_non_finite_check_and_unscale_(group, found, one)
            continue
        elsewhere = torch.zeros(1, device=device)
        torch._amp_foreach_non_finite_check_and_unscale_(group, elsewhere, torch.ones(1, device=device))
        torch.maximum(found, elsewhere.to(found.device), out=found)


def all_finite(tensors: Iterable[Tensor]) -> bool:
    """Whether every element of every tensor is finite (one host sync for all of them; tensors
    in an autograd graph, a loss, are checked apart, never written to)."""
    tensors, found = list(tensors), torch.zeros(1)
    for tensor in tensors:
        if tensor.is_floating_point() and tensor.requires_grad and not bool(tensor.detach().isfinite().all()):
            return False
    gradient_flag([t for t in tensors if not t.requires_grad], found, torch.ones(1))
    return not bool(found)


def first_nonfinite(named: Iterable[tuple[str, Tensor]]) -> str | None:
    """The name of the first floating tensor with a NaN/Inf element, or None. Of a sharded
    tensor (a DTensor: FSDP), only this rank's shard is checked: no collective."""
    for name, tensor in named:
        tensor = tensor.to_local() if hasattr(tensor, "to_local") else tensor
        if tensor.is_floating_point() and not bool(tensor.detach().isfinite().all()):
            return name
    return None
