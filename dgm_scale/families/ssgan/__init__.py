"""The semi-supervised GAN family (Salimans et al. 2016, "Improved techniques for training GANs",
sec. 5; the survey's reference 4): a GAN whose discriminator is also the classifier.

D has K class outputs l_1..l_K and an implicit (K+1)-th "fake" logit fixed at 0, so
p(real | x) = Z / (Z + 1) with Z = sum_k exp(l_k): D's real-vs-fake logit is logsumexp(l).
D's loss is the cross-entropy of the labelled real images (`data.labels_per_class` keeps K per
class, the others are labelled -1) plus the unsupervised GAN loss on every real image and the
fakes; G matches the mean of D's penultimate features on real images (feature matching, the
paper's choice for classification) or takes the non-saturating loss (`loss.generator: nsgan`).
The classifier's accuracy on the held-out split is the evaluation's `eval/test_accuracy`.

Why this and not the M2 model of Kingma et al. (2014): the semi-supervised GAN is the GAN family
plus one loss - it reuses its networks (D with K outputs), G's EMA and its standing statistics,
the augmentation of everything D sees, and one DDP / DeepSpeed engine per network, and its
classifier is D itself, so nothing new has to be built or kept in step. M2 would need a
classifier network q(y|x), a class-conditional encoder and decoder and a sum over the K classes
of the unlabelled ELBO (K decoder passes per unlabelled image); and on MNIST with 100 labels the
paper reports a lower error (feature matching: 0.93% against M1+M2's 3.33%).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, List, Tuple

from dgm_scale.core.checks import at_least, choice, require
from dgm_scale.families.gan import FAMILY as GAN
from dgm_scale.families.gan import (AdversarialModelConfig, GANOptimConfig, adversarial_rows, net_label,
                                    validate_adversarial)
from dgm_scale.families.registry import Family

GENERATOR_LOSSES = ("feature_matching", "nsgan")


@dataclass
class SSGANModelConfig(AdversarialModelConfig):
    kind: str = "ssgan"  # the model family: a built-in or registered name, or package.module:FAMILY
    # K: the classes D tells apart (its K outputs); must be the training data's classes. G is
    # unconditional (samples are not asked for a class).
    classes: int = 10


@dataclass
class SSGANLossConfig:
    # G's loss: feature_matching (|| mean f(real) - mean f(fake) ||^2 over D's penultimate
    # features, the paper's choice for classification) | nsgan (-log D(G(z)), non-saturating)
    generator: str = "feature_matching"
    supervised_weight: float = 1.0  # weight of the labelled images' cross-entropy in D's loss
    unsupervised_weight: float = 1.0  # weight of the real-vs-fake loss in D's loss
    n_critic: int = 1  # discriminator steps per generator step


def validate(cfg: Any) -> None:
    from dgm_scale.data.datasets import STREAM_DATASETS

    validate_adversarial(cfg)
    loss = cfg.loss
    choice("loss.generator", loss.generator, GENERATOR_LOSSES)
    at_least("loss.supervised_weight", loss.supervised_weight, 0)
    at_least("loss.unsupervised_weight", loss.unsupervised_weight, 0)
    at_least("model.classes", cfg.model.classes, 2)
    require(cfg.data.val_fraction > 0 or cfg.data.name in STREAM_DATASETS,
            "config key 'data.val_fraction': the ssgan family's classifier is tested on the held-out split; "
            "it must be > 0")


def describe(setting: Callable[..., Any]) -> List[Tuple[str, str]]:
    per_class = setting("data.labels_per_class")
    return [("model", f"semi-supervised GAN: G {net_label(setting, 'generator')}, D {net_label(setting, 'discriminator')} "
                      f"with {setting('model.classes')} class outputs, latent {setting('model.latent_dim')}"),
            ("labels", f"{per_class} per class, the rest hidden" if per_class else "every training label"),
            ("loss", f"D: {setting('loss.supervised_weight')} x cross-entropy + {setting('loss.unsupervised_weight')} x "
                     f"real/fake; G: {setting('loss.generator')}"),
            *adversarial_rows(setting)]


def summary(setting: Callable[..., Any]) -> str:
    per_class = setting("data.labels_per_class")
    return (f"semi-supervised GAN, {setting('model.classes')} classes, "
            f"{f'{per_class} labels per class' if per_class else 'every label'}, G loss {setting('loss.generator')}, "
            f"G {net_label(setting, 'generator')}, D {net_label(setting, 'discriminator')}")


FAMILY = Family(
    name="ssgan",
    description="a semi-supervised GAN: the discriminator classifies K classes and tells real from fake",
    model=SSGANModelConfig, loss=SSGANLossConfig, optim=GANOptimConfig,
    module="dgm_scale.families.ssgan.module:SSGANModule",
    validate=validate, describe=describe, summary=summary,
    modalities=("images",),
    chart_groups=(("semi_supervised", "D's loss terms and its accuracy on the labelled images of its batches",
                   lambda k: k in ("train/d_supervised", "train/d_unsupervised", "train/labelled_accuracy")),
                  ("critic_outputs", "D's real-vs-fake logit (logsumexp of the class logits): real, fake",
                   lambda k: k in ("train/d_real", "train/d_fake")),
                  *(group for group in GAN.chart_groups if group[0] == "augmentation")),
    sections=GAN.sections,
    sampler_names=GAN.sampler_names,
)
