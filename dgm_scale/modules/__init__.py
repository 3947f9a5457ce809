"""Lightning modules: the shared base (`GenerativeModule`), and building / loading the module a
config's model family names."""
from __future__ import annotations

from pathlib import Path

import torch

from dgm_scale.config import ConfigError, to_dict
from dgm_scale.core.imports import import_object, run_imports
from dgm_scale.families.registry import get_family
from dgm_scale.modules.base import GenerativeModule, LatentModule


def module_class(cfg) -> type:
    """The module class of a config: `model.module` (your own) or the family's."""
    family = get_family(cfg.model.kind)
    own = getattr(cfg.model, "module", None)
    cls = import_object(own, "model.module") if own else import_object(family.module, "model.kind")
    if not (isinstance(cls, type) and issubclass(cls, GenerativeModule)):
        raise ConfigError(f"config key 'model.module': '{own}' is not a GenerativeModule subclass "
                          f"(e.g. of the {family.name} family's {family.module})")
    return cls


def build_module(cfg) -> GenerativeModule:
    return module_class(cfg)(to_dict(cfg))


def load_module(checkpoint_path: str | Path, map_location: str = "cpu") -> GenerativeModule:
    """Rebuild a module from a checkpoint: the resolved config stored inside it (its run.imports
    and class paths imported again), then the weights."""
    from dgm_scale.config import config_from_dict

    path = Path(checkpoint_path)
    if not path.is_file():
        raise ConfigError(f"checkpoint '{path}' does not exist")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
        config = checkpoint["hyper_parameters"]["config"]
    except Exception as exc:
        raise ConfigError(f"checkpoint '{path}' is not a dgm_scale checkpoint: {str(exc).splitlines()[0]}") from None
    run_imports(list(config.get("run", {}).get("imports", [])))
    module = module_class(config_from_dict(config))(config)
    module.load_state_dict(checkpoint["state_dict"])
    module.checkpoint_iteration = int(checkpoint.get("global_step", 0)) // module.optimizer_steps_per_iteration
    return module


__all__ = ["GenerativeModule", "LatentModule", "build_module", "load_module", "module_class"]
