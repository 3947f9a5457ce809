"""One training per run directory: the lock, its holder in the error, stale locks taken over."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from dgm_scale.cli import main
from dgm_scale.config import ConfigError
from dgm_scale.runlock import LOCK_NAME, STALE_AFTER_SECONDS, RunLock
from helpers import ROOT, TINY


def write_lock(run_dir, **holder) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    record = {"host": "vm", "pid": os.getpid(), "since": time.time(), "slurm_job": None, "token": "x", **holder}
    (run_dir / LOCK_NAME).write_text(json.dumps(record))


def test_a_second_training_is_refused_and_a_killed_holders_lock_is_taken_over(tmp_path, capsys):
    run_dir = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "-m", "dgm_scale.cli", "train", *TINY, "trainer.max_steps=100000",
                              f"run.dir={run_dir}"], cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not (run_dir / "checkpoints" / "last.ckpt").is_file():  # it holds the lock and trains
            assert first.poll() is None and time.monotonic() < deadline
            time.sleep(0.2)
        assert main(["train", *TINY, f"run.dir={run_dir}", "resume=auto"]) == 2
        error = capsys.readouterr().err
        assert f"'{run_dir}' is in use by pid {first.pid} on " in error and error.count("\n") == 1
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert (run_dir / LOCK_NAME).is_file()  # kill -9 left it behind
    assert main(["train", *TINY, "trainer.max_steps=4", f"run.dir={run_dir}", "resume=auto"]) == 0
    assert not (run_dir / LOCK_NAME).exists()  # given back at the end


def test_which_locks_are_stale(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lock = RunLock(run_dir, slurm_job="77")
    monkeypatch.setattr("socket.gethostname", lambda: "vm")
    lock.record["host"] = "vm"
    write_lock(run_dir, pid=int(dead.stdout))
    assert "no longer runs" in lock.stale_reason(json.loads((run_dir / LOCK_NAME).read_text()))
    write_lock(run_dir, host="node-b", pid=1, slurm_job="77")
    assert "this SLURM job" in lock.stale_reason(json.loads((run_dir / LOCK_NAME).read_text()))
    write_lock(run_dir, host="node-b", pid=1, slurm_job="78")
    assert lock.stale_reason(json.loads((run_dir / LOCK_NAME).read_text())) is None  # alive elsewhere, as far as we know
    with pytest.raises(ConfigError, match=r"in use by pid 1 on node-b since .*, SLURM job 78"):
        lock.acquire()
    old = time.time() - STALE_AFTER_SECONDS - 5
    os.utime(run_dir / LOCK_NAME, (old, old))  # its heartbeat stopped long ago
    lock.acquire()
    assert json.loads((run_dir / LOCK_NAME).read_text())["token"] == lock.record["token"]
    lock.release()
    assert not (run_dir / LOCK_NAME).exists()
