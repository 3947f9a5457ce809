"""Your own diffusion denoiser, in a file outside the package (`model.kind: diffusion`,
`model.denoiser.target: examples/custom_nets/denoiser.py:Denoiser`, `model.denoiser.kwargs: {...}`).

dgm_scale passes the inputs it knows that the constructor names: `image_shape` (C, H, W) and
`num_classes`. The contract it checks before training:
    forward(x [N, C, H, W] noisy images, noise_level [N] float, labels [N] int64 | None) -> [N, C, H, W]
`noise_level` is what the objective conditions on (eps / v / flow: 1000 t; edm: ln(sigma) / 4);
`labels` of a class-conditional model run 0 .. K, where K means "no class" (label dropout,
classifier-free guidance). What the output means (noise, v, velocity, EDM's F) is the
objective's business, not the network's.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import Tensor, nn


class Denoiser(nn.Module):
    """Three 3x3 convolutions at full resolution, the noise level (and class) added as a bias."""

    def __init__(self, image_shape: Sequence[int], num_classes: int = 0, width: int = 32):
        super().__init__()
        channels = image_shape[0]
        self.width = width
        self.classes = nn.Embedding(num_classes + 1, width) if num_classes else None
        self.conv_in = nn.Conv2d(channels, width, 3, padding=1)
        self.conv_mid = nn.Conv2d(width, width, 3, padding=1)
        self.conv_out = nn.Conv2d(width, channels, 3, padding=1)

    def level_embedding(self, noise_level: Tensor) -> Tensor:
        frequencies = torch.exp(-math.log(1000.0) * torch.arange(self.width // 2, device=noise_level.device) / (self.width // 2))
        angles = noise_level.float()[:, None] * frequencies
        return torch.cat([angles.cos(), angles.sin()], dim=1)

    def forward(self, x: Tensor, noise_level: Tensor, labels: Optional[Tensor] = None) -> Tensor:
        bias = self.level_embedding(noise_level)
        if self.classes is not None and labels is not None:
            bias = bias + self.classes(labels)
        h = torch.relu(self.conv_in(x) + bias[:, :, None, None])
        return self.conv_out(torch.relu(self.conv_mid(h)))
