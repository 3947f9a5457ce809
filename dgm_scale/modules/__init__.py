"""Lightning modules: compose nets + losses + regularisers. `build_module` picks one by config."""
from __future__ import annotations

from pathlib import Path

import torch

from dgm_scale.config import ConfigError, to_dict
from dgm_scale.modules.base import GenerativeModule
from dgm_scale.modules.gan import GANModule
from dgm_scale.modules.vae import VAEModule

MODULES = {"gan": GANModule, "vae": VAEModule}


def build_module(cfg) -> GenerativeModule:
    return MODULES[cfg.model.kind](to_dict(cfg))


def load_module(checkpoint_path: str | Path, map_location: str = "cpu") -> GenerativeModule:
    """Rebuild a module from a checkpoint: the resolved config stored inside it, then the weights."""
    path = Path(checkpoint_path)
    if not path.is_file():
        raise ConfigError(f"checkpoint '{path}' does not exist")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
        config = checkpoint["hyper_parameters"]["config"]
    except Exception as exc:
        raise ConfigError(f"checkpoint '{path}' is not a dgm_scale checkpoint: {str(exc).splitlines()[0]}") from None
    module = MODULES[config["model"]["kind"]](config)
    module.load_state_dict(checkpoint["state_dict"])
    module.checkpoint_iteration = int(checkpoint.get("global_step", 0)) // module.optimizer_steps_per_iteration
    return module


__all__ = ["GANModule", "GenerativeModule", "MODULES", "VAEModule", "build_module", "load_module"]
