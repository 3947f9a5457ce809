"""The prepared GPU check: its CPU rehearsal runs in CI; the real one runs where CUDA is (marker gpu);
the GPU-only judgements are fed canned outputs here, against their thresholds."""
import importlib.util
import re
import subprocess

import pytest
import torch

from helpers import ROOT


def run_check(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "benchmarks/gpu_check.sh", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=900)


# What the CPU can judge passes; what only a GPU can judge says "skipped", never "yes".
DRY_RUN_STATUS = {"DCGAN bf16 throughput": "skipped", "WGAN-GP 16-mixed": "yes", "WGAN-GP bf16-mixed": "yes",
                  "DeepSpeed ZeRO-2 GAN, bf16": "yes", "DeepSpeed ZeRO-2 WGAN-GP, fp16": "skipped",
                  "host syncs, peak memory": "skipped", "torch.compile": "skipped",
                  "MFU, DCGAN >= 100M parameters": "skipped", "sync-free steps": "skipped",
                  "loader-wait fraction": "skipped", "input pipeline options": "skipped"}


def test_the_dry_run_passes_what_the_cpu_can_judge_and_skips_the_rest():
    proc = run_check("--dry-run")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    rows = [line.split("|") for line in proc.stdout.splitlines()
            if line.startswith("| ") and not line.startswith("| check")]
    assert {row[1].strip(): row[2].strip() for row in rows} == DRY_RUN_STATUS, proc.stdout
    details = {row[1].strip(): row[3].strip() for row in rows}
    # 6 iterations logged every 3rd, of the default job and WGAN-GP: 2 x 4 ran under the sync check
    assert details["sync-free steps"].startswith("dry run: 8 non-logged iterations"), details
    assert re.search(r"[1-9][\d.]* GFLOP per iteration", details["MFU, DCGAN >= 100M parameters"]), details


def load_gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def canned(stdout: str):
    return lambda *args, **kwargs: subprocess.CompletedProcess(args, 0, stdout, "")


@pytest.mark.parametrize("ratio", [0.5, 0.99])
def test_throughput_is_judged_against_its_threshold_on_the_gpu(ratio, monkeypatch, tmp_path):
    check = load_gpu_check()
    monkeypatch.setattr(check, "run", canned(f"| dgm_scale (Lightning) | 10.0 |\n| hand-written PyTorch loop | 10.0 |\n"
                                             f"| ratio ours / reference | {ratio} |\n"))
    status, detail = check.check_throughput(check.settings(dry_run=False), tmp_path)
    assert status == ("yes" if ratio >= check.MIN_LOOP_RATIO else "NO"), detail
    assert check.check_throughput(check.settings(dry_run=True), tmp_path)[0] == "skipped"


@pytest.mark.parametrize("ratio, graphs, status", [(1.3, 12, "yes"), (0.7, 12, "NO"), (1.0, 0, "NO")])
def test_compile_needs_compiled_graphs_and_its_speed_ratio_on_the_gpu(ratio, graphs, status, monkeypatch, tmp_path):
    check = load_gpu_check()
    monkeypatch.setattr(check, "run", canned(f"| ratio compiled / eager | {ratio} |\n"
                                             f"| dynamo graphs compiled | {graphs} |\n"))
    assert check.check_compile(check.settings(dry_run=False), tmp_path)[0] == status
    assert check.check_compile(check.settings(dry_run=True), tmp_path)[0] == "skipped"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_the_gpu_check_on_a_gpu():
    proc = run_check()
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
