"""Losses: pure functions of logits / distributions, shared by every model variant."""
from dgm_scale.losses.adversarial import ADVERSARIAL_LOSSES, AdversarialLoss, build_adversarial_loss
from dgm_scale.losses.regularizers import clip_weights, gradient_penalty
from dgm_scale.losses.vae import LIKELIHOODS, elbo_terms, gaussian_kl

__all__ = [
    "ADVERSARIAL_LOSSES", "AdversarialLoss", "build_adversarial_loss", "clip_weights",
    "gradient_penalty", "LIKELIHOODS", "elbo_terms", "gaussian_kl",
]
