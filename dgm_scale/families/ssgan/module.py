"""The semi-supervised GAN module: the GAN's networks, EMA, augmentation and iteration
(`AdversarialModule`) with D as a K-class classifier (see the family's docstring).

The losses are pure functions of D's class logits [N, K] (float32): the implicit fake class has
logit 0, so log p(real | x) = lse - softplus(lse) with lse = logsumexp_k l_k.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dgm_scale.core.errors import ConfigError
from dgm_scale.data.labels import HIDDEN
from dgm_scale.families.gan.module import AdversarialModule, frozen
from dgm_scale.nets import discriminator_features


# ----------------------------------------------------------------------------- losses
def d_unsupervised_loss(real_logits: Tensor, fake_logits: Tensor) -> Tensor:
    """-E log D(x) - E log(1 - D(G(z))) with D(x) = Z / (Z + 1), Z = sum_k exp(l_k):
    softplus(-lse) on real images and softplus(lse) on fakes (batch means)."""
    return F.softplus(-real_logits.logsumexp(1)).mean() + F.softplus(fake_logits.logsumexp(1)).mean()


def d_supervised_loss(real_logits: Tensor, labels: Tensor) -> Tensor:
    """Cross-entropy of the K class logits over the labelled images (label >= 0; HIDDEN ones
    are left out), their mean; 0 for a batch without any. No host sync: a masked mean."""
    known = labels != HIDDEN
    per_image = F.cross_entropy(real_logits, labels.clamp(min=0), reduction="none")
    return (per_image * known).sum() / known.sum().clamp(min=1)


def g_feature_matching_loss(real_features: Tensor, fake_features: Tensor) -> Tensor:
    """|| E f(x) - E f(G(z)) ||^2 / F over D's features [N, F] (the paper's feature matching)."""
    return (real_features.mean(0) - fake_features.mean(0)).square().mean()


def g_nonsaturating_loss(fake_logits: Tensor) -> Tensor:
    """-E log D(G(z)) = softplus(-lse) on fakes."""
    return F.softplus(-fake_logits.logsumexp(1)).mean()


def labelled_accuracy(logits: Tensor, labels: Tensor) -> Tensor:
    """The share of the labelled images (label >= 0) whose largest logit is their class; NaN
    when none is labelled."""
    known = labels != HIDDEN
    return ((logits.argmax(1) == labels) & known).sum() / known.sum()


# ----------------------------------------------------------------------------- module
class SSGANModule(AdversarialModule):
    heldout_score_names = ("test_accuracy",)

    @property
    def discriminator_outputs(self) -> int:
        return int(self.cfg.model.classes)

    def _build_discriminator(self) -> nn.Module:
        discriminator = super()._build_discriminator()
        if not all(isinstance(getattr(discriminator, part, None), nn.Module) for part in ("body", "head")):
            raise ConfigError(f"config key 'model.discriminator.target': {self.cfg.model.discriminator.target} has no "
                              "`body` (x -> features [N, F]) and `head` (features -> the K class logits) sub-modules; "
                              "the ssgan family needs both (feature matching reads the body's features)")
        return discriminator

    def label_classes(self) -> Tuple[str, int]:
        return "model.classes", self.discriminator_outputs

    def step_labels(self, labels: Tensor) -> Tensor:
        return labels  # every step sees them: HIDDEN (-1) where data.labels_per_class hid them

    # ------------------------------------------------------------------ D as a classifier
    def classify(self, images: Tensor) -> Tuple[Tensor, Tensor]:
        """D's class logits [N, K] and penultimate features [N, F] (float32: see GANModule._critic)
        for images as D sees them in training (augmented)."""
        features = self.compiled("discriminator.body")(self.augmented(images)).flatten(1)
        return self.compiled("discriminator.head")(features).float(), features.float()

    def encode_features(self, images: Tensor, labels: Optional[Tensor] = None) -> Dict[str, Tensor]:
        """`features`: D's penultimate layer [N, F] (as the GAN's); `logits`: its K class logits."""
        features = discriminator_features(self.discriminator, images.to(self.device))
        return {"features": features.float(), "logits": self.discriminator.head(features).float()}

    @torch.no_grad()
    def heldout_scores(self, batch) -> Dict[str, Tuple[Tensor, int]]:
        """Correct predictions of D (eval mode, no augmentation) on a held-out batch."""
        images, labels = batch[0].to(self.device), batch[1].to(self.device)
        was_training = self.discriminator.training
        self.discriminator.eval()
        try:
            logits = self.encode_features(images)["logits"]
        finally:
            self.discriminator.train(was_training)
        return {"test_accuracy": ((logits.argmax(1) == labels).sum(), labels.numel())}

    # ------------------------------------------------------------------ training
    def discriminator_step(self, real_images: Tensor, labels: Optional[Tensor], opt,
                           with_logs: bool = True, step_index: int = 0) -> Dict[str, Tensor]:
        with torch.no_grad():  # G gets no gradient from D's loss: skip its graph entirely
            fake_images = self.compiled("generator")(self.draw_noise(real_images.shape[0], self.latent_dim), None)
        real_logits, _ = self.classify(real_images)
        fake_logits, _ = self.classify(fake_images)
        real_in_loss, fake_in_loss = self.passes_apart(real_logits, fake_logits)
        supervised = d_supervised_loss(real_in_loss, labels)
        unsupervised = d_unsupervised_loss(real_in_loss, fake_in_loss)
        loss = self.cfg.loss
        d_loss = loss.supervised_weight * supervised + loss.unsupervised_weight * unsupervised
        real_lse = real_logits.detach().logsumexp(1)
        if self.augmenter is not None:
            self.augmenter.accumulate(real_lse)
        opt.zero_grad(set_to_none=True)
        self.manual_backward(d_loss, opt)
        skipped = self.guarded_step(d_loss, opt, self.discriminator, "discriminator")
        if not with_logs:
            return {}
        return {"d_loss": d_loss.detach(), "d_supervised": supervised.detach(), "d_unsupervised": unsupervised.detach(),
                "d_real": real_lse.mean(), "d_fake": fake_logits.detach().logsumexp(1).mean(),
                "labelled_accuracy": labelled_accuracy(real_logits.detach(), labels),
                "d_grad_norm": self._stepped_norm(skipped, opt, self.discriminator)}

    def generator_step(self, real_images: Tensor, labels: Optional[Tensor], opt,
                       with_logs: bool = True) -> Dict[str, Tensor]:
        fake_images = self.compiled("generator")(self.draw_noise(real_images.shape[0], self.latent_dim), None)
        with frozen(self.discriminator):
            fake_logits, fake_features = self.classify(fake_images)
            if self.cfg.loss.generator == "feature_matching":
                with torch.no_grad():  # the target: D's (updated) features of this iteration's real batch
                    _, real_features = self.classify(real_images)
                g_loss = g_feature_matching_loss(real_features, fake_features)
            else:
                g_loss = g_nonsaturating_loss(fake_logits)
        return self.step_generator(g_loss, opt, with_logs)
