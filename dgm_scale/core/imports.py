"""User code by name: `package.module:Name` or `path/to/file.py:Name`, and side-effect imports.

A class path in a config (a network, a family module, a family) is resolved here, in every
process that reads the config: `dgm-scale train`, each torchrun / srun rank, `sample`,
`evaluate`. A file path is imported under its stem as module name (so `nets.py` becomes module
`nets`, and `nets:Generator` names its class too); the current working directory is put on
`sys.path` by the command line, so modules beside the working directory import as they do in
`python -c`.
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from typing import Any

from dgm_scale.core.errors import ConfigError, first_line


def _is_file_spec(module: str) -> bool:
    return module.endswith(".py") or "/" in module or "\\" in module


def import_file(path: str | Path) -> Any:
    """Import a Python file as module `<stem>` (once: a second import returns the first)."""
    path = Path(path).expanduser().resolve()
    if not path.is_file():
        raise ImportError(f"file '{path}' does not exist")
    name = path.stem
    loaded = sys.modules.get(name)
    if loaded is not None and Path(getattr(loaded, "__file__", "") or "").resolve() == path:
        return loaded
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"'{path}' cannot be imported as Python")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return module


def import_module(spec: str) -> Any:
    """A module by dotted name or a file path."""
    return import_file(spec) if _is_file_spec(spec) else importlib.import_module(spec)


def import_object(spec: str, key: str) -> Any:
    """The object a `module:Name` / `file.py:Name` spec names; ConfigError naming `key` if not."""
    module_name, sep, attribute = str(spec).rpartition(":")
    if not sep or not module_name or not attribute:
        raise ConfigError(f"config key '{key}': '{spec}' is not of the form package.module:Name "
                          "or path/to/file.py:Name")
    try:
        module = import_module(module_name)
    except Exception as error:  # noqa: BLE001 - any failure of user code is reported in one line
        reason = first_line(error)
        raise ConfigError(f"config key '{key}': cannot import '{module_name}' for '{spec}': "
                          f"{type(error).__name__}: {reason}") from None
    obj = module
    for part in attribute.split("."):
        if not hasattr(obj, part):
            raise ConfigError(f"config key '{key}': '{module_name}' has no '{attribute}' ('{spec}')")
        obj = getattr(obj, part)
    return obj


def absolute_spec(spec: str) -> str:
    """A file-path spec with its file made absolute (a checkpoint is loaded from anywhere)."""
    module_name, sep, attribute = str(spec).rpartition(":")
    if sep and _is_file_spec(module_name):
        return f"{Path(module_name).expanduser().resolve()}:{attribute}"
    if not sep and _is_file_spec(spec):
        return str(Path(spec).expanduser().resolve())
    return spec


def run_imports(specs: list[str], key: str = "run.imports") -> None:
    """Import each module / file of `specs` for its side effects (e.g. registering a family)."""
    for spec in specs:
        try:
            import_module(spec)
        except Exception as error:  # noqa: BLE001
            reason = first_line(error)
            raise ConfigError(f"config key '{key}': cannot import '{spec}': {type(error).__name__}: {reason}") from None


def working_directory_importable() -> None:
    """Put the working directory on sys.path (console scripts do not; `python -m` does)."""
    if "" not in sys.path and str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))


def lazy_attributes(package: str, names: dict[str, str]):
    """A module `__getattr__` that imports `names[name]` (a module path) on first use of `name`:
    a package's public names without the cost of importing torch with it."""
    def __getattr__(name: str) -> Any:
        if name in names:
            return getattr(importlib.import_module(names[name]), name)
        raise AttributeError(f"module '{package}' has no attribute '{name}'")

    return __getattr__
