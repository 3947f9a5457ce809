"""Gradient all-reduce overlapped with backward: buckets launched as backward fills them.

`GradientBuckets` averages one optimizer's gradients across ranks like `all_reduce_gradients`,
but in buckets of about `bucket_mb` MB, each all-reduced asynchronously as soon as backward has
accumulated the gradient of its last parameter (`register_post_accumulate_grad_hook`); the
optimizer step only waits for them. Why our own hooks and not torch's DistributedDataParallel
per network: a D step runs D twice before one backward and a gradient penalty / R1 takes an
`autograd.grad(create_graph=True)` through D, which DDP does not support (its docs: gradients
must land in `.grad`), and G's backward runs through D. Our hooks fire only where a gradient is
accumulated into `.grad`: `autograd.grad(..., inputs=images)` accumulates nothing, and a frozen
D (requires_grad off in G's step) has no accumulation node.

The rules that keep results equal to the flat all-reduce:
- `arm()` before the backward of the optimizer about to step (the strategy does it in
  `manual_backward(loss, opt)`): hooks of other optimizers' parameters launch nothing.
- Buckets launch strictly in order (bucket k after 0 .. k-1), so every rank issues the same
  collectives in the same order whatever order its gradients arrive in.
- A gradient accumulated twice before the step (gradient accumulation, two backwards, or another
  optimizer's backward reaching a parameter already sent) makes the round fall back: in-flight buckets are waited for and dropped, and `finish()` reduces the final
  `.grad` of every bucket at the step - the flat behaviour, without overlap.
- A round that ended without a step (a NaN guard's skip clears the gradients) is dropped at the
  next `arm()`.
- The buckets are copies: `.grad` stays this rank's own until `finish()`, which is what the NaN
  guard checks between backward and step.
- A parameter without a gradient on some rank counts as zero there, and one without a gradient on
  every rank keeps `.grad = None` (as in the flat all-reduce): each bucket carries one presence
  flag per parameter. Reading the flags costs a host sync, so it is done only when some
  parameter of the bucket had no local gradient.
Each element is the same sum of the ranks' values as in the flat all-reduce, divided by the same
world size: with 2 ranks (a + b = b + a) the result is bitwise equal; with more, a different
chunking may sum in another order (equal to rounding).
"""
from __future__ import annotations

from typing import Any, Iterable, List, Optional

import torch
import torch.distributed as dist
from torch import Tensor
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors


def partition(params: List[torch.nn.Parameter], bucket_bytes: int) -> List[List[torch.nn.Parameter]]:
    """Consecutive params in buckets of at most `bucket_bytes` (at least one param each), one
    dtype and device per bucket."""
    buckets: List[List[torch.nn.Parameter]] = []
    size = 0
    for param in params:
        nbytes = param.numel() * param.element_size()
        last = buckets[-1] if buckets else None
        other_kind = last is not None and (param.dtype, param.device) != (last[0].dtype, last[0].device)
        if last is None or other_kind or size + nbytes > bucket_bytes:
            buckets.append([])
            size = 0
        buckets[-1].append(param)
        size += nbytes
    return buckets


class GradientBuckets:
    """One optimizer's parameters in buckets, reduced during backward (see the module docstring)."""

    def __init__(self, params: Iterable[torch.nn.Parameter], world_size: int, bucket_mb: float, group: Any = None):
        # Backward reaches the last-registered layers first (as DDP assumes).
        self.buckets = partition(list(params)[::-1], max(1, int(bucket_mb * 2 ** 20)))
        self.world_size, self.group = world_size, group
        self.bucket_of = {id(p): index for index, bucket in enumerate(self.buckets) for p in bucket}
        self.handles = [p.register_post_accumulate_grad_hook(self._on_gradient)
                        for bucket in self.buckets for p in bucket]
        self.launches = 0  # buckets launched during backward so far (tests and benchmarks read it)
        self._reset()

    def _reset(self) -> None:
        self.armed = False
        self.fallback = False
        self.ready: List[set] = [set() for _ in self.buckets]
        self.works: List[Optional[tuple]] = [None] * len(self.buckets)
        self.next_launch = 0

    def remove(self) -> None:
        """Unhook (at teardown), after any round left open by a skipped last step."""
        self._drain()
        for handle in self.handles:
            handle.remove()
        self.handles = []

    # ------------------------------------------------------------------ during backward
    def arm(self) -> None:
        """The next backward belongs to this optimizer: launch buckets as they fill."""
        if any(self.ready):  # a round is open: it ended without a step, or a backward follows
            stale = all(p.grad is None for bucket, ready in zip(self.buckets, self.ready)
                        for p in bucket if id(p) in ready)
            self._drain()
            if stale:  # a skipped step cleared the gradients: start afresh
                self._reset()
            else:  # a second backward onto the same gradients: reduce them at the step
                self.fallback = True
        self.armed = True

    def disarm(self) -> None:
        """Another optimizer's backward: gradients landing here now are left for `finish()`."""
        self.armed = False

    def _on_gradient(self, param: Tensor) -> None:
        if self.fallback:
            return
        index = self.bucket_of[id(param)]
        if not self.armed:  # another optimizer's backward; it matters only if this bucket was sent
            if id(param) in self.ready[index]:
                self._drain()
                self.fallback = True
            return
        if id(param) in self.ready[index]:  # accumulated twice in one round
            self._drain()
            self.fallback = True
            return
        self.ready[index].add(id(param))
        while self.next_launch < len(self.buckets) and self._full(self.next_launch):
            self._launch(self.next_launch)
            self.launches += 1

    def _full(self, index: int) -> bool:
        return len(self.ready[index]) == len(self.buckets[index])

    def _drain(self) -> None:
        """Wait for every in-flight bucket and forget it (collectives stay matched across ranks)."""
        for work in self.works:
            if work is not None:
                work[0].wait()
        self.works = [None] * len(self.buckets)
        self.next_launch = 0

    def _launch(self, index: int) -> None:
        bucket = self.buckets[index]
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in bucket]
        presence = torch.ones(len(bucket), dtype=bucket[0].dtype, device=bucket[0].device)
        missing = [i for i, p in enumerate(bucket) if p.grad is None]
        for i in missing:
            presence[i] = 0
        flat = _flatten_dense_tensors(grads + [presence])
        work = dist.all_reduce(flat, group=self.group, async_op=True)
        self.works[index] = (work, flat, bool(missing))
        self.next_launch = index + 1

    # ------------------------------------------------------------------ at the step
    def finish(self) -> None:
        """Launch what backward did not, wait for all, and write the averages into `.grad`."""
        if self.fallback:
            self._drain()
        for index in range(self.next_launch, len(self.buckets)):
            self._launch(index)
        for index, bucket in enumerate(self.buckets):
            work, flat, missing = self.works[index]
            work.wait()
            self._write_back(bucket, flat, missing)
        self._reset()

    def _write_back(self, bucket: List[torch.nn.Parameter], flat: Tensor, missing: bool) -> None:
        flat /= self.world_size
        *averages, presence = _unflatten_dense_tensors(flat, [*bucket, flat.new_empty(len(bucket))])
        anywhere = presence.gt(0).tolist() if missing else [True] * len(bucket)  # a sync: see docstring
        for param, average, present in zip(bucket, averages, anywhere):
            if not present:
                param.grad = None
            elif param.grad is None:
                param.grad = average.clone()
            else:
                param.grad.copy_(average)
