"""Batch norm with statistics over the global batch (all ranks), on CPU and GPU.

torch.nn.SyncBatchNorm refuses CPU tensors, so it cannot run (or be tested) on our CPU
machines. This one all-reduces per-channel [sum, sum of squares, count] with the differentiable
`torch.distributed.nn.all_reduce`, so gradients flow through the global statistics exactly as
in single-process batch norm over the concatenated batch. One small all-reduce per layer call.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
import torch.distributed as dist
from lightning.pytorch.plugins import LayerSync
from torch import Tensor, nn
from torch.distributed.nn import all_reduce as differentiable_all_reduce


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm{1,2,3}d whose training statistics are those of all ranks' batches together."""

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2-D input, got {input.dim()}-D")

    def forward(self, input: Tensor) -> Tensor:
        if _LOCAL_ONLY[0] or not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(input)
        channels = input.shape[1]
        dims = [d for d in range(input.dim()) if d != 1]
        x = input.float()  # statistics in float32, also under autocast
        count = torch.tensor([input.numel() / channels], device=input.device, dtype=torch.float32)
        local = torch.cat([x.sum(dims), (x * x).sum(dims), count])
        total = differentiable_all_reduce(local)
        n = total[-1]
        mean = total[:channels] / n
        var = total[channels:2 * channels] / n - mean * mean  # biased: used to normalise
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                momentum = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                unbiased = var * n / (n - 1).clamp(min=1)
                self.running_mean.lerp_(mean.to(self.running_mean.dtype), momentum)
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), momentum)
        shape = [1, channels] + [1] * (input.dim() - 2)
        out = (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        return out.to(input.dtype)


class GlobalBatchNormSync(LayerSync):
    """Lightning plugin (`trainer.sync_batchnorm=true`): every BatchNorm becomes a GlobalBatchNorm."""

    def apply(self, model: nn.Module) -> nn.Module:
        for name, child in model.named_children():
            if isinstance(child, nn.modules.batchnorm._BatchNorm) and not isinstance(child, GlobalBatchNorm):
                synced = GlobalBatchNorm(child.num_features, child.eps, child.momentum, child.affine,
                                         child.track_running_stats)
                synced.load_state_dict(child.state_dict())
                synced.to(next(iter(child.state_dict().values()), torch.zeros(())).device)
                synced.train(child.training)
                setattr(model, name, synced)
            else:
                self.apply(child)
        return model

    def revert(self, model: nn.Module) -> nn.Module:
        return model  # the module keeps the same parameters and buffers; nothing to undo


_LOCAL_ONLY = [0]  # > 0 inside local_batch_statistics()


@contextmanager
def local_batch_statistics() -> Iterator[None]:
    """Within this block a GlobalBatchNorm uses this rank's batch alone (no collective): for
    computations every rank repeats identically, e.g. an EMA network's standing statistics."""
    _LOCAL_ONLY[0] += 1
    try:
        yield
    finally:
        _LOCAL_ONLY[0] -= 1
