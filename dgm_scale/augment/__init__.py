"""Augmentation of what the discriminator sees: DiffAugment policies and ADA (see the modules).

    augmenter = Augmenter(policies=["translation", "cutout"], ada_ops=[], ...)
    x_seen = augmenter(x, u)      # u [N, augmenter.uniforms] in [0, 1): keyed by the caller
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

from torch import Tensor, nn

from dgm_scale.augment.ada import ADA_OPS, AdaptiveProbability, ada_augment
from dgm_scale.augment.ada import uniforms_needed as ada_uniforms
from dgm_scale.augment.diffaugment import POLICIES, diff_augment
from dgm_scale.augment.diffaugment import uniforms_needed as diff_uniforms


class Augmenter(nn.Module):
    """DiffAugment's `policies` (always applied), then ADA's `ada_ops` with its adaptive p
    (`ada`: an AdaptiveProbability; None: no ADA)."""

    def __init__(self, policies: Sequence[str] = (), ada_ops: Sequence[str] = (),
                 ada: Optional[AdaptiveProbability] = None):
        super().__init__()
        self.policies, self.ada_ops = list(policies), list(ada_ops) if ada is not None else []
        self.ada = ada
        self.uniforms = diff_uniforms(self.policies) + ada_uniforms(self.ada_ops)

    @property
    def enabled(self) -> bool:
        return self.uniforms > 0

    def forward(self, x: Tensor, u: Tensor) -> Tensor:
        used = diff_uniforms(self.policies)
        if self.policies:
            x = diff_augment(x, self.policies, u[:, :used])
        if self.ada_ops:
            x = ada_augment(x, self.ada_ops, self.ada.p.to(x.device, x.dtype), u[:, used:])
        return x

    def accumulate(self, real_logits: Tensor) -> None:
        if self.ada is not None:
            self.ada.accumulate(real_logits)

    def adjust(self, reduce_sum: Callable[[Tensor], Tensor]) -> bool:
        return self.ada is not None and self.ada.adjust(reduce_sum)


__all__ = ["ADA_OPS", "AdaptiveProbability", "Augmenter", "POLICIES", "ada_augment", "diff_augment"]
