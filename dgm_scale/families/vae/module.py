"""The VAE Lightning module: convolutional (or MLP, or your own) encoder/decoder trained on the ELBO."""
from __future__ import annotations

import functools
import math
from typing import Dict, Optional, Tuple

import torch
from torch import Tensor, nn

from dgm_scale.data.transforms import from_8bit, to_8bit
from dgm_scale.losses.vae import decoder_mean, elbo_terms
from dgm_scale.modules.base import LatentModule
from dgm_scale.modules.optim import build_optimizer
from dgm_scale.modules.sampling import keyed_noise
from dgm_scale.nets import build_discriminator, build_generator
from dgm_scale.nets.custom import build_network, check_network

#: likelihoods that are a probability mass over 8-bit levels once discretised (bits/dim)
DISCRETE = ("gaussian", "discretized_gaussian")


class DecoderScale(nn.Module):
    """The decoder's learned std, one per channel (discretized_gaussian), as log-std [C, 1, 1]."""

    def __init__(self, channels: int, initial_std: float):
        super().__init__()
        self.log_std = nn.Parameter(torch.full((channels, 1, 1), math.log(initial_std)))

    def forward(self) -> Tensor:
        return self.log_std.float().clamp(-9.0, 2.0).exp()


class VAEModule(LatentModule):
    def __init__(self, config: dict):
        super().__init__(config)
        cfg = self.cfg
        # Manual, like the GAN: every optimizer.step() then passes through the strategy with its
        # gradients already computed, which is where distributed gradient averaging happens.
        self.automatic_optimization = False
        shape, latent = self.sample_shape, self.latent_dim
        self.encoder = build_network("model.encoder", cfg.model.encoder,
                                     lambda: build_discriminator(cfg.model.encoder, shape, out_features=2 * latent),
                                     {"image_shape": shape, "latent_dim": latent, "out_features": 2 * latent})
        self.decoder = build_network("model.decoder", cfg.model.decoder,
                                     lambda: build_generator(cfg.model.decoder, latent, shape, out_activation=None),
                                     {"image_shape": shape, "latent_dim": latent})
        if cfg.model.encoder.target:
            check_network("model.encoder", cfg.model.encoder.target, self.encoder,
                          {"x": torch.zeros(2, *shape)}, [(2, 2 * latent)])
        if cfg.model.decoder.target:
            check_network("model.decoder", cfg.model.decoder.target, self.decoder,
                          {"z": torch.zeros(2, latent)}, [(2, *shape)])
        self.output_map = functools.partial(decoder_mean, likelihood=cfg.loss.likelihood)
        learned = cfg.loss.likelihood == "discretized_gaussian"
        self.scale = DecoderScale(shape[0], cfg.loss.gaussian_std) if learned else None

    @property
    def has_likelihood(self) -> bool:
        return self.cfg.loss.likelihood in DISCRETE

    def sampling_network(self, variant: str = "") -> nn.Module:
        return self.decoder

    def decode(self, z: Tensor, labels: Optional[Tensor] = None, variant: str = "") -> Tensor:
        """Latents [N, latent_dim] -> mean images [N, *sample_shape]."""
        return self.output_map(self.decoder(z))

    def encode(self, images: Tensor) -> Tuple[Tensor, Tensor]:
        """Images [N, *sample_shape] -> posterior mean and log-variance, each [N, latent_dim]."""
        # float32 from here on: the ELBO's sums over pixels overflow fp16 (and see GANModule._critic)
        mu, logvar = self.compiled("encoder")(images).float().chunk(2, dim=1)
        # Bounded log-variance: exp() of an early outlier would otherwise overflow the KL.
        return mu, logvar.clamp(-20.0, 10.0)

    def encode_features(self, images: Tensor, labels: Optional[Tensor] = None) -> Dict[str, Tensor]:
        """The posterior q(z | x): `mu` (the representation) and `logvar`, each [N, latent_dim]."""
        mu, logvar = self.encode(images.to(self.device))
        return {"mu": mu, "logvar": logvar}

    def decoder_std(self) -> float | Tensor:
        return self.scale() if self.scale is not None else self.cfg.loss.gaussian_std

    def elbo(self, images: Tensor, noise: Optional[Tensor] = None, likelihood: Optional[str] = None) -> Dict[str, Tensor]:
        """ELBO terms (batch means, nats per image) with one reparameterised posterior sample.

        `noise` [N, latent_dim] is the standard normal draw of the sample (fresh if None);
        `likelihood`: another one than the trained (the discretised Gaussian, for bits/dim).
        """
        mu, logvar = self.encode(images)
        noise = torch.randn_like(mu) if noise is None else noise
        z = mu + noise * (0.5 * logvar).exp()
        loss = self.cfg.loss
        return elbo_terms(self.compiled("decoder")(z).float(), images, mu, logvar, likelihood or loss.likelihood, loss.beta,
                          self.decoder_std())

    def configure_optimizers(self):
        return build_optimizer(self.parameters(), self.cfg.optim)

    def networks(self) -> dict:
        nets = {"encoder": self.encoder, "decoder": self.decoder}
        return nets if self.scale is None else {**nets, "decoder_scale": self.scale}

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

    @torch.no_grad()
    def heldout_nll(self, batch, seed: int = 0) -> Optional[Tuple[Tensor, int]]:
        """-ELBO (an upper bound of -log P(x)) summed over the batch's 8-bit-rounded images, under
        the decoder's Gaussian discretised to the 256 levels; None for the Bernoulli likelihood
        (not a distribution over pixel levels)."""
        if self.cfg.loss.likelihood not in DISCRETE:
            return None
        images = from_8bit(to_8bit(batch[0].to(self.device)))
        noise = keyed_noise(seed, 0, images.shape[0], (self.latent_dim,)).to(self.device)
        terms = self.elbo(images, noise, likelihood="discretized_gaussian")
        return -terms["elbo"] * images.shape[0], images[0].numel() * images.shape[0]
