"""Host-device synchronisation points counted."""
from __future__ import annotations

import sys

import lightning as L
import torch




# ----------------------------------------------------------------------------- host-device syncs
#: Tensor methods that read a tensor's value on the host: on a GPU each waits for the device
SYNC_METHODS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__", "__complex__")
#: aten ops that read values on the host, or whose output size depends on the values
SYNC_OPS = ("_local_scalar_dense", "nonzero", "masked_select", "equal", "is_nonzero", "_unique2",
            "unique_consecutive", "repeat_interleave")


def _caller() -> str:
    """`file:line` of the innermost frame outside torch (and this file): who asked for the sync."""
    frame = sys._getframe(2)
    while frame is not None and ("/torch/" in frame.f_code.co_filename or frame.f_code.co_filename == __file__):
        frame = frame.f_back
    return "?" if frame is None else f"{frame.f_code.co_filename}:{frame.f_lineno}"


class SyncCounter:
    """Records every host-device synchronisation point - calls of SYNC_METHODS, the aten ops
    SYNC_OPS (also from C++: a TorchDispatchMode), indexing with a boolean mask,
    torch.cuda.synchronize and torch.distributed.barrier - made from the first callback's
    on_train_batch_start to the last callback's on_train_batch_end of every iteration that is
    not a multiple of `log_every` (logged iterations, sample grids and checkpoints fall on
    those in the runs that use it). `first` and `last` are its two callbacks (with_callbacks);
    `syncs`: (iteration, what, caller) of each."""

    def __init__(self, log_every: int):
        from torch.utils._python_dispatch import TorchDispatchMode

        counter = self
        self.log_every, self.syncs, self.iteration, self._mode = log_every, [], 0, None
        self._patched: list = []

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                name = func.overloadpacket.__name__
                masked = name == "index" and any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8)
                                                 for i in (args[1] if len(args) > 1 else ()) if i is not None)
                if name in SYNC_OPS or masked:
                    counter.record(f"aten.{name}")
                return func(*args, **(kwargs or {}))

        self._mode_class = Mode

        class Edge(L.Callback):
            def __init__(self, start: bool):
                self.start = start

            def on_train_batch_start(self, trainer, pl_module, *args) -> None:
                if self.start and (pl_module.iteration + 1) % counter.log_every != 0:
                    counter.begin(pl_module.iteration + 1)

            def on_train_batch_end(self, trainer, pl_module, *args) -> None:
                if not self.start:
                    counter.end()

        self.first, self.last = Edge(True), Edge(False)

    def record(self, what: str) -> None:
        self.syncs.append((self.iteration, what, _caller()))

    def _wrap(self, owner, name: str) -> None:
        original = getattr(owner, name)

        def counted(*args, **kwargs):
            self.record(name)
            return original(*args, **kwargs)
        self._patched.append((owner, name, original))
        setattr(owner, name, counted)

    def begin(self, iteration: int) -> None:
        self.iteration = iteration
        for name in SYNC_METHODS:
            self._wrap(torch.Tensor, name)
        self._wrap(torch.cuda, "synchronize")
        self._wrap(torch.distributed, "barrier")
        self._mode = self._mode_class()
        self._mode.__enter__()

    def end(self) -> None:
        if self._mode is None:
            return
        self._mode.__exit__(None, None, None)
        self._mode = None
        for owner, name, original in reversed(self._patched):
            setattr(owner, name, original)
        self._patched = []
