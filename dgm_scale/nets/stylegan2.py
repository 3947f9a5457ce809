"""StyleGAN2 bodies (Karras et al. 2020), scaled to small images.

Generator: a mapping network (`depth` fully connected layers at 1/100 of the learning rate, the
input's second moment normalised) turns z (with the label embedding the wrapper appends: class
conditioning goes through the mapping network) into w; a learned 4x4 constant goes through one
block per resolution of two modulated, demodulated 3x3 convolutions with per-pixel noise inputs,
and a skip architecture sums each resolution's toRGB output, upsampled. Discriminator: fromRGB,
residual blocks (two 3x3 convolutions, the second halving the resolution, plus a 1x1 skip, summed
and scaled by 1/sqrt(2)) down to 4x4, minibatch standard deviation (groups of up to 4), a 3x3
convolution and a fully connected layer; the wrapper adds the head and the projection term.
Every weight uses the equalised learning rate (N(0, 1) weights scaled by 1/sqrt(fan_in) when
used). Resampling is bilinear rather than StyleGAN2's FIR filter.

The noise inputs are drawn from a hash of each sample's input vector and the pixel position,
not from the global RNG: a sample is the same whichever batch it is generated in, and a resumed
run draws the noise the uninterrupted one drew (z itself is keyed to the iteration).
"""
from __future__ import annotations

import math
from typing import List

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dgm_scale.nets.layers import image_stages, stage_channels

ARCH = "stylegan2"
LRELU_GAIN = math.sqrt(2.0)
MAPPING_LR = 0.01
_MASK = (1 << 31) - 1


class EqualLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, lr_mul: float = 1.0, bias_init: float = 0.0,
                 activate: bool = True):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_features, in_features) / lr_mul)
        self.bias = nn.Parameter(torch.full((out_features,), float(bias_init)))
        self.scale, self.lr_mul, self.activate = lr_mul / math.sqrt(in_features), lr_mul, activate

    def forward(self, x: Tensor) -> Tensor:
        out = F.linear(x, self.weight * self.scale, self.bias * self.lr_mul)
        return F.leaky_relu(out, 0.2) * LRELU_GAIN if self.activate else out


class EqualConv(nn.Module):
    """A 3x3 (or kxk) convolution with the equalised learning rate; `down` halves the resolution."""

    def __init__(self, c_in: int, c_out: int, kernel: int = 3, down: bool = False, activate: bool = True,
                 bias: bool = True):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(c_out, c_in, kernel, kernel))
        self.bias = nn.Parameter(torch.zeros(c_out)) if bias else None
        self.scale, self.down, self.activate = 1 / math.sqrt(c_in * kernel * kernel), down, activate

    def forward(self, x: Tensor) -> Tensor:
        out = F.conv2d(x, self.weight * self.scale, self.bias, padding=self.weight.shape[-1] // 2)
        if self.down:
            out = F.avg_pool2d(out, 2)
        return F.leaky_relu(out, 0.2) * LRELU_GAIN if self.activate else out


def hashed_normal(keys: Tensor, shape: tuple[int, int], salt: int) -> Tensor:
    """N(0, 1) noise [N, 1, H, W] from 31-bit integer keys [N] and the pixel index, with no RNG
    state (Box-Muller over two integer hashes)."""
    h, w = shape
    index = torch.arange(h * w, device=keys.device, dtype=torch.int64).view(1, -1)

    def mix(value: Tensor) -> Tensor:
        for multiplier in (1_103_515_245, 747_796_405, 277_803_737):
            value = ((value ^ (value >> 15)) * multiplier) & _MASK
        return value

    base = (keys.view(-1, 1) * 31 + salt * 1_000_003 + index * 2) & _MASK
    u1 = (mix(base) + 1).double() / (_MASK + 2)
    u2 = mix(base + 1).double() / (_MASK + 1)
    normal = torch.sqrt(-2 * torch.log(u1)) * torch.cos(2 * math.pi * u2)
    return normal.float().view(-1, 1, h, w)


class ModulatedConv(nn.Module):
    """Conv whose input channels are scaled per sample by a style (an affine map of w), then
    (with `demodulate`) each output filter normalised to unit norm per sample.

    Computed as StyleGAN2's non-fused path: the input is scaled by the style, one ordinary
    convolution serves the whole batch, and the output is scaled by the demodulation factors;
    the same numbers as per-sample weights in a grouped convolution, which is many times slower
    on CPUs.
    """

    def __init__(self, c_in: int, c_out: int, w_dim: int, kernel: int = 3, demodulate: bool = True):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(c_out, c_in, kernel, kernel))
        self.affine = EqualLinear(w_dim, c_in, bias_init=1.0, activate=False)
        self.scale, self.demodulate = 1 / math.sqrt(c_in * kernel * kernel), demodulate

    def forward(self, x: Tensor, w: Tensor) -> Tensor:
        style = self.affine(w)  # [N, C_in]
        weight = self.weight * self.scale
        out = F.conv2d(x * style.view(*style.shape, 1, 1).to(x.dtype), weight, padding=weight.shape[-1] // 2)
        if self.demodulate:  # 1 / ||weight * style|| per sample and output channel
            norms = style.float().square() @ weight.float().square().sum(dim=(2, 3)).t()  # [N, C_out]
            out = out * torch.rsqrt(norms + 1e-8).view(*norms.shape, 1, 1).to(out.dtype)
        return out


class StyledLayer(nn.Module):
    """Modulated 3x3 conv + noise (learned strength, starting at 0) + bias + leaky ReLU."""

    def __init__(self, c_in: int, c_out: int, w_dim: int, salt: int):
        super().__init__()
        self.conv = ModulatedConv(c_in, c_out, w_dim)
        self.noise_strength = nn.Parameter(torch.zeros(()))
        self.bias = nn.Parameter(torch.zeros(c_out))
        self.salt = salt

    def forward(self, x: Tensor, w: Tensor, keys: Tensor) -> Tensor:
        out = self.conv(x, w)
        out = out + hashed_normal(keys, out.shape[2:], self.salt).to(out.dtype) * self.noise_strength
        return F.leaky_relu(out + self.bias.view(1, -1, 1, 1), 0.2) * LRELU_GAIN


class SynthesisBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, w_dim: int, image_channels: int, index: int, first: bool):
        super().__init__()
        self.first = first
        self.conv0 = StyledLayer(c_in, c_out, w_dim, salt=2 * index)
        self.conv1 = StyledLayer(c_out, c_out, w_dim, salt=2 * index + 1)
        self.to_rgb = ModulatedConv(c_out, image_channels, w_dim, kernel=1, demodulate=False)
        self.rgb_bias = nn.Parameter(torch.zeros(image_channels))

    def forward(self, x: Tensor, image: Tensor | None, w: Tensor, keys: Tensor) -> tuple[Tensor, Tensor]:
        if not self.first:
            x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
        x = self.conv1(self.conv0(x, w, keys), w, keys)
        rgb = self.to_rgb(x, w) + self.rgb_bias.view(1, -1, 1, 1)
        if image is not None:
            rgb = rgb + F.interpolate(image, scale_factor=2, mode="bilinear", align_corners=False)
        return x, rgb


class StyleGenerator(nn.Module):
    """[N, in_dim] -> [N, C, H, W] (raw; the wrapper adds the output activation)."""

    def __init__(self, in_dim: int, out_shape: tuple[int, ...], width: int, mapping_layers: int):
        super().__init__()
        stages = image_stages(out_shape, ARCH)
        w_dim = stage_channels(width, stages)
        self.mapping = nn.Sequential(*[EqualLinear(in_dim if i == 0 else w_dim, w_dim, lr_mul=MAPPING_LR)
                                       for i in range(mapping_layers)])
        self.const = nn.Parameter(torch.randn(stage_channels(width, stages), 4, 4))
        channels = [stage_channels(width, k) for k in range(stages, -1, -1)]  # 4x4 ... full resolution
        self.blocks = nn.ModuleList(
            SynthesisBlock(channels[max(i - 1, 0)], channels[i], w_dim, out_shape[0], i, first=i == 0)
            for i in range(stages + 1))

    def forward(self, z: Tensor) -> Tensor:
        # Noise keys from the input (z and any label embedding): one 31-bit key per sample.
        scaled = (z.detach().float()[:, :8] * 65_536).round().long()
        primes = torch.tensor([3, 5, 7, 11, 13, 17, 19, 23][:scaled.shape[1]], device=z.device)
        keys = (scaled * primes).sum(dim=1) & _MASK
        x = z * torch.rsqrt(z.square().mean(dim=1, keepdim=True) + 1e-8)
        w = self.mapping(x)
        x, image = self.const.unsqueeze(0).expand(z.shape[0], -1, -1, -1), None
        for block in self.blocks:
            x, image = block(x, image, w, keys)
        return image


class ResidualBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.conv0 = EqualConv(c_in, c_in)
        self.conv1 = EqualConv(c_in, c_out, down=True)
        self.skip = EqualConv(c_in, c_out, kernel=1, down=True, activate=False, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return (self.skip(x) + self.conv1(self.conv0(x))) / math.sqrt(2.0)


class MinibatchStd(nn.Module):
    """Append the mean standard deviation over groups of up to 4 samples as one feature map."""

    def __init__(self, group: int = 4):
        super().__init__()
        self.group = group

    def forward(self, x: Tensor) -> Tensor:
        n, c, h, w = x.shape
        group = min(self.group, n)
        while n % group:  # a group size that divides the batch
            group -= 1
        y = x.float().view(group, -1, c, h, w)
        std = (y.var(dim=0, unbiased=False) + 1e-8).sqrt().mean(dim=(1, 2, 3))  # [N / group]
        feature = std.view(1, -1, 1, 1, 1).expand(group, -1, 1, h, w).reshape(n, 1, h, w)
        return torch.cat([x, feature.to(x.dtype)], dim=1)


def generator_body(net, in_dim: int, out_shape: tuple[int, ...]) -> nn.Module:
    return StyleGenerator(in_dim, out_shape, net.width, mapping_layers=net.depth)


def discriminator_body(net, in_shape: tuple[int, ...]) -> tuple[nn.Module, int]:
    """[N, C, H, W] -> features [N, 4x4 channels] ; returns (body, dim)."""
    stages = image_stages(in_shape, ARCH)
    layers: List[nn.Module] = [EqualConv(in_shape[0], stage_channels(net.width, 0), kernel=1)]
    layers += [ResidualBlock(stage_channels(net.width, k), stage_channels(net.width, k + 1)) for k in range(stages)]
    top = stage_channels(net.width, stages)
    layers += [MinibatchStd(), EqualConv(top + 1, top), nn.Flatten(), EqualLinear(top * 16, top)]
    return nn.Sequential(*layers), top


def init_weights(module: nn.Module) -> None:
    """The layers initialise themselves (N(0, 1) weights under the equalised learning rate)."""
