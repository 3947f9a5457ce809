"""Your own generator and discriminator, in a file outside the package.

dgm_scale builds them from the config (`model.generator.target: examples/custom_nets/nets.py:Generator`,
`model.generator.kwargs: {...}`) and passes the inputs it knows that a constructor names as
parameters: `latent_dim`, `num_classes`, `image_shape` (C, H, W). The contract it checks before
training:
    Generator:     forward(z [N, latent_dim], labels [N] | None) -> images [N, C, H, W] in [-1, 1]
    Discriminator: forward(x [N, C, H, W], labels [N] | None)    -> logits [N, 1] (or [N])
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor, nn


class Generator(nn.Module):
    """A latent vector -> a 4x4 map -> upsample + conv blocks -> an image (any power-of-two size)."""

    def __init__(self, latent_dim: int, image_shape: Sequence[int], num_classes: int = 0, width: int = 64):
        super().__init__()
        channels, size, _ = image_shape
        self.num_classes, self.width = num_classes, width
        self.embed = nn.Embedding(num_classes, latent_dim) if num_classes else None
        self.project = nn.Linear(latent_dim, width * 4 * 4)
        blocks = []
        while size > 4:
            blocks += [nn.Upsample(scale_factor=2), nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width),
                       nn.LeakyReLU(0.2)]
            size //= 2
        self.blocks = nn.Sequential(*blocks)
        self.to_image = nn.Conv2d(width, channels, 3, padding=1)

    def forward(self, z: Tensor, labels: Optional[Tensor] = None) -> Tensor:
        if self.embed is not None:
            z = z * self.embed(labels)
        x = self.project(z).view(-1, self.width, 4, 4)
        return torch.tanh(self.to_image(self.blocks(x)))


class Discriminator(nn.Module):
    """Strided convolutions down to 4x4, then a linear logit (projection term when conditional)."""

    def __init__(self, image_shape: Sequence[int], num_classes: int = 0, width: int = 64):
        super().__init__()
        channels, size, _ = image_shape
        layers, c_in = [], channels
        while size > 4:
            layers += [nn.Conv2d(c_in, width, 4, 2, 1), nn.LeakyReLU(0.2)]
            c_in, size = width, size // 2
        self.features = nn.Sequential(*layers, nn.Flatten())
        self.logit = nn.Linear(c_in * size * size, 1)
        self.embed = nn.Embedding(num_classes, c_in * size * size) if num_classes else None

    def forward(self, x: Tensor, labels: Optional[Tensor] = None) -> Tensor:
        h = self.features(x)
        out = self.logit(h)
        if self.embed is not None:
            out = out + (self.embed(labels) * h).sum(dim=1, keepdim=True)
        return out
