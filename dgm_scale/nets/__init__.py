"""Network architectures: generators (also the VAE decoder) and discriminators (also the VAE
encoder and the WGAN critic), built from a `NetConfig` (arch, width, depth, norm, spectral_norm).

    G = build_generator(cfg.model.generator, latent_dim, (C, H, W), num_classes)
    x = G(z, labels)          # z [N, latent_dim], labels [N] or None -> [N, C, H, W]
    D = build_discriminator(cfg.model.discriminator, (C, H, W), num_classes)
    s = D(x, labels)          # -> raw scores [N, out_features]
"""
from __future__ import annotations

from contextlib import contextmanager
from types import ModuleType
from typing import TYPE_CHECKING, Iterator, Optional, Union

from torch import Tensor, nn

from dgm_scale.nets import dcgan, mlp, resnet, stylegan2
from dgm_scale.nets.layers import (
    NORMS,
    Discriminator,
    Generator,
    apply_spectral_norm,
    conditioned_dim,
)

if TYPE_CHECKING:
    from omegaconf import DictConfig

    from dgm_scale.config.schema import NetConfig

    NetSpec = Union[NetConfig, DictConfig]

__all__ = [
    "ARCHS",
    "NORMS",
    "build_generator",
    "build_discriminator",
    "count_parameters",
    "discriminator_features",
]

# Registry: each architecture module provides generator_body, discriminator_body, init_weights.
_ARCH_MODULES: dict[str, ModuleType] = {"mlp": mlp, "dcgan": dcgan, "resnet": resnet, "stylegan2": stylegan2}
ARCHS = tuple(_ARCH_MODULES)  # ("mlp", "dcgan", "resnet", "stylegan2")


def _arch_module(net: "NetSpec") -> ModuleType:
    """Validate the config once, up front, so errors name the offending value."""
    if net.arch not in _ARCH_MODULES:
        raise ValueError(f"unknown arch {net.arch!r}; expected one of {', '.join(ARCHS)}")
    if net.norm not in NORMS:
        raise ValueError(f"unknown norm {net.norm!r}; expected one of {', '.join(NORMS)}")
    if net.arch == "mlp" and net.norm == "instance":
        raise ValueError(
            "model.*.norm=instance is not defined for the mlp arch; use none, batch or layer"
        )
    if net.width < 1:
        raise ValueError(f"model.*.width must be >= 1, got {net.width}")
    return _ARCH_MODULES[net.arch]


def _finish(model: nn.Module, net: "NetSpec", arch: ModuleType) -> nn.Module:
    """Initialise first: spectral norm reparametrises the weights it wraps."""
    arch.init_weights(model)
    if net.spectral_norm:
        apply_spectral_norm(model)
    return model


def build_generator(
    net: "NetSpec",
    latent_dim: int,
    out_shape: tuple[int, ...],
    num_classes: int = 0,
    out_activation: Optional[str] = "tanh",
) -> nn.Module:
    """Generator / VAE decoder: forward(z [N, latent_dim], labels [N] | None) -> [N, *out_shape].

    out_shape is (C, H, W) with square H = W a power of two in [8, 256], or any shape for the
    mlp (e.g. (2,)). out_activation: "tanh" (images in [-1, 1]) or None (raw logits/means).
    num_classes > 0 makes it class-conditional (labels then required).
    """
    if latent_dim < 1 or num_classes < 0:
        raise ValueError(
            f"need latent_dim >= 1 and num_classes >= 0, got {latent_dim}, {num_classes}"
        )
    arch = _arch_module(net)
    out_shape = tuple(int(s) for s in out_shape)
    body = arch.generator_body(net, conditioned_dim(latent_dim, num_classes), out_shape)
    return _finish(Generator(body, latent_dim, num_classes, out_activation), net, arch)


def build_discriminator(
    net: "NetSpec",
    in_shape: tuple[int, ...],
    num_classes: int = 0,
    out_features: int = 1,
) -> nn.Module:
    """Discriminator / critic / VAE encoder: forward(x [N, *in_shape], labels [N] | None)
    -> raw scores [N, out_features].

    num_classes > 0 with out_features == 1 adds the projection term (labels then required);
    the VAE encoder uses out_features = 2 * latent_dim (mean and log-variance).
    """
    if out_features < 1 or num_classes < 0:
        raise ValueError(
            f"need out_features >= 1 and num_classes >= 0, got {out_features}, {num_classes}"
        )
    arch = _arch_module(net)
    body, feat_dim = arch.discriminator_body(net, tuple(int(s) for s in in_shape))
    return _finish(Discriminator(body, feat_dim, num_classes, out_features), net, arch)


def count_parameters(module: nn.Module) -> int:
    """Total number of parameter elements (trainable or not)."""
    return sum(p.numel() for p in module.parameters())


@contextmanager
def _each_sample_alone(body: nn.Module) -> Iterator[None]:
    """Minibatch-std layers (stylegan2) see each sample as its own group while inside: their
    extra feature is then a constant, and a sample's features do not depend on its batch."""
    layers = [m for m in body.modules() if isinstance(m, stylegan2.MinibatchStd)]
    groups = [layer.group for layer in layers]
    for layer in layers:
        layer.group = 1
    try:
        yield
    finally:
        for layer, group in zip(layers, groups):
            layer.group = group


def discriminator_features(discriminator: nn.Module, x: Tensor) -> Tensor:
    """The penultimate features h [N, F] of x [N, *in_shape]: the discriminator's `body` output,
    flattened (what its head maps to scores). Call it in eval mode (batch norm then uses its
    running statistics), so that row i depends on x[i] only. NotImplementedError for a
    discriminator without a `body` sub-network (a custom one may add it)."""
    body = getattr(discriminator, "body", None)
    if not isinstance(body, nn.Module):
        raise NotImplementedError(
            f"the discriminator ({type(discriminator).__name__}) has no `body` sub-network giving its "
            "penultimate features (x [N, C, H, W] -> [N, F], then a head to the scores); add one")
    with _each_sample_alone(body):
        return body(x).flatten(1)
