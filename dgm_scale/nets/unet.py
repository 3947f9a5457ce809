"""A small U-Net denoiser in the DDPM++ / ADM style (Ho et al. 2020; Song et al. 2021; Dhariwal &
Nichol 2021), sized for small images:

    F = UNet(image_shape=(C, H, W), width=64, channel_mult=(1, 2, 2), blocks=2, attention=(8,))
    out = F(x, noise_level, labels)   # x [N, C, H, W], noise_level [N] float, labels [N] | None -> [N, C, H, W]

Residual blocks (GroupNorm, SiLU, 3x3 convolutions, the noise / class embedding as a per-channel
scale and shift, skip scaled by 1/sqrt 2), self-attention at the resolutions listed in
`attention` (the lowest ones: it costs (H W)^2), downsampling by strided convolution, upsampling
by nearest neighbour and a convolution, skip connections between the two halves. The noise
level is any real number (what the objective passes: 1000 t, ln(sigma) / 4) through a
sinusoidal embedding and an MLP. With num_classes = K > 0 a class embedding of K + 1 rows is
added to it: row K is "no class" (labels None, or K: what classifier-free guidance drops to).
Every sample is computed on its own (no batch statistics). Networks know nothing of training.
"""
from __future__ import annotations

import math
from typing import Any, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dgm_scale.core.checks import at_least, choice, require

ARCHS = ("unet",)


def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with up to 32 groups of at least 2 channels where possible."""
    groups = next(g for g in (32, 16, 8, 4, 2, 1) if channels % g == 0 and (channels // g >= 2 or g == 1))
    return nn.GroupNorm(groups, channels, eps=1e-6)


def zero_init(module: nn.Module) -> nn.Module:
    """A residual branch's last layer starts at zero: each block starts as the identity."""
    for param in module.parameters():
        nn.init.zeros_(param)
    return module


def sinusoidal_embedding(values: Tensor, channels: int, max_period: float = 10_000.0) -> Tensor:
    """[N] -> [N, channels]: cos / sin of values at frequencies 1 .. 1 / max_period."""
    half = channels // 2
    frequencies = torch.exp(-math.log(max_period) * torch.arange(half, device=values.device) / max(half, 1))
    angles = values.float()[:, None] * frequencies[None]
    return torch.cat([angles.cos(), angles.sin()], dim=1)


class ResBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, embed_dim: int, dropout: float):
        super().__init__()
        self.norm_in = group_norm(in_channels)
        self.conv_in = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.embed = nn.Linear(embed_dim, 2 * out_channels)  # scale and shift (ADM's "scale-shift norm")
        self.norm_out = group_norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv_out = zero_init(nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: Tensor, embedding: Tensor) -> Tensor:
        h = self.conv_in(F.silu(self.norm_in(x)))
        scale, shift = self.embed(F.silu(embedding))[:, :, None, None].chunk(2, dim=1)
        h = self.norm_out(h) * (1 + scale) + shift
        h = self.conv_out(self.dropout(F.silu(h)))
        return (self.skip(x) + h) / math.sqrt(2)


class SelfAttention(nn.Module):
    def __init__(self, channels: int, head_channels: int = 32):
        super().__init__()
        self.heads = max(1, channels // head_channels)
        self.norm = group_norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.out = zero_init(nn.Conv2d(channels, channels, 1))

    def forward(self, x: Tensor) -> Tensor:
        n, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(n, 3, self.heads, c // self.heads, h * w).transpose(-1, -2).unbind(1)
        attended = F.scaled_dot_product_attention(q, k, v)  # [N, heads, HW, c / heads]
        return (x + self.out(attended.transpose(-1, -2).reshape(n, c, h, w))) / math.sqrt(2)


class Level(nn.Module):
    """The residual blocks (each followed by attention where asked) of one resolution."""

    def __init__(self, channels_in: Sequence[int], channels: int, embed_dim: int, dropout: float, attention: bool):
        super().__init__()
        self.blocks = nn.ModuleList(ResBlock(c, channels, embed_dim, dropout) for c in channels_in)
        self.attention = nn.ModuleList(SelfAttention(channels) if attention else nn.Identity() for _ in channels_in)


class UNet(nn.Module):
    def __init__(self, image_shape: Tuple[int, int, int], width: int = 64, channel_mult: Sequence[int] = (1, 2, 2),
                 blocks: int = 2, attention: Sequence[int] = (8,), dropout: float = 0.0, num_classes: int = 0):
        super().__init__()
        channels, resolution, _ = image_shape
        embed_dim, self.num_classes = 4 * width, num_classes
        self.width = width
        self.noise_mlp = nn.Sequential(nn.Linear(width, embed_dim), nn.SiLU(), nn.Linear(embed_dim, embed_dim))
        self.class_embedding = nn.Embedding(num_classes + 1, embed_dim) if num_classes > 0 else None
        self.conv_in = nn.Conv2d(channels, width, 3, padding=1)
        widths = [width * m for m in channel_mult]
        self.down, self.downsample, skips, current = nn.ModuleList(), nn.ModuleList(), [width], width
        for index, level_width in enumerate(widths):
            res = resolution >> index
            self.down.append(Level([current] + [level_width] * (blocks - 1), level_width, embed_dim, dropout, res in attention))
            current = level_width
            skips += [level_width] * blocks
            last = index == len(widths) - 1
            self.downsample.append(nn.Identity() if last else nn.Conv2d(current, current, 3, stride=2, padding=1))
            if not last:
                skips.append(current)
        self.middle = Level([current, current], current, embed_dim, dropout, True)
        self.up, self.upsample = nn.ModuleList(), nn.ModuleList()
        for index, level_width in reversed(list(enumerate(widths))):
            res = resolution >> index
            inputs = []
            for _ in range(blocks + 1):
                inputs.append(current + skips.pop())
                current = level_width
            self.up.append(Level(inputs, level_width, embed_dim, dropout, res in attention))
            self.upsample.append(nn.Conv2d(current, current, 3, padding=1) if index > 0 else nn.Identity())
        self.norm_out = group_norm(current)
        self.conv_out = zero_init(nn.Conv2d(current, channels, 3, padding=1))

    def embedding(self, noise_level: Tensor, labels: Optional[Tensor], batch: int) -> Tensor:
        embedding = self.noise_mlp(sinusoidal_embedding(noise_level.reshape(-1).expand(batch), self.width))
        if self.class_embedding is not None:
            if labels is None:  # unconditional: the "no class" row
                labels = torch.full((batch,), self.num_classes, dtype=torch.long, device=noise_level.device)
            embedding = embedding + self.class_embedding(labels.long())
        return embedding

    def forward(self, x: Tensor, noise_level: Tensor, labels: Optional[Tensor] = None) -> Tensor:
        embedding = self.embedding(noise_level, labels, x.shape[0])
        h = self.conv_in(x)
        skips = [h]
        for level, downsample in zip(self.down, self.downsample):
            for block, attention in zip(level.blocks, level.attention):
                h = attention(block(h, embedding))
                skips.append(h)
            if not isinstance(downsample, nn.Identity):
                h = downsample(h)
                skips.append(h)
        for block, attention in zip(self.middle.blocks, self.middle.attention):
            h = attention(block(h, embedding))
        for level, upsample in zip(self.up, self.upsample):
            for block, attention in zip(level.blocks, level.attention):
                h = attention(block(torch.cat([h, skips.pop()], dim=1), embedding))
            if not isinstance(upsample, nn.Identity):
                h = upsample(F.interpolate(h, scale_factor=2.0, mode="nearest"))
        return self.conv_out(F.silu(self.norm_out(h)))


def build_unet(net: Any, image_shape: Tuple[int, int, int], num_classes: int = 0) -> UNet:
    """The built-in denoiser of a `model.denoiser` block (DenoiserConfig)."""
    return UNet(tuple(image_shape), net.width, tuple(net.channel_mult), net.blocks, tuple(net.attention),
                net.dropout, num_classes)


def validate_unet(key: str, net: Any, resolution: int) -> None:
    """Checks of a `model.denoiser` block without a `target` (`key`: its config key)."""
    choice(f"{key}.arch", net.arch, ARCHS)
    at_least(f"{key}.width", net.width, 2)
    at_least(f"{key}.blocks", net.blocks, 1)
    require(len(net.channel_mult) >= 1 and all(m >= 1 for m in net.channel_mult),
            f"config key '{key}.channel_mult' must be a non-empty list of integers >= 1, got {list(net.channel_mult)}")
    lowest = resolution >> (len(net.channel_mult) - 1)
    require(lowest >= 1 and lowest << (len(net.channel_mult) - 1) == resolution,
            f"config key '{key}.channel_mult': {len(net.channel_mult)} levels halve the resolution "
            f"{resolution} {len(net.channel_mult) - 1} times; it must stay a whole number")
    levels = [resolution >> i for i in range(len(net.channel_mult))]
    unknown = [res for res in net.attention if res not in levels]
    require(not unknown, f"config key '{key}.attention': resolution(s) {unknown} are not among the U-Net's levels {levels}")
    require(0.0 <= net.dropout < 1.0, f"config key '{key}.dropout' must be in [0, 1), got {net.dropout}")
