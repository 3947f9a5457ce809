"""The VAE Lightning module: convolutional (or MLP) encoder/decoder trained on the ELBO."""
from __future__ import annotations

from typing import Dict, Optional

import torch
from torch import Tensor, nn

from dgm_scale.losses.vae import decoder_mean, elbo_terms
from dgm_scale.modules.base import GenerativeModule, build_optimizer
from dgm_scale.nets import build_discriminator, build_generator


class VAEModule(GenerativeModule):
    """Encoder = `model.discriminator` net with 2*latent outputs; decoder = `model.generator` net."""

    def __init__(self, config: dict):
        super().__init__(config)
        cfg = self.cfg
        # Manual, like the GAN: every optimizer.step() then passes through the strategy with its
        # gradients already computed, which is where distributed gradient averaging happens.
        self.automatic_optimization = False
        self.encoder = build_discriminator(cfg.model.discriminator, self.sample_shape, out_features=2 * self.latent_dim)
        self.decoder = build_generator(cfg.model.generator, self.latent_dim, self.sample_shape, out_activation=None)

    def sampling_network(self) -> nn.Module:
        return self.decoder

    def decode(self, z: Tensor, labels: Optional[Tensor] = None) -> Tensor:
        """Latents [N, latent_dim] -> mean images [N, *sample_shape]."""
        return decoder_mean(self.decoder(z), self.cfg.loss.likelihood)

    def encode(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """Images [N, *sample_shape] -> posterior mean and log-variance, each [N, latent_dim]."""
        # float32 from here on: the ELBO's sums over pixels overflow fp16 (and see GANModule._critic)
        mu, logvar = self.encoder(images).float().chunk(2, dim=1)
        # Bounded log-variance: exp() of an early outlier would otherwise overflow the KL.
        return mu, logvar.clamp(-20.0, 10.0)

    def elbo(self, images: Tensor, noise: Optional[Tensor] = None) -> Dict[str, Tensor]:
        """ELBO terms (batch means, nats per image) with one reparameterised posterior sample.

        `noise` [N, latent_dim] is the standard normal draw of the sample (fresh if None).
        """
        mu, logvar = self.encode(images)
        noise = torch.randn_like(mu) if noise is None else noise
        z = mu + noise * (0.5 * logvar).exp()
        loss = self.cfg.loss
        return elbo_terms(self.decoder(z).float(), images, mu, logvar, loss.likelihood, loss.beta, loss.gaussian_std)

    def configure_optimizers(self):
        return build_optimizer(self.parameters(), self.cfg.optim.g)

    def networks(self) -> dict:
        return {"encoder": self.encoder, "decoder": self.decoder}

    def training_step(self, batch, batch_idx: int) -> None:
        opt = self.optimizers()
        log_now = self.logging_due()
        terms = self.elbo(batch[0], self.draw_noise(batch[0].shape[0], self.latent_dim))
        opt.zero_grad(set_to_none=True)
        self.manual_backward(terms["loss"], opt)
        self.guarded_step(terms["loss"], opt, self, "encoder-decoder")
        if not log_now:
            return
        self.log_train(terms)
        self.log("elbo", terms["elbo"].detach(), prog_bar=True, logger=False)

    def validation_step(self, batch, batch_idx: int) -> None:
        terms = self.elbo(batch[0])
        self.log_dict({f"val/{key}": value for key, value in terms.items() if key != "loss"},
                      on_epoch=True, batch_size=batch[0].shape[0], sync_dist=True)
