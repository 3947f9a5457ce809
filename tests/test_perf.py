"""ThroughputMonitor in a real (tiny, CPU) Lightning run whose step and loader sleep for known
times: the logged means match the sleeps, images/s is images over step time, peak memory is in
MiB and sees a big allocation, and the values land in the CSV logger's file every log_every
iterations only."""
import csv
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from dgm_scale.tracking import ThroughputMonitor
from dgm_scale.tracking.loggers import AppendingCSVLogger
from dgm_scale.tracking.perf import peak_memory_mb, reset_peak_memory

STEP_SLEEP, LOAD_SLEEP = 0.20, 0.10
LOG_EVERY, ITERATIONS, IMAGES = 3, 9, 48
BIG_MIB = 256  # allocated (and touched) in iteration 4, i.e. in the second window
# A noisy shared 2-core machine can stall a process for tens of ms; a wrong attribution (the
# loader wait counted in the step, or the window sum instead of its mean) is off by >= 0.1 s.
SLACK = 0.08
PERF_KEYS = ["perf/step_time_s", "perf/images_per_s", "perf/peak_memory_mb", "perf/data_wait_s"]


class SlowLoader(Dataset):
    """Each item sleeps LOAD_SLEEP; `durations` holds how long each load really took (a loaded
    machine oversleeps), the truth the logged data wait is compared with."""

    durations: list[float] = []

    def __len__(self) -> int:
        return 4  # short epochs: the loader wait across epoch ends is measured too

    def __getitem__(self, index: int) -> torch.Tensor:
        start = time.perf_counter()
        time.sleep(LOAD_SLEEP)
        SlowLoader.durations.append(time.perf_counter() - start)
        return torch.randn(2)


class SlowModule(L.LightningModule):
    """One manual optimizer step per batch, as our modules: iteration == global_step."""

    def __init__(self):
        super().__init__()
        self.automatic_optimization = False
        self.layer = torch.nn.Linear(2, 1)
        self.big, self.rss_with_big = None, 0.0
        self.step_durations: list[float] = []  # the real length of each training_step

    @property
    def iteration(self) -> int:
        return self.global_step

    def training_step(self, batch, batch_idx: int) -> None:
        start = time.perf_counter()
        opt = self.optimizers()
        opt.zero_grad()
        self.manual_backward(self.layer(batch).square().mean())
        opt.step()
        if self.iteration == 4:  # kept alive; sized to lift the lifetime peak RSS by BIG_MIB
            headroom = proc_status_mib("VmHWM") - proc_status_mib("VmRSS")
            self.big = torch.ones(int((headroom + BIG_MIB) * 2**20) // 8, dtype=torch.float64)
            self.rss_with_big = proc_status_mib("VmRSS")
        self.log("iteration", float(self.iteration), on_step=True, on_epoch=False)
        time.sleep(STEP_SLEEP)
        self.step_durations.append(time.perf_counter() - start)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def proc_status_mib(field: str) -> float:
    """VmRSS (now) or VmHWM (peak) from /proc, in MiB: a source independent of getrusage."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024  # the kernel writes kB (KiB)
    pytest.skip(f"no {field} in /proc/self/status")


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[list[dict], float, list[float], list[float]]:
    run_dir = tmp_path_factory.mktemp("perf")
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=ITERATIONS, max_epochs=-1,
                        logger=AppendingCSVLogger(save_dir=str(run_dir), name="", version=""),
                        callbacks=[ThroughputMonitor(LOG_EVERY, IMAGES)], log_every_n_steps=1,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    module = SlowModule()
    SlowLoader.durations = []
    trainer.fit(module, DataLoader(SlowLoader(), batch_size=1, num_workers=0))
    with open(run_dir / "metrics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    return rows, module.rss_with_big, module.step_durations, SlowLoader.durations


def perf_rows(rows: list[dict]) -> list[dict]:
    return [row for row in rows if row.get("perf/step_time_s")]


def test_values_are_logged_every_log_every_iterations_only(run):
    rows = run[0]
    step_of_iteration = {int(float(row["iteration"])): row["step"] for row in rows if row.get("iteration")}
    assert sorted(step_of_iteration) == list(range(1, ITERATIONS + 1))
    expected = [step_of_iteration[it] for it in range(LOG_EVERY, ITERATIONS + 1, LOG_EVERY)]
    assert [row["step"] for row in perf_rows(rows)] == expected  # the module's step for that iteration
    assert all(row[key] for row in perf_rows(rows) for key in PERF_KEYS)


def test_step_time_and_data_wait_match_the_sleeps(run):
    rows, _, step_durations, load_durations = run
    for window, row in enumerate(perf_rows(rows)):
        # The window's real step and load times (sleeps overrun on a loaded machine). Lightning
        # fetches one batch ahead, so an iteration may wait for its own load or the next one's.
        steps = step_durations[window * LOG_EVERY:(window + 1) * LOG_EVERY]
        step_truth = sum(steps) / len(steps)
        load_means = [sum(loads) / len(loads) for shift in (0, 1)
                      if (loads := load_durations[window * LOG_EVERY + shift:(window + 1) * LOG_EVERY + shift])]
        assert step_truth <= float(row["perf/step_time_s"]) <= step_truth + SLACK
        assert min(load_means) * 0.98 <= float(row["perf/data_wait_s"]) <= max(load_means) + SLACK


def test_images_per_second_is_images_over_step_time(run):
    rows = run[0]
    for row in perf_rows(rows):
        expected = IMAGES / float(row["perf/step_time_s"])
        assert float(row["perf/images_per_s"]) == pytest.approx(expected, rel=1e-12)


def test_peak_memory_is_in_mib_and_grows_with_a_big_allocation(run):
    rows, rss_with_big = run[:2]
    peaks = [float(row["perf/peak_memory_mb"]) for row in perf_rows(rows)]
    assert peaks[0] > 10  # a Python process with torch: wrong units (KiB read as bytes) give < 1
    assert peaks[1] >= rss_with_big - 1  # the window's peak covers the RSS seen inside it
    assert peaks[1] >= peaks[0] + 0.9 * BIG_MIB
    assert peaks[2] >= peaks[1]  # a lifetime peak never falls
    assert peaks[-1] <= proc_status_mib("VmHWM") + 1  # the kernel's own peak, read later, bounds it


def test_cuda_peak_is_allocated_memory_in_mib_and_resets(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device: 3 * 2**20 + 2**19)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device: calls.append(device))
    device = torch.device("cuda", 1)
    assert peak_memory_mb(device) == 3.5
    reset_peak_memory(device)
    reset_peak_memory(torch.device("cpu"))  # no-op: RSS peaks cannot be reset
    assert calls == [device]


def test_rejects_a_non_positive_interval_or_image_count():
    with pytest.raises(ValueError):
        ThroughputMonitor(0, 8)
    with pytest.raises(ValueError):
        ThroughputMonitor(5, 0)
