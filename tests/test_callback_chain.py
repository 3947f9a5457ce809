"""CallbackChain: stateless callbacks handed to Lightning as one (core/chain.py, train.chained)."""
import lightning as L
import pytest

from dgm_scale.core.chain import CallbackChain, callbacks_of
from dgm_scale.training import chained


class Recorder(L.Callback):
    def __init__(self, name: str, calls: list):
        self.name, self.calls = name, calls

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.calls.append((self.name, batch_idx))


class StartOnly(L.Callback):
    def __init__(self, calls: list):
        self.calls = calls

    def on_train_start(self, trainer, pl_module) -> None:
        self.calls.append(("start", None))


class Stateful(L.Callback):
    def state_dict(self) -> dict:
        return {"x": 1}


def test_chain_calls_the_members_that_implement_a_hook_in_order():
    calls = []
    chain = CallbackChain([Recorder("a", calls), StartOnly(calls), Recorder("b", calls)])
    chain.on_train_batch_end(None, None, None, None, 7)
    chain.on_train_start(None, None)
    chain.on_validation_start(None, None)  # nobody implements it: Callback's no-op
    assert calls == [("a", 7), ("b", 7), ("start", None)]
    assert "on_validation_start" not in vars(chain) and "on_train_batch_end" in vars(chain)


def test_callbacks_with_checkpoint_state_are_never_chained():
    with pytest.raises(ValueError, match="Stateful has checkpoint state"):
        CallbackChain([Stateful(), StartOnly([])])
    first, second, stateful, third = StartOnly([]), StartOnly([]), Stateful(), StartOnly([])
    out = chained([first, second, stateful, third])
    assert isinstance(out[0], CallbackChain) and out[0].members == [first, second]
    assert out[1:] == [stateful, third]  # a run of one stays itself

    class Trainer:
        callbacks = out
    assert list(callbacks_of(Trainer, StartOnly)) == [first, second, third]
