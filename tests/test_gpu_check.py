"""The prepared GPU check: its CPU rehearsal runs in CI; the real one runs where CUDA is (marker gpu)."""
import subprocess

import pytest
import torch

from helpers import ROOT


def run_check(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "benchmarks/gpu_check.sh", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=900)


def test_the_dry_run_passes_every_check_on_the_cpu():
    proc = run_check("--dry-run")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| ") and not line.startswith("| check")]
    assert len(rows) == 7 and all(row.split("|")[2].strip() == "yes" for row in rows), proc.stdout


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_the_gpu_check_on_a_gpu():
    proc = run_check()
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
