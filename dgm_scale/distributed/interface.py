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
- `step(opt, skip)`: `opt.step()` gated by a device flag (a NaN guard's), without a host sync
  where the optimizer takes a `found_inf` (fused ones).
- `grad_scale(opt)`: `loss_scale` as a device tensor (reading the scale would sync the host).
- `backward_per_pass`: whether a loss over several forward passes of one network should be
  backpropagated one pass at a time (`GenerativeModule.passes_apart`).

`step_interface(trainer)` returns the strategy's own (DeepSpeed: all four live in its engines)
or the default below, with the precision plugin's loss scalers where it has them (`scaler_of`).
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import Any, Callable, ContextManager, Optional

import torch
from torch import Tensor, nn

from dgm_scale.core.lightning_internals import count_skipped_optimizer_step


class StepInterface:
    """Plain gradients in `.grad` (our DDP averages them inside `opt.step()`), optionally scaled
    by a GradScaler per optimizer (`scaler_of(opt)`)."""

    def __init__(self, scaler_of: Optional[Callable[[Any], Any]] = None):
        self._scaler_of = scaler_of

    @property
    def owns_overflow(self) -> bool:
        return self._scaler_of is not None

    #: One backward per forward pass of a network (see GenerativeModule.passes_apart) instead of
    #: one through all of them: True where a gradient summed over passes costs more than the
    #: extra backward calls (FSDP: the sum would be held unsharded between the passes).
    backward_per_pass: bool = False

    def loss_scale(self, optimizer: Any) -> float:
        return 1.0 if self._scaler_of is None else float(self._scaler_of(optimizer).get_scale())

    def grad_scale(self, optimizer: Any) -> float | Tensor:
        if self._scaler_of is None:
            return 1.0
        return self._scaler_of(optimizer).scale(torch.ones((), device=_device_of(optimizer)))

    def local_gradients(self, optimizer: Any, network: nn.Module) -> list[Tensor]:
        return [p.grad for p in network.parameters() if p.grad is not None]

    def step(self, optimizer: Any, skip: Tensor) -> None:
        """`optimizer.step()` where `skip` (float [1] on the device) is 0.0; where it is 1.0 the
        weights and the optimizer's state stay exactly as they are (see gated_step)."""
        gated_step(optimizer, unwrap(optimizer), skip)

    def gradient_norm(self, optimizer: Any, network: nn.Module) -> Tensor:
        """L2 norm of the gradient just stepped with: all ranks' average, unscaled (our DDP
        averages and the scaler unscales `.grad` in place inside step())."""
        norms = [p.grad.detach().float().norm() for p in network.parameters() if p.grad is not None]
        return torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.zeros(())

    def full_weights(self, module: nn.Module) -> ContextManager[None]:
        """Every rank holds every weight already."""
        return nullcontext()


def unwrap(optimizer: Any) -> Any:
    """The torch optimizer inside Lightning's wrapper."""
    return getattr(optimizer, "_optimizer", optimizer)


def _device_of(optimizer: Any) -> torch.device:
    return unwrap(optimizer).param_groups[0]["params"][0].device


def gated_step(optimizer: Any, inner: Any, skip: Tensor) -> None:
    """`optimizer.step()` gated by `skip`, which the torch optimizer `inner` applies.

    A fused optimizer (`_step_supports_amp_scaling`) reads `found_inf` as under torch's
    GradScaler: at 1.0 it updates neither weights nor state (Adam undoes its step-count
    increment): no host sync. Others are gated on the host (one sync); a skipped step then
    clears the gradients and advances Lightning's step counter as a real step would."""
    if getattr(inner, "_step_supports_amp_scaling", False):
        inner.found_inf = skip.reshape(())  # (the shape of a GradScaler's)
        try:
            optimizer.step()
        finally:
            inner.__dict__.pop("found_inf", None)  # (a GradScaler's step may have removed it)
    elif not bool(skip):
        optimizer.step()
    else:
        optimizer.zero_grad(set_to_none=True)
        # Our iterations are global_step // steps per iteration, and the noise is keyed to them:
        # a skipped step must still count, or every later iteration would be numbered (and seeded) anew.
        count_skipped_optimizer_step(optimizer)


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
