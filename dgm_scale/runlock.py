"""One training per run directory: RUN/.lock names its holder (host, pid, start, SLURM job).

Rank 0 takes the lock before it writes anything into the run directory and gives it back when
training ends, however it ends; a heartbeat thread refreshes the file's time every
HEARTBEAT_SECONDS while it holds it. A second training that finds the lock stops at once with a
one-line error naming the holder, unless the lock is stale:
- its holder ran on this host and that process no longer exists (killed, crashed), or
- it was taken by this SLURM job (a requeued job continues its own run), or
- its holder ran on another host and its heartbeat is older than STALE_AFTER_SECONDS;
then the lock is taken over with a log line. The file is created with O_EXCL and replaced by a
rename, which are atomic on local and NFS (v3+) file systems, so two trainings started at once
on different nodes of a shared file system cannot both win.
"""
from __future__ import annotations

import json
import logging
import os
import secrets
import socket
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Optional

from dgm_scale.core.errors import ConfigError
from dgm_scale.core.files import atomic_path, disk_full_named

log = logging.getLogger(__name__)

LOCK_NAME = ".lock"
HEARTBEAT_SECONDS = 30.0
STALE_AFTER_SECONDS = 600.0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    return True


def _holder(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _describe(holder: dict) -> str:
    since = datetime.fromtimestamp(holder.get("since", 0)).strftime("%Y-%m-%d %H:%M:%S")
    job = f", SLURM job {holder['slurm_job']}" if holder.get("slurm_job") else ""
    return f"pid {holder.get('pid')} on {holder.get('host')} since {since}{job}"


class RunLock:
    """The lock of one run directory (see the module docstring); `acquire()`, then `release()`."""

    def __init__(self, run_dir: str | Path, slurm_job: Optional[str] = None):
        self.path = Path(run_dir) / LOCK_NAME
        self.slurm_job = slurm_job
        self.record = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.time(),
                       "slurm_job": slurm_job, "token": secrets.token_hex(8)}
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def stale_reason(self, holder: Optional[dict]) -> Optional[str]:
        """Why `holder`'s lock may be taken over, or None if it is held."""
        if holder is None:
            return "unreadable lock file"
        same_host = holder.get("host") == self.record["host"]
        if same_host and int(holder.get("pid", -1)) == os.getpid():
            return "left by this process"
        if same_host and not _alive(int(holder.get("pid", -1))):
            return f"holder {_describe(holder)} no longer runs"
        if self.slurm_job and holder.get("slurm_job") == self.slurm_job:
            return f"held by this SLURM job before its requeue ({_describe(holder)})"
        try:
            age = time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            return "released meanwhile"
        if not same_host and age > STALE_AFTER_SECONDS:
            return f"holder {_describe(holder)} has not been heard of for {age:.0f} s"
        return None

    def acquire(self) -> None:
        """Take the lock or raise a ConfigError naming its holder; starts the heartbeat."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            self._take_over()
        else:
            self._write_new(fd)
        self._thread = threading.Thread(target=self._heartbeat, name="dgm-scale-run-lock", daemon=True)
        self._thread.start()

    def _write_new(self, fd: int) -> None:
        """The record into the lock file just created; one that could not be written (a full
        disk) is removed, so that the next start does not find an empty lock."""
        try:
            with disk_full_named(self.path), os.fdopen(fd, "w") as handle:
                json.dump(self.record, handle)
                handle.flush()
                os.fsync(handle.fileno())
        except BaseException:
            self.path.unlink(missing_ok=True)
            raise

    def _take_over(self) -> None:
        holder = _holder(self.path)
        reason = self.stale_reason(holder)
        if reason is None:
            raise ConfigError(f"config key 'run.dir': '{self.path.parent}' is in use by {_describe(holder)} "
                              f"({self.path}); wait for it, stop it, or delete the lock if that training is gone")
        with atomic_path(self.path, unique=True) as tmp:
            tmp.write_text(json.dumps(self.record))
        if (_holder(self.path) or {}).get("token") != self.record["token"]:  # another taker won the race
            raise ConfigError(f"config key 'run.dir': '{self.path.parent}' was just taken by "
                              f"{_describe(_holder(self.path) or {})}")
        log.info("took over the run directory's lock: %s", reason)

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_SECONDS):
            try:
                os.utime(self.path)
            except OSError:
                return

    def release(self) -> None:
        """Stop the heartbeat and remove the lock if this process still holds it."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if (_holder(self.path) or {}).get("token") == self.record["token"]:
            self.path.unlink(missing_ok=True)
