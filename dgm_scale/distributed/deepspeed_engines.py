"""DeepSpeed ZeRO for models with several optimizers: one DeepSpeed engine per optimizer.

Lightning's DeepSpeedStrategy accepts exactly one optimizer and CUDA only (Lightning #19773).
Here every optimizer (G's, D's; the VAE's single one) gets its own `deepspeed.initialize` engine
(its own ZeRO partitioning, loss scaling, step), under one Lightning Trainer:
- the modules call `manual_backward(loss, opt)`: the optimizer tells us which engine runs the
  backward (ZeRO's gradient hooks and loss scaler live in the engine);
- `opt.step()` becomes that engine's `step()`;
- forwards use the raw networks, never the engines: an engine's forward registers backward
  hooks, which break a gradient penalty or a frozen D inside G's loss (seen in our CPU study).
Replicas, the process group and per-rank seeding come from GradientAllReduceDDP; DeepSpeed
does the gradient reduction itself, so the all-reduce there is skipped.
"""
from __future__ import annotations

import io
import secrets
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional

import torch
from lightning.pytorch.core.optimizer import LightningOptimizer
from torch import nn
from torch.optim import Optimizer

from dgm_scale.distributed.interface import StepInterface, gated_step
from dgm_scale.distributed.zero_checkpoint import (SHARD_FOLDER, ZERO_PARTITIONS, ZERO_SHARDS, load_partition,
                                                  prune_shards, read_shard, write_shard)
from dgm_scale.distributed.strategy import GradientAllReduceDDP
from dgm_scale.distributed.zero_reshard import repartition



def _precision_block(precision: str) -> Dict[str, Any]:
    """DeepSpeed's own precision for `trainer.precision`. bf16-mixed: none - the weights (and
    ZeRO's partitions) stay float32 and Lightning's bf16 autocast computes, as without DeepSpeed
    (DeepSpeed's bf16 mode turns the weights themselves into bf16, which our raw forwards then
    feed float32 inputs: "expected scalar type BFloat16 but found Float", seen on CPU). 16-mixed:
    DeepSpeed's fp16 with its loss scaler per engine (GPU only; the config check says so)."""
    if precision.startswith("16"):
        return {"fp16": {"enabled": True, "initial_scale_power": 16}}
    return {}


class MultiEngineDeepSpeed(GradientAllReduceDDP):
    def __init__(self, seed: int, deepspeed_config: Dict[str, Any], precision: str, micro_batch: int, **kwargs: Any):
        super().__init__(seed=seed, **kwargs)
        self.fp16 = precision.startswith("16")  # then each engine's loss scaler skips overflowing steps
        self.deepspeed_config = {
            "train_micro_batch_size_per_gpu": micro_batch,
            "gradient_accumulation_steps": 1,
            # DeepSpeed 0.19 defaults to clipping at 1.0 when unset: training would silently differ.
            "gradient_clipping": 0.0,
            "zero_allow_untested_optimizer": True,
            **_precision_block(precision),
            **deepspeed_config,
        }
        self._engines: Dict[int, Any] = {}  # id(optimizer) -> engine
        self._shard_dirs: set = set()  # checkpoint folders this run wrote ZeRO shards into

    def setup(self, trainer) -> None:
        super().setup(trainer)  # process group, identical replicas, Lightning's optimizers
        import deepspeed

        deepspeed.init_distributed(dist_backend=torch.distributed.get_backend())
        networks = self.lightning_module.networks()
        engine_optimizers = []
        for optimizer in self.optimizers:
            owned = {id(p) for group in optimizer.param_groups for p in group["params"]}
            # The networks this optimizer trains (G; D; or encoder + decoder for the VAE).
            model = nn.ModuleList([net for net in networks.values() if {id(p) for p in net.parameters()} <= owned])
            engine, engine_optimizer, _, _ = deepspeed.initialize(
                model=model, optimizer=optimizer, config=self.deepspeed_config, dist_init_required=False)
            self._engines[id(engine_optimizer)] = engine
            engine_optimizers.append(engine_optimizer)
        self.optimizers = engine_optimizers  # assign (not append): rebuilds Lightning's wrappers

    def _engine_of(self, optimizer: Optional[Any]):
        if isinstance(optimizer, LightningOptimizer):  # (ZeRO optimizers have an .optimizer too)
            optimizer = optimizer.optimizer
        if optimizer is None or id(optimizer) not in self._engines:
            raise RuntimeError("under trainer.strategy=deepspeed, call self.manual_backward(loss, optimizer)")
        return self._engines[id(optimizer)]

    def backward(self, closure_loss: torch.Tensor, optimizer: Optional[Optimizer], *args: Any, **kwargs: Any):
        # manual_backward(loss, opt) arrives as backward(loss, None, opt).
        self._engine_of(args[0] if args else optimizer).backward(closure_loss)
        return closure_loss

    def optimizer_step(self, optimizer: Optimizer, closure: Callable[[], Any], model: Optional[Any] = None,
                       **kwargs: Any) -> Any:
        closure()  # manual optimisation: a no-op; gradients are already in the engine
        return self._engine_of(optimizer).step()

    def step_interface(self) -> "DeepSpeedSteps":
        return DeepSpeedSteps(self)

    def optimizer_state(self, optimizer: Optimizer) -> Dict[str, Any]:
        """A placeholder: `save_checkpoint` writes this rank's ZeRO partition to a file of its own
        and names the files in the checkpoint (see distributed/zero_checkpoint.py)."""
        return {ZERO_SHARDS: None}

    def save_checkpoint(self, checkpoint: Dict[str, Any], filepath: Any, storage_options: Optional[Any] = None) -> None:
        """Every rank writes its partitions (in parallel), then rank 0 the checkpoint naming them."""
        if "optimizer_states" in checkpoint:
            directory = Path(filepath).parent
            folder = f"{SHARD_FOLDER}/{self.broadcast(secrets.token_hex(8), src=0)}"
            for index, optimizer in enumerate(self.optimizers):
                write_shard(self._engine_of(optimizer).optimizer.state_dict(), directory, folder, self.global_rank, index)
            self.barrier("zero-shards-written")
            checkpoint["optimizer_states"] = [{ZERO_SHARDS: {"dir": folder, "world_size": self.world_size}}
                                              for _ in self.optimizers]
            if self.is_global_zero:
                prune_shards(directory, keep=[folder])
                self._shard_dirs.add(directory)
        super().save_checkpoint(checkpoint, filepath, storage_options)

    def teardown(self) -> None:
        """Rank 0 deletes the shard folders no checkpoint names any more (e.g. those of iter_*
        checkpoints pruned after the last save)."""
        if self.is_global_zero:
            for directory in self._shard_dirs:
                prune_shards(directory)
        super().teardown()

    def load_checkpoint(self, checkpoint_path: Any, *args: Any, **kwargs: Any) -> Dict[str, Any]:
        self._checkpoint_dir = Path(checkpoint_path).parent  # where its shard files are
        return super().load_checkpoint(checkpoint_path, *args, **kwargs)

    def _partitions(self, state: Mapping[str, Any], index: int) -> List[Optional[Dict[str, Any]]]:
        """What each engine's load_state_dict takes: a list by rank, this rank's entry filled. On
        the world size that wrote them a rank reads its own partition; on another, the old
        partitions it overlaps, re-cut (distributed/zero_reshard.py)."""
        if ZERO_PARTITIONS in state:  # the older format: every partition embedded
            blobs = state[ZERO_PARTITIONS]
            old_world = len(blobs)
            read = lambda rank: load_partition(io.BytesIO(blobs[rank].numpy().tobytes()),  # noqa: E731
                                               f"{ZERO_PARTITIONS}[{rank}] of optimizer {index}")
        else:
            info = state[ZERO_SHARDS]
            old_world = int(info["world_size"])
            read = lambda rank: read_shard(self._checkpoint_dir, info["dir"], rank, index)  # noqa: E731
        partitions: List[Optional[Dict[str, Any]]] = [None] * self.world_size
        if old_world == self.world_size:
            partitions[self.global_rank] = read(self.global_rank)
        else:
            partitions[self.global_rank] = self._repartitioned(read, old_world, index)
        return partitions

    def _repartitioned(self, read: Callable[[int], Dict[str, Any]], old_world: int, index: int) -> Dict[str, Any]:
        zero = self._engine_of(self.optimizers[index]).optimizer
        if getattr(zero, "round_robin_gradients", False):
            raise ValueError("config key 'trainer.deepspeed.zero_optimization.round_robin_gradients': its parameter "
                             f"order depends on the world size, so its checkpoint resumes only on {old_world} processes")
        lengths = [int(flat.numel()) for flat in zero.single_partition_of_fp32_groups]
        return repartition(read, old_world, self.global_rank, self.world_size, lengths, list(zero.groups_padding),
                           f"ZeRO partitions of optimizer {index} in '{self._checkpoint_dir}'")

    def load_optimizer_state_dict(self, checkpoint: Mapping[str, Any]) -> None:
        """Give each engine's ZeRO optimizer its saved partition (fp32 master weights included)."""
        states = checkpoint["optimizer_states"]
        if len(states) != len(self.optimizers) or any(
                not isinstance(state, dict) or not (ZERO_SHARDS in state or ZERO_PARTITIONS in state) for state in states):
            raise ValueError("this checkpoint holds no DeepSpeed optimizer state (it was written "
                             "under another strategy): resume it with the strategy that wrote it")
        for index, (optimizer, state) in enumerate(zip(self.optimizers, states)):
            # fp32 master weights from the checkpoint too, not re-derived from bf16/fp16 weights.
            self._engine_of(optimizer).optimizer.load_state_dict(
                self._partitions(state, index), load_optimizer_states=True, load_from_fp32_weights=True)


class DeepSpeedSteps(StepInterface):
    """Loss scaling, gradients and norms live in each optimizer's engine."""

    def __init__(self, strategy: MultiEngineDeepSpeed):
        super().__init__()
        self.strategy = strategy

    @property
    def owns_overflow(self) -> bool:
        return self.strategy.fp16

    def loss_scale(self, optimizer: Any) -> float:
        """The engine's current fp16 loss scale (1.0 in bf16/fp32)."""
        return float(getattr(self.strategy._engine_of(optimizer).optimizer, "loss_scale", 1.0))

    def gradient_norm(self, optimizer: Any, network: nn.Module) -> torch.Tensor:
        """The global gradient norm the engine computed in its last step (ZeRO-2 keeps .grad empty)."""
        norm = self.strategy._engine_of(optimizer).get_global_grad_norm()
        return torch.tensor(float("nan") if norm is None else float(norm))

    def grad_scale(self, optimizer: Any) -> float:
        return self.loss_scale(optimizer)  # a number on the host already

    def step(self, optimizer: Any, skip: torch.Tensor) -> None:
        """The engine's step, gated by `skip` through the torch optimizer ZeRO wraps (fused Adam
        takes it as `found_inf`, and then leaves this rank's partition and its state as they are)."""
        zero = self.strategy._engine_of(optimizer).optimizer
        gated_step(optimizer, getattr(zero, "optimizer", zero), skip)

    def local_gradients(self, optimizer: Any, network: nn.Module) -> List[torch.Tensor]:
        """This rank's share of the reduced gradients the engine's next `step()` will apply.

        Under ZeRO-1/2 they are not in the parameters' `.grad`: each rank holds its partition in
        the ZeRO optimizer (on CPU with optimizer offload). Without ZeRO: `.grad`.
        """
        zero = self.strategy._engine_of(optimizer).optimizer
        if getattr(zero, "cpu_offload", False):
            return [flat.grad for flat in zero.single_partition_of_fp32_groups if flat.grad is not None]
        if not hasattr(zero, "averaged_gradients"):
            return super().local_gradients(optimizer, network)
        grads: List[torch.Tensor] = []
        for group in zero.averaged_gradients.values():
            if isinstance(group, torch.Tensor):
                grads.append(group)
            elif group is not None:
                grads += [grad for grad in group if grad is not None]
        return grads
