"""Strategy glue: which Lightning strategy a config gets, and our DDP for multi-network models.

Lightning's DDP wraps the whole LightningModule in one DistributedDataParallel. A GAN's
discriminator step leaves G without gradients (and the gradient penalty runs D twice before one
backward), so stock DDP fails with "parameters that were not used in producing the loss" unless
`find_unused_parameters=True` (Lightning issues #20328, #20866). Like stylegan2-ada-pytorch, we
do not wrap at all: replicas start from rank 0's weights and, at every optimizer step, the
gradients of exactly that optimizer's parameters are averaged across ranks in one flat
all-reduce. Any number of networks, forwards and backwards per step work the same way.
With `trainer.ddp.overlap` (the default) that all-reduce runs in buckets launched during backward
(distributed/buckets.py); off, in one flat all-reduce at the step.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Optional

import torch
import torch.distributed as dist
from lightning.pytorch.overrides.distributed import _sync_module_states
from lightning.pytorch.strategies import DDPStrategy
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors
from torch.optim import Optimizer

from dgm_scale.distributed.buckets import GradientBuckets

STRATEGIES = ("auto", "ddp", "deepspeed", "fsdp")


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

    def __init__(self, seed: int, bucket_mb: Optional[float] = None, **kwargs: Any):
        super().__init__(**kwargs)
        self.seed = seed
        self.bucket_mb = bucket_mb  # None: one flat all-reduce at the step
        self._buckets: dict = {}  # id(optimizer) -> GradientBuckets

    def configure_ddp(self) -> None:
        # Identical replicas: every rank takes rank 0's parameters and buffers.
        _sync_module_states(self.model)
        # Different noise per rank (same init above, same data order from the sampler's seed):
        # with one global seed every rank would draw the same latents and waste its batch.
        torch.manual_seed(self.seed + self.global_rank)

    def setup(self, trainer) -> None:
        super().setup(trainer)  # builds the optimizers when fitting
        if self.bucket_mb is not None and self.world_size > 1:
            self._buckets = {id(opt): GradientBuckets([p for g in opt.param_groups for p in g["params"]],
                                                      self.world_size, self.bucket_mb) for opt in self.optimizers}

    def backward(self, closure_loss, optimizer, *args: Any, **kwargs: Any):
        # manual_backward(loss, opt) arrives as backward(loss, None, opt): arm opt's buckets only.
        target = optimizer if optimizer is not None else (args[0] if args else None)
        target = getattr(target, "optimizer", target)  # a LightningOptimizer wraps the optimizer
        for key, buckets in self._buckets.items():
            buckets.arm() if key == id(target) else buckets.disarm()
        return super().backward(closure_loss, optimizer, *args, **kwargs)

    def optimizer_step(self, optimizer: Optimizer, closure: Callable[[], Any],
                       model: Optional[Any] = None, **kwargs: Any) -> Any:
        buckets = self._buckets.get(id(optimizer))
        if buckets is not None:
            buckets.finish()
        else:
            all_reduce_gradients([p for group in optimizer.param_groups for p in group["params"]], self.world_size)
        return super().optimizer_step(optimizer, closure, model, **kwargs)

    def teardown(self) -> None:
        for buckets in self._buckets.values():
            buckets.remove()
        self._buckets = {}
        super().teardown()


def build_strategy(trainer_cfg, seed: int, micro_batch: int = 1):
    """The Lightning strategy for `trainer.strategy` ("auto": DDP when more than one process)."""
    name = trainer_cfg.strategy  # validated against STRATEGIES with the rest of the config
    if name == "deepspeed":
        from dgm_scale.distributed.deepspeed_engines import MultiEngineDeepSpeed

        return MultiEngineDeepSpeed(seed=seed, deepspeed_config=dict(trainer_cfg.deepspeed),
                                    precision=trainer_cfg.precision, micro_batch=micro_batch)
    if name == "fsdp":
        from dgm_scale.distributed.fsdp import FullyShardedStrategy

        fsdp = trainer_cfg.fsdp
        return FullyShardedStrategy(seed=seed, reshard_after_forward=fsdp.reshard_after_forward,
                                    param_dtype=fsdp.param_dtype, cpu_offload=fsdp.cpu_offload,
                                    return_freed_memory=fsdp.return_freed_memory,
                                    async_save=fsdp.async_save)
    processes = trainer_cfg.devices * trainer_cfg.num_nodes
    if name == "ddp" or processes > 1:
        ddp = trainer_cfg.ddp
        return GradientAllReduceDDP(seed=seed, bucket_mb=ddp.bucket_mb if ddp.overlap else None)
    return "auto"
