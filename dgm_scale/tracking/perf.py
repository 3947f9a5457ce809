"""Cost metrics of a run: step time, throughput, peak memory and loader wait, logged every
`log_every` iterations next to the training metrics (same CSV row, same step).

One Lightning batch is one training iteration here (the modules optimise manually and take
their n_critic batches at once), so an iteration's time is on_train_batch_start ->
on_train_batch_end, and the loader's time is the gap from one batch's end to the next one's start.
"""
from __future__ import annotations

import resource
import sys
import time

import lightning as L
import torch

from dgm_scale.core.logs import log_now


def process_peak_rss_mb() -> float:
    """This process's peak resident set size in MiB (whole lifetime; the OS cannot reset it).

    ru_maxrss is in KiB on Linux but in bytes on macOS.
    """
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory in MiB: allocated CUDA memory on a CUDA device (since the last reset), else
    the process's peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return process_peak_rss_mb()


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak window on a CUDA device (no-op elsewhere: RSS peaks are lifetime)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


class ThroughputMonitor(L.Callback):
    """Logs `perf/step_time_s`, `perf/images_per_s`, `perf/peak_memory_mb`, `perf/data_wait_s`
    whenever the completed iteration count is a multiple of `log_every`.

    Step time and data wait are means over the iterations since the last log; images/s is
    `images_per_iteration` (the GLOBAL count: per-device batch x batches per iteration x world
    size) over that mean step time, i.e. compute throughput without the loader wait. Rank 0
    writes its own values (memory is rank 0's device) in a row of their own at Lightning's step.

    Nothing here waits for the device on iterations that log nothing: on CUDA the batch end
    synchronises the device (`cuda_sync`) only at a window's end, and the window's step time is
    its wall time from the previous window's end (or the first batch's start) to that
    synchronised end, less the loader waits measured in it (host gaps between a batch's end and
    the next one's start). On the CPU this is the sum of the batches' own times. The step time
    includes the batch-end work of callbacks listed before this one; the batch-end work of
    those after it counts as data wait.
    """

    def __init__(self, log_every: int, images_per_iteration: int, cuda_sync: bool = True):
        if log_every < 1 or images_per_iteration < 1:
            raise ValueError(f"log_every={log_every} and images_per_iteration={images_per_iteration} must be >= 1")
        self.log_every, self.images_per_iteration, self.cuda_sync = log_every, images_per_iteration, cuda_sync
        self._window_start: float | None = None  # where the current window's wall time starts
        self._last_end: float | None = None  # None: no previous batch, so no wait to measure
        self._reset_window()

    def _reset_window(self) -> None:
        self._steps = 0
        self._wait_total, self._waits = 0.0, 0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._reset_window()
        self._last_end = self._window_start = None
        reset_peak_memory(pl_module.device)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        now = time.perf_counter()
        if self._last_end is not None:
            self._wait_total += now - self._last_end
            self._waits += 1
        if self._window_start is None:
            self._window_start = now

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        self._steps += 1
        if pl_module.iteration % self.log_every == 0:
            device = pl_module.device
            if self.cuda_sync and device.type == "cuda":
                torch.cuda.synchronize(device)
            step_total = time.perf_counter() - self._window_start - self._wait_total
            log_now(trainer, self.window_metrics(device, step_total))
            self._reset_window()
            reset_peak_memory(device)
            self._last_end = self._window_start = time.perf_counter()
            return
        self._last_end = time.perf_counter()

    def window_metrics(self, device: torch.device, step_total: float) -> dict[str, float]:
        """The current window's means (needs at least one step), its steps having taken `step_total` s."""
        step_time = step_total / self._steps
        return {
            "perf/step_time_s": step_time,
            "perf/images_per_s": self.images_per_iteration / step_time,
            "perf/peak_memory_mb": peak_memory_mb(device),
            # The first batch after the start has no previous end: a window of only it logs 0.
            "perf/data_wait_s": self._wait_total / self._waits if self._waits else 0.0,
        }
