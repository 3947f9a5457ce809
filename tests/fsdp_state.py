"""Gathered (full, plain) training state of a module, whatever its strategy: for comparisons
between runs on different numbers of processes (tests/test_fsdp.py, tests/fsdp_worker.py)."""
from typing import Any, Dict, List

import torch


def full(tensor: Any) -> Any:
    """A DTensor's whole tensor (a collective), a plain tensor cloned, anything else as it is."""
    if hasattr(tensor, "full_tensor"):
        return tensor.full_tensor().detach().clone()
    return tensor.detach().clone() if isinstance(tensor, torch.Tensor) else tensor


def full_optimizer_states(module: torch.nn.Module, optimizers: List[Any]) -> List[Dict[str, Dict[str, Any]]]:
    """Each optimizer's per-parameter state keyed by parameter name, gathered."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return [{name: {key: full(value) for key, value in state.items()}
             for name, state in get_optimizer_state_dict(module, optimizer)["state"].items()}
            for optimizer in optimizers]
