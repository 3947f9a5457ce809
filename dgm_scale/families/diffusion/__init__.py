"""The diffusion family: a denoiser trained to undo Gaussian noise, sampled by integrating from
noise to data; one family for the parameterisations labs use, chosen by `loss.objective`:

- `eps`, `v`: DDPM / variance-preserving (linear or cosine schedule; discrete with
  loss.timesteps = T steps, continuous with 0), the network predicting the noise or v;
- `edm`: Karras et al. 2022's preconditioning (c_skip, c_out, c_in, c_noise), log-normal noise
  levels, EDM loss weighting;
- `flow`: rectified flow / conditional flow matching on the straight path, the network
  predicting the velocity; t uniform or logit-normal.

Its `sampler` section picks how grids, `dgm-scale sample` and evaluations sample (`ddpm`,
`ddim`, `euler`, `heun`, `dpmpp_2m`; steps; classifier-free guidance weight); an EMA of the
denoiser (the GANs' ramped EMA) is what they use, the raw denoiser is scored as `eval_raw/*`.
Its `likelihood` section sets how evaluations score the held-out bits/dim (likelihood.py: the
VLB for eps / v, the probability-flow ODE for edm / flow).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

from dgm_scale.config.schema import OptimizerConfig
from dgm_scale.core.checks import at_least, choice, require
from dgm_scale.families.registry import Family


@dataclass
class DenoiserConfig:
    """The built-in U-Net (nets/unet.py), or your own network by class path: `target` with
    `kwargs`, called as net(noisy x [N, C, H, W], noise level [N], labels [N] or None) -> [N, C, H, W]."""
    arch: str = "unet"  # unet (the only built-in denoiser)
    width: int = 32  # channels of the first level
    channel_mult: List[int] = field(default_factory=lambda: [1, 2, 2])  # width multiplier per level (each halves H, W)
    blocks: int = 2  # residual blocks per level
    attention: List[int] = field(default_factory=lambda: [4])  # resolutions with self-attention
    dropout: float = 0.0  # dropout probability in the residual blocks
    target: Optional[str] = None  # your own denoiser instead of `arch`: package.module:Class or path/to/file.py:Class
    kwargs: Dict[str, Any] = field(default_factory=dict)  # keyword arguments for `target`


@dataclass
class PhemaConfig:
    """Power-function EMAs (EDM2's post-hoc EMA, modules/phema.py) of the denoiser, tracked every
    iteration and saved to RUN/phema/ every `snapshot_every` iterations and at the last one;
    `dgm-scale ema RUN --sigma-rel S` then builds the EMA of any width S from them."""
    snapshot_every: int = 0  # iterations between snapshots; 0 = off (nothing tracked)
    sigma_rels: List[float] = field(default_factory=lambda: [0.05, 0.10])  # the tracked widths (EDM2's)


@dataclass
class DiffusionModelConfig:
    kind: str = "diffusion"  # the model family: a built-in or registered name, or package.module:FAMILY
    module: Optional[str] = None  # your own module class (a DiffusionModule subclass)
    denoiser: DenoiserConfig = field(default_factory=DenoiserConfig)
    num_classes: int = 0  # > 0: class-conditional (a class embedding; "no class" is row K)
    # classifier-free guidance: the share of training samples whose label is dropped to "no class"
    label_dropout: float = 0.0
    ema_decay: float = 0.999  # the EMA denoiser that samples (0 = none); ramped like the GAN's
    ema_rampup: float = 0.05  # the EMA's half-life is at most this fraction of the iterations so far (0 = no ramp)
    phema: PhemaConfig = field(default_factory=PhemaConfig)


@dataclass
class DiffusionLossConfig:
    objective: str = "eps"  # eps | v | edm | flow
    schedule: str = "cosine"  # eps, v: linear | cosine
    timesteps: int = 1000  # eps, v: discrete time with this many steps; 0 = continuous time
    sigma_data: float = 0.5  # edm: the data's standard deviation
    p_mean: float = -1.2  # edm: ln(sigma) ~ N(p_mean, p_std^2) in training
    p_std: float = 1.2  # edm: the standard deviation of ln(sigma) in training
    time_sampling: str = "uniform"  # flow: uniform | logit_normal
    logit_mean: float = 0.0  # flow, logit_normal: t = sigmoid(logit_mean + logit_std * n)
    logit_std: float = 1.0  # flow, logit_normal: the standard deviation of the logit of t


@dataclass
class SamplerConfig:
    """How sample grids, evaluations and `dgm-scale sample` sample (the last: --sampler, --steps, --guidance)."""
    name: str = "heun"  # ddpm | ddim | euler | heun | dpmpp_2m
    steps: int = 18  # noise levels visited (heun evaluates the denoiser about twice per step)
    guidance: float = 1.0  # classifier-free guidance weight w: D_uncond + w (D_cond - D_uncond); 1 = none
    # clamp the denoised estimate D to the data range [-1, 1] at every step (DDPM's clip_denoised):
    # eps-prediction divides by alpha, ~5e-5 at the cosine schedule's first level
    clip_denoised: bool = True
    eta: float = 0.0  # ddim: 0 deterministic .. 1 ancestral
    churn: float = 0.0  # heun: EDM's S_churn (0 = deterministic)
    churn_min: float = 0.05  # heun: churn only where sigma / alpha is in [churn_min, churn_max]
    churn_max: float = 50.0  # heun: the upper end of churn's range of sigma / alpha
    churn_noise: float = 1.003  # heun: EDM's S_noise
    sigma_min: float = 0.002  # edm: the lowest noise level of the sampling grid
    sigma_max: float = 80.0  # edm: the highest noise level of the sampling grid (where sampling starts)
    rho: float = 7.0  # edm: the grid's spacing exponent (larger: more steps at low noise)


@dataclass
class LikelihoodConfig:
    """The held-out bits/dim of evaluations (families/diffusion/likelihood.py); its cost is
    about (vlb_steps, or 2 ode_steps x (1 + probes)) denoiser passes x repeats per held-out batch."""
    method: str = "auto"  # auto (vlb for eps / v, ode for edm / flow) | vlb | ode | none (no bits/dim)
    vlb_steps: int = 0  # vlb: the ddpm sampler's levels it bounds; 0 = loss.timesteps (discrete), else 1000
    ode_steps: int = 100  # ode: Heun steps from ratio_min to ratio_max
    probes: int = 1  # ode: Rademacher probes of Hutchinson's trace estimator per image
    repeats: int = 1  # draws per image averaged (vlb: noise; ode: dequantisation and probes)
    # ode (and encode): the range [ratio_min, ratio_max] of sigma / alpha it integrates over,
    # within the model's own
    ratio_min: float = 0.002
    ratio_max: float = 80.0  # ode (and encode): the upper end of the range (see ratio_min)


@dataclass
class DiffusionOptimConfig(OptimizerConfig):
    lr: float = 2e-4
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])


def validate_sampler(sampler: Any, loss: Any, model: Any, key: str = "sampler") -> None:
    """The sampler settings (`key`: `sampler`, or the CLI's names) against the model's."""
    from dgm_scale.families.diffusion.samplers import SAMPLERS

    choice(f"{key}.name", sampler.name, sorted(SAMPLERS))
    at_least(f"{key}.steps", sampler.steps, 1)
    discrete = loss.objective in ("eps", "v") and loss.timesteps > 0
    require(not discrete or sampler.steps <= loss.timesteps,
            f"config key '{key}.steps': {sampler.steps} steps is more than the model's loss.timesteps = {loss.timesteps}")
    at_least(f"{key}.guidance", sampler.guidance, 0.0)
    require(sampler.guidance == 1.0 or (model.num_classes > 0 and model.label_dropout > 0),
            f"config key '{key}.guidance': guidance {sampler.guidance} needs a class-conditional model trained "
            f"with label dropout (model.num_classes > 0, model.label_dropout > 0); 1 = no guidance")
    require(0.0 <= sampler.eta <= 1.0, f"config key '{key}.eta' must be in [0, 1], got {sampler.eta}")
    at_least(f"{key}.churn", sampler.churn, 0.0)
    require(sampler.churn_noise > 0, f"config key '{key}.churn_noise' must be > 0, got {sampler.churn_noise}")
    require(0 < sampler.sigma_min < sampler.sigma_max,
            f"config key '{key}.sigma_min' must be > 0 and below sampler.sigma_max, got {sampler.sigma_min}")
    require(sampler.rho > 0, f"config key '{key}.rho' must be > 0, got {sampler.rho}")


#: likelihood.vlb_steps = 0 on a continuous-time model
DEFAULT_VLB_STEPS = 1000


def likelihood_method(likelihood: Any, loss: Any) -> str:
    """vlb | ode | none: `likelihood.method`, auto resolved by the objective."""
    if likelihood.method != "auto":
        return likelihood.method
    return "vlb" if loss.objective in ("eps", "v") else "ode"


def vlb_steps(likelihood: Any, loss: Any) -> int:
    discrete = loss.objective in ("eps", "v") and loss.timesteps > 0
    return likelihood.vlb_steps or (loss.timesteps if discrete else DEFAULT_VLB_STEPS)


def validate_likelihood(likelihood: Any, loss: Any, sampler: Any) -> None:
    choice("likelihood.method", likelihood.method, ["auto", "vlb", "ode", "none"])
    at_least("likelihood.vlb_steps", likelihood.vlb_steps, 0)
    discrete = loss.objective in ("eps", "v") and loss.timesteps > 0
    require(not discrete or likelihood.vlb_steps <= loss.timesteps,
            f"config key 'likelihood.vlb_steps': {likelihood.vlb_steps} levels is more than the model's "
            f"loss.timesteps = {loss.timesteps}")
    for key in ("ode_steps", "probes", "repeats"):
        at_least(f"likelihood.{key}", getattr(likelihood, key), 1)
    require(0 < likelihood.ratio_min < likelihood.ratio_max,
            f"config key 'likelihood.ratio_min' must be > 0 and below likelihood.ratio_max, got {likelihood.ratio_min}")
    from dgm_scale.core.errors import ConfigError
    from dgm_scale.families.diffusion.likelihood import ratio_bounds
    from dgm_scale.families.diffusion.processes import build_process

    import torch

    try:
        # on the CPU whatever device a caller builds under (a meta-device build sizes the networks)
        with torch.device("cpu"):
            ratio_bounds(build_process(loss, sampler), likelihood.ratio_min, likelihood.ratio_max)
    except ValueError as error:
        raise ConfigError(str(error)) from None


def validate_phema(phema: Any) -> None:
    from dgm_scale.modules.phema import MAX_SIGMA_REL

    at_least("model.phema.snapshot_every", phema.snapshot_every, 0)
    require(len(phema.sigma_rels) > 0, "config key 'model.phema.sigma_rels' needs at least one width")
    for width in phema.sigma_rels:
        require(0 < width <= MAX_SIGMA_REL, f"config key 'model.phema.sigma_rels': {width} is not in "
                                            f"(0, {MAX_SIGMA_REL:.4f}] (1/sqrt(12): the average of the whole run)")
    require(len(set(phema.sigma_rels)) == len(phema.sigma_rels),
            f"config key 'model.phema.sigma_rels': {list(phema.sigma_rels)} repeats a width")


def validate(cfg: Any) -> None:
    from dgm_scale.losses.diffusion import OBJECTIVES
    from dgm_scale.modules.optim import validate_optimizer
    from dgm_scale.nets.unet import validate_unet

    model, loss = cfg.model, cfg.loss
    denoiser = model.denoiser
    if denoiser.target:
        require(":" in str(denoiser.target), f"config key 'model.denoiser.target': '{denoiser.target}' is not of the "
                                             "form package.module:Class or path/to/file.py:Class")
    else:
        validate_unet("model.denoiser", denoiser, cfg.data.resolution)
    choice("loss.objective", loss.objective, sorted(OBJECTIVES))
    choice("loss.schedule", loss.schedule, ["linear", "cosine"])
    at_least("loss.timesteps", loss.timesteps, 0)
    require(loss.sigma_data > 0, f"config key 'loss.sigma_data' must be > 0, got {loss.sigma_data}")
    require(loss.p_std > 0, f"config key 'loss.p_std' must be > 0, got {loss.p_std}")
    choice("loss.time_sampling", loss.time_sampling, ["uniform", "logit_normal"])
    require(loss.logit_std > 0, f"config key 'loss.logit_std' must be > 0, got {loss.logit_std}")
    at_least("model.num_classes", model.num_classes, 0)
    require(0.0 <= model.label_dropout < 1.0, f"config key 'model.label_dropout' must be in [0, 1), got {model.label_dropout}")
    require(model.label_dropout == 0 or model.num_classes > 0,
            "config key 'model.label_dropout': label dropout is for class-conditional models (model.num_classes > 0)")
    require(0.0 <= model.ema_decay < 1.0, f"config key 'model.ema_decay' must be in [0, 1), got {model.ema_decay}")
    at_least("model.ema_rampup", model.ema_rampup, 0)
    validate_phema(model.phema)
    validate_sampler(cfg.sampler, loss, model)
    validate_likelihood(cfg.likelihood, loss, cfg.sampler)
    validate_optimizer("optim", cfg.optim)


def objective_label(setting: Callable[..., Any]) -> str:
    objective = setting("loss.objective")
    if objective in ("eps", "v"):
        steps = setting("loss.timesteps")
        time = f"{steps} discrete steps" if steps else "continuous time"
        return f"{objective}-prediction, VP {setting('loss.schedule')} schedule, {time}"
    if objective == "edm":
        return f"EDM preconditioning, sigma_data {setting('loss.sigma_data')}, ln sigma ~ N({setting('loss.p_mean')}, " \
               f"{setting('loss.p_std')}^2)"
    return f"flow matching (straight path, velocity), t {setting('loss.time_sampling')}"


def sampler_label(setting: Callable[..., Any]) -> str:
    guidance = setting("sampler.guidance")
    return f"{setting('sampler.name')}, {setting('sampler.steps')} steps" + \
        (f", guidance {guidance}" if guidance not in (None, 1.0) else "")


def likelihood_label(setting: Callable[..., Any]) -> str:
    method = setting("likelihood.method", "auto")
    if method == "auto":
        method = "vlb" if setting("loss.objective") in ("eps", "v") else "ode"
    if method == "vlb":
        steps = setting("likelihood.vlb_steps", 0) or "all"
        return f"VLB over {steps} levels, discretised Gaussian decoder (an upper bound)"
    if method == "ode":
        return f"probability-flow ODE, {setting('likelihood.ode_steps', 100)} Heun steps, Hutchinson " \
               f"({setting('likelihood.probes', 1)} probe(s)), uniform dequantisation (an estimated upper bound)"
    return "none"


def _denoiser_label(setting: Callable[..., Any]) -> str:
    target = setting("model.denoiser.target")
    if target:
        return str(target).rsplit("/", 1)[-1]
    return f"U-Net width {setting('model.denoiser.width')} x {setting('model.denoiser.channel_mult')}"


def _phema_label(setting: Callable[..., Any]) -> str:
    every = setting("model.phema.snapshot_every") or 0
    if not every:
        return "off"
    return f"power-function EMAs of sigma_rel {setting('model.phema.sigma_rels')}, snapshots every {every} " \
           "iterations in phema/ (dgm-scale ema)"


def describe(setting: Callable[..., Any]) -> List[Tuple[str, str]]:
    classes, ema = setting("model.num_classes") or 0, setting("model.ema_decay") or 0
    return [("model", f"diffusion: {_denoiser_label(setting)}" + (f", {classes} classes, label dropout "
                                                                 f"{setting('model.label_dropout')}" if classes else "")),
            ("loss", objective_label(setting)),
            ("sampler", sampler_label(setting)),
            ("held-out likelihood", likelihood_label(setting)),
            ("EMA of the denoiser", f"decay up to {ema}, ramp-up {setting('model.ema_rampup', 0)}" if ema else "none"),
            ("post-hoc EMA", _phema_label(setting)),
            ("optimizer", f"{setting('optim.name')} lr {setting('optim.lr')}")]


def summary(setting: Callable[..., Any]) -> str:
    return f"diffusion, {objective_label(setting)}; {_denoiser_label(setting)}; sampler {sampler_label(setting)}"


def _report_charts(run_dir: Any) -> list:
    from dgm_scale.families.diffusion.posthoc import fid_chart

    return fid_chart(run_dir)


FAMILY = Family(
    name="diffusion",
    description="a denoiser trained to undo Gaussian noise (eps, v, EDM or flow matching), sampled from noise",
    model=DiffusionModelConfig, loss=DiffusionLossConfig, optim=DiffusionOptimConfig,
    module="dgm_scale.families.diffusion.module:DiffusionModule",
    validate=validate, describe=describe, summary=summary,
    modalities=("images",),
    chart_groups=(("loss_by_noise", "Training loss by noise level sigma / alpha (rank 0's batch)",
                   lambda k: k.startswith("train/loss_sigma_")),),
    sections={"sampler": SamplerConfig, "likelihood": LikelihoodConfig},
    sampler_names={"": "EMA denoiser", "raw": "raw denoiser"},
    report_charts=_report_charts,
)
