"""NaN/Inf guards: detect a non-finite loss or gradient between backward and step, then stop or skip.

`trainer.nonfinite=stop` raises a `NonFiniteError` naming the iteration, the network and the
quantity; `skip` leaves that step out (no optimizer step, no EMA update), counts it in
`train/nonfinite_skips` and raises once more than `trainer.max_nonfinite_skips` were skipped.

Under DDP / DeepSpeed the decision is global: each rank checks its own loss and local gradient
(under DeepSpeed ZeRO: its partition of the reduced gradient, which ZeRO keeps out of `.grad`),
and one 1-element all-reduce per optimizer step (`reduce_boolean_decision`) makes every rank take
the same decision, so a NaN on one rank can neither hang the others in the gradient all-reduce
nor let the replicas diverge. (Folding the flag into the gradient all-reduce would save that
collective, but that all-reduce runs inside `optimizer.step()`, after the decision is needed,
and not at all with one process or under DeepSpeed.)

Gradients scaled by an fp16 loss scaler may be inf by design: the scaler skips such a step and
lowers its scale, so there only the loss is checked and the scaler's skips are not counted. The
same holds for a gradient penalty, computed from loss-scaled gradients (`scaled_terms`).
"""
from __future__ import annotations

from typing import Any, Sequence

from torch import Tensor, nn

from dgm_scale.core.errors import NonFiniteError
from dgm_scale.core.finite import all_finite, first_nonfinite
from dgm_scale.core.lightning_internals import count_skipped_optimizer_step
from dgm_scale.distributed.interface import step_interface

__all__ = ["NonFiniteError", "NonFiniteGuard", "all_finite", "first_nonfinite"]


class NonFiniteGuard:
    """The policy of one module: `check()` before every `opt.step()`; the skip count is checkpointed."""

    def __init__(self, policy: str, max_skips: int):
        self.policy, self.max_skips = policy, max_skips
        self.skips = 0

    def _global(self, trainer, bad: bool) -> bool:
        """Any rank's flag, on every rank (a collective: every rank calls it at every step)."""
        if trainer is None or trainer.world_size == 1:
            return bad
        return bool(trainer.strategy.reduce_boolean_decision(bad, all=False))

    def check(self, module, loss: Tensor, network: nn.Module, name: str, opt: Any,
              scaled_terms: Sequence[Tensor] = ()) -> bool:
        """True: apply the step. False: skip it (gradients cleared, Lightning's step counter
        advanced so that iterations keep their numbers). Raises under `stop` or past the limit.

        `scaled_terms`: loss terms computed from loss-scaled gradients (the gradient penalty),
        which overflow like the gradients under fp16 and are then left to the scaler too.
        """
        trainer = module._trainer
        steps = step_interface(trainer)
        unscaled = not steps.owns_overflow
        # Copies of the loss terms (the fused check writes in place), then one check of all.
        losses = [term.detach().clone() for term in (loss, *(scaled_terms if unscaled else ()))]
        grads = steps.local_gradients(opt, network) if unscaled else []
        bad = not all_finite(losses + grads)
        # Two flags in one decision would need two collectives; the quantity only names the error.
        if not self._global(trainer, bad):
            return True
        loss_bad = bad and not all_finite(losses)
        grad_bad = bad and not loss_bad
        quantity = "loss" if loss_bad else ("gradient" if grad_bad else "loss or gradient on another rank")
        where = f"non-finite {quantity} in the {name} step at iteration {module.iteration + 1}"
        if self.policy == "stop":
            raise NonFiniteError(f"{where} (trainer.nonfinite=stop)")
        self.skips += 1
        if self.skips > self.max_skips:
            raise NonFiniteError(f"{where}: {self.skips} non-finite steps, more than "
                                 f"trainer.max_nonfinite_skips={self.max_skips}")
        opt.zero_grad(set_to_none=True)
        # Our iterations are global_step // steps per iteration, and the noise is keyed to them:
        # a skipped step must still count, or every later iteration would be numbered (and seeded) anew.
        count_skipped_optimizer_step(opt)
        return False

