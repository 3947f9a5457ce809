"""What a module asks about its optimizer steps, whatever strategy and precision run them.

One small interface instead of checks for concrete strategy classes in the callers:

- `loss_scale(opt)`: the factor `opt`'s next backward is scaled by (1.0 when nothing scales it);
  a gradient penalty / R1 takes its inner gradient of the scaled output with it (PyTorch AMP
  docs, "Gradient penalty"), so fp16 gradients neither underflow nor stay scaled.
- `owns_overflow`: True where an fp16 loss scaler skips steps with inf/NaN gradients itself
  (then only the loss is a NaN guard's business).
- `local_gradients(opt, network)`: the gradients this rank is about to step with.
- `gradient_norm(opt, network)`: the global norm of the gradient `opt` just stepped with.
- `full_weights(module)`: a block inside which the module's networks hold their full weights
  (FSDP gathers its shards; every rank must enter it, then one rank alone may sample).

`step_interface(trainer)` returns the strategy's own (DeepSpeed: all four live in its engines)
or the default below, with the precision plugin's loss scalers where it has them (`scaler_of`).
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import Any, Callable, ContextManager, Optional

import torch
from torch import Tensor, nn


class StepInterface:
    """Plain gradients in `.grad` (our DDP averages them inside `opt.step()`), optionally scaled
    by a GradScaler per optimizer (`scaler_of(opt)`)."""

    def __init__(self, scaler_of: Optional[Callable[[Any], Any]] = None):
        self._scaler_of = scaler_of

    @property
    def owns_overflow(self) -> bool:
        return self._scaler_of is not None

    def loss_scale(self, optimizer: Any) -> float:
        return 1.0 if self._scaler_of is None else float(self._scaler_of(optimizer).get_scale())

    def local_gradients(self, optimizer: Any, network: nn.Module) -> list[Tensor]:
        return [p.grad for p in network.parameters() if p.grad is not None]

    def gradient_norm(self, optimizer: Any, network: nn.Module) -> Tensor:
        """L2 norm of the gradient just stepped with: all ranks' average, unscaled (our DDP
        averages and the scaler unscales `.grad` in place inside step())."""
        norms = [p.grad.detach().float().norm() for p in network.parameters() if p.grad is not None]
        return torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.zeros(())

    def full_weights(self, module: nn.Module) -> ContextManager[None]:
        """Every rank holds every weight already."""
        return nullcontext()


DEFAULT = StepInterface()


def step_interface(trainer) -> StepInterface:
    """The StepInterface of `trainer`'s strategy and precision (the default outside a trainer)."""
    if trainer is None:
        return DEFAULT
    own = getattr(trainer.strategy, "step_interface", None)
    if own is not None:
        return own()
    scaler_of = getattr(trainer.precision_plugin, "scaler_of", None)
    return DEFAULT if scaler_of is None else StepInterface(scaler_of)
