"""The diffusion family's held-out likelihood against closed forms (families/diffusion/likelihood.py).

- Data x0 quantised from N(MU, STD^2) to the 8-bit levels have the exact NLL -log P(k) (Gaussian
  mass of each level's bin) and the exact optimal denoiser E[x0 | x] (a posterior over the levels):
  with it the VLB is above the NLL (a bound) and close to it on a fine grid.
- Continuous Gaussian data N(m, S) (S a full covariance) have the optimal denoiser
  m + a S (a^2 S + s^2 I)^-1 (x - a m) and, in the ODE's frame y = x / a, r = s / a, the density
  N(y; m, S + r^2 I): the ODE's log-density, with one Rademacher probe per image, matches it on
  average; its latent is the closed-form affine map for an isotropic S.
- The discretised decoder's probabilities sum to 1 over the 256 levels; Hutchinson's estimator
  averages to the exact trace of a known Jacobian.
- The module, given those exact denoisers as its network (tests/gaussian_denoisers.py), reports
  the exact NLL through the evaluation's bits/dim and the closed-form latent through
  encode_features; `dgm-scale encode` writes a trained model's latents; bad likelihood.* keys
  stop in one line.
"""
import math

import numpy as np
import pytest
import torch

from dgm_scale.cli import main
from dgm_scale.config import ConfigError, load_config
from dgm_scale.data.shards.sources import open_source
from dgm_scale.data.transforms import from_8bit
from dgm_scale.families.diffusion.likelihood import (
    LOG_LEVELS_PER_UNIT,
    dequantised,
    hutchinson_trace,
    ode_log_density,
    ode_nll,
    rademacher,
    ratio_grid,
    vlb_terms,
)
from dgm_scale.families.diffusion.processes import EDM, Flow, VPContinuous, VPDiscrete
from dgm_scale.losses.vae import discretized_gaussian_log_likelihood
from dgm_scale.metrics.evaluation import heldout_likelihood
from dgm_scale.metrics.real_data import raw_to_image, to_model_space
from dgm_scale.modules import build_module, load_module
from dgm_scale.training import train
from helpers import ROOT, TINY_RUN, one_line

LEVELS = from_8bit(torch.arange(256)).double()
HALF_BIN = 1.0 / 255.0
MU, STD = 0.1, 0.1  # the quantised Gaussian: about 60 levels carry its mass


def generator(seed):
    return torch.Generator().manual_seed(seed)


def bits_per_dim(nats, dims):
    return nats / dims / math.log(2.0)


# ----------------------------------------------------------------------------- the quantised Gaussian
def level_log_masses():
    """log P(k) of N(MU, STD^2) rounded to the levels (the end levels take the tails), computed
    here from the normal CDF."""
    upper = torch.special.ndtr((LEVELS + HALF_BIN - MU) / STD)
    lower = torch.special.ndtr((LEVELS - HALF_BIN - MU) / STD)
    upper[-1], lower[0] = 1.0, 0.0
    return (upper - lower).clamp_min(1e-300).log()


def quantised_denoiser(process):
    """The exact E[x0 | x = a x0 + s noise] of the quantised Gaussian: a softmax over the levels
    (those with any mass: the others cannot change it)."""
    log_mass = level_log_masses()
    kept = log_mass > -60
    log_mass, levels = log_mass[kept], LEVELS[kept]

    def denoise(x, t):
        alpha, sigma = (float(v) for v in process.alpha_sigma(torch.tensor(t, dtype=torch.float64)))
        logits = log_mass - (x.unsqueeze(-1) - alpha * levels) ** 2 / (2 * sigma ** 2)
        return (logits.softmax(dim=-1) * levels).sum(dim=-1)
    return denoise


def quantised_data(num, shape, seed):
    """(levels [num, *shape] in [-1, 1], their exact NLL per image [num] in nats)."""
    log_mass = level_log_masses()
    index = torch.multinomial(log_mass.exp(), num * math.prod(shape), replacement=True,
                              generator=generator(seed)).reshape(num, *shape)
    return LEVELS[index], -log_mass[index].flatten(1).sum(dim=1)


def gap_in_bits(process, steps, num=64, shape=(1, 2, 2), seed=0):
    """(mean VLB - NLL, its standard error) in bits/dim over `num` images."""
    images, nll = quantised_data(num, shape, seed)
    noise = generator(seed + 1)
    terms = vlb_terms(quantised_denoiser(process), process, images, steps,
                      lambda k: torch.randn(num, *shape, generator=noise, dtype=torch.float64))
    gap = bits_per_dim(sum(terms.values()) - nll, math.prod(shape))
    return gap.mean().item(), gap.std().item() / math.sqrt(num)


def test_the_vlb_of_the_exact_denoiser_bounds_the_nll_and_meets_it_on_a_fine_grid():
    """EDM's grid down to sigma = 5e-4 (well inside a level's bin: the decoder costs ~0): the
    bound is above the exact NLL and within 0.1 bits/dim of it at 2,000 levels, closer than at
    250 (the discrete-time gap shrinks with the steps)."""
    process = EDM(-1.2, 1.2, 5e-4, 80.0, 7.0)
    fine, fine_error = gap_in_bits(process, 2000)
    coarse, coarse_error = gap_in_bits(process, 250)
    assert -3 * fine_error < fine < 0.1, (fine, fine_error)
    assert fine + 3 * (fine_error + coarse_error) < coarse, (fine, coarse)


@pytest.mark.parametrize("process", [VPDiscrete("cosine", 1000), VPContinuous("linear")], ids=["vp-discrete", "vp-linear"])
def test_the_vlb_on_vp_processes_is_a_bound_within_the_decoders_cost(process):
    """DDPM's own chains end at sigma / alpha ~ 0.01, more than a level's bin (2 / 255): the
    decoder there costs ~2 bits, which the bound pays partly twice (DDPM's decoder, as in Ho et
    al. and improved-diffusion): above the NLL, by less than 0.8 bits/dim."""
    gap, error = gap_in_bits(process, 1000, num=48)
    assert -3 * error < gap < 0.8, (gap, error)


def test_the_vlb_terms_are_the_prior_kl_and_the_decoder_alone_for_one_level():
    """One level: no step; the prior's KL 0.5 SNR |x0|^2 and the decoder's -log mass, by hand."""
    process = VPDiscrete("linear", 1000)
    images, _ = quantised_data(8, (1, 2, 2), seed=3)
    noise = torch.randn(8, 1, 2, 2, generator=generator(4), dtype=torch.float64)
    means = torch.full_like(images, 0.05)
    terms = vlb_terms(lambda x, t: means, process, images, 1, lambda k: noise)
    alpha, sigma = (float(v) for v in process.alpha_sigma(torch.tensor(999.0, dtype=torch.float64)))
    torch.testing.assert_close(terms["prior"], 0.5 * (alpha / sigma) ** 2 * images.pow(2).flatten(1).sum(1))
    std = sigma / alpha
    mass = torch.special.ndtr((images + HALF_BIN - 0.05) / std) - torch.special.ndtr((images - HALF_BIN - 0.05) / std)
    torch.testing.assert_close(terms["decoder"], -mass.log().flatten(1).sum(1), rtol=1e-4, atol=1e-4)
    assert terms["diffusion"].abs().max() == 0


# ----------------------------------------------------------------------------- the discretised decoder
@pytest.mark.parametrize("mean", [-1.3, -1.0, -0.37, 0.0, 0.5, 0.999, 1.2])
@pytest.mark.parametrize("std", [1e-3, 0.01, 0.3, 2.0])
def test_the_discretised_decoder_sums_to_one_over_the_256_levels(mean, std):
    means = torch.full((256, 1, 1, 1), mean, dtype=torch.float64)
    log_p = discretized_gaussian_log_likelihood(means, LEVELS.reshape(256, 1, 1, 1), std)
    assert abs(log_p.exp().sum().item() - 1.0) < 1e-4


# ----------------------------------------------------------------------------- Hutchinson
def test_hutchinsons_estimator_averages_to_the_exact_trace():
    """y -> A y with a known A: the mean over 4,000 Rademacher probes is within 4 standard errors
    of tr A (the estimator's variance for Rademacher probes: sum over i != j of A_ij^2 + A_ij A_ji);
    for a diagonal A one probe is exact."""
    dims, count = 6, 4000
    matrix = torch.randn(dims, dims, generator=generator(0), dtype=torch.float64)
    y = torch.randn(count, dims, dtype=torch.float64, requires_grad=True)
    probes = [rademacher(torch.randn(count, dims, generator=generator(1), dtype=torch.float64))]
    estimates = hutchinson_trace(y @ matrix.T, y, probes)
    off = matrix - torch.diag(torch.diag(matrix))
    std = math.sqrt((off.pow(2) + off * off.T).sum().item())
    assert abs(estimates.mean().item() - matrix.trace().item()) < 4 * std / math.sqrt(count)
    assert estimates.std().item() == pytest.approx(std, rel=0.1)
    diagonal = torch.diag(torch.arange(1.0, dims + 1, dtype=torch.float64))
    torch.testing.assert_close(hutchinson_trace(y @ diagonal, y, probes), torch.full((count,), 21.0, dtype=torch.float64))


# ----------------------------------------------------------------------------- the ODE
def gaussian_denoiser(process, mean, covariance):
    """The exact E[x0 | x] for x0 ~ N(mean, covariance) (vectors [D], x [N, D])."""
    def denoise(x, t):
        alpha, sigma = (float(v) for v in process.alpha_sigma(torch.tensor(t, dtype=torch.float64)))
        eye = torch.eye(len(mean), dtype=torch.float64)
        gain = alpha * covariance @ torch.linalg.inv(alpha ** 2 * covariance + sigma ** 2 * eye)
        return mean + (x - alpha * mean) @ gain.T
    return denoise


def isotropic_denoiser(process, mean, std, dims):
    return gaussian_denoiser(process, torch.full((dims,), mean, dtype=torch.float64),
                             std ** 2 * torch.eye(dims, dtype=torch.float64))


ODE_PROCESSES = {"edm": EDM(-1.2, 1.2, 0.002, 80.0, 7.0), "vp-discrete": VPDiscrete("cosine", 1000),
                 "vp-linear": VPContinuous("linear"), "flow": Flow("uniform", 0.0, 1.0)}


def all_signs(count, dims):
    """The 2^dims sign vectors, each [count, dims]: their mean z z^T is exactly I (Hutchinson exact)."""
    rows = torch.tensor([[1.0 if (code >> i) & 1 else -1.0 for i in range(dims)] for code in range(2 ** dims)],
                        dtype=torch.float64)
    return [row.expand(count, dims) for row in rows]


@pytest.mark.parametrize("name", sorted(ODE_PROCESSES))
def test_the_ode_log_density_of_the_exact_denoiser_is_the_gaussians(name):
    """Full-covariance Gaussian data, 80 Heun steps, at the first ratio r: with all 16 sign
    vectors as probes (an exact trace) the log-density of each point is N(y; m, S + r^2 I)'s
    within 0.05 nats (Heun's error: 0.14 at 40 steps, 0.04 at 80, second order, on EDM's
    process); with one Rademacher probe per point the mean over 400 points is within 4
    standard errors of the exact mean (unbiased)."""
    process, dims, count = ODE_PROCESSES[name], 4, 400
    root = 0.3 * torch.randn(dims, dims, generator=generator(2), dtype=torch.float64)
    eye = torch.eye(dims, dtype=torch.float64)
    covariance, mean = root @ root.T + 0.01 * eye, torch.tensor([0.2, -0.1, 0.0, 0.4], dtype=torch.float64)
    low, high = max(0.01, process.ratio_range()[0]), min(80.0, process.ratio_range()[1])
    ratios = ratio_grid(low, high, 80)
    exact = torch.distributions.MultivariateNormal(mean, covariance + low ** 2 * eye)
    y0 = mean + torch.randn(count, dims, generator=generator(3), dtype=torch.float64) @ exact.scale_tril.T
    denoise = gaussian_denoiser(process, mean, covariance)
    exhaustive, _ = ode_log_density(denoise, process, y0[:20], ratios, all_signs(20, dims))
    torch.testing.assert_close(exhaustive, exact.log_prob(y0[:20]), rtol=0, atol=0.05)
    probes = [rademacher(torch.randn(count, dims, generator=generator(4), dtype=torch.float64))]
    error = ode_log_density(denoise, process, y0, ratios, probes)[0] - exact.log_prob(y0)
    assert abs(error.mean().item()) < 4 * error.std().item() / math.sqrt(count), error.mean()


def test_the_ode_latent_is_the_closed_form_map_of_isotropic_gaussian_data():
    """x0 ~ N(m, c^2 I): the ODE carries y0 at r to m + sqrt((c^2 + R^2) / (c^2 + r^2)) (y0 - m)
    at R (80 Heun steps: within 0.5%)."""
    process, c, m = VPDiscrete("linear", 1000), 0.4, 0.3
    denoise = isotropic_denoiser(process, m, c, 3)
    ratios = ratio_grid(0.02, 50.0, 80)
    y0 = m + 0.5 * torch.randn(10, 3, generator=generator(5), dtype=torch.float64)
    _, latent = ode_log_density(denoise, process, y0, ratios)
    torch.testing.assert_close(latent, m + math.sqrt((c ** 2 + 50.0 ** 2) / (c ** 2 + 0.02 ** 2)) * (y0 - m),
                               rtol=5e-3, atol=0)


def test_the_dequantised_ode_bound_meets_the_quantised_gaussians_nll():
    """Images quantised from N(MU, 0.3^2): -log p(x + u) + D log(255 / 2) of the continuous
    Gaussian's ODE (r from 1e-3, exact traces) is within 0.005 bits/dim of the exact discrete
    NLL at 160 Heun steps. Heun's error is second order and optimistic here (-0.05 bits/dim at
    40 steps, -0.0125 at 80): a solver error, not a bound, which the steps shrink 4-fold per doubling."""
    process, dims, count, std = EDM(-1.2, 1.2, 0.002, 80.0, 7.0), 4, 400, 0.3
    index = (torch.randn(count, dims, generator=generator(6), dtype=torch.float64) * std + MU + 1) * 127.5
    images = LEVELS[index.round().clamp(0, 255).long()]
    mass = torch.special.ndtr((images + HALF_BIN - MU) / std) - torch.special.ndtr((images - HALF_BIN - MU) / std)
    nll = -mass.log().sum(dim=1)
    denoise = isotropic_denoiser(process, MU, std, dims)
    uniform = torch.rand(count, dims, generator=generator(7), dtype=torch.float64)

    def gap(steps):
        bound = ode_nll(denoise, process, images, ratio_grid(1e-3, 80.0, steps), uniform, all_signs(count, dims))
        return bits_per_dim(bound - nll, dims).mean().item()

    fine, coarse = gap(160), gap(80)
    assert abs(fine) < 0.005 and abs(fine) < abs(coarse) / 3, (fine, coarse)
    assert ((dequantised(images, uniform) - images).abs() <= HALF_BIN).all() and LOG_LEVELS_PER_UNIT == math.log(127.5)


# ----------------------------------------------------------------------------- the module's held-out bits/dim
GAUSSIAN_DENOISERS = ROOT / "tests" / "gaussian_denoisers.py"


def gaussian_module(objective, target, *likelihood):
    return build_module(load_config(overrides=[
        *TINY_RUN, "model.kind=diffusion", f"loss.objective={objective}",
        f"model.denoiser.target={GAUSSIAN_DENOISERS}:{target}",
        "model.denoiser.kwargs={mean: 0.1, std: 0.3}", *likelihood]))


def quantised_images(count, std=0.3, seed=9):
    """8x8 images of 8-bit pixels quantised from N(MU, std^2), and their exact NLL in bits/dim."""
    index = ((torch.randn(count, 1, 8, 8, generator=generator(seed)) * std + MU + 1) * 127.5).round().clamp(0, 255)
    images = LEVELS[index.long()]
    upper = torch.where(index == 255, 1.0, torch.special.ndtr((images + HALF_BIN - MU) / std))
    lower = torch.where(index == 0, 0.0, torch.special.ndtr((images - HALF_BIN - MU) / std))
    return images.float(), bits_per_dim(-(upper - lower).log().sum().item(), images.numel())


@pytest.mark.parametrize("objective, target, likelihood, low, high", [
    ("flow", "FlowVelocity", ["likelihood.ode_steps=160"], -0.01, 0.01),
    ("eps", "CosineNoise", [], 0.0, 0.8),
])
def test_the_modules_heldout_bits_per_dim_meet_the_gaussians_nll(objective, target, likelihood, low, high):
    """The module with the exact denoiser of Gaussian pixels, scored by the evaluation on two
    held-out batches of quantised Gaussian images: the ODE (flow, auto) within 0.01 bits/dim of
    the exact NLL; the VLB (eps, auto: all 1,000 levels) above it, within DDPM's decoder cost."""
    module = gaussian_module(objective, target, *likelihood)
    images, exact = quantised_images(24)
    batches = [(images[:16], torch.zeros(16)), (images[16:], torch.zeros(8))]
    scored = heldout_likelihood(module, batches)["bits_per_dim"]
    assert low < scored - exact < high, (scored, exact)


def test_the_modules_encoding_is_the_ode_latent_of_each_image():
    """encode_features' `latent` of Gaussian pixels' exact flow: (m + sqrt((c^2 + R^2) / (c^2 + r^2))
    (x - m)) / R per pixel (r, R = likelihood.ratio_min, ratio_max), row i from image i alone."""
    module = gaussian_module("flow", "FlowVelocity", "likelihood.ode_steps=80", "likelihood.ratio_min=0.01",
                             "likelihood.ratio_max=40")
    images, _ = quantised_images(6)
    latent = module.encode_features(images)["latent"]
    expected = (MU + math.sqrt((0.09 + 40.0 ** 2) / (0.09 + 0.01 ** 2)) * (images - MU)) / 40.0
    torch.testing.assert_close(latent, expected.flatten(1), rtol=5e-3, atol=1e-4)
    torch.testing.assert_close(module.encode_features(images[2:4])["latent"], latent[2:4])


@pytest.mark.parametrize("override, key", [
    (["likelihood.method=exact"], "likelihood.method"),
    (["likelihood.ode_steps=0"], "likelihood.ode_steps"),
    (["likelihood.probes=0"], "likelihood.probes"),
    (["likelihood.repeats=0"], "likelihood.repeats"),
    (["loss.timesteps=100", "likelihood.vlb_steps=101"], "likelihood.vlb_steps"),
    (["likelihood.ratio_min=100"], "likelihood.ratio_min"),
    (["loss.schedule=linear", "likelihood.ratio_min=200", "likelihood.ratio_max=300"], "likelihood.ratio_min"),
])
def test_bad_likelihood_settings_stop_with_one_line_naming_the_key(override, key):
    with pytest.raises(ConfigError) as error:
        load_config(overrides=[*TINY_RUN, "model.kind=diffusion", *override])
    assert f"'{key}'" in one_line(error.value)


def test_dgm_scale_encode_writes_a_trained_diffusion_models_latents(tmp_path):
    """`dgm-scale encode` through the family's encode_features: the digits' ODE latents
    [1797, 64] with their labels, the module's own for the same images."""
    run = train(load_config(overrides=[*TINY_RUN, "model.kind=diffusion", "model.denoiser.width=8",
                                       "model.denoiser.channel_mult=[1,2]", "model.denoiser.blocks=1",
                                       "sampler.steps=2", "likelihood.ode_steps=2", f"run.dir={tmp_path / 'run'}"]))
    out = tmp_path / "latents.npz"
    assert main(["encode", str(run.checkpoint), "--data", "builtin:digits", "--batch-size", "256", "--out", str(out)]) == 0
    with np.load(out) as npz:
        assert sorted(npz.files) == ["labels", "latent"] and npz["latent"].shape == (1797, 64)
        latents, labels = npz["latent"], npz["labels"]
    images = to_model_space([raw_to_image(raw, 1, 8) for raw in open_source("builtin:digits", 8, 1).samples()][:5])
    direct = load_module(run.checkpoint).eval().encode_features(images)["latent"]
    np.testing.assert_allclose(latents[:5], direct.numpy(), rtol=1e-5, atol=1e-5)
    assert labels[:5].tolist() == [0, 1, 2, 3, 4] and np.isfinite(latents).all()
