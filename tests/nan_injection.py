"""Test helper: make one network's loss NaN at one iteration (optionally on one rank only).

`install("generator:4")` (or "discriminator:4:1", "encoder-decoder:2", "autoregressive model:3") patches the modules so
that the loss of that network's step in iteration 4 (1-based) is NaN - on rank 1 only when a
rank is given. "generator-gradient:4" (or "discriminator-gradient:...") leaves the loss finite
and makes the gradient of the network's first parameter NaN instead, in its backward.
tests/ddp_worker.py installs the spec in env DGM_TEST_NAN.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

from dgm_scale.families.autoregressive.module import AutoregressiveModule
from dgm_scale.families.gan.module import GANModule
from dgm_scale.families.vae.module import VAEModule


def _due(module, iteration: int, rank: int | None) -> bool:
    return module.iteration + 1 == iteration and (rank is None or module.global_rank == rank)


def _nan(fn: Callable) -> Callable:
    return lambda *args, **kwargs: fn(*args, **kwargs) * float("nan")


def install(spec: str, setattr: Callable = setattr) -> None:
    network, iteration, *rank = spec.split(":")
    iteration, rank = int(iteration), (int(rank[0]) if rank else None)
    if network == "encoder-decoder":
        elbo = VAEModule.elbo

        def poisoned_elbo(self, *args, **kwargs):
            terms = elbo(self, *args, **kwargs)
            if self.training and _due(self, iteration, rank):
                terms["loss"] = terms["loss"] * float("nan")
            return terms
        setattr(VAEModule, "elbo", poisoned_elbo)
        return
    if network == "autoregressive model":
        nll = AutoregressiveModule.nll_per_symbol

        def poisoned_nll(self, *args, **kwargs):
            value = nll(self, *args, **kwargs)
            return value * float("nan") if self.rnn.training and _due(self, iteration, rank) else value
        setattr(AutoregressiveModule, "nll_per_symbol", poisoned_nll)
        return
    network, _, quantity = network.partition("-")
    name, field = {"generator": ("generator_step", "g_loss"), "discriminator": ("discriminator_step", "d_loss")}[network]
    step = getattr(GANModule, name)

    def poisoned_step(self, *args, **kwargs):
        if not _due(self, iteration, rank):
            return step(self, *args, **kwargs)
        if quantity == "gradient":  # the hook runs in backward, before any gradient reduction
            first_param = next(getattr(self, network).parameters())
            handle = first_param.register_hook(lambda grad: grad * float("nan"))
            try:
                return step(self, *args, **kwargs)
            finally:
                handle.remove()
        clean = self.adversarial
        self.adversarial = dataclasses.replace(clean, **{field: _nan(getattr(clean, field))})
        try:
            return step(self, *args, **kwargs)
        finally:
            self.adversarial = clean
    setattr(GANModule, name, poisoned_step)
