"""Exponential moving average of a network's weights (Karras et al. 2018; Yazici et al. 2019).

Two things make an EMA generator better than the raw one rather than worse:

- **A ramped decay.** A fixed decay of 0.999 averages over a half-life of ~700 steps, which over a
  short run still holds the weights of its first, poor phase. As in StyleGAN2-ADA (`ema_rampup`),
  the half-life is capped at a fraction `rampup` of the steps taken so far:
  half_life = min(half_life(decay), rampup * step), decay_t = 0.5 ** (1 / half_life).
- **Batch-norm statistics of its own.** Running means and variances are properties of the
  weights that produced the activations. Copying the raw generator's statistics into the averaged
  weights (what the copy of buffers did) normalises the averaged activations with the wrong
  numbers. Instead the EMA network's statistics are recomputed for its own weights ("standing
  statistics", Brock et al. 2019, BigGAN sec. 3.1 / app. C): a fixed set of batches goes through
  it in training mode with a cumulative average (momentum None), so eval-mode normalisation uses
  the mean of the per-batch statistics the network was trained to see. The batches are drawn
  from a fixed seed, so the statistics are a deterministic function of the averaged weights
  (a resumed run recomputes exactly the same numbers).
"""
from __future__ import annotations

import copy
from typing import Callable, Iterable, Optional, Sequence

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from dgm_scale.distributed.sync_batchnorm import local_batch_statistics


def make_ema_copy(net: nn.Module) -> nn.Module:
    """A frozen copy of `net` to hold the average; as a submodule it is checkpointed and moved with it."""
    ema = copy.deepcopy(net)
    ema.requires_grad_(False)
    return ema


def batchnorm_layers(net: nn.Module) -> list[_BatchNorm]:
    """The batch-norm layers of `net` that keep running statistics."""
    return [m for m in net.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]


def _batchnorm_buffer_ids(net: nn.Module) -> set[int]:
    return {id(buffer) for layer in batchnorm_layers(net) for buffer in layer.buffers(recurse=False)}


def ramped_decay(decay: float, rampup: float, step: int) -> float:
    """The decay for EMA update number `step` (1-based): `decay`, or less early in training so
    that the half-life is at most `rampup * step` steps (rampup 0: always `decay`)."""
    if decay <= 0.0 or rampup <= 0.0:
        return decay
    # 0.5 ** (1 / h) is the decay of half-life h; min() takes the shorter half-life.
    return min(decay, 0.5 ** (1.0 / max(rampup * step, 1e-8)))


@torch.no_grad()
def update_ema(ema: nn.Module, net: nn.Module, decay: float, copy_batchnorm: bool = False,
               skip: Optional[torch.Tensor] = None) -> None:
    """ema <- decay * ema + (1 - decay) * net for parameters. Buffers that are not batch-norm
    statistics (e.g. spectral norm's power-iteration vectors) are copied; batch-norm statistics
    are left to `standing_statistics` (see the module docstring), or copied from `net` too with
    `copy_batchnorm` (what this did before: kept for comparison, `model.ema_bn_batches=0`).
    `skip` (a device flag, 1.0: the step was not applied): then nothing changes, decided on
    the device (lerp by exactly 0 leaves the average bit for bit as it was)."""
    averages, params = list(ema.parameters()), [param.detach() for param in net.parameters()]
    if skip is None:
        torch._foreach_lerp_(averages, params, 1.0 - decay)
    else:  # one weight tensor per parameter: a single tensor weight is read on the host
        weight = (1.0 - skip.reshape(())) * (1.0 - decay)
        torch._foreach_lerp_(averages, params, [weight] * len(averages))
    skip_ids = set() if copy_batchnorm else _batchnorm_buffer_ids(ema)
    for ema_buffer, buffer in zip(ema.buffers(), net.buffers()):
        if id(ema_buffer) not in skip_ids:
            ema_buffer.copy_(buffer if skip is None else torch.where(skip.reshape(()) > 0, ema_buffer, buffer))


@torch.no_grad()
def standing_statistics(net: nn.Module, batches: Iterable[Sequence[torch.Tensor]],
                        forward: Callable[..., torch.Tensor] | None = None) -> bool:
    """Recompute the running statistics of every batch-norm layer of `net` as the plain average
    over `batches` (each a tuple of forward arguments) run in training mode; returns whether
    `net` has any such layer. The network's mode and the layers' momenta are restored. Under
    `trainer.sync_batchnorm` the statistics stay local: every rank computes the same numbers
    from the same batches, without a collective."""
    layers = batchnorm_layers(net)
    if not layers:
        return False
    momenta = [layer.momentum for layer in layers]
    was_training = net.training
    for layer in layers:
        layer.reset_running_stats()
        layer.momentum = None  # cumulative moving average: the plain mean over the batches
    net.train()
    try:
        with local_batch_statistics():
            for args in batches:
                (forward or net)(*args)
    finally:
        for layer, momentum in zip(layers, momenta):
            layer.momentum = momentum
        net.train(was_training)
    return True
