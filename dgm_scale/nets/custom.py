"""Your own networks by import path: `model.<net>.target: package.module:Class` (or
`path/to/file.py:Class`) with `model.<net>.kwargs: {...}`.

A target is an `nn.Module` subclass, or a function marked with `@dgm_scale.network_factory`
that returns one: not just any callable, so that a config (or a checkpoint's stored config)
cannot name, say, a standard-library function that runs a command.

The class is built as `Class(**kwargs, **provided)`, where `provided` are the inputs the family
knows (e.g. `latent_dim`, `num_classes`, `image_shape`) that the constructor declares as
parameters and `kwargs` does not set. Before training, `check_network` runs it once on a tiny
batch of the declared inputs: a class that does not import, cannot be built, fails on the
inputs, or returns the wrong shape stops with one line naming the config key, the class and
the shapes.
"""
from __future__ import annotations

import inspect
import itertools
import os
from typing import Any, Callable, Mapping, Optional, Sequence

import torch
from torch import Tensor, nn

from dgm_scale.core.errors import ConfigError, described
from dgm_scale.core.imports import import_object


#: the attribute `network_factory` sets on a function
FACTORY_MARK = "__dgm_scale_network_factory__"


def network_factory(function: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Mark `function` (keyword arguments -> an nn.Module) as usable as `model.<net>.target`."""
    if not callable(function) or isinstance(function, type):
        raise TypeError("network_factory marks a function that returns an nn.Module")
    setattr(function, FACTORY_MARK, True)
    return function


def _buildable(target: Any) -> bool:
    if isinstance(target, type):
        return issubclass(target, nn.Module)
    return callable(target) and getattr(target, FACTORY_MARK, False) is True


def _accepted(cls: type, provided: Mapping[str, Any], kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """The provided inputs the constructor of `cls` takes by name and `kwargs` does not set."""
    try:
        parameters = inspect.signature(cls).parameters
    except (TypeError, ValueError):
        return {}
    return {name: value for name, value in provided.items() if name in parameters and name not in kwargs}


def _memory_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def build_within_memory(key: str, build: Callable[[], nn.Module]) -> nn.Module:
    """`build()`, after building it once on the meta device (no memory, no init cost): sizes
    in the config that ask for more parameters than this machine has memory are a one-line error
    naming `key`, not an allocator traceback, a minutes-long init or the OOM killer."""
    try:
        with torch.device("meta"):
            shell = build()
    except (RuntimeError, ValueError, OverflowError, MemoryError) as error:  # e.g. sizes overflowing int64
        raise ConfigError(f"config key '{key}': cannot build a network of these sizes: {described(error)}") from None
    tensors = itertools.chain(shell.parameters(), shell.buffers())
    needed = sum(tensor.numel() * tensor.element_size() for tensor in tensors)
    if needed > _memory_bytes():
        raise ConfigError(f"config key '{key}': its sizes ask for {needed / 2**30:,.1f} GiB of parameters, more "
                          f"than this machine's {_memory_bytes() / 2**30:,.1f} GiB of memory")
    return build()


def build_network(key: str, net: Any, builtin: Callable[[], nn.Module], provided: Mapping[str, Any]) -> nn.Module:
    """`net.target` built with `net.kwargs` (+ accepted `provided` inputs), else `builtin()`
    (sized first: `build_within_memory`). `key`: the config key of this network, e.g.
    `model.generator`."""
    target = getattr(net, "target", None)
    if not target:
        return build_within_memory(key, builtin)
    cls = import_object(target, f"{key}.target")
    if not _buildable(cls):
        kind = "a class" if isinstance(cls, type) else f"a {type(cls).__name__}"
        raise ConfigError(f"config key '{key}.target': '{target}' is {kind}, not an nn.Module subclass or a "
                          "function marked @dgm_scale.network_factory; it was not called")
    kwargs = dict(getattr(net, "kwargs", {}) or {})
    try:
        module = cls(**kwargs, **_accepted(cls, provided, kwargs))
    except Exception as error:  # noqa: BLE001 - user code: report in one line
        raise ConfigError(f"config key '{key}.kwargs': building {target}({', '.join(kwargs)}) failed: "
                          f"{described(error)}") from None
    if not isinstance(module, nn.Module):
        raise ConfigError(f"config key '{key}.target': {target} made a {type(module).__name__}, not a torch nn.Module")
    return module


def _shape(value: Optional[Tensor]) -> str:
    return "None" if value is None else str(list(value.shape))


@torch.no_grad()
def check_network(key: str, target: str, network: nn.Module, inputs: Mapping[str, Optional[Tensor]],
                  expected: Sequence[Sequence[int]]) -> None:
    """Run `network(*inputs.values())` once in eval mode (weights and statistics untouched) and
    require an output shape in `expected`; else a ConfigError naming `key`, the class and shapes."""
    described = ", ".join(f"{name} {_shape(value)}" for name, value in inputs.items())
    wanted = " or ".join(str(list(shape)) for shape in expected)
    was_training = network.training
    network.eval()
    try:
        output = network(*inputs.values())
    except Exception as error:  # noqa: BLE001
        raise ConfigError(f"config key '{key}.target': {target} failed on inputs {described} (expected output "
                          f"{wanted}): {described(error)}") from None
    finally:
        network.train(was_training)
    if not isinstance(output, Tensor):
        raise ConfigError(f"config key '{key}.target': {target} returned a {type(output).__name__} for inputs "
                          f"{described}; expected a tensor of shape {wanted}")
    if list(output.shape) not in [list(shape) for shape in expected]:
        raise ConfigError(f"config key '{key}.target': {target} returned shape {_shape(output)} for inputs "
                          f"{described}; expected {wanted}")
