"""FSDP2 (`fully_shard`) for models with several networks and optimizers: parameters sharded.

Like our DDP (strategy.py) and unlike Lightning's FSDP strategies (which wrap the whole
LightningModule and cannot run manual optimisation: Lightning #19685, #20138), nothing wraps
the module: every network it names (`networks()`), and every other top-level child holding
parameters (a GAN's EMA generator), is `fully_shard`-ed as its own root. One root for G and D
together breaks the alternating steps (pytorch #132068). Built-in architectures are also
sharded per block (each child of their `nn.Sequential` parts), so only one block's full weights
exist at a time in a forward.

- Replicas start from rank 0's weights (GradientAllReduceDDP.configure_ddp), then are sharded;
  Lightning builds the optimizers afterwards, over the sharded (DTensor) parameters.
- FSDP reduce-scatters the gradients in the backward: our all-reduce is skipped.
- The EMA generator is sharded like G, so `update_ema`'s lerp is shard-local (no collective).
- Sampling needs the full weights: `FSDPSteps.full_weights` gathers them (every rank enters it)
  and keeps them until it exits, so one rank alone may then run forwards (sample grids).
- A loss over two passes of D (real, fake) is backpropagated one pass at a time
  (`FSDPSteps.backward_per_pass`), and on CPU glibc returns freed blocks to the OS
  (`return_freed_memory`): both keep a rank near its shards' 16 B / parameter / W.
- Checkpoints: every rank writes its shards through torch.distributed.checkpoint (see
  dcp_checkpoint.py), at once or in the background (dcp_saves.py); DCP reshards them when
  loaded on another number of processes.
"""
from __future__ import annotations

import ctypes
import logging
import operator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional

import torch
from lightning.pytorch.strategies import DDPStrategy
from torch import nn
from torch.optim import Optimizer

from dgm_scale.distributed import dcp_checkpoint
from dgm_scale.distributed.dcp_saves import ShardSaves
from dgm_scale.distributed.interface import StepInterface
from dgm_scale.distributed.strategy import GradientAllReduceDDP, all_reduce_on_device

PARAM_DTYPES = {"float32": None, "bfloat16": torch.bfloat16}  # None: FSDP keeps the parameters' own dtype
M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter (malloc.h)
log = logging.getLogger(__name__)


def return_freed_memory(threshold: int = 1 << 20) -> bool:
    """Have glibc map every allocation of `threshold` bytes or more on its own and unmap it when
    freed (mallopt M_MMAP_THRESHOLD). By default glibc raises that threshold to the largest block
    freed so far, so the block-sized buffers FSDP frees and allocates again each step end up in
    its heap, which keeps their pages. Process-wide; False where the C library is not glibc."""
    try:
        return bool(ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, threshold))
    except (OSError, AttributeError):
        return False


def sharded_roots(module: nn.Module) -> List[nn.Module]:
    """The networks to shard, each as its own root: `networks()` and the other top-level
    children that hold parameters (a GAN's EMA generator), outermost only."""
    candidates = list(module.networks().values()) + list(module.children())
    roots: List[nn.Module] = []
    for net in candidates:
        if all(net is not root for root in roots) and _has_parameters(net):
            roots.append(net)
    inside = {id(sub) for root in roots for sub in root.modules() if sub is not root}
    return [root for root in roots if id(root) not in inside]


def _has_parameters(module: nn.Module) -> bool:
    return next(module.parameters(), None) is not None


def blocks_of(network: nn.Module) -> List[nn.Module]:
    """The per-block units of a built-in architecture (one with `nn.Sequential` parts, e.g.
    `body` + `head`): each child of those parts, and each other child, that holds parameters -
    or, for a child the forward never calls itself (a ModuleList, a U-Net's `Level`), the modules
    inside it that it calls. A part called on its own (ssgan runs `body` and `head` apart, never
    the whole D) then still gathers its weights. None for other networks: they are one unit."""
    if not any(isinstance(child, nn.Sequential) for child in network.children()):
        return []
    parts = [part for child in network.children()
             for part in (child.children() if isinstance(child, nn.Sequential) else [child])]
    return [unit for part in parts for unit in _called(part) if _has_parameters(unit)]


def _called(module: nn.Module) -> List[nn.Module]:
    """The modules a forward calls in place of `module`: itself, or - a container or another
    module without a forward of its own, which FSDP's forward hooks would never gather - the
    ones inside it (fully_shard refuses a ModuleList outright)."""
    if type(module).forward is not nn.Module.forward:
        return [module]
    return [unit for child in module.children() for unit in _called(child)]


def batchnorm_layers(network: nn.Module) -> List[nn.Module]:
    return [layer for layer in network.modules() if isinstance(layer, nn.modules.batchnorm._BatchNorm)
            and _has_parameters(layer)]


def fsdp_modules(module: nn.Module) -> List[nn.Module]:
    from torch.distributed.fsdp import FSDPModule

    return [sub for sub in module.modules() if isinstance(sub, FSDPModule)]


class FullyShardedStrategy(GradientAllReduceDDP):
    """trainer.strategy=fsdp (see the module docstring)."""

    def __init__(self, seed: int, reshard_after_forward: bool = True, param_dtype: str = "float32",
                 cpu_offload: bool = False, async_save: bool = False, return_freed_memory: bool = True, **kwargs: Any):
        super().__init__(seed=seed, **kwargs)
        self.reshard_after_forward, self.param_dtype, self.cpu_offload = reshard_after_forward, param_dtype, cpu_offload
        self.return_freed_memory = return_freed_memory
        self._checkpoint_dir: Optional[Path] = None
        self._saves = ShardSaves(self, background=async_save)
        self._failed = False  # the fit raised: no collective at teardown

    #: save_checkpoint_atomic hands the checkpoint's own path: this strategy writes the file
    #: itself (atomically), once every rank's shards are written (dcp_saves.py)
    writes_checkpoint_files = True

    @property
    def restore_checkpoint_after_setup(self) -> bool:
        return True  # the saved shards load into the sharded networks

    def _shard_options(self, param_dtype: Optional[torch.dtype]) -> Dict[str, Any]:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy

        options: Dict[str, Any] = {
            "mesh": init_device_mesh(self.root_device.type, (self.world_size,)),
            # e.g. bf16 all-gathers and compute, with the gradients reduced in float32
            "mp_policy": MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32),
            "reshard_after_forward": self.reshard_after_forward,
        }
        if self.cpu_offload:
            options["offload_policy"] = CPUOffloadPolicy()
        return options

    def configure_ddp(self) -> None:
        super().configure_ddp()  # identical replicas (rank 0's weights), per-rank seeds
        from torch.distributed.fsdp import FSDPModule, fully_shard

        if self.return_freed_memory and (self.root_device.type == "cpu" or self.cpu_offload):
            if not return_freed_memory():
                log.info("trainer.fsdp.return_freed_memory: not glibc, the C library's allocator is left as it is")
        options, float32 = self._shard_options(PARAM_DTYPES[self.param_dtype]), self._shard_options(None)
        for network in sharded_roots(self.lightning_module):
            if self.param_dtype != "float32":
                # Batch norm stays float32, as its running statistics (torch.batch_norm refuses
                # bf16 weights with float32 statistics: "expected scalar type BFloat16 but found Float").
                for layer in batchnorm_layers(network):
                    fully_shard(layer, **float32)
            for block in blocks_of(network):
                if not isinstance(block, FSDPModule):
                    fully_shard(block, **options)
            fully_shard(network, **options)
        # A gradient penalty / R1 differentiates twice: its first backward (autograd.grad) must
        # not free the gathered weights its second one needs ("The tensor has a non-zero number
        # of elements, but its data is not allocated yet", seen on CPU). So the gathered weights
        # are then kept from a backward until the next optimizer step, which frees them: a full
        # copy of those networks per rank (benchmarks/sharding_memory.py), only where needed.
        module = self.lightning_module
        names = getattr(module, "twice_differentiated", None)
        for network in [module] if names is None else [operator.attrgetter(name)(module) for name in names]:
            for unit in fsdp_modules(network):  # (a module that does not say: all, the safe way)
                unit.set_reshard_after_backward(False, recurse=False)
        unsharded = next((name for name, p in self.lightning_module.named_parameters() if not hasattr(p, "to_local")), None)
        if unsharded is not None:  # FSDP would not reduce its gradient, and our all-reduce is off
            raise RuntimeError(f"trainer.strategy=fsdp: parameter '{unsharded}' is in no network the module names "
                               "(networks()) nor in a top-level child module, so nothing would synchronise it")

    def optimizer_step(self, optimizer: Optimizer, closure: Callable[[], Any],
                       model: Optional[Any] = None, **kwargs: Any) -> Any:
        # FSDP reduce-scattered the gradients in the backward: no all-reduce of ours.
        output = DDPStrategy.optimizer_step(self, optimizer, closure, model, **kwargs)
        reshard(self.lightning_module)  # gathered copies are stale now: the next forward gathers anew
        return output

    def step_interface(self) -> "FSDPSteps":
        return FSDPSteps()

    # ------------------------------------------------------------------ checkpoints
    def lightning_module_state_dict(self) -> Dict[str, Any]:
        reshard(self.lightning_module)
        return self.lightning_module.state_dict()  # this rank's shards (DTensors), no collective

    def optimizer_state(self, optimizer: Optimizer) -> Dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        # keyed by parameter name, not position: what DCP matches when it reshards
        return get_optimizer_state_dict(self.lightning_module, optimizer)

    def save_checkpoint(self, checkpoint: Dict[str, Any], filepath: Any, storage_options: Optional[Any] = None) -> None:
        """Every rank writes its shards into a new folder; once all are written, rank 0 writes the
        checkpoint that names the folder: now, or with async_save later (see dcp_saves.py)."""
        trainer = self.lightning_module.trainer
        state = (trainer.global_step, trainer.fit_loop.epoch_loop.total_batch_idx)  # equal: same weights
        self._saves.save(checkpoint, Path(filepath), state)

    def write_checkpoint_file(self, checkpoint: Dict[str, Any], path: Path) -> None:
        super().save_checkpoint(checkpoint, path)  # rank 0, through the trainer's checkpoint IO

    def on_exception(self, exception: BaseException) -> None:
        self._failed = True
        super().on_exception(exception)

    def teardown(self) -> None:
        """The save in flight is finished (after an error: without a collective); rank 0 deletes
        the shard folders no checkpoint names any more."""
        if self._failed:
            self._saves.abandon()
        else:
            self._saves.finish()  # raises a failed write's error: the fit fails, teardown runs again
        self._saves.close(prune=not self._failed)
        super().teardown()

    def load_checkpoint(self, checkpoint_path: Any, *args: Any, **kwargs: Any) -> Dict[str, Any]:
        self._checkpoint_dir = Path(checkpoint_path).parent
        return super().load_checkpoint(checkpoint_path, *args, **kwargs)

    def load_model_state_dict(self, checkpoint: Dict[str, Any], strict: bool = True) -> None:
        state = self.lightning_module.state_dict()  # views of the parameters: DCP loads in place
        dcp_checkpoint.read_into({"state_dict": state}, checkpoint, self._checkpoint_dir)

    def load_optimizer_state_dict(self, checkpoint: Dict[str, Any]) -> None:
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

        module = self.lightning_module
        # Templates of the right shapes and shards (get_ initialises empty Adam states).
        states = {str(i): get_optimizer_state_dict(module, opt) for i, opt in enumerate(self.optimizers)}
        dcp_checkpoint.read_into({"optimizer_states": states}, checkpoint, self._checkpoint_dir)
        for index, optimizer in enumerate(self.optimizers):
            set_optimizer_state_dict(module, optimizer, states[str(index)])


class FSDPSteps(StepInterface):
    """Gradients are sharded DTensors: each rank checks its shard, norms are summed over ranks."""

    # Autograd sums a leaf's gradient over every pass through it before handing it on, so with
    # two passes of a sharded network in one backward, each unit's whole unsharded gradient waits
    # from the first pass until the second reaches that unit: a full, unsharded copy of the
    # network's gradient at the turn (measured: benchmarks/README.md, sharding_memory.py). Apart,
    # each pass's gradient is reduce-scattered when it is done, at one more reduce-scatter per pass.
    backward_per_pass = True

    def local_gradients(self, optimizer: Any, network: nn.Module) -> List[torch.Tensor]:
        return [_local(p.grad) for p in network.parameters() if p.grad is not None]

    def gradient_norm(self, optimizer: Any, network: nn.Module) -> torch.Tensor:
        """The L2 norm of the whole (reduced) gradient: the shards' squared norms summed over ranks."""
        squares = [_local(p.grad).detach().float().square().sum() for p in network.parameters() if p.grad is not None]
        total = torch.stack(squares).sum() if squares else torch.zeros(())
        return all_reduce_on_device(total).sqrt()

    @contextmanager
    def full_weights(self, module: nn.Module) -> Iterator[None]:
        """All sharded networks of `module` hold their full weights inside (gathered on entry:
        every rank must enter; inside, forwards need no collective, so one rank may sample)."""
        settings = [(unit, _reshards(unit)) for unit in fsdp_modules(module)]
        reshard(module)  # a copy gathered before the last update (an EMA's) is stale
        for unit, _ in settings:
            unit.set_reshard_after_forward(False, recurse=False)
            unit.unshard()
        try:
            yield
        finally:
            for unit, reshards in settings:
                unit.reshard()
                unit.set_reshard_after_forward(reshards, recurse=False)


def reshard(module: nn.Module) -> None:
    """Free the gathered weights of every sharded unit of `module` (local: no collective)."""
    for unit in fsdp_modules(module):
        unit.reshard()


def _reshards(unit: nn.Module) -> bool:
    """The reshard-after-forward setting a sharded unit was built with (kept by FSDP per unit)."""
    group = unit._get_fsdp_state()._fsdp_param_group
    return bool(group is not None and group.post_forward_mesh_info is not None)


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor; a plain tensor as it is."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor
