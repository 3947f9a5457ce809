"""Damaged samples in tar shards and the stream's promises: ranks still end an epoch together
(a worker left short of its batch cap wraps around), a resume stays exact, data without any
readable image stops with a DataError instead of looping, and training counts the skips in
metrics.csv and the end-of-run summary."""
from __future__ import annotations

from pathlib import Path

import pytest

from helpers import (TINY, assert_same_weights, epoch_keys, flat, hang_guard, interrupted, make, metrics_rows, sample,
                     single_worker, stop_and_resume, tar_bytes, write_set)
from dgm_scale.cli import main
from dgm_scale.config import load_config
from dgm_scale.data import DataError
from dgm_scale.data.shards import stream as stream_module
from dgm_scale.training import train

SIZES = [16, 16, 16, 16]  # two shards per rank of two
SHARD_RUN = [*TINY, "data.name=shards", "data.batch_size=4", "data.shuffle_buffer=1", "run.checkpoint_every=3"]


def _rank_keys(root: Path, rank: int, **options):
    loader = make(str(root), rank=rank, world_size=2, **options)
    return loader, flat(epoch_keys(loader))


@pytest.mark.parametrize("workers", [0, 2])
def test_ranks_short_of_their_cap_wrap_around(tmp_path, workers):
    """Manifest counts cap both ranks at the same batch count; 10 bad samples leave the ranks
    short of it (DDP would wait forever at the epoch end). Each re-reads its own samples instead:
    the cap met, every good sample of the epoch at least once, no sample on both ranks, no bad
    one, and each fault counted once."""
    keys = write_set(tmp_path, SIZES, bad=frozenset(range(0, 64, 7)))
    seen = []
    for rank in (0, 1):
        loader, got = _rank_keys(tmp_path, rank, workers=workers)
        assert len(got) == loader.stream.batches_per_epoch(0, max(1, workers)) * 8 == 32
        seen.append(set(got))
    assert not seen[0] & seen[1]
    assert seen[0] | seen[1] == {k for k in keys if int(k) % 7}
    faults = sum(_rank_keys(tmp_path, rank, workers=0)[0].tracker.faults()["bad_image"] for rank in (0, 1))
    assert faults == 10  # not again in the wrap-around


def test_resume_inside_the_wrap_around_is_exact(tmp_path):
    """Two thirds of the samples bad: a rank's pass gives ~11 images of its 4 x 8, so most of its
    batches come from wrapping around. Interrupted after every batch (inside the wrap-around too),
    the resumed stream continues the uninterrupted one."""
    write_set(tmp_path, SIZES, bad=frozenset(i for i in range(64) if i % 3))
    options = dict(rank=1, world_size=2, workers=0, shuffle_buffer=4)
    loader = make(str(tmp_path), **options)
    full = epoch_keys(loader) + epoch_keys(loader)
    assert len(full) == 8
    for k in range(1, len(full)):
        assert interrupted(str(tmp_path), k, **options) == full, k


def test_damaged_set_resume_is_exact(tmp_path):
    write_set(tmp_path, [12, 12, 12], bad=frozenset({1, 5, 14, 30}))
    loader = make(str(tmp_path), workers=2, drop_last=False)
    full = epoch_keys(loader) + epoch_keys(loader)
    for k in (2, 4):
        assert interrupted(str(tmp_path), k, workers=2, drop_last=False) == full


def test_resampled_data_without_a_readable_image_stops(tmp_path, monkeypatch):
    """Resampled streams never run out: with every image undecodable they would draw forever."""
    write_set(tmp_path, [8, 8], bad=frozenset(range(16)))
    monkeypatch.setattr(stream_module, "BARREN_LIMIT", 40)
    with hang_guard(30), pytest.raises(DataError, match="the last 40 samples drawn held no decodable image"):
        epoch_keys(make(str(tmp_path), workers=0, resampled=True, steps_per_epoch=3))


def test_an_epoch_without_a_full_batch_stops_unless_resumed(tmp_path):
    """Training on an epoch of no batch would loop over empty epochs forever; a resumed epoch
    whose batches were all delivered is empty by design and ends quietly."""
    write_set(tmp_path / "bad", [8, 8], bad=frozenset(range(15)))
    with hang_guard(30), pytest.raises(DataError, match="epoch 0 gave rank 0 no full batch of 8 readable samples"):
        epoch_keys(make(str(tmp_path / "bad"), workers=0))
    write_set(tmp_path / "good", [8, 8])
    first = make(str(tmp_path / "good"), workers=0)
    assert len(epoch_keys(first)) == 2
    resumed = make(str(tmp_path / "good"), workers=0)
    resumed.load_state_dict(first.state_dict())
    assert epoch_keys(resumed) == [] and len(epoch_keys(resumed)) == 2


def test_training_on_damaged_shards_counts_skips_in_metrics_and_summary(tmp_path, capsys):
    """20 samples in two shards, 4 undecodable (none last in its shard, so each fault lands in
    a delivered batch), batches of 4: an epoch is 4 iterations; 8 iterations meet 8 bad images."""
    root = tmp_path / "shards"
    write_set(root, [10, 10], bad=frozenset({1, 6, 11, 15}))
    with hang_guard(120):  # shuffle buffer 1: the order within a shard is kept (the shard order still varies)
        code = main(["train", *SHARD_RUN, f"data.path={root}", "trainer.max_steps=8", f"run.dir={tmp_path / 'run'}"])
    assert code == 0
    rows = metrics_rows(tmp_path / "run")
    counts = [int(float(row["data/skipped_bad_image"])) for row in rows]
    assert counts == sorted(counts) and counts[3] == 4 and counts[7] == 8
    assert all(float(row["data/skipped_bad_shard"]) == 0 for row in rows)
    assert "skipped data:  8 bad images" in capsys.readouterr().out


def test_training_resume_on_damaged_shards_equals_uninterrupted_run(tmp_path):
    """Stop at iteration 3 and resume: the same weights and the same skip counts in every row."""
    root = tmp_path / "shards"
    write_set(root, [10, 10], bad=frozenset({1, 6, 11, 15}))
    run = lambda overrides: train(load_config(overrides=overrides))  # noqa: E731
    full, part = stop_and_resume(run, tmp_path, SHARD_RUN + [f"data.path={root}", "data.num_workers=0"])
    assert_same_weights(full / "checkpoints" / "last.ckpt", part / "checkpoints" / "last.ckpt")
    rows = metrics_rows(full)  # 6 x 4 samples: the 4 bad ones of epoch 0, and 2 of epoch 1's first 8
    assert rows == metrics_rows(part) and int(float(rows[-1]["data/skipped_bad_image"])) == 6


def _forged_size(tar: bytes, name: str, size: int) -> bytes:
    """`tar` with member `name`'s size field set to `size` (GNU base-256), the checksum valid."""
    import io
    import tarfile

    with tarfile.open(fileobj=io.BytesIO(tar)) as archive:
        at = archive.getmember(name).offset
    header = bytearray(tar[at:at + 512])
    header[124:136] = b"\x80" + size.to_bytes(11, "big")
    header[148:156] = b" " * 8
    header[148:156] = f"{sum(header):06o}\0 ".encode()
    return tar[:at] + bytes(header) + tar[at + 512:]


@pytest.mark.parametrize("damage", ["gzip", "non_octal_checksum", "huge_size_skipped_member", "terabyte_size_read_member"])
def test_foreign_or_forged_tars_are_bad_shards(tmp_path, damage):
    """Found by tests/test_fuzz_data.py: a gzip file named .tar (its "checksum" field held no
    octal number), a size of 2^80 on a member that is skipped (no seek offset fits it) and one of
    1 TiB on a member that is read (one read would allocate it all) were a ValueError, an
    OverflowError and a MemoryError; each is now one bad shard."""
    import gzip

    tar = tar_bytes([("000000000.txt", b"a caption: not wanted"), *sample(0), *sample(1)])
    shard = tmp_path / "x-000000.tar"
    shard.write_bytes({"gzip": lambda: gzip.compress(tar),
                       "non_octal_checksum": lambda: tar[:148] + b"notoctal" + tar[156:],
                       "huge_size_skipped_member": lambda: _forged_size(tar, "000000000.txt", 1 << 80),
                       "terabyte_size_read_member": lambda: _forged_size(tar, "000000000.png", 1 << 40)}[damage]())
    worker = single_worker(str(shard))
    with hang_guard(30):
        assert list(worker.batches()) == []
    assert worker.faults.counts == {"bad_shard": 1, "bad_image": 0, "missing_image": 0, "bad_label": 0}
