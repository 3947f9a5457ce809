"""gpu_check.py's checks of the training step itself (issue 23), each run in this process:

- model FLOPs utilisation of a DCGAN with at least 100M parameters (bf16): the FLOPs of one
  iteration counted by torch's FlopCounterMode, over the measured time of later iterations, against
  the GPU's dense bf16 peak;
- the sync-free check: the iterations that log nothing run under
  `torch.cuda.set_sync_debug_mode("error")`, so any host-device synchronisation fails them;
- the loader-wait fraction: time blocked in the DataLoader iterator over the training time;
- the input pipeline options (pinned memory, device prefetch, channels_last, fused Adam): ours
  with each against the run without, images/s.

On the dry run every step runs on the CPU with tiny widths and judges nothing (the CPU has no syncs
to catch, and its timings say nothing of a GPU's).
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Optional

import lightning as L
import torch

PASSED, FAILED, SKIPPED = "yes", "NO", "skipped"
MIN_MFU = 0.25  # a chosen bar for a large bf16 DCGAN on one GPU (convolutions at 64px)
MAX_LOADER_WAIT = 0.05  # share of the training time the step may wait for the loader
MIN_OPTION_RATIO = 0.97  # with / without an option, images/s: an option offered for speed is not slower
#: dense bf16 tensor-core peaks (FLOP/s) by device name, from the vendors' data sheets
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}
MFU_WIDTH = 320  # G 73M + D 69M parameters at 64px (dgm_scale.nets DCGAN)


def verdict(ok: bool) -> str:
    return PASSED if ok else FAILED


def on_gpu(s: dict) -> bool:
    return not s["tiny"] and torch.cuda.is_available()


def sync(s: dict) -> None:
    if on_gpu(s):
        torch.cuda.synchronize()


class StepTimer(L.Callback):
    """Wall time of iterations `warmup` .. end (the device drained at both ends)."""

    def __init__(self, s: dict, warmup: int):
        self.s, self.warmup, self.start, self.end, self.timed = s, warmup, 0.0, 0.0, 0

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        if pl_module.iteration < self.warmup:
            return
        sync(self.s)
        if pl_module.iteration == self.warmup:
            self.start = time.perf_counter()
        self.end, self.timed = time.perf_counter(), pl_module.iteration - self.warmup

    @property
    def rate(self) -> float:
        return self.timed / (self.end - self.start) if self.end > self.start else float("nan")


def fit(s: dict, run_dir: Path, overrides: list[str], callbacks: list, config: Optional[str] = None):
    """Train the default job (or `config`) here with `overrides` and extra `callbacks`; the module."""
    from dgm_scale.config import load_config
    from dgm_scale.data import DataModule
    from dgm_scale.modules import build_module
    from dgm_scale.training import build_trainer, make_run_dir, quiet_lightning

    quiet_lightning()
    cfg = load_config(config, [*overrides, f"run.dir={run_dir}"])
    module = build_module(cfg)
    datamodule = DataModule(cfg.data, batch_size=cfg.data.batch_size * module.batches_per_iteration, seed=cfg.run.seed)
    trainer = build_trainer(cfg, module, make_run_dir(cfg))
    trainer.callbacks.extend(callbacks)
    trainer.fit(module, datamodule=datamodule)
    return module


def dcgan64(s: dict, common: Callable, run_dir: Path, iterations: int, width: Optional[int] = None) -> list[str]:
    """The throughput check's DCGAN-64 (bf16, RGB), `width` wide (tiny on the dry run)."""
    sized = [f"model.generator.width={width}", f"model.discriminator.width={width}"] if width and not s["tiny"] else []
    return [*common(s, run_dir, iterations), f"data.resolution={s['resolution']}", "data.channels=3",
            "trainer.precision=bf16-mixed", "model.ema_decay=0", f"trainer.log_every={iterations}", *sized]


# ---------------------------------------------------------------------------------------- MFU
class IterationFlops(L.Callback):
    """The FLOPs of iteration `at` (forward and backward of every D and G step)."""

    def __init__(self, at: int):
        self.at, self.flops, self._mode = at, 0, None

    def on_train_batch_start(self, trainer, pl_module, *args) -> None:
        if pl_module.iteration == self.at:
            from torch.utils.flop_counter import FlopCounterMode

            self._mode = FlopCounterMode(display=False)
            self._mode.__enter__()

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        if self._mode is not None:
            self._mode.__exit__(None, None, None)
            self.flops, self._mode = self._mode.get_total_flops(), None


def peak_flops() -> Optional[float]:
    name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else ""
    return next((peak for key, peak in PEAK_BF16.items() if key in name), None)


def check_mfu(s: dict, scratch: Path, common: Callable) -> tuple[str, str]:
    iterations = 8 if s["tiny"] else 60
    flops, timer = IterationFlops(at=1), StepTimer(s, warmup=3 if s["tiny"] else 10)
    module = fit(s, scratch / "mfu", dcgan64(s, common, scratch / "mfu", iterations, MFU_WIDTH), [flops, timer])
    params = sum(p.numel() for net in module.networks().values() for p in net.parameters())
    achieved = flops.flops * timer.rate
    detail = f"{params / 1e6:.2f}M parameters, {flops.flops / 1e9:.3g} GFLOP per iteration, {achieved / 1e12:.3g} TFLOP/s"
    if flops.flops <= 0 or not achieved > 0:
        return FAILED, f"{detail}: nothing counted or timed"
    peak = peak_flops()
    if not on_gpu(s) or peak is None:
        why = "dry run: a CPU has no bf16 peak to judge" if s["tiny"] else "unknown device: no peak to judge against"
        return SKIPPED, f"{detail} ({why})"
    mfu = achieved / peak
    return verdict(mfu >= MIN_MFU and params >= 100e6), (f"{detail}, MFU {mfu:.3f} of {peak / 1e12:.0f} TFLOP/s "
                                                         f"(threshold >= {MIN_MFU}, >= 100M parameters)")


# ---------------------------------------------------------------------------------------- sync-free
class SyncDebugWindow(L.Callback):
    """Switch `set_mode` to "error" for the batches of iterations that log nothing."""

    def __init__(self, set_mode: Callable[[str], None]):
        self.set_mode, self.windows = set_mode, 0

    def on_train_batch_start(self, trainer, pl_module, *args) -> None:
        if not pl_module.logging_due():
            self.set_mode("error")
            self.windows += 1

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        self.set_mode("default")


def check_sync_free(s: dict, scratch: Path, common: Callable) -> tuple[str, str]:
    """The default job and WGAN-GP (the gradient penalty's double backward), 30 iterations each,
    logging every 10th: a synchronising call in any other iteration raises."""
    counting = on_gpu(s)
    modes: list[str] = []
    set_mode = torch.cuda.set_sync_debug_mode if counting else modes.append
    windows = 0
    for config in (None, "configs/wgan_gp.yaml"):
        window = SyncDebugWindow(set_mode)
        run_dir = scratch / f"sync-free-{Path(config or 'default').stem}"
        try:
            fit(s, run_dir, [*common(s, run_dir, 30 if counting else 6), "trainer.log_every=10" if counting else
                             "trainer.log_every=3"], [window], config)
        except RuntimeError as error:
            from dgm_scale.core.errors import first_line

            return FAILED, f"{config or 'default job'}: {first_line(error)}"
        finally:
            if counting:
                torch.cuda.set_sync_debug_mode("default")
        windows += window.windows
    if not counting:
        return SKIPPED, f"dry run: {windows} non-logged iterations ran in the window (the CPU has no syncs to catch)"
    return PASSED, f"{windows} non-logged iterations of the default job and WGAN-GP, no synchronisation"


# ---------------------------------------------------------------------------------------- loader wait
class LoaderClock:
    """Time spent in DataLoader iterators' __next__ while installed (a context manager)."""

    def __init__(self):
        from torch.utils.data.dataloader import _BaseDataLoaderIter

        self.cls, self.waited = _BaseDataLoaderIter, 0.0

    def __enter__(self):
        self.original = original = self.cls.__next__

        def timed(iterator):
            start = time.perf_counter()
            try:
                return original(iterator)
            finally:
                self.waited += time.perf_counter() - start
        self.cls.__next__ = timed
        return self

    def __exit__(self, *exc) -> None:
        self.cls.__next__ = self.original


def check_loader_wait(s: dict, scratch: Path, common: Callable) -> tuple[str, str]:
    """DCGAN-64 on the digits upsampled in 2 loader workers: the share of the training time
    the host spent blocked on the next batch."""
    iterations = 6 if s["tiny"] else 100
    timer = StepTimer(s, warmup=0)
    overrides = [*dcgan64(s, common, scratch / "loader", iterations), f"data.num_workers={0 if s['tiny'] else 2}"]
    with LoaderClock() as clock:
        start = time.perf_counter()
        fit(s, scratch / "loader", overrides, [timer])
        sync(s)
        total = time.perf_counter() - start
    share = clock.waited / total
    detail = f"{share:.3f} of {total:.1f} s waiting for batches ({clock.waited:.2f} s)"
    if not on_gpu(s):
        return SKIPPED, f"{detail} (dry run: CPU timings are not judged)"
    return verdict(share <= MAX_LOADER_WAIT), f"{detail} (threshold <= {MAX_LOADER_WAIT})"


# ---------------------------------------------------------------------------------------- pipeline options
#: each option's speed-up: the run with it over the run without (pinned memory is on by default)
PIPELINE_OPTIONS = {"pinned memory": (["data.pin_memory=false"], []), "device prefetch": ([], ["data.prefetch_to_device=true"]),
                    "channels_last": ([], ["trainer.channels_last=true"]),
                    "fused Adam": ([], ["optim.g.impl=fused", "optim.d.impl=fused"])}


def check_pipeline_options(s: dict, scratch: Path, common: Callable) -> tuple[str, str]:
    """DCGAN-64 bf16 images/s, 2 loader workers: each option's run over the run without it."""
    iterations, warmup = (6, 2) if s["tiny"] else (150, 30)
    runs = {tuple(extra) for pair in PIPELINE_OPTIONS.values() for extra in pair}
    rates = {}
    for extra in sorted(runs):
        run_dir = scratch / f"pipeline-{len(rates)}"
        timer = StepTimer(s, warmup)
        module = fit(s, run_dir, [*dcgan64(s, common, run_dir, iterations), f"data.num_workers={0 if s['tiny'] else 2}",
                                  *extra], [timer])
        rates[extra] = timer.rate * module.cfg.data.batch_size
    speedups = {name: rates[tuple(on)] / rates[tuple(off)] for name, (off, on) in PIPELINE_OPTIONS.items()}
    detail = f"defaults {rates[()]:.0f} images/s; speed-up " + ", ".join(f"{n} x{r:.3f}" for n, r in speedups.items())
    if not on_gpu(s):
        return SKIPPED, f"{detail} (dry run: CPU timings are not judged)"
    return verdict(min(speedups.values()) >= MIN_OPTION_RATIO), f"{detail} (threshold each >= {MIN_OPTION_RATIO})"
