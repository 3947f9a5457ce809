"""DCGAN bodies (Radford et al. 2016): strided (transposed) 4x4 convolutions.

Stage k has `width * min(2**k, 8)` channels, k = 0 next to the image and growing towards the
4x4 stage, so the 4x4 stage is the widest and 256x256 nets do not blow up. Weights are drawn
from N(0, 0.02) (norm scales from N(1, 0.02)) as in the paper.
"""
from __future__ import annotations

from torch import nn

from dgm_scale.nets.layers import image_stages, make_norm, stage_channels

ARCH = "dcgan"


def _conv_block(
    conv_cls: type[nn.Module], c_in: int, c_out: int, stride: int, pad: int,
    net, act: nn.Module, norm: bool,
) -> list[nn.Module]:
    """[conv 4x4, norm?, act]; the conv has no bias when a norm follows (it would cancel it)."""
    conv = conv_cls(c_in, c_out, 4, stride, pad, bias=not norm)
    norm_layer = make_norm(net.norm, c_out, spatial=True, arch=ARCH) if norm else nn.Identity()
    return [conv, norm_layer, act]


def generator_body(net, in_dim: int, out_shape: tuple[int, ...]) -> nn.Module:
    """[N, in_dim] -> [N, C, H, W] (raw).

    z is read as a 1x1 map, a 4x4 valid transposed conv makes the 4x4 stage, then each
    stride-2 transposed conv doubles the resolution; the last one outputs C channels directly
    and has no norm.
    """
    n = image_stages(out_shape, ARCH)
    use_norm = net.norm != "none"
    ch = lambda k: stage_channels(net.width, k)  # noqa: E731
    layers: list[nn.Module] = [nn.Unflatten(1, (in_dim, 1, 1))]
    layers += _conv_block(nn.ConvTranspose2d, in_dim, ch(n - 1), 1, 0, net, nn.ReLU(), use_norm)
    for k in range(n - 1, 0, -1):  # 4x4 -> H/2
        layers += _conv_block(nn.ConvTranspose2d, ch(k), ch(k - 1), 2, 1, net, nn.ReLU(), use_norm)
    layers.append(nn.ConvTranspose2d(ch(0), out_shape[0], 4, 2, 1))  # H/2 -> H
    return nn.Sequential(*layers)


def discriminator_body(net, in_shape: tuple[int, ...]) -> tuple[nn.Module, int]:
    """[N, C, H, W] -> features [N, 16 * ch] (the flattened 4x4 map); returns (body, dim).

    The wrapper's linear head on the flattened 4x4 map is the paper's final 4x4 valid conv.
    """
    n = image_stages(in_shape, ARCH)
    layers: list[nn.Module] = []
    c_in = in_shape[0]
    for k in range(n):  # H -> 4x4; no norm on the first conv (DCGAN convention)
        c_out = stage_channels(net.width, k)
        use_norm = net.norm != "none" and k > 0
        layers += _conv_block(nn.Conv2d, c_in, c_out, 2, 1, net, nn.LeakyReLU(0.2), use_norm)
        c_in = c_out
    layers.append(nn.Flatten())
    return nn.Sequential(*layers), c_in * 16


_NORM_TYPES = (nn.BatchNorm2d, nn.GroupNorm, nn.InstanceNorm2d)


def init_weights(module: nn.Module) -> None:
    """DCGAN init: conv/linear weights ~ N(0, 0.02), norm scales ~ N(1, 0.02), biases 0.
    Embeddings keep their N(0, 1) default."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            nn.init.normal_(m.weight, 0.0, 0.02)
        elif isinstance(m, _NORM_TYPES) and m.weight is not None:
            nn.init.normal_(m.weight, 1.0, 0.02)
        else:
            continue
        if m.bias is not None:
            nn.init.zeros_(m.bias)
