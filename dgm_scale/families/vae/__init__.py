"""The VAE family (Kingma & Welling 2014): an encoder q(z|x), a decoder p(x|z), trained on the ELBO.

Its own names: `model.encoder` / `model.decoder` and one optimizer `optim`. Configs written
before (the encoder as `model.discriminator`, the decoder as `model.generator`, the optimizer as
`optim.g`) get a one-line error naming the new key; checkpoints from then load as they are.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, List, Optional, Tuple

from dgm_scale.config.schema import NetConfig, OptimizerConfig
from dgm_scale.core.checks import at_least, choice, require
from dgm_scale.families.registry import Family


@dataclass
class VAEModelConfig:
    kind: str = "vae"  # the model family: a built-in or registered name, or package.module:FAMILY
    module: Optional[str] = None  # your own module class (a VAEModule subclass): package.module:Class
    latent_dim: int = 16  # size of the latent vector z (the posterior is a diagonal Gaussian over it)
    # outputs 2 x latent_dim numbers per image (posterior mean and log-variance)
    encoder: NetConfig = field(default_factory=NetConfig)
    decoder: NetConfig = field(default_factory=NetConfig)  # maps a latent z to the likelihood's parameters


@dataclass
class VAELossConfig:
    # bernoulli (grey levels as soft targets) | gaussian (fixed std) | discretized_gaussian (a
    # probability mass over the 256 levels with a learned std per channel: an ELBO in bits/dim)
    likelihood: str = "bernoulli"
    gaussian_std: float = 0.1  # gaussian: the decoder's std ([-1, 1] scale); discretized_gaussian: its start
    beta: float = 1.0  # KL weight


@dataclass
class VAEOptimConfig(OptimizerConfig):
    lr: float = 1e-3
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])


def validate(cfg: Any) -> None:
    from dgm_scale.losses.vae import LIKELIHOODS
    from dgm_scale.modules.optim import validate_optimizer
    from dgm_scale.nets.config import validate_net

    for key in ("encoder", "decoder"):
        validate_net(f"model.{key}", cfg.model[key], "images")
    validate_optimizer("optim", cfg.optim)
    choice("loss.likelihood", cfg.loss.likelihood, sorted(LIKELIHOODS))
    require(cfg.loss.gaussian_std > 0, f"config key 'loss.gaussian_std' must be > 0, got {cfg.loss.gaussian_std}")
    at_least("loss.beta", cfg.loss.beta, 0)
    at_least("model.latent_dim", cfg.model.latent_dim, 1)


def _net(setting: Callable[..., Any], key: str) -> str:
    target = setting(f"model.{key}.target")
    return str(target).rsplit("/", 1)[-1] if target else str(setting(f"model.{key}.arch"))


def describe(setting: Callable[..., Any]) -> List[Tuple[str, str]]:
    return [("model", f"VAE: encoder {_net(setting, 'encoder')}, decoder {_net(setting, 'decoder')}, "
                      f"latent {setting('model.latent_dim')}"),
            ("loss", f"ELBO, {setting('loss.likelihood')} likelihood, beta {setting('loss.beta')}"),
            ("optimizer", f"{setting('optim.name')} lr {setting('optim.lr')}")]


def summary(setting: Callable[..., Any]) -> str:
    return f"VAE, {setting('loss.likelihood')} likelihood, encoder {_net(setting, 'encoder')}, " \
           f"decoder {_net(setting, 'decoder')}"


FAMILY = Family(
    name="vae",
    description="an encoder and a decoder trained on the evidence lower bound",
    model=VAEModelConfig, loss=VAELossConfig, optim=VAEOptimConfig,
    module="dgm_scale.families.vae.module:VAEModule",
    validate=validate, describe=describe, summary=summary,
    renamed={"model.generator": "model.decoder", "model.discriminator": "model.encoder",
             "optim.g": "optim", "optim.d": None},
    modalities=("images",),
    chart_groups=(("elbo", "ELBO terms (per image)",
                   lambda k: k.split("/")[-1] in ("elbo", "reconstruction", "kl") and k.split("/")[0] in ("train", "val")),),
)
