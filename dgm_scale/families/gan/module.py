"""The GAN Lightning module: composes G, D, an adversarial loss pair and the regularisers.

`AdversarialModule` is what it shares with the other generator-against-discriminator family
(families/ssgan): the networks, G's EMA, augmentation and the iteration; `GANModule` adds the
adversarial loss pair and the regularisers.

Manual optimisation: per iteration, `n_critic` discriminator steps, each on its own real batch,
then one generator step. Every image D sees - real and fake, in D's and G's steps, and inside
the gradient penalty / R1 - goes through the augmentation (`aug`: DiffAugment, ADA) with noise
keyed to the iteration. The EMA generator (see modules/ema.py) is updated after every applied
G step with a ramped decay; its batch-norm statistics are recomputed for its own weights before
it samples and before every checkpoint.
"""
from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Dict, Iterator, Optional

import torch
from torch import Tensor, nn

from dgm_scale.distributed.interface import step_interface
from dgm_scale.distributed.strategy import all_reduce_on_device
from dgm_scale.augment import AdaptiveProbability, Augmenter
from dgm_scale.losses import build_adversarial_loss, clip_weights, gradient_penalty
from dgm_scale.losses.regularizers import lecam_penalty, r1_penalty
from dgm_scale.losses.adversarial import wasserstein_estimate
from dgm_scale.modules.base import LatentModule
from dgm_scale.modules.ema import make_ema_copy, ramped_decay, standing_statistics, update_ema
from dgm_scale.modules.optim import build_optimizer
from dgm_scale.modules.sampling import keyed_noise
from dgm_scale.nets import build_discriminator, build_generator, discriminator_features
from dgm_scale.nets.custom import build_network, check_network

log = logging.getLogger(__name__)

#: the latent sequence the EMA generator's standing statistics are computed from
STATISTICS_SEED = 2_718_281


class LeCamAnchors(nn.Module):
    """Moving averages of D's mean output on real and fake images (buffers: checkpointed)."""

    def __init__(self, decay: float):
        super().__init__()
        self.decay = decay
        self.register_buffer("real", torch.zeros(()))
        self.register_buffer("fake", torch.zeros(()))

    @torch.no_grad()
    def update(self, real_mean: Tensor, fake_mean: Tensor) -> None:
        self.real.lerp_(real_mean.float(), 1.0 - self.decay)
        self.fake.lerp_(fake_mean.float(), 1.0 - self.decay)


def build_augmenter(aug) -> Optional[Augmenter]:
    """The `aug` section's Augmenter (None when nothing is augmented)."""
    ada = AdaptiveProbability(aug.ada_target, aug.ada_kimg * 1000.0, aug.ada_interval, aug.ada_p) if aug.ada else None
    augmenter = Augmenter(aug.policy, aug.ada_ops, ada)
    return augmenter if augmenter.enabled or ada is not None else None


@contextmanager
def frozen(net: nn.Module) -> Iterator[None]:
    """Keep `net`'s parameters out of the autograd graph (no wasted grads, no stale .grad)."""
    params = list(net.parameters())  # (one walk of the module tree, not three: this runs every step)
    flags = [p.requires_grad for p in params]
    for param in params:
        param.requires_grad_(False)
    try:
        yield
    finally:
        for param, flag in zip(params, flags):
            param.requires_grad_(flag)


class AdversarialModule(LatentModule):
    """What every family of a generator against a discriminator shares (the GAN, the
    semi-supervised GAN): G and D built from the config (D with `discriminator_outputs` scores
    per image), G's EMA with standing statistics, augmentation of everything D sees, and the
    iteration of `loss.n_critic` D steps then one G step. A subclass gives `discriminator_step`
    and `generator_step` (which ends in `step_generator`: G's guarded step and its EMA)."""

    #: D's scores per image (the GAN: one real-vs-fake logit)
    discriminator_outputs: int = 1

    def __init__(self, config: dict):
        super().__init__(config)
        cfg = self.cfg
        self.automatic_optimization = False
        self.n_critic = cfg.loss.n_critic
        self.optimizer_steps_per_iteration = self.n_critic + 1
        self.batches_per_iteration = self.n_critic
        self.generator = self._build_generator()
        self.discriminator = self._build_discriminator()
        self.generator_ema = make_ema_copy(self.generator) if cfg.model.ema_decay > 0 else None
        self._ema_statistics_fresh = False  # the EMA's batch-norm statistics match its weights
        self.augmenter = build_augmenter(cfg.aug)

    # ------------------------------------------------------------------ networks
    def _build_generator(self) -> nn.Module:
        net, images = self.cfg.model.generator, len(self.sample_shape) == 3
        generator = build_network(
            "model.generator", net,
            lambda: build_generator(net, self.latent_dim, self.sample_shape, self.num_classes,
                                    out_activation="tanh" if images else None),
            {"latent_dim": self.latent_dim, "num_classes": self.num_classes, "image_shape": self.sample_shape})
        if net.target:
            labels = torch.arange(2) % self.num_classes if self.num_classes else None
            check_network("model.generator", net.target, generator,
                          {"z": torch.zeros(2, self.latent_dim), "labels": labels}, [(2, *self.sample_shape)])
        return generator

    def _build_discriminator(self) -> nn.Module:
        net, outputs = self.cfg.model.discriminator, self.discriminator_outputs
        provided = {"num_classes": self.num_classes, "image_shape": self.sample_shape}
        discriminator = build_network(
            "model.discriminator", net,
            lambda: build_discriminator(net, self.sample_shape, self.num_classes, out_features=outputs),
            provided if outputs == 1 else {**provided, "out_features": outputs})
        if net.target:
            labels = torch.arange(2) % self.num_classes if self.num_classes else None
            check_network("model.discriminator", net.target, discriminator,
                          {"x": torch.zeros(2, *self.sample_shape), "labels": labels},
                          [(2, 1), (2,)] if outputs == 1 else [(2, outputs)])
        return discriminator

    def configure_optimizers(self):
        return [build_optimizer(self.generator.parameters(), self.cfg.optim.g),
                build_optimizer(self.discriminator.parameters(), self.cfg.optim.d)]

    def networks(self) -> dict:
        return {"generator": self.generator, "discriminator": self.discriminator}

    def encode_features(self, images: Tensor, labels: Optional[Tensor] = None) -> Dict[str, Tensor]:
        """`features`: the discriminator's penultimate layer [N, F], not augmented (see
        nets.discriminator_features; a stylegan2 D's minibatch-std layer sees each image alone)."""
        return {"features": discriminator_features(self.discriminator, images.to(self.device)).float()}

    # ------------------------------------------------------------------ sampling
    def sampler_variants(self) -> Dict[str, str]:
        if self.generator_ema is None:
            return {"": "generator"}
        return {"": "EMA generator", "raw": "raw generator"}

    def sampling_network(self, variant: str = "") -> nn.Module:
        if variant not in self.sampler_variants():
            raise ValueError(f"unknown sampler variant '{variant}'; this GAN has {sorted(self.sampler_variants())}")
        if self.generator_ema is None or variant == "raw":
            return self.generator
        self.refresh_ema_statistics()
        return self.generator_ema

    @torch.no_grad()
    def refresh_ema_statistics(self) -> None:
        """Recompute the EMA generator's batch-norm statistics for its weights, unless fresh."""
        if self.generator_ema is None or self._ema_statistics_fresh or self.cfg.model.ema_bn_batches == 0:
            return
        batch, count = self.cfg.data.batch_size, self.cfg.model.ema_bn_batches
        batches = ((keyed_noise(STATISTICS_SEED, i * batch, batch, (self.latent_dim,)).to(self.device),
                    self.default_labels(batch, start=i * batch)) for i in range(count))
        standing_statistics(self.generator_ema, batches)
        self._ema_statistics_fresh = True

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        self._ema_statistics_fresh = False  # recomputed from the restored weights when needed

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """The EMA generator is saved with statistics that match its weights (the state dict was
        taken before this hook: its EMA batch-norm buffers are replaced by the fresh ones)."""
        super().on_save_checkpoint(checkpoint)
        if self.generator_ema is None:
            return
        self.refresh_ema_statistics()
        state = checkpoint.get("state_dict")
        if state is not None:
            for name, buffer in self.generator_ema.named_buffers():
                if f"generator_ema.{name}" in state:
                    state[f"generator_ema.{name}"] = buffer.detach().clone()

    # ------------------------------------------------------------------ training
    def augmented(self, images: Tensor) -> Tensor:
        """`images` as D sees them: augmented (see `aug`), noise keyed to the iteration."""
        if self.augmenter is not None and self.augmenter.uniforms > 0:
            images = self.augmenter(images, self.draw_noise(images.shape[0], self.augmenter.uniforms, uniform=True))
        return images

    def seen(self, images: Tensor, labels: Optional[Tensor] = None, eager: bool = False) -> Tensor:
        """D's raw output on `images` as D sees them (`augmented`). `eager`: D without
        torch.compile (the gradient penalty and R1 differentiate this function twice, which
        compiled graphs do not support)."""
        return (self.discriminator if eager else self.compiled("discriminator"))(self.augmented(images), labels)

    def seen_eagerly(self, images: Tensor, labels: Optional[Tensor] = None) -> Tensor:
        return self.seen(images, labels, eager=True)

    def _stepped_norm(self, skipped: Tensor, opt, network: nn.Module) -> Tensor:
        """The stepped gradient's global norm; NaN for a skipped step (for logged iterations:
        reads `skipped` on the host)."""
        if bool(skipped):
            return torch.tensor(float("nan"))
        return step_interface(self._trainer).gradient_norm(opt, network)

    def step_generator(self, g_loss: Tensor, opt, with_logs: bool) -> Dict[str, Tensor]:
        """G's backward and (guarded) step on `g_loss`, then its EMA; G's logs when `with_logs`."""
        opt.zero_grad(set_to_none=True)
        self.manual_backward(g_loss, opt)
        skipped = self.guarded_step(g_loss, opt, self.generator, "generator")
        logs = {"g_loss": g_loss.detach(),
                "g_grad_norm": self._stepped_norm(skipped, opt, self.generator)} if with_logs else {}
        self.step_ema(skipped, logs, with_logs)
        return logs

    def step_ema(self, skipped: Tensor, logs: Dict[str, Tensor], with_logs: bool) -> None:
        """After a G step: G's moving average takes the new weights (a skipped step leaves G, so
        its average, as is: gated on the device by `skipped`)."""
        if self.generator_ema is None:
            return
        model = self.cfg.model
        decay = ramped_decay(model.ema_decay, model.ema_rampup, self.iteration + 1)
        update_ema(self.generator_ema, self.generator, decay, copy_batchnorm=model.ema_bn_batches == 0, skip=skipped)
        self._ema_statistics_fresh = False
        if with_logs and not bool(skipped):
            logs["ema_decay"] = torch.tensor(decay)

    def _adjust_augmentation(self) -> None:
        """ADA: every `aug.ada_interval` D steps, p follows r_t over all ranks' real batches."""
        if self.augmenter is None:
            return
        self.augmenter.adjust(lambda t: all_reduce_on_device(t, "sum"))

    def step_labels(self, labels: Tensor) -> Optional[Tensor]:
        """The labels the D and G steps take (the GAN: only a class-conditional one's)."""
        return labels if self.num_classes > 0 else None

    def discriminator_step(self, real_images: Tensor, labels: Optional[Tensor], opt,
                           with_logs: bool = True, step_index: int = 0) -> Dict[str, Tensor]:
        """One D step on a real batch; returns its logs (`d_loss` among them) when `with_logs`;
        `step_index`: this step's number among all D steps of the run."""
        raise NotImplementedError

    def generator_step(self, real_images: Tensor, labels: Optional[Tensor], opt,
                       with_logs: bool = True) -> Dict[str, Tensor]:
        """One G step (as many samples as `real_images`, the last D step's real batch); returns
        its logs (`g_loss` among them) when `with_logs`."""
        raise NotImplementedError

    def training_step(self, batch, batch_idx: int) -> None:
        real_images, labels = batch[0], self.step_labels(batch[1])  # (a shard stream adds its position info)
        opt_g, opt_d = self.optimizers()
        log_now = self.logging_due()
        # The loader hands over n_critic batches at once: one fresh real batch per critic step.
        real_chunks = real_images.chunk(self.n_critic)
        label_chunks = labels.chunk(self.n_critic) if labels is not None else [None] * self.n_critic
        for index, (real_chunk, label_chunk) in enumerate(zip(real_chunks, label_chunks)):
            last = index == self.n_critic - 1  # the logged D values are those of the last critic step
            logs = self.discriminator_step(real_chunk, label_chunk, opt_d, with_logs=log_now and last,
                                           step_index=self.iteration * self.n_critic + index)
        logs.update(self.generator_step(real_chunks[-1], label_chunks[-1], opt_g, with_logs=log_now))
        self._adjust_augmentation()
        if not log_now:
            return
        steps = step_interface(self._trainer)
        if steps.owns_overflow:  # fp16: each network's loss scale (halved at every overflow)
            logs.update(loss_scale_g=steps.loss_scale(opt_g), loss_scale_d=steps.loss_scale(opt_d))
        ada = self.augmenter.ada if self.augmenter is not None else None
        self.log_train(logs, {"aug/p": float(ada.p), "aug/rt": float(ada.last_rt)} if ada is not None else None)
        self.log_dict({"d": logs["d_loss"], "g": logs["g_loss"]}, prog_bar=True, logger=False)


class GANModule(AdversarialModule):
    """The GAN: D's one logit under the adversarial loss pair `loss.name`, with the configured
    regularisers (gradient penalty, weight clipping, R1, LeCam)."""

    @property
    def twice_differentiated(self) -> tuple:
        return ("discriminator",) if self.cfg.loss.gp_weight > 0 or self.cfg.loss.r1_gamma > 0 else ()

    def __init__(self, config: dict):
        super().__init__(config)
        self.adversarial = build_adversarial_loss(self.cfg.loss)
        self.lecam = LeCamAnchors(self.cfg.loss.lecam_decay) if self.cfg.loss.lecam_weight > 0 else None

    def _critic(self, images: Tensor, labels: Optional[Tensor]) -> Tensor:
        """Discriminator logits [N] (float32) for images [N, *sample_shape], augmented.

        Losses are computed in float32 even under fp16 autocast: the gradient at an fp16 loss
        is the loss scale itself (65,536 at first), which fp16 cannot hold (max 65,504).
        """
        return self.seen(images, labels).reshape(-1).float()

    def discriminator_step(self, real_images: Tensor, labels: Optional[Tensor], opt,
                           with_logs: bool = True, step_index: int = 0) -> Dict[str, Tensor]:
        """One D step; `step_index`: this step's number among all D steps of the run (lazy R1)."""
        with torch.no_grad():  # G gets no gradient from D's loss: skip its graph entirely
            fake_images = self.compiled("generator")(self.draw_noise(real_images.shape[0], self.latent_dim), labels)
        real_logits = self._critic(real_images, labels)
        fake_logits = self._critic(fake_images, labels)
        real_in_loss, fake_in_loss = self.passes_apart(real_logits, fake_logits)
        d_loss = self.adversarial.d_loss(real_in_loss, fake_in_loss)
        total, logs = d_loss, {}
        total, scaled = self._regularise(total, logs, real_images, fake_images, real_in_loss, fake_in_loss, labels,
                                         opt, step_index)
        if self.augmenter is not None:
            self.augmenter.accumulate(real_logits)
        opt.zero_grad(set_to_none=True)
        self.manual_backward(total, opt)
        skipped = self.guarded_step(d_loss, opt, self.discriminator, "discriminator", scaled_terms=scaled)
        if with_logs:  # values of this rank's batch; the gradient norm is the global gradient's
            logs.update(d_loss=d_loss.detach(), d_real=real_logits.detach().mean(),
                        d_fake=fake_logits.detach().mean(), wasserstein=wasserstein_estimate(real_logits, fake_logits),
                        d_grad_norm=self._stepped_norm(skipped, opt, self.discriminator))
        if self.cfg.loss.clip_value > 0:  # (after a skipped step: weights clipped already, unchanged)
            clip_weights(self.discriminator, self.cfg.loss.clip_value)
        return logs

    def _regularise(self, total: Tensor, logs: dict, real_images: Tensor, fake_images: Tensor, real_logits: Tensor,
                    fake_logits: Tensor, labels: Optional[Tensor], opt, step_index: int) -> tuple[Tensor, tuple]:
        """D's loss plus the configured regularisers (gradient penalty, R1, LeCam); returns it and
        the terms computed from loss-scaled gradients (the guard leaves those to an fp16 scaler)."""
        loss, scaled = self.cfg.loss, []
        grad_scale = step_interface(self._trainer).grad_scale(opt)
        if loss.gp_weight > 0:
            mix = self.draw_noise(real_images.shape[0], uniform=True)
            penalty = gradient_penalty(self.seen_eagerly, real_images, fake_images, labels, mix=mix, grad_scale=grad_scale)
            total = total + loss.gp_weight * penalty
            logs["gradient_penalty"] = penalty.detach()
            scaled.append(penalty)
        if loss.r1_gamma > 0 and step_index % loss.r1_interval == 0:
            # Lazy regularisation: every r1_interval-th step, weighted by the interval, so that its
            # expected weight per step is gamma / 2 (Karras et al. 2020, StyleGAN2 sec. 3.1).
            r1 = r1_penalty(self.seen_eagerly, real_images, labels, grad_scale=grad_scale)
            total = total + loss.r1_gamma / 2 * loss.r1_interval * r1
            logs["r1"] = r1.detach()
            scaled.append(r1)
        if self.lecam is not None:
            lecam = lecam_penalty(real_logits, fake_logits, self.lecam.real, self.lecam.fake)
            total = total + loss.lecam_weight * lecam
            logs["lecam"] = lecam.detach()
            means = torch.stack([real_logits.detach().mean(), fake_logits.detach().mean()])
            means = all_reduce_on_device(means, "mean")  # same on every rank
            self.lecam.update(means[0], means[1])
        return total, tuple(scaled)

    def generator_step(self, real_images: Tensor, labels: Optional[Tensor], opt,
                       with_logs: bool = True) -> Dict[str, Tensor]:
        fake_images = self.compiled("generator")(self.draw_noise(real_images.shape[0], self.latent_dim), labels)
        with frozen(self.discriminator):
            fake_logits = self._critic(fake_images, labels)
        g_loss = self.adversarial.g_loss(fake_logits)
        return self.step_generator(g_loss, opt, with_logs)

    def on_fit_start(self) -> None:
        super().on_fit_start()
        loss = self.cfg.loss
        if self.cfg.trainer.compile and (loss.gp_weight > 0 or loss.r1_gamma > 0) and self.trainer.is_global_zero:
            log.info("trainer.compile: the gradient penalty / R1 run D eagerly (torch.compile does not "
                     "support their double backward); the other forwards are compiled")
