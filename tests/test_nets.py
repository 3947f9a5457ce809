"""Shape, conditioning, normalisation and spectral-norm checks for dgm_scale.nets."""
from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn
from torch.nn.utils import parametrize

from dgm_scale.config.schema import NetConfig
from dgm_scale.nets import (
    ARCHS,
    NORMS,
    build_discriminator,
    build_generator,
    count_parameters,
)

LATENT = 8


def net(arch: str = "dcgan", width: int = 4, depth: int = 2, norm: str = "batch", sn: bool = False):
    """A NetConfig as the builders receive it from the loader (a DictConfig)."""
    cfg = NetConfig(arch=arch, width=width, depth=depth, norm=norm, spectral_norm=sn)
    return OmegaConf.structured(cfg)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def test_public_constants():
    assert ARCHS == ("mlp", "dcgan", "resnet", "stylegan2")
    assert NORMS == ("none", "batch", "layer", "instance")


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("res", [8, 16, 32])
@pytest.mark.parametrize("channels", [1, 3])
def test_image_shapes(arch, res, channels):
    shape = (channels, res, res)
    g = build_generator(net(arch), LATENT, shape)
    d = build_discriminator(net(arch), shape)
    x = g(torch.randn(3, LATENT))
    assert x.shape == (3, *shape)
    assert d(x).shape == (3, 1)


@pytest.mark.parametrize("arch", ["dcgan", "resnet"])
def test_resolution_256(arch):
    shape = (3, 256, 256)
    with torch.no_grad():
        x = build_generator(net(arch, width=2), LATENT, shape)(torch.randn(2, LATENT))
        assert x.shape == (2, *shape)
        assert build_discriminator(net(arch, width=2), shape)(x).shape == (2, 1)


def test_mlp_toy_2d():
    g = build_generator(net("mlp", width=16), LATENT, (2,), out_activation=None)
    d = build_discriminator(net("mlp", width=16), (2,))
    x = g(torch.randn(5, LATENT))
    assert x.shape == (5, 2)
    assert d(x).shape == (5, 1)


@pytest.mark.parametrize("arch", ["dcgan", "resnet"])
def test_conv_arch_rejects_bad_shapes(arch):
    for shape in [(2,), (1, 12, 12), (1, 16, 8), (1, 4, 4), (1, 512, 512)]:
        with pytest.raises(ValueError):
            build_generator(net(arch), LATENT, shape)
        with pytest.raises(ValueError):
            build_discriminator(net(arch), shape)


@pytest.mark.parametrize("arch", ARCHS)
def test_conditional_generator_depends_on_labels(arch):
    g = build_generator(net(arch), LATENT, (1, 8, 8), num_classes=10).eval()
    z = torch.randn(4, LATENT).repeat(2, 1)
    labels = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7])
    x = g(z, labels)
    assert not torch.allclose(x[:4], x[4:])
    with pytest.raises(ValueError, match="labels"):
        g(z)


@pytest.mark.parametrize("arch", ARCHS)
def test_projection_discriminator_depends_on_labels(arch):
    d = build_discriminator(net(arch), (1, 8, 8), num_classes=10).eval()
    assert d.projection is not None
    x = torch.randn(4, 1, 8, 8).repeat(2, 1, 1, 1)
    out = d(x, torch.arange(8))
    assert out.shape == (8, 1)
    assert not torch.allclose(out[:4], out[4:])
    with pytest.raises(ValueError, match="labels"):
        d(x)


def test_unconditional_nets_ignore_labels():
    g = build_generator(net(), LATENT, (1, 8, 8)).eval()
    d = build_discriminator(net(), (1, 8, 8)).eval()
    z = torch.randn(2, LATENT)
    labels = torch.tensor([0, 1])
    assert torch.equal(g(z), g(z, labels))
    x = torch.randn(2, 1, 8, 8)
    assert torch.equal(d(x), d(x, labels))


@pytest.mark.parametrize("arch", ARCHS)
def test_spectral_norm(arch):
    d = build_discriminator(net(arch, norm="none", sn=True), (1, 8, 8), num_classes=3)
    layers = [m for m in d.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert layers and all(parametrize.is_parametrized(m, "weight") for m in layers)
    assert parametrize.is_parametrized(d.projection.embed, "weight")
    d.train()
    x, y = torch.randn(4, 1, 8, 8), torch.randint(0, 3, (4,))
    for _ in range(20):  # each training forward runs one power iteration
        d(x, y)
    w = d.head.weight.detach()
    assert abs(torch.linalg.matrix_norm(w, ord=2).item() - 1.0) < 0.1
    first = layers[0].weight.detach().flatten(1)  # conv kernels reshaped as SN sees them
    assert abs(torch.linalg.matrix_norm(first, ord=2).item() - 1.0) < 0.1


def test_spectral_norm_generator_allowed():
    g = build_generator(net("dcgan", sn=True), LATENT, (1, 8, 8), num_classes=3)
    convs = [m for m in g.modules() if isinstance(m, nn.ConvTranspose2d)]
    assert all(parametrize.is_parametrized(m, "weight") for m in convs)
    assert g(torch.randn(2, LATENT), torch.tensor([0, 2])).shape == (2, 1, 8, 8)


def _types(module: nn.Module) -> set[type]:
    return {type(m) for m in module.modules()}


@pytest.mark.parametrize(
    "norm, expected",
    [("batch", nn.BatchNorm2d), ("layer", nn.GroupNorm), ("instance", nn.InstanceNorm2d)],
)
@pytest.mark.parametrize("arch", ["dcgan", "resnet"])
def test_conv_norm_types(arch, norm, expected):
    shape = (1, 16, 16)
    g = build_generator(net(arch, norm=norm), LATENT, shape)
    d = build_discriminator(net(arch, norm=norm), shape)
    assert expected in _types(g) and expected in _types(d)
    assert d(g(torch.randn(2, LATENT))).shape == (2, 1)
    if expected is nn.GroupNorm:  # layer norm over (C, H, W) = one group
        assert all(m.num_groups == 1 for m in g.modules() if isinstance(m, nn.GroupNorm))


@pytest.mark.parametrize("arch", ARCHS)
def test_norm_none_has_no_norm_layers(arch):
    norm_types = {nn.BatchNorm1d, nn.BatchNorm2d, nn.GroupNorm, nn.InstanceNorm2d, nn.LayerNorm}
    g = build_generator(net(arch, norm="none"), LATENT, (1, 8, 8))
    d = build_discriminator(net(arch, norm="none"), (1, 8, 8))
    assert not (_types(g) | _types(d)) & norm_types


@pytest.mark.parametrize("norm, expected", [("batch", nn.BatchNorm1d), ("layer", nn.LayerNorm)])
def test_mlp_norm_types(norm, expected):
    g = build_generator(net("mlp", norm=norm), LATENT, (2,))
    d = build_discriminator(net("mlp", norm=norm, depth=2), (2,))
    assert expected in _types(g) and expected in _types(d)
    # D's first hidden layer is not normalised (DCGAN convention): 2 hidden layers -> 1 norm.
    assert sum(isinstance(m, expected) for m in d.modules()) == 1


def test_mlp_instance_norm_rejected():
    with pytest.raises(ValueError, match="instance.*mlp"):
        build_generator(net("mlp", norm="instance"), LATENT, (2,))
    with pytest.raises(ValueError, match="instance.*mlp"):
        build_discriminator(net("mlp", norm="instance"), (2,))


def test_unknown_arch_and_norm_rejected():
    with pytest.raises(ValueError, match="vit"):
        build_generator(net("vit"), LATENT, (1, 8, 8))
    with pytest.raises(ValueError, match="spectral"):
        build_discriminator(net(norm="spectral"), (1, 8, 8))


def test_plain_dataclass_config_works():
    cfg = NetConfig(arch="resnet", width=4, norm="none", spectral_norm=True)
    assert build_discriminator(cfg, (3, 8, 8))(torch.randn(2, 3, 8, 8)).shape == (2, 1)


@pytest.mark.parametrize("arch", ARCHS)
def test_vae_encoder_decoder(arch):
    shape = (1, 16, 16)
    enc = build_discriminator(net(arch), shape, out_features=2 * LATENT)
    assert enc(torch.randn(3, *shape)).shape == (3, 2 * LATENT)
    dec = build_generator(net(arch), LATENT, shape, out_activation=None)
    assert dec(torch.randn(3, LATENT)).shape == (3, *shape)
    g = build_generator(net(arch), LATENT, shape, out_activation="tanh")
    x = g(10 * torch.randn(3, LATENT))
    assert x.abs().max() <= 1.0


def test_vae_encoder_with_classes_has_no_projection():
    enc = build_discriminator(net(), (1, 8, 8), num_classes=5, out_features=2 * LATENT)
    assert enc.projection is None
    assert enc(torch.randn(2, 1, 8, 8)).shape == (2, 2 * LATENT)


def test_mlp_on_image_shapes():
    shape = (3, 16, 16)
    g = build_generator(net("mlp", width=16), LATENT, shape)
    d = build_discriminator(net("mlp", width=16), shape)
    x = g(torch.randn(2, LATENT))
    assert x.shape == (2, *shape)
    assert d(x).shape == (2, 1)


def test_dcgan_channels_are_capped():
    g = build_generator(net("dcgan", width=2), LATENT, (3, 256, 256))
    widest = max(m.out_channels for m in g.modules() if isinstance(m, nn.ConvTranspose2d))
    assert widest == 16  # 8 * width


def test_dcgan_init_std():
    d = build_discriminator(net("dcgan", width=16), (3, 32, 32))
    conv = next(m for m in d.modules() if isinstance(m, nn.Conv2d))
    assert abs(conv.weight.std().item() - 0.02) < 0.005


@pytest.mark.parametrize("arch", ARCHS)
def test_count_parameters(arch):
    for sn in (False, True):
        d = build_discriminator(net(arch, sn=sn, norm="none"), (1, 8, 8), num_classes=3)
        assert count_parameters(d) == sum(p.numel() for p in d.parameters()) > 0
    assert count_parameters(nn.Linear(3, 2)) == 8
