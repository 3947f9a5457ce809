"""Lightning modules: the shared base (`GenerativeModule`), and building / loading the module a
config's model family names."""
from __future__ import annotations

from pathlib import Path

import torch

from dgm_scale.core.errors import described, first_line
from dgm_scale.config import ConfigError, to_dict
from dgm_scale.core.imports import import_object, run_imports
from dgm_scale.core.trust import require_trusted
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


def _read_checkpoint(path: Path, map_location: str) -> tuple[dict, dict]:
    """(the whole checkpoint, its stored config), read with weights_only: no code runs."""
    if not path.is_file():
        raise ConfigError(f"checkpoint '{path}' does not exist")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
        config = checkpoint["hyper_parameters"]["config"]
    except Exception as exc:  # noqa: BLE001 - torch.load raises many types for a bad file
        raise ConfigError(f"checkpoint '{path}' is not a dgm_scale checkpoint: {first_line(exc)}") from None
    if not isinstance(config, dict) or not isinstance(checkpoint.get("state_dict"), dict):
        raise ConfigError(f"checkpoint '{path}' is not a dgm_scale checkpoint: no stored config and state_dict")
    return checkpoint, config


def load_module(checkpoint_path: str | Path, map_location: str = "cpu", trust_code: bool = False) -> GenerativeModule:
    """Rebuild a module from a checkpoint: the resolved config stored inside it (its run.imports
    and class paths imported again), then the weights. Code the config names outside dgm_scale
    is imported only when `trust_code` (or DGM_SCALE_TRUST_CODE=1); else a one-line ConfigError
    lists it before anything is imported (see core/trust.py)."""
    from dgm_scale.config import config_from_dict

    path = Path(checkpoint_path)
    checkpoint, config = _read_checkpoint(path, map_location)
    require_trusted(config, str(path), trust_code)
    try:
        run_imports(list((config.get("run") or {}).get("imports") or []))
        module = module_class(config_from_dict(config))(config)
        module.load_state_dict(checkpoint["state_dict"])
    except ConfigError as error:
        raise ConfigError(f"checkpoint '{path}': {error}") from None
    except (RuntimeError, ValueError, TypeError, KeyError, AttributeError) as error:  # a damaged stored config / weights
        raise ConfigError(f"checkpoint '{path}' does not load: {described(error)}") from None
    module.checkpoint_iteration = int(checkpoint.get("global_step", 0)) // module.optimizer_steps_per_iteration
    return module


__all__ = ["GenerativeModule", "LatentModule", "build_module", "load_module", "module_class"]
