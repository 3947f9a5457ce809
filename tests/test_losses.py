"""Losses against hand-computed values and closed forms."""
import math

import numpy as np
import pytest
import torch
from scipy.stats import norm
from torch import nn

from dgm_scale.config import load_config
from dgm_scale.losses import ADVERSARIAL_LOSSES, build_adversarial_loss, clip_weights, gaussian_kl, gradient_penalty
from dgm_scale.data.transforms import from_8bit, to_8bit
from dgm_scale.losses.vae import (bernoulli_log_likelihood, discretized_gaussian_log_likelihood, elbo_terms,
                                  gaussian_log_likelihood)

REAL = torch.tensor([2.0, -1.0])
FAKE = torch.tensor([0.5, -3.0])


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def loss_pair(name: str, **overrides):
    cfg = load_config(overrides=[f"loss.name={name}"] + [f"loss.{k}={v}" for k, v in overrides.items()])
    return build_adversarial_loss(cfg.loss)


def test_minimax_and_nonsaturating_on_fixed_logits():
    # D: -log sigmoid(r) - log(1 - sigmoid(f)) = softplus(-r) + softplus(f), averaged.
    expected_d = (softplus(-2) + softplus(1)) / 2 + (softplus(0.5) + softplus(-3)) / 2
    for name in ("minimax", "nonsaturating"):
        assert loss_pair(name).d_loss(REAL, FAKE).item() == pytest.approx(expected_d, rel=1e-6)
    # G minimax: mean log(1 - sigmoid(f)); non-saturating: mean -log sigmoid(f).
    sigmoid = lambda x: 1 / (1 + math.exp(-x))
    minimax_g = (math.log(1 - sigmoid(0.5)) + math.log(1 - sigmoid(-3))) / 2
    nonsat_g = (-math.log(sigmoid(0.5)) - math.log(sigmoid(-3))) / 2
    assert loss_pair("minimax").g_loss(FAKE).item() == pytest.approx(minimax_g, rel=1e-6)
    assert loss_pair("nonsaturating").g_loss(FAKE).item() == pytest.approx(nonsat_g, rel=1e-6)


def test_minimax_generator_saturates_where_nonsaturating_does_not():
    very_fake = torch.tensor([-10.0], requires_grad=True)
    (grad_mm,) = torch.autograd.grad(loss_pair("minimax").g_loss(very_fake), very_fake)
    (grad_ns,) = torch.autograd.grad(loss_pair("nonsaturating").g_loss(very_fake), very_fake)
    assert abs(grad_mm.item()) < 1e-4 < 0.99 < abs(grad_ns.item())


def test_least_squares_uses_configured_targets():
    default = loss_pair("lsgan")  # a=0, b=1, c=1
    assert default.d_loss(REAL, FAKE).item() == pytest.approx(0.5 * ((1 + 4) / 2) + 0.5 * ((0.25 + 9) / 2))
    assert default.g_loss(FAKE).item() == pytest.approx(0.5 * ((0.25 + 16) / 2))
    pearson = loss_pair("lsgan", lsgan_a=-1, lsgan_b=1, lsgan_c=0)
    assert pearson.d_loss(REAL, FAKE).item() == pytest.approx(0.5 * ((1 + 4) / 2) + 0.5 * ((2.25 + 4) / 2))
    assert pearson.g_loss(FAKE).item() == pytest.approx(0.5 * ((0.25 + 9) / 2))


def test_wasserstein_and_hinge_on_fixed_logits():
    assert loss_pair("wasserstein").d_loss(REAL, FAKE).item() == pytest.approx(-1.25 - 0.5)
    assert loss_pair("wasserstein").g_loss(FAKE).item() == pytest.approx(1.25)
    # hinge D: mean relu(1 - r) = (0 + 2)/2; mean relu(1 + f) = (1.5 + 0)/2
    assert loss_pair("hinge").d_loss(REAL, FAKE).item() == pytest.approx(1.0 + 0.75)
    assert loss_pair("hinge").g_loss(FAKE).item() == pytest.approx(1.25)


def test_every_registered_loss_is_tested_above():
    assert set(ADVERSARIAL_LOSSES) == {"minimax", "nonsaturating", "lsgan", "wasserstein", "hinge"}


class LinearCritic(nn.Module):
    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(weight)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return images.flatten(1) @ self.weight.flatten()


@pytest.mark.parametrize("weight_norm", [0.3, 1.0, 2.5])
def test_gradient_penalty_of_linear_critic_is_exact(weight_norm):
    torch.manual_seed(0)
    direction = torch.randn(3, 4, 4)
    critic = LinearCritic(direction / direction.norm() * weight_norm)
    real, fake = torch.randn(8, 3, 4, 4), torch.randn(8, 3, 4, 4)
    # f(x) = w.x has gradient w everywhere: penalty = (||w|| - 1)^2 for every interpolate.
    penalty = gradient_penalty(critic, real, fake)
    assert penalty.item() == pytest.approx((weight_norm - 1.0) ** 2, rel=1e-5, abs=1e-7)
    # d/dw (||w|| - 1)^2 = 2 (||w|| - 1) w / ||w||: the penalty is differentiable w.r.t. the critic.
    penalty.backward()
    expected = 2 * (weight_norm - 1.0) * critic.weight.detach() / weight_norm
    torch.testing.assert_close(critic.weight.grad, expected, rtol=1e-4, atol=1e-6)


def test_gradient_penalty_passes_labels_to_a_conditional_critic():
    calls = []

    def critic(images, labels):
        calls.append(labels)
        return images.flatten(1).sum(1) * 2.0  # gradient norm 2 * sqrt(D)

    labels = torch.tensor([1, 0])
    penalty = gradient_penalty(critic, torch.zeros(2, 4), torch.ones(2, 4), labels)
    assert calls[0] is labels
    assert penalty.item() == pytest.approx((2 * 2 - 1) ** 2)


def test_weight_clipping_bounds_every_parameter():
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(100)
    clip_weights(net, 0.01)
    for p in net.parameters():
        assert p.abs().max().item() <= 0.01 + 1e-9
    assert any((p.abs() == 0.01).any() for p in net.parameters())


def test_gaussian_kl_matches_closed_form_and_torch_distributions():
    torch.manual_seed(0)
    mu, logvar = torch.randn(5, 3), torch.randn(5, 3)
    q = torch.distributions.Normal(mu, (0.5 * logvar).exp())
    p = torch.distributions.Normal(torch.zeros(3), torch.ones(3))
    expected = torch.distributions.kl_divergence(q, p).sum(1)
    torch.testing.assert_close(gaussian_kl(mu, logvar), expected, rtol=1e-5, atol=1e-6)
    # closed form for one dimension: KL(N(1, 4) || N(0, 1)) = 0.5 (4 + 1 - 1 - ln 4)
    value = gaussian_kl(torch.tensor([[1.0]]), torch.tensor([[math.log(4.0)]]))
    assert value.item() == pytest.approx(0.5 * (4 + 1 - 1 - math.log(4)))
    assert gaussian_kl(torch.zeros(2, 7), torch.zeros(2, 7)).abs().max().item() == 0.0


def test_likelihoods_match_torch_distributions():
    torch.manual_seed(0)
    images = torch.rand(4, 1, 3, 3) * 2 - 1
    logits = torch.randn(4, 1, 3, 3)
    soft_targets = (images + 1) / 2
    expected = -(torch.nn.functional.binary_cross_entropy_with_logits(logits, soft_targets, reduction="none")).sum((1, 2, 3))
    torch.testing.assert_close(bernoulli_log_likelihood(logits, images), expected)
    binary = torch.randint(0, 2, (4, 1, 3, 3)).float()
    bern = torch.distributions.Bernoulli(logits=logits).log_prob(binary).sum((1, 2, 3))
    torch.testing.assert_close(bernoulli_log_likelihood(logits, binary * 2 - 1), bern)
    gauss = torch.distributions.Normal(logits, 0.3).log_prob(images).sum((1, 2, 3))
    torch.testing.assert_close(gaussian_log_likelihood(logits, images, 0.3), gauss)


def exact_log_masses(means: np.ndarray, std: np.ndarray) -> np.ndarray:
    """log P(level k) [256, ...] of N(mean, std^2) discretised to the 8-bit levels, from
    scipy.stats.norm: the mass between the bin edges x_k -+ 1/255 (x_k = k / 127.5 - 1, in
    float32 as the data holds it), the first and last level taking the tails; computed on the
    side of the mean where it does not cancel (log sf above the mean, log cdf below)."""
    x = from_8bit(torch.arange(256)).double().numpy().reshape(-1, *[1] * np.ndim(means))
    lower, upper = (x - 1 / 255 - means) / std, (x + 1 / 255 - means) / std
    above = lower > 0
    far = np.where(above, norm.logsf(upper), norm.logcdf(lower))
    near = np.where(above, norm.logsf(lower), norm.logcdf(upper))
    masses = near + np.log1p(-np.exp(far - near))
    masses[0], masses[-1] = norm.logcdf(upper[0]), norm.logsf(lower[-1])
    return masses


@pytest.mark.parametrize("mean, std", [(0.0, 0.1), (0.3, 0.01), (-0.97, 0.5), (1.4, 0.2), (-2.5, 1.0), (0.0, 3.0)])
def test_discretized_gaussian_is_a_mass_over_the_256_levels_matching_scipy(mean, std):
    levels = from_8bit(torch.arange(256)).double().view(256, 1, 1, 1)
    log_p = discretized_gaussian_log_likelihood(torch.full_like(levels, mean), levels, std).numpy()
    exact = exact_log_masses(np.array(mean), np.array(std))
    assert np.exp(log_p).sum() == pytest.approx(1.0, abs=1e-5)  # observed: within 2e-6
    # Levels with a mass above 1e-5 exactly; the rest (the density at the level times the bin
    # width) never get more mass than the exact one, so the bound on log P(x) holds.
    held = exact > math.log(1e-5)
    np.testing.assert_allclose(log_p[held], exact[held], rtol=0, atol=1e-6)  # observed: 1e-7 (float32 levels)
    assert (log_p <= exact + 1e-6).all()


def test_discretized_gaussian_takes_a_std_per_channel_and_sums_the_pixels():
    """std [C, 1, 1] (the VAE's learned one) broadcast over [N, C, H, W]; per sample, the sum
    over its pixels of the log mass of its level."""
    generator = torch.Generator().manual_seed(0)
    means = torch.randn(3, 2, 2, 2, generator=generator, dtype=torch.float64) * 0.3
    images = from_8bit(to_8bit(means + 0.1 * torch.randn(3, 2, 2, 2, generator=generator, dtype=torch.float64)))
    std = torch.tensor([0.2, 0.5], dtype=torch.float64).view(2, 1, 1)  # every pixel's mass above 1e-5
    table = exact_log_masses(means.numpy(), std.numpy())  # [256, 3, 2, 2, 2]: every level of every pixel
    index = np.rint((images.numpy() + 1) * 127.5).astype(int)
    expected = np.take_along_axis(table, index[None], axis=0)[0].reshape(3, -1).sum(1)
    np.testing.assert_allclose(discretized_gaussian_log_likelihood(means, images, std).numpy(), expected,
                               rtol=1e-6)


def test_elbo_terms_weight_kl_by_beta_but_report_the_true_bound():
    torch.manual_seed(0)
    images, out = torch.rand(2, 1, 2, 2) * 2 - 1, torch.randn(2, 1, 2, 2)
    mu, logvar = torch.randn(2, 3), torch.randn(2, 3)
    terms = elbo_terms(out, images, mu, logvar, beta=4.0)
    torch.testing.assert_close(terms["elbo"], terms["reconstruction"] - terms["kl"])
    torch.testing.assert_close(terms["loss"], -(terms["reconstruction"] - 4.0 * terms["kl"]))
