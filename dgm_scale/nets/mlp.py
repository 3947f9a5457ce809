"""Fully connected bodies: `depth` hidden layers of `width` units.

Used for 2-D toy mixtures and flat data; images are flattened on the way in (D) and reshaped
on the way out (G). Weights keep PyTorch's default initialisation.
"""
from __future__ import annotations

import math
from typing import Callable

from torch import nn

from dgm_scale.nets.layers import make_norm

ARCH = "mlp"


def _hidden_stack(
    in_dim: int, net, act: Callable[[], nn.Module], norm_first: bool
) -> list[nn.Module]:
    """[Linear, norm, act] x depth: [N, in_dim] -> [N, width]. norm_first=False leaves the
    first layer un-normalised (DCGAN convention for discriminators)."""
    if net.depth < 1:
        raise ValueError(f"model.*.depth must be >= 1 for the mlp arch, got {net.depth}")
    layers: list[nn.Module] = []
    for i in range(net.depth):
        use_norm = net.norm != "none" and (norm_first or i > 0)
        # A bias right before a normalisation layer is cancelled by it, so drop it.
        layers.append(nn.Linear(in_dim if i == 0 else net.width, net.width, bias=not use_norm))
        if use_norm:
            layers.append(make_norm(net.norm, net.width, spatial=False, arch=ARCH))
        layers.append(act())
    return layers


def generator_body(net, in_dim: int, out_shape: tuple[int, ...]) -> nn.Module:
    """[N, in_dim] -> [N, *out_shape] (raw; the wrapper adds the output activation)."""
    layers = _hidden_stack(in_dim, net, nn.ReLU, norm_first=True)
    layers += [nn.Linear(net.width, math.prod(out_shape)), nn.Unflatten(1, tuple(out_shape))]
    return nn.Sequential(*layers)


def discriminator_body(net, in_shape: tuple[int, ...]) -> tuple[nn.Module, int]:
    """[N, *in_shape] -> features [N, width]; returns (body, width)."""
    act = lambda: nn.LeakyReLU(0.2)  # noqa: E731 - a factory, one fresh module per layer
    layers = [nn.Flatten()] + _hidden_stack(math.prod(in_shape), net, act, norm_first=False)
    return nn.Sequential(*layers), net.width


def init_weights(module: nn.Module) -> None:
    """PyTorch defaults are kept for the mlp."""
