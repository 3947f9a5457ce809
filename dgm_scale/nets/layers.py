"""Pieces shared by every architecture.

An architecture module (mlp, dcgan, resnet) only builds a *body*: the generator body maps a
(possibly label-conditioned) latent vector to an output tensor, the discriminator body maps an
input to a flat feature vector. The wrappers here add what is common to all of them: label
conditioning, output activation, the linear head and the projection term, spectral norm.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn
from torch.nn.utils.parametrizations import spectral_norm

NORMS = ("none", "batch", "layer", "instance")
OUT_ACTIVATIONS = ("tanh", "sigmoid", "none")


def make_norm(norm: str, features: int, *, spatial: bool, arch: str) -> nn.Module:
    """Normalisation layer for `features` channels (spatial: [N, C, H, W]) or units ([N, F]).

    "layer" on feature maps is GroupNorm with one group, i.e. layer norm over (C, H, W) that
    does not depend on the resolution (nn.LayerNorm would need H and W up front).
    """
    if norm not in NORMS:
        raise ValueError(f"unknown norm {norm!r}; expected one of {', '.join(NORMS)}")
    if norm == "none":
        return nn.Identity()
    if spatial:
        if norm == "batch":
            return nn.BatchNorm2d(features)
        if norm == "layer":
            return nn.GroupNorm(1, features)
        return nn.InstanceNorm2d(features, affine=True)
    if norm == "batch":
        return nn.BatchNorm1d(features)
    if norm == "layer":
        return nn.LayerNorm(features)
    raise ValueError(
        f"model.*.norm={norm!r} is not defined for the {arch} arch (flat features); "
        "use none, batch or layer"
    )


def make_out_activation(name: Optional[str]) -> nn.Module:
    """Final generator activation: "tanh" (images in [-1, 1]), "sigmoid", or None/"none" (raw)."""
    if name is None or name == "none":
        return nn.Identity()
    if name == "tanh":
        return nn.Tanh()
    if name == "sigmoid":
        return nn.Sigmoid()
    raise ValueError(f"unknown out_activation {name!r}; expected one of tanh, sigmoid, None")


def stage_channels(width: int, k: int) -> int:
    """Channels of stage k (k = 0 at full resolution, growing towards 4x4), capped at 8*width
    so that 256x256 nets stay the size of 64x64 ones."""
    return width * min(2**k, 8)


def image_stages(shape: tuple[int, ...], arch: str) -> int:
    """Number of x2 resolution steps between 4x4 and an image shape (C, H, W).

    Raises ValueError unless H == W is a power of two in [8, 256].
    """
    if len(shape) != 3:
        raise ValueError(f"the {arch} arch needs an image shape (C, H, W), got {tuple(shape)}")
    channels, height, width = shape
    if channels < 1 or height != width or height < 8 or height > 256 or height & (height - 1):
        raise ValueError(
            f"the {arch} arch needs C >= 1 and square H == W, a power of two in [8, 256]; "
            f"got {tuple(shape)}"
        )
    return int(math.log2(height)) - 2


def require_labels(labels: Optional[Tensor], num_classes: int) -> Tensor:
    """Return labels [N] or raise: a conditional net must not silently run unconditionally."""
    if labels is None:
        raise ValueError(
            f"this network is class-conditional (num_classes={num_classes}) and needs labels"
        )
    return labels.long()


def conditioned_dim(latent_dim: int, num_classes: int) -> int:
    """Input width of a generator body: z, plus the label embedding when conditional."""
    return latent_dim * 2 if num_classes > 0 else latent_dim


class Generator(nn.Module):
    """z [N, latent_dim] (+ labels [N]) -> x [N, *out_shape].

    Conditioning follows the conditional GAN of Mirza & Osindero (2014): the label embedding
    [N, latent_dim] is concatenated to z, so the body sees [N, 2 * latent_dim]. Concatenation
    (not z * embed(y)) keeps z's information intact and works the same for every body.
    """

    def __init__(
        self, body: nn.Module, latent_dim: int, num_classes: int, out_activation: Optional[str]
    ) -> None:
        super().__init__()
        self.latent_dim = latent_dim
        self.num_classes = num_classes
        self.embed = nn.Embedding(num_classes, latent_dim) if num_classes > 0 else None
        self.body = body
        self.out_act = make_out_activation(out_activation)

    def forward(self, z: Tensor, labels: Optional[Tensor] = None) -> Tensor:
        if self.embed is not None:
            z = torch.cat([z, self.embed(require_labels(labels, self.num_classes))], dim=1)
        return self.out_act(self.body(z))


class Projection(nn.Module):
    """Projection term of Miyato & Koyama (2018): features h [N, F], labels [N] -> [N, 1]
    equal to <embed(y), h>, the class-dependent part of the discriminator's logit."""

    def __init__(self, num_classes: int, features: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.embed = nn.Embedding(num_classes, features)

    def forward(self, h: Tensor, labels: Optional[Tensor]) -> Tensor:
        y = self.embed(require_labels(labels, self.num_classes))
        return (y * h).sum(dim=1, keepdim=True)


class Discriminator(nn.Module):
    """x [N, *in_shape] (+ labels [N]) -> raw scores [N, out_features] (no sigmoid).

    The body yields features h [N, F]; a linear head gives the scores. With num_classes > 0
    and a single output the projection term is added; with several outputs (e.g. the VAE
    encoder's mean and log-variance) there is no projection and labels are ignored.
    """

    def __init__(
        self, body: nn.Module, feat_dim: int, num_classes: int, out_features: int
    ) -> None:
        super().__init__()
        self.body = body
        self.head = nn.Linear(feat_dim, out_features)
        use_projection = num_classes > 0 and out_features == 1
        self.projection = Projection(num_classes, feat_dim) if use_projection else None

    def forward(self, x: Tensor, labels: Optional[Tensor] = None) -> Tensor:
        h = self.body(x)
        out = self.head(h)
        if self.projection is not None:
            out = out + self.projection(h, labels)
        return out


_SN_TYPES = (nn.Linear, nn.Conv2d, nn.ConvTranspose2d)


def apply_spectral_norm(module: nn.Module) -> nn.Module:
    """Spectrally normalise every Linear/Conv/ConvTranspose weight and projection embedding.

    The generator's label embedding is a lookup table, not a layer whose Lipschitz constant
    matters, so it is left alone. Returns `module` (modified in place).
    """
    for sub in list(module.modules()):
        if isinstance(sub, _SN_TYPES):
            spectral_norm(sub)
        elif isinstance(sub, Projection):
            spectral_norm(sub.embed)
    return module
