"""The model-family registry: what a family is, and where to find one by name.

A family is the unit of extension (a GAN, a VAE, an autoregressive model, or yours): it owns its
config sections (`model`, `loss`, `optim`: dataclasses), their validation, its Lightning module
class, a one-line description (the start-of-run log line, the report) and, through the module,
the one sampling contract everything else uses (`GenerativeModule.sample_batch`). The training
loop, evaluation, `dgm-scale sample` and the report ask the family; none of them names one.

Built-in families are listed in `BUILTIN` (one line each) and imported on first use. Others
register themselves: `register_family(Family(...))` in a module that the config imports
(`run.imports`, `--import`), or `model.kind: package.module:FAMILY` naming the Family object.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

from dgm_scale.core.errors import ConfigError

#: what a family may model (from data.name: see dgm_scale.data.config.modality_of)
MODALITIES = ("images", "points", "text")

#: name -> the module holding its FAMILY; adding a built-in family is one line here
BUILTIN: Dict[str, str] = {
    "gan": "dgm_scale.families.gan",
    "vae": "dgm_scale.families.vae",
    "autoregressive": "dgm_scale.families.autoregressive",
    "ssgan": "dgm_scale.families.ssgan",
    "diffusion": "dgm_scale.families.diffusion",
}


def _no_checks(cfg: Any) -> None:
    """A family without checks beyond its dataclasses' types."""


@dataclass(frozen=True)
class Family:
    """Everything the rest of the package needs to know about a model family.

    `model`, `loss`, `optim`: dataclasses of the config sections (`model` must have a `kind`
    field; a `module` field, when present, names a module class that replaces `module`).
    `module`: `package.module:Class` of its GenerativeModule subclass (imported when needed).
    `validate(cfg)`: raises ConfigError (one line, naming the key) for bad values / combinations.
    `describe(setting)`: label/value pairs for the report, where `setting("model.latent_dim")`
    reads the run's config (a report may read a config of another version: use defaults).
    `summary(setting)`: one line for the start-of-run log line.
    `renamed`: old key -> new key (or None: dropped) of configs written before the family had
    its own names; a user config using an old key gets a one-line error naming the new one,
    a checkpoint's stored config is translated.
    `modalities`: what it models (images, points = the 2-D toys, text).
    `chart_groups`: extra (file stem, title, column predicate) groups for the report's curves.
    `sections`: more config sections of its own, name -> dataclass (e.g. the GAN's `aug`).
    `sampler_names`: what its samplers are called in the report ("" = the default one).
    `report_charts(run_dir)`: more charts for the report, from files of its own in the run
    directory: a list of (file stem, title, x label, [(curve name, x array, y array)]).
    """

    name: str
    description: str
    model: type
    loss: type
    optim: type
    module: str
    validate: Callable[[Any], None] = _no_checks
    describe: Optional[Callable[[Callable[..., Any]], List[Tuple[str, str]]]] = None
    summary: Optional[Callable[[Callable[..., Any]], str]] = None
    renamed: Mapping[str, Optional[str]] = field(default_factory=dict)
    modalities: Tuple[str, ...] = ("images",)
    chart_groups: Tuple[Tuple[str, str, Callable[[str], bool]], ...] = ()
    sections: Mapping[str, type] = field(default_factory=dict)
    sampler_names: Mapping[str, str] = field(default_factory=dict)
    report_charts: Optional[Callable[[Any], List[Tuple[str, str, str, List[Tuple[str, Any, Any]]]]]] = None

    def headline(self, setting: Callable[..., Any]) -> str:
        """The one-line description of a configured model (log line, report title row)."""
        return self.summary(setting) if self.summary is not None else f"{self.name}: {self.description}"


_REGISTRY: Dict[str, Family] = {}


def register_family(family: Family, replace: bool = False) -> Family:
    """Make `family` available as `model.kind: <family.name>`; returns it (usable as a decorator
    target). Registering a different family under a taken name is an error unless `replace`."""
    if not isinstance(family, Family):
        raise TypeError(f"register_family takes a Family, got {type(family).__name__}")
    known = _REGISTRY.get(family.name)
    if known is not None and known is not family and not replace:
        raise ValueError(f"a model family named '{family.name}' is already registered")
    bad = [modality for modality in family.modalities if modality not in MODALITIES]
    if bad:
        raise ValueError(f"family '{family.name}': unknown modality(s) {bad}; known: {list(MODALITIES)}")
    _REGISTRY[family.name] = family
    return family


def family_names() -> List[str]:
    """Built-in and registered family names."""
    return sorted(set(BUILTIN) | set(_REGISTRY))


def get_family(kind: str, key: str = "model.kind") -> Family:
    """The family `model.kind` names: a registered or built-in name, or `module:FAMILY` (a
    Family object in an importable module or file, registered on first use)."""
    kind = str(kind)
    if kind in _REGISTRY:
        return _REGISTRY[kind]
    if kind in BUILTIN:
        import importlib

        return register_family(importlib.import_module(BUILTIN[kind]).FAMILY)
    if ":" in kind:
        from dgm_scale.core.imports import import_object

        family = import_object(kind, key)
        if not isinstance(family, Family):
            raise ConfigError(f"config key '{key}': '{kind}' is a {type(family).__name__}, not a Family")
        _REGISTRY[kind] = family  # by its path: the config names it so
        return family
    raise ConfigError(f"config key '{key}': '{kind}' is not a model family; known: {', '.join(family_names())} "
                      "(or package.module:FAMILY; a family registered by your code needs run.imports / --import)")
