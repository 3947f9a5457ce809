"""NaN/Inf guards: detect a non-finite loss or gradient between backward and step, then stop or skip.

`trainer.nonfinite=stop` raises a `NonFiniteError` naming the iteration, the network and the
quantity; `skip` leaves that step out (no optimizer step, no EMA update), counts it in
`train/nonfinite_skips` and raises once more than `trainer.max_nonfinite_skips` were skipped.

The decision is taken on the device, without a host sync, and acted on later on the host:
- `flag()` computes, before every `opt.step()`, a flag tensor (1.0: some loss term or gradient
  is NaN/Inf) and the step runs gated by it (`StepInterface.step`): a fused optimizer takes it
  as its `found_inf`, as under a GradScaler, and then changes neither the weights nor its state
  (Adam's moments and step count), so the skipped step leaves no trace; G's EMA update is gated
  by the same flag. Under `stop`, the flag stays set from the first non-finite step on: no
  later step is applied either.
- `settle()` reads the flags of all steps since the last call in one host sync, and raises or
  counts exactly as a check at every step would have (same iterations, names and counts). The
  modules call it on every logged iteration (`trainer.log_every`), before every checkpoint is
  written and at the end of training: the error comes at most `log_every - 1` iterations late,
  no checkpoint is ever written past a non-finite step that was not yet settled, and
  `train/nonfinite_skips` is exact in every logged row.
Optimizers without a `found_inf` input (RMSprop, torch's non-fused Adam) are gated on the host:
one sync per step, as before.

Under DDP / DeepSpeed / FSDP the decision is global: each rank checks its own loss and local
gradient (under DeepSpeed ZeRO: its partition of the reduced gradient, which ZeRO keeps out of
`.grad`; under FSDP: its shard of the reduce-scattered gradient),
and one 1-element all-reduce (MAX) per optimizer step, on the device, makes every rank take the
same decision, so a NaN on one rank can neither hang the others nor let the replicas diverge.

Gradients scaled by an fp16 loss scaler may be inf by design: the scaler skips such a step and
lowers its scale, so there only the loss is checked and the scaler's skips are not counted. The
same holds for a gradient penalty, computed from loss-scaled gradients (`scaled_terms`).
"""
from __future__ import annotations

from typing import Any, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from dgm_scale.core.errors import NonFiniteError
from dgm_scale.core.finite import all_finite, first_nonfinite, gradient_flag
from dgm_scale.distributed.interface import step_interface
from dgm_scale.distributed.strategy import all_reduce_on_device

__all__ = ["NonFiniteError", "NonFiniteGuard", "all_finite", "first_nonfinite"]


class NonFiniteGuard:
    """The policy of one module: `flag()` before every `opt.step()`, `settle()` to act on the
    flags; the skip count is checkpointed."""

    def __init__(self, policy: str, max_skips: int):
        self.policy, self.max_skips = policy, max_skips
        self.skips = 0  # settled skips of the run
        # Steps not yet settled: (iteration, network, [loss, gradient] flags, the global flag), on the device
        self._pending: List[Tuple[int, str, Tensor, Tensor]] = []
        self._halted: Optional[Tensor] = None  # `stop`: 1.0 from the first non-finite step on

    def flag(self, module, loss: Tensor, network: nn.Module, name: str, opt: Any,
             scaled_terms: Sequence[Tensor] = ()) -> Tensor:
        """1.0 (float32 [1], on the loss's device): skip this step; 0.0: apply it. No host sync.

        `scaled_terms`: loss terms computed from loss-scaled gradients (the gradient penalty),
        which overflow like the gradients under fp16 and are then left to the scaler too.
        """
        trainer = module._trainer
        steps = step_interface(trainer)
        unscaled = not steps.owns_overflow
        terms = (loss, *(scaled_terms if unscaled else ()))
        # [loss, gradient] flags in one tensor; the losses stacked (a copy: the fused check writes in place)
        local = torch.zeros(2, device=loss.device)
        one = torch.ones(1, device=loss.device)
        torch._amp_foreach_non_finite_check_and_unscale_([torch.stack([t.detach().float() for t in terms])],
                                                         local[:1], one)
        if unscaled:
            gradient_flag(steps.local_gradients(opt, network), local[1:], one)
        found = local.amax().reshape(1)
        if trainer is not None and trainer.world_size > 1:
            found = all_reduce_on_device(found, "max")
        self._pending.append((module.iteration + 1, name, local, found))
        if self.policy == "stop":
            self._halted = found if self._halted is None else torch.maximum(self._halted, found)
            return self._halted
        return found

    def settle(self) -> None:
        """Act on the steps flagged since the last call, in order: raise under `stop` or past
        the skip limit, else count the skips (one host sync for all of them)."""
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        flags = torch.stack([torch.cat([local, found]) for _, _, local, found in pending]).cpu().tolist()
        for (iteration, name, _, _), (loss_bad, grad_bad, found) in zip(pending, flags):
            if found:
                self._act(iteration, name, bool(loss_bad), bool(grad_bad))

    def _act(self, iteration: int, name: str, loss_bad: bool, grad_bad: bool) -> None:
        quantity = "loss" if loss_bad else ("gradient" if grad_bad else "loss or gradient on another rank")
        where = f"non-finite {quantity} in the {name} step at iteration {iteration}"
        if self.policy == "stop":
            raise NonFiniteError(f"{where} (trainer.nonfinite=stop)")
        self.skips += 1
        if self.skips > self.max_skips:
            raise NonFiniteError(f"{where}: {self.skips} non-finite steps, more than "
                                 f"trainer.max_nonfinite_skips={self.max_skips}")
