"""The device side of the input pipeline: pinned host batches, and the next batch copied to the
device while the current step runs (`data.pin_memory`, `data.prefetch_to_device`).

Lightning copies each batch right before its step (non-blocking on CUDA): the copy then queues
in front of the step's kernels on the same stream. `prefetched` issues the copy of batch i + 1
when batch i is handed out, on a side stream on CUDA, so that it runs during step i; the step
that takes batch i + 1 first waits for that stream. Elsewhere (CPU) the same code copies in
line, which is what the CPU tests exercise. Lightning's own copy of a batch already on the
device is then a no-op.
"""
from __future__ import annotations

from typing import Any, Iterable, Iterator, Optional

import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from torch.utils.data import DataLoader


def pin_memory_for(device: Optional[torch.device], wanted: bool) -> bool:
    """Whether a loader pins its batches: only for copies to CUDA (pinning for the CPU costs a copy)."""
    return wanted and device is not None and device.type == "cuda"


def _tensors(batch: Any) -> Iterator[torch.Tensor]:
    if isinstance(batch, torch.Tensor):
        yield batch
    elif isinstance(batch, dict):
        for value in batch.values():
            yield from _tensors(value)
    elif isinstance(batch, (list, tuple)):
        for value in batch:
            yield from _tensors(value)


def prefetched(batches: Iterable[Any], device: torch.device) -> Iterator[Any]:
    """`batches` moved to `device`, each copy issued one batch ahead of its use."""
    stream = torch.cuda.Stream(device) if device.type == "cuda" else None
    upcoming = None
    for batch in batches:
        if stream is None:
            moved = move_data_to_device(batch, device)
        else:
            with torch.cuda.stream(stream):
                moved = move_data_to_device(batch, device)  # non-blocking from pinned memory
        if upcoming is not None:
            yield _ready(upcoming, stream)
        upcoming = moved
    if upcoming is not None:
        yield _ready(upcoming, stream)


def _ready(batch: Any, stream: Optional["torch.cuda.Stream"]) -> Any:
    if stream is not None:
        current = torch.cuda.current_stream(stream.device)
        current.wait_stream(stream)
        for tensor in _tensors(batch):  # the allocator must not reuse it before the step is done
            tensor.record_stream(current)
    return batch


class DevicePrefetchLoader(DataLoader):
    """A DataLoader (sampler, length and workers as ever) whose iterator hands out batches
    already on `prefetch_device` (None: host batches, as a plain DataLoader)."""

    prefetch_device: Optional[torch.device] = None

    def __iter__(self):
        batches = super().__iter__()
        return batches if self.prefetch_device is None else prefetched(batches, self.prefetch_device)
