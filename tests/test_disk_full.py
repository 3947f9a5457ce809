"""A full disk (ENOSPC) while a checkpoint, a report, a sample dump or a shard is written: the
previous file stays whole and loadable, the command stops with one line naming the file, and
once space is freed the work continues to the same result as if the disk had never filled.

Each test mounts a small tmpfs (helpers.small_tmpfs; skipped where mounting is not allowed) and
fills it with a file (helpers.fill_disk); deleting that file is "freeing space".
"""
import csv
import hashlib
import logging
import re
import shutil
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch

from helpers import TINY, assert_same_weights, fill_disk, metrics_rows, one_line, one_thread, small_tmpfs, with_callback
from dgm_scale.cli import main
from dgm_scale.config import load_config
from dgm_scale.core.errors import DiskFullError
from dgm_scale.core.files import append_text, torch_save_atomic, write_bytes_atomic
from dgm_scale.data import DataError
from dgm_scale.data.shards import BuildOptions, build_shards, read_manifest
from dgm_scale.modules import load_module
from dgm_scale.tracking.loggers import AppendingCSVLogger, _AppendingWriter
from dgm_scale.tracking.report import RunReport, build_report
from dgm_scale.training import train

MAX_STEPS = 8
RUN = ["configs/nsgan.yaml", *TINY, f"trainer.max_steps={MAX_STEPS}", "run.checkpoint_every=1",
       "run.keep_checkpoints=0", "run.sample_every=100"]  # every checkpoint kept: the disk fills up
PAGE = 4096  # tmpfs allocates whole pages


@pytest.fixture
def tmpfs(tmp_path):
    with small_tmpfs(tmp_path / "tmpfs", 4 * 2**20) as mounted:
        yield mounted


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory) -> Path:
    """The uninterrupted run (on an ordinary disk)."""
    run_dir = tmp_path_factory.mktemp("disk_full") / "reference"
    with one_thread():
        train(load_config(RUN[0], [*RUN[1:], f"run.dir={run_dir}"]))
    return run_dir


def cli(args: list[str], capsys) -> tuple[int, list[str]]:
    """`dgm-scale ARGS` in this process: exit code and the lines it printed on stderr."""
    with one_thread():
        code = main(args)
    return code, capsys.readouterr().err.splitlines()


def error_line(lines: list[str]) -> str:
    """The one `dgm-scale: error:` line (and no traceback) among `lines`."""
    assert not any("Traceback" in line for line in lines), "\n".join(lines)
    errors = [line for line in lines if line.startswith("dgm-scale: error:")]
    assert len(errors) == 1, lines
    return errors[0]


def named_path(message: str) -> Path:
    return Path(re.search(r"disk full while writing '([^']+)'", message).group(1))


def hidden_temporaries(directory: Path) -> list[Path]:
    return [path for path in directory.rglob(".*") if path.name.endswith(".tmp")]


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ----------------------------------------------------------------------------- the write helpers
@pytest.mark.parametrize("write", [
    lambda path, size: write_bytes_atomic(path, b"x" * size),
    lambda path, size: torch_save_atomic({"w": torch.zeros(size // 4)}, path),  # torch.save on a handle
], ids=["bytes", "torch"])
def test_atomic_write_on_a_full_disk_keeps_the_old_file(tmpfs, write):
    path = tmpfs / "sub" / "file.bin"
    write(path, 1000)
    old = path.read_bytes()
    filler = fill_disk(tmpfs, leave=8 * PAGE)
    with pytest.raises(DiskFullError) as caught:
        write(path, 64 * PAGE)
    assert named_path(one_line(caught.value)) == path
    assert path.read_bytes() == old
    assert sorted(p.name for p in tmpfs.rglob("*")) == ["file.bin", "filler", "sub"]  # no temporary left
    filler.unlink()
    write(path, 64 * PAGE)
    assert len(path.read_bytes()) >= 64 * PAGE


def test_append_on_a_full_disk_leaves_no_torn_line(tmpfs):
    path = tmpfs / "metrics.jsonl"
    append_text(path, '{"iteration": 1}\n')
    filler = fill_disk(tmpfs, leave=2 * PAGE)
    with pytest.raises(DiskFullError) as caught:
        append_text(path, '{"iteration": 2, "pad": "' + "x" * (8 * PAGE) + '"}\n')
    assert named_path(one_line(caught.value)) == path
    assert path.read_text() == '{"iteration": 1}\n'
    filler.unlink()
    append_text(path, '{"iteration": 2}\n')
    assert path.read_text().splitlines() == ['{"iteration": 1}', '{"iteration": 2}']


def test_metrics_csv_on_a_full_disk_keeps_its_rows_for_the_next_save(tmpfs):
    """A row with a new column fails to save: the file is as it was and the header is not taken as
    widened, so the next save (space freed) writes a consistent file with both rows."""
    writer = _AppendingWriter(log_dir=str(tmpfs))
    writer.log_metrics({"a": 1.0}, step=0)
    writer.save()
    before = (tmpfs / "metrics.csv").read_text()
    filler = fill_disk(tmpfs)
    writer.log_metrics({"a": 2.0, "b": 3.0}, step=1)
    with pytest.raises(DiskFullError) as caught:
        writer.save()
    assert named_path(one_line(caught.value)) == tmpfs / "metrics.csv"
    assert (tmpfs / "metrics.csv").read_text() == before
    filler.unlink()
    writer.save()
    with open(tmpfs / "metrics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert rows == [{"a": "1.0", "b": "", "step": "0"}, {"a": "2.0", "b": "3.0", "step": "1"}]


def test_a_failed_runs_unsaved_rows_give_way_on_a_full_disk(tmpfs):
    """When a run fails, the CSV logger's unsaved rows are dropped on a full disk (a resume
    recomputes every row after its checkpoint), so that the error which stopped the run is the one
    reported and Lightning's teardown still runs; at a successful end the error is raised."""
    logger = AppendingCSVLogger(save_dir=str(tmpfs), name="", version="")
    logger.log_metrics({"a": 1.0}, step=0)
    logger.save()
    fill_disk(tmpfs)
    logger.log_metrics({f"metric_{i}": float(i) for i in range(1000)}, step=1)  # more than a page
    logger.finalize("failed")
    with pytest.raises(DiskFullError):
        logger.finalize("success")


# ----------------------------------------------------------------------------- training
def test_checkpoints_need_no_room_in_the_temp_folder(tmpfs, tmp_path, monkeypatch):
    """A checkpoint is written where it goes, not first in full to the system temp folder
    (Lightning's own checkpoint IO does that): a full /tmp does not stop a run."""
    fill_disk(tmpfs)
    monkeypatch.setattr(tempfile, "tempdir", str(tmpfs))
    with one_thread():
        train(load_config(RUN[0], [*RUN[1:], "trainer.max_steps=2", f"run.dir={tmp_path / 'run'}"]))
    assert load_module(tmp_path / "run" / "checkpoints" / "last.ckpt").checkpoint_iteration == 2


class FillDiskAt(L.Callback):
    """Takes every free byte of `directory`'s file system at the end of `iteration` (before the
    checkpoint callbacks of that iteration: it is put first)."""

    def __init__(self, directory: Path, iteration: int):
        self.directory, self.iteration = directory, iteration

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        if pl_module.iteration == self.iteration:
            fill_disk(self.directory)


def start_filling_up(tmpfs: Path, reference_run: Path, monkeypatch) -> None:
    """Every checkpoint is kept: the disk fills up a few iterations in, while a checkpoint is
    written."""
    size = -(-(reference_run / "checkpoints" / "last.ckpt").stat().st_size // PAGE) * PAGE
    fill_disk(tmpfs, leave=16 * PAGE + int(4.5 * size))  # config, metrics... and ~3 iterations


def start_full_at_once(tmpfs: Path, reference_run: Path, monkeypatch) -> None:
    """The disk is full to the last byte at the end of iteration 3 (another process took it):
    iteration 3's checkpoint fails, and nothing else can be written while the run stops."""
    with_callback(FillDiskAt(tmpfs, 3), monkeypatch.setattr)


@pytest.mark.parametrize("start", [start_filling_up, start_full_at_once], ids=["filling_up", "full_at_once"])
def test_training_on_a_full_disk_stops_in_one_line_and_resumes_exactly(reference_run, tmpfs, capsys, caplog, start):
    """One line naming the checkpoint being written (no warnings besides: the failed run writes
    no report), exit code 2, last.ckpt whole, no temporary file left; after freeing space,
    resume=auto ends bit-identical to the uninterrupted run (weights and every metrics.csv row)."""
    victim = tmpfs / "run"
    with pytest.MonkeyPatch.context() as monkeypatch:
        start(tmpfs, reference_run, monkeypatch)
        code, lines = cli(["train", *RUN, f"run.dir={victim}"], capsys)
    assert code == 2
    message = error_line(lines)
    assert "resume=auto" in message
    assert named_path(message).parent == victim / "checkpoints" and named_path(message).suffix == ".ckpt"
    assert [record.getMessage() for record in caplog.records if record.levelno >= logging.WARNING] == []
    stopped_at = load_module(victim / "checkpoints" / "last.ckpt").checkpoint_iteration
    print(f"disk full after iteration {stopped_at}: {message}", file=sys.__stderr__)
    assert 1 <= stopped_at < MAX_STEPS
    assert hidden_temporaries(victim) == []
    (tmpfs / "filler").unlink()
    code, lines = cli(["train", *RUN, f"run.dir={victim}", "resume=auto"], capsys)
    assert code == 0, lines
    assert_same_weights(reference_run / "checkpoints" / "last.ckpt", victim / "checkpoints" / "last.ckpt")
    assert metrics_rows(victim) == metrics_rows(reference_run)
    assert [float(row["train/iteration"]) for row in metrics_rows(victim)] == list(range(1, MAX_STEPS + 1))


# ----------------------------------------------------------------------------- report, dump, shards
def test_report_on_a_full_disk_keeps_the_old_report(reference_run, tmpfs):
    """The report written again on a full disk: one line naming the file, the old report.html
    whole; during training a full disk stops the run instead of being logged like other report
    problems."""
    run_dir = tmpfs / "run"
    shutil.copytree(reference_run, run_dir, ignore=shutil.ignore_patterns("checkpoints", "plots", "report.html"))
    old = build_report(run_dir, status="running").read_text()
    filler = fill_disk(tmpfs)
    with pytest.raises(DiskFullError) as caught:
        build_report(run_dir, status="finished")
    assert named_path(one_line(caught.value)).is_relative_to(run_dir)
    with pytest.raises(DiskFullError):  # during training: the run stops (its next checkpoint would fail too)
        RunReport(run_dir, every=1, max_steps=MAX_STEPS).refresh(SimpleNamespace(is_global_zero=True, loggers=[]), "running")
    assert (run_dir / "report.html").read_text() == old
    assert hidden_temporaries(run_dir) == []
    filler.unlink()
    assert "finished" in build_report(run_dir, status="finished").read_text()


def test_sample_dump_on_a_full_disk_stops_in_one_line_and_reruns_to_the_same_files(reference_run, tmpfs,
                                                                                   tmp_path, capsys):
    checkpoint = str(reference_run / "checkpoints" / "last.ckpt")
    dump = ["sample", checkpoint, "--num", "64", "--batch-size", "16"]
    assert cli([*dump, "--out-dir", str(tmp_path / "straight")], capsys)[0] == 0
    filler = fill_disk(tmpfs, leave=20 * PAGE)  # ~20 of the 64 one-page files fit
    code, lines = cli([*dump, "--out-dir", str(tmpfs / "dump")], capsys)
    assert code == 2
    assert named_path(error_line(lines)).parent == tmpfs / "dump"
    assert hidden_temporaries(tmpfs) == []
    filler.unlink()
    assert cli([*dump, "--out-dir", str(tmpfs / "dump")], capsys)[0] == 0
    straight = sorted((tmp_path / "straight").iterdir())
    assert [p.name for p in straight] == sorted(p.name for p in (tmpfs / "dump").iterdir())
    assert all(digest(p) == digest(tmpfs / "dump" / p.name) for p in straight)


def test_shard_rebuild_on_a_full_disk_keeps_the_old_set(tmpfs, tmp_path):
    """Replacing a finished set needs room for both: on a full disk the rebuild stops in one
    line naming the shard, the old set is as it was; after freeing space it is the same set a
    build elsewhere makes."""
    rng = np.random.default_rng(0)
    source = tmp_path / "images.npz"
    np.savez(source, x=rng.integers(0, 256, (64, 16, 16, 3), dtype=np.uint8), y=rng.integers(0, 4, 64))
    options = dict(samples_per_shard=16, encoding="npy", progress=False)
    out = tmpfs / "shards"
    build_shards(str(source), out, BuildOptions(**options))
    old = {path.name: digest(path) for path in out.iterdir()}
    build_shards(str(source), tmp_path / "elsewhere", BuildOptions(name="images", resolution=8, **options))
    filler = fill_disk(tmpfs, leave=2 * PAGE)  # less than a shard: it fails while samples are added
    with pytest.raises(DataError) as caught:
        build_shards(str(source), out, BuildOptions(resolution=8, overwrite=True, **options))
    assert "disk full while writing" in one_line(caught.value)
    assert named_path(str(caught.value)).name.startswith("images-")
    assert {path.name: digest(path) for path in out.iterdir()} == old  # no staging folder, nothing changed
    assert read_manifest(out)["num_samples"] == 64
    filler.unlink()
    build_shards(str(source), out, BuildOptions(resolution=8, overwrite=True, **options))
    assert {p.name: digest(p) for p in out.iterdir()} == {p.name: digest(p) for p in (tmp_path / "elsewhere").iterdir()}
