"""ResNet bodies in the SNGAN style (Miyato et al. 2018; Gulrajani et al. 2017).

Pre-activation residual blocks with 3x3 convs; the generator upsamples (nearest) inside its
blocks, the discriminator average-pools. Channels follow the dcgan scheme
`width * min(2**k, 8)` (k = 0 at full resolution). Weights keep PyTorch's default
initialisation (kaiming-uniform); with spectral norm on D the scale is normalised anyway.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from dgm_scale.nets.layers import image_stages, make_norm, stage_channels

ARCH = "resnet"


class ResBlock(nn.Module):
    """x [N, c_in, H, W] -> [N, c_out, H', W'], H' = 2H (resample="up") or H/2 ("down").

    Main path: norm, ReLU, [up], conv3x3, norm, ReLU, conv3x3, [down].
    Shortcut: [up], conv1x1, [down] (learnable, since channels and resolution change).
    first=True is SNGAN's "optimized" first discriminator block: the input is the image, so
    no norm/ReLU before the first conv, and the shortcut pools before its 1x1 conv.
    """

    def __init__(self, c_in: int, c_out: int, norm: str, resample: str, first: bool = False):
        super().__init__()
        if resample not in ("up", "down"):
            raise ValueError(f"resample must be 'up' or 'down', got {resample!r}")
        self.resample = resample
        self.first = first
        self.norm1 = nn.Identity() if first else make_norm(norm, c_in, spatial=True, arch=ARCH)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, 1, 1)
        self.norm2 = make_norm(norm, c_out, spatial=True, arch=ARCH)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1)
        self.shortcut = nn.Conv2d(c_in, c_out, 1)

    def _up(self, x: Tensor) -> Tensor:
        return F.interpolate(x, scale_factor=2, mode="nearest") if self.resample == "up" else x

    def _down(self, x: Tensor) -> Tensor:
        return F.avg_pool2d(x, 2) if self.resample == "down" else x

    def forward(self, x: Tensor) -> Tensor:
        h = x if self.first else F.relu(self.norm1(x))
        h = self.conv1(self._up(h))
        h = self.conv2(F.relu(self.norm2(h)))
        h = self._down(h)
        if self.first:  # pooling first makes the 1x1 conv 4x cheaper; both are linear
            return h + self.shortcut(self._down(x))
        return h + self._down(self.shortcut(self._up(x)))


class _GlobalSumPool(nn.Module):
    """[N, C, H, W] -> [N, C]; SNGAN sums (not averages) so the score scales with area."""

    def forward(self, x: Tensor) -> Tensor:
        return x.sum(dim=(2, 3))


def generator_body(net, in_dim: int, out_shape: tuple[int, ...]) -> nn.Module:
    """[N, in_dim] -> [N, C, H, W] (raw): Linear to 4x4, up blocks to H, norm-ReLU-conv3x3."""
    n = image_stages(out_shape, ARCH)
    ch = lambda k: stage_channels(net.width, k)  # noqa: E731
    layers: list[nn.Module] = [nn.Linear(in_dim, ch(n) * 16), nn.Unflatten(1, (ch(n), 4, 4))]
    layers += [ResBlock(ch(k), ch(k - 1), net.norm, "up") for k in range(n, 0, -1)]
    layers += [
        make_norm(net.norm, ch(0), spatial=True, arch=ARCH),
        nn.ReLU(),
        nn.Conv2d(ch(0), out_shape[0], 3, 1, 1),
    ]
    return nn.Sequential(*layers)


def discriminator_body(net, in_shape: tuple[int, ...]) -> tuple[nn.Module, int]:
    """[N, C, H, W] -> features [N, ch] after down blocks to 4x4, ReLU and a global sum.

    The optimized block takes H to H/2; each further block halves until 4x4 (so a tiny 8x8
    input gets only the optimized block).
    """
    n = image_stages(in_shape, ARCH)
    ch = lambda k: stage_channels(net.width, k)  # noqa: E731
    layers: list[nn.Module] = [ResBlock(in_shape[0], ch(0), net.norm, "down", first=True)]
    layers += [ResBlock(ch(k - 1), ch(k), net.norm, "down") for k in range(1, n)]
    layers += [nn.ReLU(), _GlobalSumPool()]
    return nn.Sequential(*layers), ch(n - 1)


def init_weights(module: nn.Module) -> None:
    """PyTorch defaults are kept for the resnet."""
