"""The one place where experiment loggers are built: RUN/metrics.csv, and W&B unless disabled.

This module is also the one place that reads W&B's environment: whether an API key is
configured (only that, to resolve `tracking.wandb.mode=auto`; the key itself is left to wandb),
and a W&B service inherited from a parent process (see `drop_inherited_wandb_service`).
"""
from __future__ import annotations

import csv
import logging
import netrc
import os
import re
import secrets
from pathlib import Path
from typing import Any, List, Optional

import lightning as L
from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import DummyExperiment, rank_zero_experiment
from lightning.pytorch.utilities import rank_zero_only

from dgm_scale.core.errors import DiskFullError, described
from dgm_scale.core.files import appending, atomic_open, write_text_atomic
from dgm_scale.core.lightning_internals import logger_step

log = logging.getLogger(__name__)


class _AppendingWriter(ExperimentWriter):
    """Lightning's CSV writer deletes an existing metrics.csv when it starts; a resumed run
    (e.g. after a SLURM requeue) must append to it instead. A new column (say, a metric first
    logged after the resume) rewrites the file with the wider header, atomically."""

    def __init__(self, log_dir: str) -> None:
        super().__init__(log_dir)
        path = Path(self.metrics_file_path)
        if path.is_file():  # continue with the columns the file already has
            with open(path, newline="") as handle:
                self.metrics_keys = sorted(next(csv.reader(handle), []))

    def _check_log_dir_exists(self) -> None:
        pass

    def log_metrics(self, metrics_dict: dict, step: int | None = None) -> None:
        """Values logged at the same step (training values, perf/*, data/*, eval/*) share one row."""
        pending = self.metrics[-1] if self.metrics else None
        super().log_metrics(metrics_dict, step)
        if pending is not None and pending.get("step") == self.metrics[-1]["step"] \
                and not (set(pending) & set(self.metrics[-1])) - {"step"}:
            pending.update(self.metrics.pop())

    def save(self) -> None:
        """Lightning's, written through core.files: a new column rewrites the file atomically and
        only then counts as known, rows are appended whole or not at all (a full disk: a one-line
        DiskFullError naming metrics.csv, the rows kept in memory for the next try)."""
        if not self.metrics:
            return
        path = Path(self.metrics_file_path)
        keys = sorted(set(self.metrics_keys).union(*self.metrics))
        if keys != self.metrics_keys and path.is_file():
            self._rewrite_with_new_header(keys)
        self.metrics_keys = keys
        new_file = not path.is_file()
        with appending(path), open(path, "a", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=keys)
            if new_file:
                writer.writeheader()
            writer.writerows(self.metrics)
        self.metrics = []

    def _rewrite_with_new_header(self, fieldnames: list[str], before_step: Optional[int] = None) -> None:
        """Rewrite the file with `fieldnames`, atomically; with `before_step`, keep only the rows
        of earlier steps (and drop a last line cut short by a kill: it has no newline)."""
        path = Path(self.metrics_file_path)
        text = path.read_text()
        if before_step is not None and not text.endswith("\n"):
            text = text[:text.rfind("\n") + 1]
        rows = list(csv.DictReader(text.splitlines()))
        if before_step is not None:
            rows = [row for row in rows if row.get("step") and int(float(row["step"])) < before_step]
        with atomic_open(path, "w", newline="") as handle:  # a crash mid-rewrite leaves the old file whole
            writer = csv.DictWriter(handle, fieldnames=fieldnames)
            writer.writeheader()
            writer.writerows(rows)

    def flush_before(self, step: int) -> list[dict]:
        """Write the pending rows of steps < `step`; return (and keep pending) the rest."""
        later = [row for row in self.metrics if row.get("step", -1) >= step]
        self.metrics = [row for row in self.metrics if row.get("step", -1) < step]
        self.save()
        self.metrics = later
        return [dict(row) for row in later]

    def rewind(self, step: int, pending: list[dict]) -> None:
        """Continue as at a checkpoint of `step`: rows of steps >= `step` on disk (written after
        that checkpoint by a run that was then killed) go; the rows pending then come back."""
        if Path(self.metrics_file_path).is_file():
            self._rewrite_with_new_header(self.metrics_keys, before_step=step)
        self.metrics = [dict(row) for row in pending] + self.metrics


class AppendingCSVLogger(CSVLogger):
    @rank_zero_only
    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        """As CSVLogger's, but flushes only when a new step begins, so that values logged later
        at the same step (callbacks) still join the step's row instead of starting a new one."""
        experiment = self.experiment
        pending = experiment.metrics
        if pending and step is not None and pending[-1].get("step") != step \
                and len(pending) >= self._flush_logs_every_n_steps:
            self.save()
        experiment.log_metrics(metrics, step if step is not None else len(pending))

    @rank_zero_only
    def finalize(self, status: str) -> None:
        """A failed run's last rows are a courtesy (a resume recomputes every row after its
        checkpoint): on a full disk they are dropped, so that the error which stopped the run is
        the one reported."""
        try:
            super().finalize(status)
        except DiskFullError:
            if status != "failed":
                raise

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment


WANDB_HOST = "api.wandb.ai"  # the netrc machine `wandb login` writes
WANDB_RUN_ID_FILE = "wandb_run_id"  # RUN/wandb_run_id: the W&B run a resumed run continues


def wandb_api_key_configured() -> bool:
    """Whether wandb would find an API key: WANDB_API_KEY, or a netrc entry for api.wandb.ai
    (from `wandb login`; $NETRC or ~/.netrc, as wandb looks). Only presence is checked."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    path = Path(os.environ.get("NETRC") or "~/.netrc").expanduser()
    try:
        entry = netrc.netrc(str(path)).authenticators(WANDB_HOST)
    except (OSError, netrc.NetrcParseError):  # no netrc file, or one wandb could not read either
        return False
    return entry is not None and bool(entry[2])


def resolve_wandb_mode(mode: str) -> str:
    """`auto` -> online when an API key is configured, else offline (sync later); others as given."""
    if mode == "auto":
        return "online" if wandb_api_key_configured() else "offline"
    return mode


def stored_wandb_run_id(run_dir: Path) -> str:
    """The run directory's W&B run id: read from RUN/wandb_run_id, or made and stored on first
    start (via a temporary file and a rename, so a crash never leaves an empty id). A W&B sweep
    agent's id (WANDB_RUN_ID, set by `wandb agent`) is the one a new run directory takes."""
    path = run_dir / WANDB_RUN_ID_FILE
    if path.is_file():
        return path.read_text().strip()
    run_id = os.environ.get("WANDB_RUN_ID") or secrets.token_hex(6)  # W&B ids: short [a-z0-9] strings
    write_text_atomic(path, run_id + "\n")
    return run_id


WANDB_SERVICE_ENV = "WANDB_SERVICE"  # "VERSION-PID-unix-SOCKET" or "VERSION-PID-tcp-localhost-PORT"


def drop_inherited_wandb_service() -> Optional[str]:
    """Forget a W&B service that a parent process started; return its token if one was dropped.

    wandb puts its service's address into os.environ (WANDB_SERVICE) and every child process
    connects to that service instead of starting its own. A training launched from a process that
    used W&B - a notebook, a sweep driver, the test suite, `sbatch` from such a shell - would log
    through the parent's service: on another node its socket does not exist, and a SLURM job
    killed on requeue leaves its run open there, so the requeued job fails with "run ID ... is in
    use". A training owns its W&B run, so it starts its own service (the token names the pid of
    the process that started the service: ours, or inherited).
    """
    token = os.environ.get(WANDB_SERVICE_ENV, "")
    match = re.match(r"\d+-(\d+)-", token)
    if match is None or int(match.group(1)) == os.getpid():
        return None
    del os.environ[WANDB_SERVICE_ENV]
    return token


class RunWandbLogger(WandbLogger):
    """Lightning's WandbLogger, tied to a run directory.

    - The W&B run id comes from RUN/wandb_run_id (resume="allow"), so a resumed or requeued run
      continues the same W&B run. Only rank 0 reads or writes it: Lightning gives the other
      ranks a dummy experiment, so they never create a run.
    - It logs through a W&B service of this process, never one inherited from a parent process.
    - The W&B run is finished with the training; otherwise the next `train` in this process
      would silently log into it (WandbLogger reuses an open `wandb.run`).
    - With `log_checkpoints`, a successful end logs last.ckpt / best.ckpt as one model artifact.
    - A W&B server that cannot be reached when the run starts (refused, or no answer within
      `init_timeout` seconds) does not stop or hold up the training: one warning, and the run
      logs to W&B offline instead (`wandb sync` uploads it later).
    - W&B failing (its service killed - SLURM's SIGTERM reaches every process of a job step,
      W&B's own service among them -, a full disk, a network error) does not stop the training:
      the first failure is logged as a warning, W&B is left out for the rest of this start, and
      metrics.csv keeps everything.
    """

    def __init__(self, run_dir: Path, log_checkpoints: bool, init_timeout: float = 60.0, **kwargs: Any) -> None:
        super().__init__(save_dir=str(run_dir), settings={"init_timeout": init_timeout}, **kwargs)
        self._wandb_init.pop("anonymous")  # Lightning's default; wandb 0.31 warns that it does nothing
        self._run_dir, self._log_checkpoints = Path(run_dir), log_checkpoints
        self._failed: Optional[str] = None

    def _guarded(self, what: str, call, *args: Any, **kwargs: Any) -> Any:
        if self._failed is not None:
            return None
        try:
            return call(*args, **kwargs)
        except Exception as error:  # noqa: BLE001 - any W&B failure: keep training without it
            self._failed = described(error)
            log.warning("W&B failed in %s (%s); training continues without W&B, metrics.csv has every value",
                        what, self._failed)
            return None

    @rank_zero_only
    def log_metrics(self, metrics: dict, step: Optional[int] = None) -> None:
        self._guarded("log_metrics", super().log_metrics, metrics, step)

    @rank_zero_only
    def log_hyperparams(self, params: Any) -> None:
        self._guarded("log_hyperparams", super().log_hyperparams, params)

    @rank_zero_only
    def log_image(self, *args: Any, **kwargs: Any) -> None:
        self._guarded("log_image", super().log_image, *args, **kwargs)

    @rank_zero_only
    def log_text(self, *args: Any, **kwargs: Any) -> None:
        self._guarded("log_text", super().log_text, *args, **kwargs)

    @property
    @rank_zero_experiment
    def experiment(self):
        if self._experiment is None and self._failed is None:  # rank 0, first use: start the W&B run
            self._id = self._wandb_init["id"] = stored_wandb_run_id(self._run_dir)
            drop_inherited_wandb_service()
            self._guarded("init", self._start)
        return self._experiment if self._experiment is not None else DummyExperiment()

    def _start(self) -> None:
        """wandb.init; online, a server that refuses the connection or does not answer within
        init_timeout leaves the run logging offline instead, with one warning."""
        try:
            WandbLogger.experiment.fget(self)
        except Exception as error:  # noqa: BLE001 - wandb raises CommError, AuthenticationError, ...
            if self._wandb_init.get("mode") != "online":
                raise
            import wandb

            log.warning("W&B server not reachable (%s); this run logs to W&B offline instead, upload it later "
                        "with `wandb sync %s`", described(error),
                        self._run_dir / "wandb" / "offline-run-*")
            wandb.teardown()  # the failed online run holds its id in the W&B service ("run ID is in use")
            self._wandb_init["mode"] = "offline"
            WandbLogger.experiment.fget(self)

    @rank_zero_only
    def finalize(self, status: str) -> None:
        if self._experiment is None:
            return
        self._guarded("finalize", self._finish, status)
        self._experiment = None  # a later use resumes the same run id instead of a finished run

    def _finish(self, status: str) -> None:
        super().finalize(status)
        if status == "success" and self._log_checkpoints:
            self.log_checkpoint_artifact()
        self._experiment.finish(exit_code=0 if status == "success" else 1)

    def log_checkpoint_artifact(self) -> Optional[Any]:
        """last.ckpt and best.ckpt (those that exist) as a `model` artifact of this run."""
        import wandb

        files = [self._run_dir / "checkpoints" / name for name in ("last.ckpt", "best.ckpt")]
        files = [path for path in files if path.is_file()]
        if not files:
            return None
        artifact = wandb.Artifact(name=f"checkpoints-{self.experiment.id}", type="model")
        for path in files:
            artifact.add_file(str(path), name=path.name)
        return self.experiment.log_artifact(artifact, aliases=["latest"])


def build_wandb_logger(cfg, run_dir: Path) -> Optional[RunWandbLogger]:
    """A WandbLogger writing under RUN/wandb, or None when the mode resolves to disabled.

    The resolved config reaches W&B once per start, through Lightning's log_hyperparams of the
    module's hparams (`config`, a nested dict); no API key is part of it: wandb reads the key
    itself from the environment or netrc.
    """
    wb = cfg.tracking.wandb
    mode = resolve_wandb_mode(wb.mode)
    if mode == "disabled":
        return None
    return RunWandbLogger(Path(run_dir), wb.log_checkpoints, wb.init_timeout, project=wb.project, entity=wb.entity,
                          tags=list(wb.tags), mode=mode, name=Path(run_dir).name)


class MetricsResumePoint(L.Callback):
    """Keeps metrics.csv in step with the checkpoints, so a run killed at any moment and resumed
    logs every iteration exactly once.

    Rows are buffered in memory and appended in batches. With every checkpoint, rank 0 writes
    the rows of earlier steps and stores the current step's (still open) rows in the checkpoint;
    a run resumed from it drops the rows the killed run wrote after that checkpoint and reopens
    the stored ones.
    """

    def __init__(self) -> None:
        self._restore: Optional[dict] = None
        self._trainer = None

    @staticmethod
    def _writer(trainer) -> Optional[_AppendingWriter]:
        if trainer is None or not trainer.is_global_zero:
            return None
        loggers = [lg for lg in trainer.loggers if isinstance(lg, AppendingCSVLogger)]
        return loggers[0].experiment if loggers else None

    def setup(self, trainer, pl_module, stage: str) -> None:
        self._trainer = trainer  # state_dict() gets no trainer

    def state_dict(self) -> dict[str, Any]:
        writer = self._writer(self._trainer)
        if writer is None:
            return {}
        step = logger_step(self._trainer)
        return {"step": step, "pending": writer.flush_before(step)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._restore = state_dict or None

    def on_train_start(self, trainer, pl_module) -> None:
        writer = self._writer(trainer)
        if writer is not None and self._restore is not None:
            writer.rewind(self._restore["step"], self._restore["pending"])
        self._restore = None


def build_loggers(cfg, run_dir: str | Path) -> List[Logger]:
    """Metrics go to `RUN/metrics.csv` (one row per logged iteration, appended across resumes)
    and, unless `tracking.wandb.mode` resolves to disabled, to W&B (files under RUN/wandb)."""
    loggers: List[Logger] = [AppendingCSVLogger(save_dir=str(run_dir), name="", version="")]
    wandb_logger = build_wandb_logger(cfg, Path(run_dir))
    if wandb_logger is not None:
        loggers.append(wandb_logger)
    return loggers


def unsaved_metric_rows(trainer) -> list[dict]:
    """Metric rows the CSV logger holds in memory, not yet in metrics.csv (it writes every 100
    rows and at the end), so that a report made during training shows the newest values."""
    rows: list[dict] = []
    for logger in trainer.loggers:
        if isinstance(logger, AppendingCSVLogger) and logger._experiment is not None:
            rows += [dict(row) for row in logger.experiment.metrics]
    return rows
