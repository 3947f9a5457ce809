"""Strategy glue: which Lightning strategy a config gets, and our DDP for multi-network models.

Lightning's DDP wraps the whole LightningModule in one DistributedDataParallel. A GAN's
discriminator step leaves G without gradients (and the gradient penalty runs D twice before one
backward), so stock DDP fails with "parameters that were not used in producing the loss" unless
`find_unused_parameters=True` (Lightning issues #20328, #20866). Like stylegan2-ada-pytorch, we
do not wrap at all: replicas start from rank 0's weights and, at every optimizer step, the
gradients of exactly that optimizer's parameters are averaged across ranks in one flat
all-reduce. Any number of networks, forwards and backwards per step work the same way.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Optional

import torch
import torch.distributed as dist
from lightning.pytorch.overrides.distributed import _sync_module_states
from lightning.pytorch.strategies import DDPStrategy
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors
from torch.optim import Optimizer

STRATEGIES = ("auto", "ddp", "deepspeed")


def all_reduce_gradients(params: Iterable[torch.nn.Parameter], world_size: int) -> None:
    """Average the .grad of `params` over all ranks, in place, with one coalesced all-reduce."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads or world_size == 1:
        return
    flat = _flatten_dense_tensors(grads)
    dist.all_reduce(flat)
    flat /= world_size
    for grad, synced in zip(grads, _unflatten_dense_tensors(flat, grads)):
        grad.copy_(synced)


def all_reduce_on_device(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """`tensor` reduced over all ranks ("sum", "mean" or "max"), as a new tensor, without a host
    sync: Lightning's `strategy.reduce` puts a barrier before its all-reduce, and a barrier
    synchronises the device under NCCL. One process: `tensor` itself."""
    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size() == 1:
        return tensor
    reduced = tensor.clone()
    dist.all_reduce(reduced, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return reduced / dist.get_world_size() if op == "mean" else reduced


class GradientAllReduceDDP(DDPStrategy):
    """Data parallel without a DistributedDataParallel wrapper (see the module docstring)."""

    def __init__(self, seed: int, **kwargs: Any):
        super().__init__(**kwargs)
        self.seed = seed

    def configure_ddp(self) -> None:
        # Identical replicas: every rank takes rank 0's parameters and buffers.
        _sync_module_states(self.model)
        # Different noise per rank (same init above, same data order from the sampler's seed):
        # with one global seed every rank would draw the same latents and waste its batch.
        torch.manual_seed(self.seed + self.global_rank)

    def optimizer_step(self, optimizer: Optimizer, closure: Callable[[], Any],
                       model: Optional[Any] = None, **kwargs: Any) -> Any:
        params = [p for group in optimizer.param_groups for p in group["params"]]
        all_reduce_gradients(params, self.world_size)
        return super().optimizer_step(optimizer, closure, model, **kwargs)


def build_strategy(trainer_cfg, seed: int, micro_batch: int = 1):
    """The Lightning strategy for `trainer.strategy` ("auto": DDP when more than one process)."""
    name = trainer_cfg.strategy  # validated against STRATEGIES with the rest of the config
    if name == "deepspeed":
        from dgm_scale.distributed.deepspeed_engines import MultiEngineDeepSpeed

        return MultiEngineDeepSpeed(seed=seed, deepspeed_config=dict(trainer_cfg.deepspeed),
                                    precision=trainer_cfg.precision, micro_batch=micro_batch)
    processes = trainer_cfg.devices * trainer_cfg.num_nodes
    if name == "ddp" or processes > 1:
        return GradientAllReduceDDP(seed=seed)
    return "auto"
