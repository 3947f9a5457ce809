"""The GAN family: a generator against a discriminator / critic under an adversarial loss.

Every GAN variant (minimax, non-saturating, LSGAN, WGAN, WGAN-GP, hinge) is this one family with
a different `loss` block; an exponential moving average of G (ramped, with batch-norm statistics
of its own: modules/ema.py) is what `sample` and `eval/*` use, the raw G is scored as `eval_raw/*`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, List, Optional, Tuple

from dgm_scale.config.schema import NetConfig, OptimizerConfig
from dgm_scale.core.checks import at_least, choice, require
from dgm_scale.families.registry import Family


@dataclass
class AdversarialModelConfig:
    """The `model` section of a family of a generator against a discriminator (the GAN, the SSGAN)."""
    kind: str = "gan"  # the model family: a built-in or registered name, or package.module:FAMILY
    module: Optional[str] = None  # your own module class (a subclass of the family's): package.module:Class
    latent_dim: int = 64  # size of the latent vector z that G maps to a sample
    generator: NetConfig = field(default_factory=NetConfig)  # G: maps a latent z (and a class) to a sample
    discriminator: NetConfig = field(default_factory=NetConfig)  # D: scores samples as real or fake (the critic)
    # > 0 keeps an exponential moving average of G for sampling and evaluation. The decay is at
    # most ema_decay (0.999: a half-life of ~693 iterations), and early on less: the half-life is
    # at most ema_rampup x the iterations so far (StyleGAN2-ADA's ramp; 0 = the fixed decay).
    ema_decay: float = 0.999
    ema_rampup: float = 0.05  # the EMA's half-life is at most this fraction of the iterations so far (0 = no ramp)
    # batches of data.batch_size latents that recompute the EMA generator's batch-norm statistics
    # for its own weights before it samples (modules/ema.py: standing statistics); 0 = copy the
    # raw generator's statistics instead (the old behaviour, worse: kept for comparison)
    ema_bn_batches: int = 32


@dataclass
class GANModelConfig(AdversarialModelConfig):
    num_classes: int = 0  # > 0: class-conditional G (embedding) and D (projection)


@dataclass
class GANLossConfig:
    name: str = "nonsaturating"  # minimax | nonsaturating | lsgan | wasserstein | hinge
    n_critic: int = 1  # discriminator steps per generator step
    gp_weight: float = 0.0  # WGAN-GP gradient penalty lambda (0 = off)
    clip_value: float = 0.0  # WGAN weight clipping bound c (0 = off)
    lsgan_a: float = 0.0  # LSGAN target for fake images in D's loss
    lsgan_b: float = 1.0  # LSGAN target for real images in D's loss
    lsgan_c: float = 1.0  # LSGAN target G wants D to output on fakes
    # R1 (Mescheder et al. 2018): gamma / 2 * E||grad_x D(real)||^2 (0 = off), applied every
    # r1_interval-th discriminator step with weight x r1_interval (lazy regularisation)
    r1_gamma: float = 0.0
    r1_interval: int = 1  # R1 every this many discriminator steps, its weight multiplied by it (1 = every step)
    # LeCam (Tseng et al. 2021): lambda * (E(D(real) - a_fake)^2 + E(D(fake) - a_real)^2), a_* the
    # moving averages (decay lecam_decay) of D's mean outputs (0 = off)
    lecam_weight: float = 0.0
    lecam_decay: float = 0.99  # decay of LeCam's moving averages a_real, a_fake of D's outputs


@dataclass
class AugConfig:
    """What D sees: DiffAugment's policies (always) and / or ADA's pipeline (probability p)."""
    policy: List[str] = field(default_factory=list)  # DiffAugment: color, translation, cutout (combinable)
    ada: bool = False  # adaptive discriminator augmentation
    # ADA's operations, applied in the order listed: any of xflip, rotate90, translation, color, cutout
    ada_ops: List[str] = field(default_factory=lambda: ["xflip", "rotate90", "translation", "color"])
    ada_target: float = 0.6  # the r_t = E[sign(D(real))] that p is adjusted towards
    ada_kimg: float = 100.0  # thousands of real images over which p can move by 1 (0 = p stays ada_p)
    ada_interval: int = 4  # discriminator steps between adjustments
    ada_p: float = 0.0  # p at the start


@dataclass
class GANOptimConfig:
    g: OptimizerConfig = field(default_factory=OptimizerConfig)  # generator
    d: OptimizerConfig = field(default_factory=OptimizerConfig)  # discriminator / critic


def validate(cfg: Any) -> None:
    from dgm_scale.losses.adversarial import ADVERSARIAL_LOSSES

    model, loss = cfg.model, cfg.loss
    validate_adversarial(cfg)
    choice("loss.name", loss.name, sorted(ADVERSARIAL_LOSSES))
    at_least("loss.gp_weight", loss.gp_weight, 0)
    at_least("loss.clip_value", loss.clip_value, 0)
    # Batch norm couples the samples of a batch, so the per-sample gradient the penalty constrains
    # is no longer the critic's gradient (Gulrajani et al. 2017, sec. 4): reject it outright.
    uses_norm = not model.discriminator.target and model.discriminator.arch != "stylegan2"
    require(not (loss.gp_weight > 0 and uses_norm and model.discriminator.norm == "batch"),
            "config key 'model.discriminator.norm': batch norm is invalid in a WGAN-GP critic "
            "(loss.gp_weight > 0); use layer, instance or none")
    at_least("loss.r1_gamma", loss.r1_gamma, 0)
    at_least("loss.r1_interval", loss.r1_interval, 1)
    at_least("loss.lecam_weight", loss.lecam_weight, 0)
    require(0.0 <= loss.lecam_decay < 1.0, f"config key 'loss.lecam_decay' must be in [0, 1), got {loss.lecam_decay}")
    at_least("model.num_classes", model.num_classes, 0)


def validate_adversarial(cfg: Any) -> None:
    """What every generator-against-discriminator family checks: both networks and optimizers,
    `loss.n_critic`, the augmentation, the EMA and the latent size."""
    from dgm_scale.data.config import modality_of
    from dgm_scale.modules.optim import validate_optimizer
    from dgm_scale.nets.config import validate_net

    model = cfg.model
    modality = modality_of(cfg.data.name)
    for key in ("generator", "discriminator"):
        validate_net(f"model.{key}", model[key], modality)
    for key in ("g", "d"):
        validate_optimizer(f"optim.{key}", cfg.optim[key])
    at_least("loss.n_critic", cfg.loss.n_critic, 1)
    validate_aug(cfg.aug, modality)
    require(0.0 <= model.ema_decay < 1.0, f"config key 'model.ema_decay' must be in [0, 1), got {model.ema_decay}")
    at_least("model.ema_rampup", model.ema_rampup, 0)
    at_least("model.ema_bn_batches", model.ema_bn_batches, 0)
    at_least("model.latent_dim", model.latent_dim, 1)


def validate_aug(aug: Any, modality: str) -> None:
    from dgm_scale.augment import ADA_OPS, POLICIES

    unknown = [name for name in aug.policy if name not in POLICIES]
    require(not unknown, f"config key 'aug.policy': unknown DiffAugment policy {unknown}; known: {', '.join(POLICIES)}")
    unknown = [name for name in aug.ada_ops if name not in ADA_OPS]
    require(not unknown, f"config key 'aug.ada_ops': unknown ADA op {unknown}; known: {', '.join(ADA_OPS)}")
    require(0.0 <= aug.ada_p <= 1.0, f"config key 'aug.ada_p' must be in [0, 1], got {aug.ada_p}")
    require(-1.0 <= aug.ada_target <= 1.0, f"config key 'aug.ada_target' must be in [-1, 1], got {aug.ada_target}")
    at_least("aug.ada_kimg", aug.ada_kimg, 0)
    at_least("aug.ada_interval", aug.ada_interval, 1)
    require(modality == "images" or not (aug.policy or aug.ada),
            "config key 'aug': augmentation is for images, not the 2-D toy data")


def net_label(setting: Callable[..., Any], key: str) -> str:
    target = setting(f"model.{key}.target")
    if target:
        return str(target).rsplit("/", 1)[-1]
    return f"{setting(f'model.{key}.arch')} (width {setting(f'model.{key}.width')})"


def describe(setting: Callable[..., Any]) -> List[Tuple[str, str]]:
    extras = [f"n_critic {setting('loss.n_critic')}" if (setting("loss.n_critic") or 1) > 1 else "",
              f"gradient penalty {setting('loss.gp_weight')}" if setting("loss.gp_weight") else "",
              f"clipping {setting('loss.clip_value')}" if setting("loss.clip_value") else ""]
    classes = setting("model.num_classes") or 0
    ema, augmentation, optimizer = adversarial_rows(setting)
    return [("model", f"GAN: G {net_label(setting, 'generator')}, D {net_label(setting, 'discriminator')}, "
                      f"latent {setting('model.latent_dim')}" + (f", {classes} classes" if classes else "")),
            ("loss", ", ".join([str(setting("loss.name"))] + [e for e in extras if e])),
            ema,
            ("regularisers", ", ".join(part for part in (
                f"R1 gamma {setting('loss.r1_gamma')} every {setting('loss.r1_interval', 1)}" if setting("loss.r1_gamma") else "",
                f"LeCam {setting('loss.lecam_weight')}" if setting("loss.lecam_weight") else "") if part) or "none"),
            augmentation,
            optimizer]


def adversarial_rows(setting: Callable[..., Any]) -> List[Tuple[str, str]]:
    """The report rows every generator-against-discriminator family has: G's EMA, the
    augmentation and the two optimizers."""
    ema = setting("model.ema_decay") or 0
    return [("EMA of G", f"decay up to {ema}, ramp-up {setting('model.ema_rampup', 0)}" if ema else "none"),
            ("augmentation", augmentation_label(setting)),
            ("optimizer", f"G {setting('optim.g.name')} lr {setting('optim.g.lr')}, "
                          f"D {setting('optim.d.name')} lr {setting('optim.d.lr')}")]


def augmentation_label(setting: Callable[..., Any]) -> str:
    parts = [f"DiffAugment {'+'.join(setting('aug.policy'))}"] if setting("aug.policy") else []
    if setting("aug.ada"):
        parts.append(f"ADA ({', '.join(setting('aug.ada_ops') or [])}; target r_t {setting('aug.ada_target')})")
    return ", ".join(parts) or "none"


def summary(setting: Callable[..., Any]) -> str:
    return f"GAN, {setting('loss.name')} loss, G {net_label(setting, 'generator')}, D {net_label(setting, 'discriminator')}"


FAMILY = Family(
    name="gan",
    description="a generator trained against a discriminator under an adversarial loss",
    model=GANModelConfig, loss=GANLossConfig, optim=GANOptimConfig,
    module="dgm_scale.families.gan.module:GANModule",
    validate=validate, describe=describe, summary=summary,
    modalities=("images", "points"),
    chart_groups=(("critic_outputs", "Critic outputs: mean D(real), D(fake), Wasserstein estimate",
                   lambda k: k in ("train/d_real", "train/d_fake", "train/wasserstein")),
                  ("augmentation", "ADA: augmentation probability p and r_t = E[sign(D(real))]",
                   lambda k: k in ("aug/p", "aug/rt"))),
    sections={"aug": AugConfig},
    sampler_names={"": "EMA generator", "raw": "raw generator"},
)
