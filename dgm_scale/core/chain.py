"""Several stateless Lightning callbacks as one.

Lightning calls every hook of every callback it holds - ~8 hooks per training iteration (batch
start and end, before / after each backward, before each optimizer step), each through its
profiler's context manager - whether the callback implements the hook or not. A chain of N
callbacks is one callback to Lightning: per hook it calls only the members that implement it,
in order. Callbacks with state (`state_dict`) stay Lightning's own: their checkpoint entries
are keyed by their class.
"""
from __future__ import annotations

from typing import Iterator, List, Type, TypeVar

import lightning as L

T = TypeVar("T")

#: the hooks a member may implement (Lightning's callback hooks, without the state ones)
HOOKS = tuple(name for name in dir(L.Callback) if (name.startswith("on_") or name in ("setup", "teardown"))
              and name not in ("on_save_checkpoint", "on_load_checkpoint"))


def _implements(callback: L.Callback, hook: str) -> bool:
    return getattr(type(callback), hook) is not getattr(L.Callback, hook)


def has_state(callback: L.Callback) -> bool:
    """Whether `callback` takes part in checkpoints (then it cannot be chained)."""
    return any(_implements(callback, hook) for hook in ("state_dict", "load_state_dict", "on_save_checkpoint",
                                                         "on_load_checkpoint"))


class CallbackChain(L.Callback):
    def __init__(self, members: List[L.Callback]):
        for member in members:
            if has_state(member):
                raise ValueError(f"{type(member).__name__} has checkpoint state: give it to the Trainer itself")
        self.members = list(members)
        # Lightning reads the key at every hook call (its profiler's names): built once.
        self._state_key = "CallbackChain[" + ",".join(type(member).__qualname__ for member in self.members) + "]"
        for hook in HOOKS:
            implementing = [getattr(member, hook) for member in self.members if _implements(member, hook)]
            if implementing:
                setattr(self, hook, self._forward(implementing))

    @staticmethod
    def _forward(methods):
        def forward(*args, **kwargs) -> None:
            for method in methods:
                method(*args, **kwargs)
        return forward

    @property
    def state_key(self) -> str:
        return self._state_key


def callbacks_of(trainer, cls: Type[T]) -> Iterator[T]:
    """The callbacks of class `cls` the trainer holds, chained ones included."""
    for callback in trainer.callbacks:
        for member in callback.members if isinstance(callback, CallbackChain) else [callback]:
            if isinstance(member, cls):
                yield member
