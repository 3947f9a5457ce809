"""Exponential moving average of a network's weights (Karras et al.; Yazici et al. 2019)."""
from __future__ import annotations

import copy

import torch
from torch import nn


def make_ema_copy(net: nn.Module) -> nn.Module:
    """A frozen copy of `net` to hold the average; as a submodule it is checkpointed and moved with it."""
    ema = copy.deepcopy(net)
    ema.requires_grad_(False)
    return ema


@torch.no_grad()
def update_ema(ema: nn.Module, net: nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * net for parameters; buffers (BN statistics) are copied."""
    for ema_param, param in zip(ema.parameters(), net.parameters()):
        ema_param.lerp_(param.detach(), 1.0 - decay)
    for ema_buffer, buffer in zip(ema.buffers(), net.buffers()):
        ema_buffer.copy_(buffer)
