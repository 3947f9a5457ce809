"""Which code a checkpoint may make this process run.

A checkpoint stores its run's resolved config, and some config keys name code: modules imported
for their side effects (`run.imports`), a model family or module class (`model.kind`,
`model.module`), a network class built with keyword arguments (`model.<net>.target`). Rebuilding
the module imports and calls those names before any weight is read, so a checkpoint someone else
made could run any importable code on the machine that loads it (the weights themselves are read
with `weights_only=True`). Names inside the `dgm_scale` package are always allowed; any other
name needs the user's consent: `--trust-code`, `trust_code=True`, or DGM_SCALE_TRUST_CODE=1. A
config file given to `train` (and resuming one's own run) is the user's own and needs none.

Every config key that can name code is listed once, in CODE_KEYS: the loader makes the file
paths among them absolute, and the trust check reads the same list.
"""
from __future__ import annotations

import fnmatch
import os
from typing import Any, Iterator, List, Mapping, Tuple

from dgm_scale.core.errors import ConfigError

#: config keys (dotted; `*` any run of sections) whose values name code: a module, `module:Name`
#: or `path/file.py:Name`. A new key that names code is added here, and nowhere else.
CODE_KEYS = ("run.imports", "model.kind", "model.module", "model.*.target")

#: set to 1 (or true / yes) to trust the code every loaded checkpoint names, e.g. in batch jobs
TRUST_ENV = "DGM_SCALE_TRUST_CODE"

#: the package whose names any checkpoint may use
PACKAGE = "dgm_scale"

HOW_TO_TRUST = (f"if you trust whoever made it, pass --trust-code (Python: trust_code=True; batch jobs: "
                f"{TRUST_ENV}=1)")


def is_code_key(key: str) -> bool:
    """Whether dotted config `key` (list items as `key[i]`) names code. A network's `kwargs` are
    its arguments, never names, whatever they are called."""
    bare = key.split("[", 1)[0]
    if ".kwargs." in bare:
        return False
    return any(fnmatch.fnmatchcase(bare, pattern) for pattern in CODE_KEYS)


def _leaves(tree: Any, prefix: str = "") -> Iterator[Tuple[str, Any]]:
    if isinstance(tree, Mapping):
        for key, value in tree.items():
            yield from _leaves(value, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(tree, (list, tuple)):
        for index, value in enumerate(tree):
            yield from _leaves(value, f"{prefix}[{index}]")
    else:
        yield prefix, tree


def code_names(config: Mapping[str, Any]) -> List[Tuple[str, str]]:
    """(config key, name) of every value of `config` (a plain nested dict) that names code. A
    `model.kind` without `:` is a family's registered name, not an import: it is not listed."""
    named = []
    for key, value in _leaves(config):
        if value is None or value == "" or not is_code_key(key):
            continue
        if key == "model.kind" and ":" not in str(value):
            continue
        named.append((key, str(value)))
    return named


def is_packaged(name: str) -> bool:
    """Whether `name` (`module`, `module:Name`) is a plain name inside the dgm_scale package:
    a dotted module under it and at most one attribute, no file path, no reach through the
    module's own imports (`dgm_scale.x:os.system` is not dgm_scale's code)."""
    module, _, attribute = name.partition(":")
    if "/" in module or "\\" in module or module.endswith(".py"):
        return False
    inside = module == PACKAGE or module.startswith(PACKAGE + ".")
    return inside and all(part.isidentifier() for part in module.split(".")) and \
        (attribute == "" or attribute.isidentifier())


def trusted_by_environment() -> bool:
    return os.environ.get(TRUST_ENV, "").strip().lower() in ("1", "true", "yes")


def foreign_code(config: Mapping[str, Any]) -> List[Tuple[str, str]]:
    """(key, name) of the code `config` names outside the dgm_scale package."""
    return [(key, name) for key, name in code_names(config) if not is_packaged(name)]


def require_trusted(config: Mapping[str, Any], source: str, trust_code: bool = False) -> None:
    """Raise a one-line ConfigError listing every name outside dgm_scale in `config` (the stored
    config of `source`, a checkpoint) unless the user trusts it; import nothing."""
    if trust_code or trusted_by_environment():
        return
    foreign = foreign_code(config)
    if foreign:
        listed = ", ".join(f"{key}={name}" for key, name in foreign)
        raise ConfigError(f"checkpoint '{source}' names code outside dgm_scale that loading it would import and "
                          f"run: {listed}; nothing was imported; {HOW_TO_TRUST}")


def add_trust_option(parser: Any) -> None:
    """`--trust-code` on an argparse parser of a command that loads a checkpoint."""
    parser.add_argument("--trust-code", action="store_true",
                        help="import and run the code the checkpoint's config names outside dgm_scale (its "
                             f"networks, module, family, run.imports); only for checkpoints you trust ({TRUST_ENV}=1 "
                             "does the same)")
