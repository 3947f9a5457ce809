"""Load a config: schema defaults <- YAML file <- `key=value` overrides, validated once.

The schema depends on the model family (`model.kind`), which may come from user code
(`run.imports`), so loading takes two passes: a plain merge of the file and the overrides finds
`model.kind` and `run.imports` (imported first), then the family's typed schema takes the same
file and overrides with unknown keys as errors. Every problem is raised as a `ConfigError` whose
message is one line naming the config key.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from dgm_scale.config.schema import config_class
from dgm_scale.core.errors import ConfigError, first_line
from dgm_scale.core.imports import absolute_spec, run_imports
from dgm_scale.core.trust import is_code_key
from dgm_scale.families.registry import Family, family_names, get_family

DEFAULT_KIND = "gan"


def _one_line(exc: OmegaConfBaseException) -> str:
    """OmegaConf's messages span several lines; keep the key and the first line of the reason."""
    key = getattr(exc, "full_key", None) or "<config>"
    reason = (getattr(exc, "msg", None) or str(exc)).splitlines()[0].strip()
    if "not in" in reason and "Key" in reason:
        return f"unknown config key '{key}'"
    return f"config key '{key}': {reason}"


def _merge(base: DictConfig, other: Any, source: str) -> DictConfig:
    try:
        return OmegaConf.merge(base, other)
    except OmegaConfBaseException as exc:
        raise ConfigError(f"{source}: {_one_line(exc)}") from None
    except (TypeError, ValueError) as exc:  # e.g. a list where the schema has a mapping
        raise ConfigError(f"{source}: {first_line(exc)}") from None


def _resolved(cfg: DictConfig) -> DictConfig:
    """`cfg` with its `${...}` interpolations resolved once, so that a bad one is a one-line error
    here and not a traceback wherever the value is first read."""
    try:
        OmegaConf.resolve(cfg)
    except OmegaConfBaseException as exc:
        raise ConfigError(_one_line(exc)) from None
    return cfg


def _read_yaml(path: str | Path) -> DictConfig:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file '{path}' does not exist")
    try:
        loaded = OmegaConf.load(path)
    except Exception as exc:  # noqa: BLE001 - YAML syntax errors, undecodable bytes
        raise ConfigError(f"config file '{path}': {first_line(exc)}") from None
    if not isinstance(loaded, DictConfig):
        raise ConfigError(f"config file '{path}' does not hold a mapping of sections")
    return loaded


def _parse_override(item: str) -> tuple[str, DictConfig]:
    if "=" not in item:
        raise ConfigError(f"override '{item}' is not of the form key=value")
    if item.startswith("resume="):  # the short form users type: `dgm-scale train ... resume=auto`
        item = "run." + item
    try:
        return item, OmegaConf.from_dotlist([item])
    except OmegaConfBaseException as exc:
        raise ConfigError(f"override '{item}': {_one_line(exc)}") from None
    except Exception as exc:  # noqa: BLE001 - YAML's scanner / parser errors for the value
        raise ConfigError(f"override '{item}': not a YAML value: {first_line(exc)}") from None


def _normalise_overrides(overrides: Sequence[str] | Mapping[str, Any]) -> list[str]:
    """Overrides as `key=value` strings (a dict from the Python API is written as such)."""
    if isinstance(overrides, Mapping):
        return [f"{key}={yaml_value(value)}" for key, value in overrides.items()]
    return [str(item) for item in overrides]


def yaml_value(value: Any) -> str:
    if isinstance(value, str):
        return value
    return OmegaConf.to_yaml(OmegaConf.create({"v": value})).split(":", 1)[1].strip().replace("\n", " ")


def _get(tree: Any, dotted: str, default: Any = None) -> Any:
    node = tree
    for part in dotted.split("."):
        if not isinstance(node, (dict, DictConfig)) or part not in node:
            return default
        node = node[part]
    return node


def _flat_keys(tree: Any, prefix: str = "") -> Iterable[str]:
    if isinstance(tree, DictConfig):  # its keys, without resolving ${...} values
        tree = OmegaConf.to_container(tree, resolve=False)
    if isinstance(tree, dict):
        for key in tree:
            yield f"{prefix}{key}"
            yield from _flat_keys(tree[key], f"{prefix}{key}.")


def _check_renamed(raw: Any, family: Family, source: str) -> None:
    """A user config that still uses a key the family renamed: one line naming the new key."""
    keys = set(_flat_keys(raw))
    for old, new in family.renamed.items():
        if old in keys:
            where = f"rename it to '{new}'" if new else "remove it"
            raise ConfigError(f"{source}: config key '{old}' is not a {family.name} key any more: {where}")


def _schema(family: Family) -> DictConfig:
    """The structured config of `family`, in struct mode (unknown keys are errors) except for
    the free-form mappings of the schema (a network's `kwargs`, `trainer.deepspeed`,
    `eval.options`): those take any key, checked by whoever reads them."""
    cfg = OmegaConf.structured(config_class(family))
    OmegaConf.set_struct(cfg, True)
    _open_mappings(cfg)
    return cfg


def _open_mappings(node: DictConfig) -> None:
    for key in node.keys():
        child = node._get_node(key)
        if isinstance(child, DictConfig):
            if child._metadata.object_type in (None, dict):  # a Dict[str, Any] field, not a section
                OmegaConf.set_struct(child, False)
            else:
                _open_mappings(child)


def family_of(raw: Any, imports: Sequence[str] = ()) -> Family:
    """Import `run.imports` (and `imports`), then the family `model.kind` names."""
    try:
        listed, kind = _get(raw, "run.imports") or [], _get(raw, "model.kind") or DEFAULT_KIND
    except OmegaConfBaseException as exc:  # a bad ${...} in either
        raise ConfigError(_one_line(exc)) from None
    if not isinstance(listed, (list, tuple, ListConfig)) or not all(isinstance(spec, str) for spec in listed):
        raise ConfigError(f"config key 'run.imports' must be a list of modules or files, got {listed!r:.80}")
    if not isinstance(kind, str):
        raise ConfigError(f"config key 'model.kind' must be a family name or module:FAMILY, got {kind!r:.80}")
    run_imports([*imports, *listed])
    return get_family(kind)


def load_config(path: str | Path | None = None, overrides: Sequence[str] | Mapping[str, Any] = (),
                imports: Sequence[str] = ()) -> DictConfig:
    """The validated config (unknown keys are errors) of YAML file `path` (None: the defaults)
    with `overrides` (`key=value` strings, or a dict {dotted key: value}); `imports`: modules or
    files to import first (recorded in run.imports)."""
    file_cfg = _read_yaml(path) if path is not None else OmegaConf.create()
    parsed = [_parse_override(item) for item in _normalise_overrides(overrides)]
    raw = file_cfg
    for item, override in parsed:  # schema-free: only to find run.imports and model.kind
        raw = _merge(raw, override, f"override '{item}'")
    family = family_of(raw, imports)
    if path is not None:
        _check_renamed(file_cfg, family, str(path))
    for item, override in parsed:
        _check_renamed(override, family, f"override '{item}'")
    cfg = _merge(_schema(family), file_cfg, str(path))
    if path is not None and not cfg.run.name:
        cfg.run.name = Path(path).stem
    for item, override in parsed:
        cfg = _merge(cfg, override, f"override '{item}'")
    cfg = _resolved(cfg)
    cfg.run.imports = [absolute_spec(spec) for spec in [*imports, *cfg.run.imports]]
    _absolute_code_paths(cfg.model, "model")
    if not cfg.run.name:
        cfg.run.name = "default"
    validate(cfg)
    return cfg


def _absolute_code_paths(node: Any, prefix: str) -> None:
    """File paths in the class specs of `node` (the keys core.trust.CODE_KEYS lists) made
    absolute: a checkpoint's config must name the same file wherever `dgm-scale sample` runs."""
    for key in list(node.keys()):
        value, dotted = node[key], f"{prefix}.{key}"
        if isinstance(value, DictConfig):
            _absolute_code_paths(value, dotted)
        elif is_code_key(dotted) and isinstance(value, str) and ":" in value:
            node[key] = absolute_spec(value)


def _translate_stored(data: dict, family: Family) -> dict:
    """A checkpoint's stored config from before the family had its own names: old keys moved to
    the new ones, keys the family's schema lacks (another family's defaults) dropped."""
    data = {section: (dict(value) if isinstance(value, dict) else value) for section, value in data.items()}
    for old, new in family.renamed.items():
        section, _, rest = old.partition(".")
        holder = data.get(section)
        if not isinstance(holder, dict) or rest not in holder:
            continue
        value = holder.pop(rest)
        if new:
            new_section, _, new_rest = new.partition(".")
            if new_rest:
                data.setdefault(new_section, {})[new_rest] = value
            else:
                data[new_section] = {**value, **data.get(new_section, {})} if isinstance(value, dict) else value
    schema = OmegaConf.to_container(OmegaConf.structured(config_class(family)))
    for other in family_names():
        for section in get_family(other).sections:
            if section not in schema:
                data.pop(section, None)
    for section in ("model", "loss", "optim", *family.sections):
        if isinstance(data.get(section), dict):
            data[section] = {k: v for k, v in data[section].items() if k in schema[section]}
    return data


def config_from_dict(data: dict) -> DictConfig:
    """Rebuild a validated config from a plain dict (e.g. the one stored in a checkpoint)."""
    family = family_of(data)
    cfg = _resolved(_merge(_schema(family), _translate_stored(data, family), "stored config"))
    validate(cfg)
    return cfg


def validate(cfg: DictConfig) -> None:
    """Check value ranges and combinations that types alone cannot express: each component
    checks its own section, the family its own."""
    from dgm_scale.data.config import modality_of, validate_data
    from dgm_scale.distributed.config import validate_trainer
    from dgm_scale.metrics.config import validate_eval

    family = get_family(cfg.model.kind)
    validate_data(cfg.data)
    modality = modality_of(cfg.data.name)
    if modality not in family.modalities:
        raise ConfigError(f"config key 'model.kind': the {family.name} family does not model {modality} "
                          f"(data.name={cfg.data.name}); it models {', '.join(family.modalities)}")
    family.validate(cfg)
    if getattr(cfg.model, "num_classes", 0) > 0 and cfg.data.labels_per_class is not None:
        raise ConfigError("config key 'data.labels_per_class': a class-conditional model (model.num_classes > 0) "
                          "trains on every label; unset one of them")
    validate_trainer(cfg.trainer)
    run = cfg.run
    for key in ("sample_every", "checkpoint_every", "num_samples"):
        if run[key] < 1:
            raise ConfigError(f"config key 'run.{key}' must be >= 1, got {run[key]}")
    unknown = [name for name in run.requeue_on if name not in ("USR1", "TERM")]
    if unknown:
        raise ConfigError(f"config key 'run.requeue_on': {unknown} is not a subset of [USR1, TERM]")
    if run.keep_checkpoints < 0:
        raise ConfigError(f"config key 'run.keep_checkpoints' must be >= 0, got {run.keep_checkpoints}")
    if cfg.tracking.wandb.mode not in ("auto", "online", "offline", "disabled"):
        raise ConfigError(f"config key 'tracking.wandb.mode': '{cfg.tracking.wandb.mode}' is not one of "
                          "auto, online, offline, disabled")
    if not cfg.tracking.wandb.init_timeout > 0:
        raise ConfigError(f"config key 'tracking.wandb.init_timeout' must be > 0 (seconds), got "
                          f"{cfg.tracking.wandb.init_timeout}")
    validate_eval(cfg.eval, modality, cfg.data.name)


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg)


def to_dict(cfg: DictConfig) -> dict:
    return OmegaConf.to_container(cfg, resolve=True)
