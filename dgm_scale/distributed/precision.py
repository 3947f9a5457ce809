"""Precision glue: fp16 autocast with one loss scaler per network, and the current loss scale.

Lightning's `16-mixed` plugin keeps ONE GradScaler for all optimizers: in a GAN, an overflow in
D's backward then also halves G's scale, and the scale is updated twice per iteration by
unrelated losses. Here every optimizer (G's, D's; the VAE's one) gets its own GradScaler: its
loss is scaled by its scaler in `manual_backward(loss, opt)`, and `opt.step()` unscales, skips
on inf/NaN and updates that scaler alone. All scalers are saved in checkpoints.
Lightning also turns `16-mixed` on CPU into bf16; this plugin runs true fp16 autocast on CPU
too (torch >= 2.3), so the scaling path is tested without a GPU.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List

import torch
from lightning.pytorch.core.optimizer import LightningOptimizer
from lightning.pytorch.plugins.precision import MixedPrecision
from torch import Tensor
from torch.optim import Optimizer

PRECISIONS = ("32-true", "bf16-mixed", "16-mixed")


def _unwrap(optimizer: Any) -> Any:
    return optimizer.optimizer if isinstance(optimizer, LightningOptimizer) else optimizer


class PerOptimizerScaledPrecision(MixedPrecision):
    """fp16 autocast; a GradScaler per optimizer (see the module docstring)."""

    def __init__(self, device: str):
        super().__init__("16-mixed", device)
        # MixedPrecision made a shared scaler (pre_backward would scale every loss with it): none.
        self.scaler = None
        self.scalers: List[torch.amp.GradScaler] = []
        self._scaler_index: Dict[int, int] = {}  # id(optimizer) -> index in `scalers`
        self._pending_state: List[Dict[str, Any]] = []

    def connect(self, model, optimizers, lr_schedulers):
        # Strategy.setup hands over the optimizers in configure_optimizers' order: scaler i
        # belongs to optimizer i, in this run and in any run resumed from its checkpoints.
        self.scalers = [torch.amp.GradScaler(self.device) for _ in optimizers]
        self._scaler_index = {id(_unwrap(opt)): index for index, opt in enumerate(optimizers)}
        for scaler, state in zip(self.scalers, self._pending_state):
            scaler.load_state_dict(state)
        self._pending_state = []
        return super().connect(model, optimizers, lr_schedulers)

    def scaler_of(self, optimizer: Any) -> torch.amp.GradScaler:
        optimizer = _unwrap(optimizer)
        if id(optimizer) not in self._scaler_index:
            raise RuntimeError("under 16-mixed, call self.manual_backward(loss, optimizer) so that the "
                               "loss is scaled by that optimizer's scaler")
        return self.scalers[self._scaler_index[id(optimizer)]]

    def backward(self, tensor: Tensor, model, optimizer: Any, *args: Any, **kwargs: Any) -> None:
        # manual_backward(loss, opt) arrives with optimizer=None and opt as the first extra arg.
        scaled = self.scaler_of(args[0] if args else optimizer).scale(tensor)
        super().backward(scaled, model, optimizer, *args, **kwargs)

    def optimizer_step(self, optimizer: Optimizer, model, closure: Callable[[], Any], **kwargs: Any) -> Any:
        closure()  # manual optimisation: gradients are already there
        scaler = self.scaler_of(optimizer)
        skip = getattr(_unwrap(optimizer), "found_inf", None)  # a NaN guard's verdict (interface.gated_step)
        if skip is not None:
            _poison_gradient(optimizer, skip)
        scaler.unscale_(optimizer)  # before _after_closure: gradient clipping sees true gradients
        self._after_closure(model, optimizer)
        step_output = scaler.step(optimizer)  # skipped when a gradient is inf/NaN
        scaler.update()
        return step_output

    def state_dict(self) -> Dict[str, Any]:
        return {"scalers": [scaler.state_dict() for scaler in self.scalers]}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        states = list(state_dict.get("scalers", []))
        if self.scalers:
            for scaler, state in zip(self.scalers, states):
                scaler.load_state_dict(state)
        else:  # restored before setup: applied when the optimizers connect
            self._pending_state = states


def _poison_gradient(optimizer: Any, skip: Tensor) -> None:
    """An inf in one gradient element where `skip` is 1.0 (no host sync): the scaler, which sets
    the fused optimizer's `found_inf` itself, then skips the step, as it would for the NaN
    gradients a NaN loss makes (and lowers its scale the same way)."""
    for group in _unwrap(optimizer).param_groups:
        for param in group["params"]:
            if param.grad is not None:
                first = param.grad[(0,) * param.grad.dim()]
                first.add_(torch.where(skip.reshape(()) > 0, float("inf"), 0.0).to(first.dtype))
                return


def build_precision_plugins(precision: str, accelerator: str, strategy: str) -> list:
    """Lightning `plugins=` for a precision: ours for 16-mixed (outside DeepSpeed, which scales
    each engine's loss itself), none otherwise (Lightning's own plugins handle the rest)."""
    if precision != "16-mixed" or strategy == "deepspeed":
        return []
    device = "cuda" if accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available()) else "cpu"
    return [PerOptimizerScaledPrecision(device)]
