"""Tests for the streaming shard reader: tario, URL expansion, ShardStream and StreamLoader.

Shards are built inside the tests (tarfile, or `tar` itself for the foreign layout). Ranks are
simulated in one process by constructing streams with rank / world_size.
"""
from __future__ import annotations

import io
import json
import random
import shutil
import subprocess
import tarfile
from pathlib import Path
from typing import Dict, List, Optional

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
import numpy as np
import pytest
import torch
from PIL import Image

from helpers import epoch_keys, flat, interrupted, make, png_bytes, sample, workers_stop_inside, write_set, write_tar
from dgm_scale.data.datasets import DataError
from dgm_scale.data.shards import samples as samples_module
from dgm_scale.data.shards.loader import StreamPositionCallback, make_stream_loader
from dgm_scale.data.shards.urls import expand_braces, expand_urls
from dgm_scale.data.shards.stream import ShardStream
from dgm_scale.data.shards.tario import TarCorrupt, TarTruncated, iter_members


# ----------------------------------------------------------------------------- tario
def _random_tar(path: Path, fmt: int, seed: int) -> None:
    rng = random.Random(seed)
    with tarfile.open(path, "w", format=fmt) as tar:
        info = tarfile.TarInfo("somedir")
        info.type = tarfile.DIRTYPE
        tar.addfile(info)
        for i in range(60):
            long = "d" * rng.choice([1, 99, 150]) + "/"
            if fmt != tarfile.USTAR_FORMAT and i % 7 == 0:
                long = "x" * 300 + "/é/"  # > 255 bytes and non-ASCII: GNU 'L' / PAX 'path'
            data = bytes(rng.getrandbits(8) for _ in range(rng.choice([0, 1, 511, 512, 513, 3000])))
            info = tarfile.TarInfo(f"{long}{i:05d}.bin")
            info.size, info.mtime = len(data), rng.random() * 1e9  # float mtime: PAX record
            tar.addfile(info, io.BytesIO(data))
            if i % 20 == 0:
                link = tarfile.TarInfo(f"link{i}")
                link.type = tarfile.SYMTYPE
                link.linkname = "l" * (120 if fmt != tarfile.USTAR_FORMAT else 50)  # GNU "K"
                tar.addfile(link)


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_tario_matches_tarfile(tmp_path, fmt):
    path = tmp_path / "t.tar"
    _random_tar(path, fmt, seed=fmt)
    with tarfile.open(path) as tar:
        expected = [(m.name, tar.extractfile(m).read()) for m in tar if m.isreg()]
    with open(path, "rb") as f:
        assert list(iter_members(f, str(path))) == expected
    with open(path, "rb") as f:  # a pipe-like stream (not seekable) reads the same
        assert list(iter_members(io.BufferedReader(io.BytesIO(f.read())))) == expected


def test_tario_damage_raises(tmp_path):
    write_set(tmp_path / "s", [4], manifest=False)
    raw = (tmp_path / "s" / "x-000000.tar").read_bytes()
    cases = {
        "inside a member": raw[:512 + 100],
        "between members": raw[:3 * 1024],  # headers and data are 512-aligned: a clean cut
        "inside a header": raw[:512 * 7 + 200],
    }
    for what, data in cases.items():
        with pytest.raises(TarTruncated):
            list(iter_members(io.BytesIO(data), what))
    broken = bytearray(raw)
    broken[1024 + 5] ^= 0xFF  # a byte of the second header's name
    with pytest.raises(TarCorrupt, match="checksum"):
        list(iter_members(io.BytesIO(bytes(broken))))


# ----------------------------------------------------------------------------- urls
def test_expand_urls_braces_lists_dirs_pipes(tmp_path):
    assert expand_braces("a{0..2}b{x,y}") == ["a0bx", "a0by", "a1bx", "a1by", "a2bx", "a2by"]
    assert expand_braces("s-{0008..0010}.tar") == ["s-0008.tar", "s-0009.tar", "s-0010.tar"]
    write_set(tmp_path / "m", [3, 4, 5])
    write_set(tmp_path / "n", [2, 2], manifest=False)
    ranged = expand_urls(f"{tmp_path}/m/x-{{000000..000002}}.tar")
    assert [s.num_samples for s in ranged] == [3, 4, 5]  # the manifest beside them
    both = expand_urls(f"{tmp_path}/m::{tmp_path}/n")
    assert [s.num_samples for s in both] == [3, 4, 5, None, None]
    piped = expand_urls(f"pipe:cat {tmp_path}/n/x-{{000000..000001}}.tar")
    assert [s.url for s in piped] == [f"pipe:cat {tmp_path}/n/x-00000{i}.tar" for i in (0, 1)]


@pytest.mark.parametrize("spec, message", [
    ("", "no shards"),
    ("{tmp}/missing-{{000..001}}.tar", "missing-000.tar' does not exist"),
    ("{tmp}/empty", "holds no"),
    ("pipe:echo oops >&2; exit 3", "exit status 3: oops"),
])
def test_expand_urls_errors_name_the_path(tmp_path, spec, message):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=message):
        expand_urls(spec.format(tmp=tmp_path))


def test_pipe_equals_local_and_exit_status_is_a_bad_shard(tmp_path):
    write_set(tmp_path, [10, 10, 10], manifest=False)
    local = epoch_keys(make(str(tmp_path), workers=0))
    piped = epoch_keys(make(f"pipe:cat {tmp_path}/x-{{000000..000002}}.tar", workers=0))
    assert piped == local and len(flat(local)) == 24
    failing = make(f"pipe:cat {tmp_path}/x-000000.tar; exit 4::{tmp_path}/x-000001.tar",
                   workers=0, drop_last=False)
    assert len(flat(epoch_keys(failing))) == 20  # its data was read; the failure is counted
    assert failing.tracker.faults()["bad_shard"] == 1


# ----------------------------------------------------------------------------- splitting
@pytest.mark.parametrize("sizes, even_ranks", [([25] * 8, True), ([25] * 7 + [13], False)])
def test_exactly_once_two_ranks_two_workers(tmp_path, sizes, even_ranks):
    # Uneven ranks keep every sample only with even_ranks=False (else the longer rank's tail
    # is trimmed so that DDP does not wait; see test_uneven_shards_give_equal_batches_per_rank).
    everything = write_set(tmp_path, sizes)
    seen = []
    for rank in range(2):
        loader = make(str(tmp_path), rank=rank, world_size=2, drop_last=False,
                      even_ranks=even_ranks)
        seen += flat(epoch_keys(loader))
    assert sorted(seen) == everything  # each sample once, none lost


def test_resampled_every_rank_gets_steps_per_epoch(tmp_path):
    write_set(tmp_path, [10, 30, 3, 50, 7])
    runs = {}
    for rank in range(2):
        for attempt in range(2):
            loader = make(str(tmp_path), rank=rank, world_size=2, resampled=True,
                          steps_per_epoch=7)
            assert len(loader) == 7
            runs[rank, attempt] = [epoch_keys(loader) for _ in range(2)]  # two epochs
            assert [len(e) for e in runs[rank, attempt]] == [7, 7]
    assert runs[0, 0] == runs[0, 1] and runs[1, 0] == runs[1, 1]  # deterministic
    assert runs[0, 0] != runs[1, 0] and runs[0, 0][0] != runs[0, 0][1]  # per rank and epoch


def test_uneven_shards_give_equal_batches_per_rank(tmp_path):
    write_set(tmp_path, [40, 9, 31, 17, 26])
    for epoch in range(3):
        counts = []
        for rank in range(2):
            loader = make(str(tmp_path), rank=rank, world_size=2)
            loader.set_epoch(epoch)
            counts.append((len(loader), len(epoch_keys(loader))))
        assert counts[0] == counts[1] and counts[0][0] == counts[0][1] > 0


def test_source_with_fewer_shards_than_ranks_is_an_error_without_counts(tmp_path):
    """Without sample counts shards are dealt whole; with a manifest, by sample ranges, so one
    shard can feed two ranks, but not fewer samples than ranks."""
    write_set(tmp_path / "plain", [5], manifest=False)
    with pytest.raises(DataError, match="1 shards for 2 ranks"):
        ShardStream([str(tmp_path / "plain")], batch_size=2, resolution=8, rank=0, world_size=2)
    everything = write_set(tmp_path / "counted", [5])
    seen = [flat(epoch_keys(make(str(tmp_path / "counted"), rank=rank, world_size=2, batch_size=1, drop_last=False,
                               even_ranks=False)))
            for rank in range(2)]
    assert sorted(seen[0] + seen[1]) == everything and [len(keys) for keys in seen] == [3, 2]
    with pytest.raises(DataError, match="fewer samples than the 6 ranks"):
        ShardStream([str(tmp_path / "counted")], batch_size=2, resolution=8, rank=0, world_size=6)


# ----------------------------------------------------------------------------- faults
def _damaged_set(root: Path) -> Dict[str, List[str]]:
    """Good shards + one with an undecodable PNG and an image-less sample + one truncated
    inside a member; returns {"good": keys expected, "bad_image": [...], ...}."""
    keys = write_set(root, [10, 10, 5, 10])  # shard 2 is replaced by 5 hand-made samples
    members = sample(100) + [("000000101.png", b"\x89PNG not really")] + sample(102)
    members += [("000000103.cls", b"3")] + sample(104)
    write_tar(root / "x-000002.tar", members)
    truncated = root / "x-000003.tar"
    with tarfile.open(truncated) as tar:
        cut = tar.getmember("000000029.png").offset_data + 10
    truncated.write_bytes(truncated.read_bytes()[:cut])
    good = keys[:20] + keys[25:29] + ["000000100", "000000102", "000000104"]
    return {"good": good, "bad_image": ["000000101"], "missing_image": ["000000103"]}


def test_damaged_data_is_skipped_and_counted(tmp_path):
    expected = _damaged_set(tmp_path)
    loader = make(str(tmp_path), drop_last=False)
    assert sorted(flat(epoch_keys(loader))) == sorted(expected["good"])
    faults = loader.tracker.faults()
    assert (faults["bad_shard"], faults["bad_image"], faults["missing_image"]) == (1, 1, 1)


def test_cut_between_samples_is_detected_without_manifest(tmp_path):
    write_set(tmp_path, [6], manifest=False)
    shard = tmp_path / "x-000000.tar"
    with tarfile.open(shard) as tar:
        cut = tar.getmember("000000004.png").offset  # a header boundary: tarfile reads short
    shard.write_bytes(shard.read_bytes()[:cut])
    loader = make(str(shard), workers=0, drop_last=False)
    # Samples 0-2 are read; sample 3 may be incomplete (its .cls could follow) and is dropped.
    assert sorted(flat(epoch_keys(loader))) == [f"{i:09d}" for i in range(3)]
    assert loader.tracker.faults()["bad_shard"] == 1


def test_strict_errors_name_the_shard_and_sample(tmp_path):
    _damaged_set(tmp_path)
    # Through a worker process (the message survives the DataLoader's re-raise); the failed
    # epoch stops its workers.
    with workers_stop_inside(), pytest.raises(DataError, match=r"x-000003.tar'.*data.strict=true"):
        epoch_keys(make(str(tmp_path / "x-000003.tar"), strict=True))
    with pytest.raises(DataError, match=r"x-000002.tar' sample '000000101': bad image"):
        epoch_keys(make(str(tmp_path / "x-000002.tar"), workers=0, strict=True, shuffle_buffer=0))


# ----------------------------------------------------------------------------- resume
@pytest.mark.parametrize("manifest, options", [
    (True, {}), (False, {"hflip": True}), (True, {"resampled": True, "steps_per_epoch": 9}),
])
def test_resume_continues_the_uninterrupted_sequence(tmp_path, manifest, options):
    write_set(tmp_path, [20, 20, 20, 20, 20, 13], manifest=manifest)
    loader = make(str(tmp_path), **options)
    full = epoch_keys(loader) + epoch_keys(loader)
    for k in (3, len(full) // 2 + 1):
        assert interrupted(str(tmp_path), k, **options) == full


def test_resume_does_not_open_delivered_shards(tmp_path, monkeypatch):
    write_set(tmp_path, [20] * 6)
    opened: List[str] = []
    real_open = samples_module.open_shard

    def spy(url):
        opened.append(Path(url).name)
        return real_open(url)

    monkeypatch.setattr(samples_module, "open_shard", spy)
    spec, options = str(tmp_path), dict(workers=0, shuffle_buffer=4)
    full = epoch_keys(make(spec, **options))
    first = make(spec, **options)
    delivered = flat(epoch_keys(first, limit=9))
    state = first.state_dict()
    done = {f"x-{i:06d}.tar" for i in range(6)
            if {f"{j:09d}" for j in range(20 * i, 20 * i + 20)} <= set(delivered)}
    assert done  # the test needs at least one fully delivered shard
    opened.clear()
    resumed = make(spec, **options)
    resumed.load_state_dict(state)
    assert flat(full)[len(delivered):] == flat(epoch_keys(resumed))
    assert not done & set(opened)


def test_resume_with_other_worker_count_without_counts_restarts_the_epoch(tmp_path, caplog):
    everything = write_set(tmp_path, [10] * 4, manifest=False)
    first = make(str(tmp_path), workers=2, drop_last=False)
    epoch_keys(first, limit=2)
    second = make(str(tmp_path), workers=1, drop_last=False)
    second.load_state_dict(first.state_dict())
    assert "restarts from its beginning" in caplog.text
    assert sorted(flat(epoch_keys(second))) == everything


# ----------------------------------------------------------------------------- layouts
def test_plain_tar_with_jpg_and_json_trains(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(6):
        Image.fromarray(np.full((20, 30, 3), 40 * i, np.uint8)).save(src / f"img{i:03d}.jpg")
        meta = {"caption": "a photo", "width": 30} | ({"label": i} if i % 2 else {})
        (src / f"img{i:03d}.json").write_text(json.dumps(meta))
    if shutil.which("tar") is None:
        pytest.skip("no tar binary")
    # --sort=name keeps each sample's files together (readdir order would scatter them).
    subprocess.run(["tar", "--sort=name", "-cf", str(tmp_path / "plain.tar"), "-C", str(src), "."],
                   check=True)
    loader = make(str(tmp_path / "plain.tar"), workers=0, batch_size=3, resolution=16,
                  shuffle_buffer=0)
    batches = list(loader)
    keys = [[f"./img{i:03d}" for i in r] for r in ((0, 1, 2), (3, 4, 5))]
    assert [b[2]["keys"] for b in batches] == keys
    x, labels, _ = batches[1]
    assert x.shape == (3, 3, 16, 16) and labels.tolist() == [3, 0, 5]
    assert -1 <= x.min() and x.max() <= 1
    order = ["img001.json", "img000.jpg", "img001.jpg", "img000.json"]  # scattered samples
    subprocess.run(["tar", "-cf", str(tmp_path / "scattered.tar"), "-C", str(src), *order],
                   check=True)
    with pytest.raises(DataError, match="sample 'img001' are not adjacent.*--sort=name"):
        list(make(str(tmp_path / "scattered.tar"), workers=0, batch_size=1, strict=True))


def test_npy_webp_and_grey_decode(tmp_path):
    array = np.arange(12 * 12 * 3, dtype=np.uint8).reshape(12, 12, 3)
    npy = io.BytesIO()
    np.save(npy, array)
    write_tar(tmp_path / "m.tar", [("a.npy", npy.getvalue()), ("a.cls", b"7"),
                                   ("b.webp", png_bytes(1, 12, "WEBP")), ("b.cls", b"2")])
    x, labels, _ = next(iter(make(str(tmp_path / "m.tar"), workers=0, batch_size=2,
                                  resolution=12, channels=1, shuffle_buffer=0)))
    assert x.shape == (2, 1, 12, 12) and labels.tolist() == [7, 2]


# ----------------------------------------------------------------------------- lightning
class _KeyRecorder(L.LightningModule):
    """Trains nothing useful; records the keys of every batch it trains on."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.keys: List[List[str]] = []

    def training_step(self, batch, batch_idx):
        self.keys.append(batch[2]["keys"])
        return (self.weight * batch[0].mean()).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _fit(spec: str, ckpt_dir: Path, resume: Optional[Path] = None) -> List[List[str]]:
    """Two epochs through Lightning (checkpoint every 13 steps); the keys trained on."""
    stream = ShardStream(spec, batch_size=8, resolution=8, return_keys=True, shuffle_buffer=16)
    loader = make_stream_loader(stream, num_workers=2)  # persistent workers, as in training
    module = _KeyRecorder()
    saver = ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=13, save_top_k=-1,
                            filename="{step}")
    trainer = L.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False,
                        callbacks=[StreamPositionCallback(loader), saver])
    trainer.fit(module, train_dataloaders=loader, ckpt_path=resume)
    return module.keys


def test_lightning_resume_mid_epoch_continues_the_sequence(tmp_path):
    """Through Lightning: epochs via `loader.sampler.set_epoch`, the position via the loader's
    state_dict in the checkpoint, consumed batches via the callback (not the prefetched ones)."""
    write_set(tmp_path / "data", [20] * 4)
    with workers_stop_inside():  # the callback stops the persistent workers when the fit ends
        full = _fit(str(tmp_path / "data"), tmp_path / "run")
    assert len(full) == 20  # 2 epochs x 10 batches
    # Step 13 = 3 batches into epoch 1: the resumed epoch number, the skip inside it and the
    # worker rotation (next batch from worker 1) all come from the checkpoint.
    rest = _fit(str(tmp_path / "data"), tmp_path / "again", tmp_path / "run" / "step=13.ckpt")
    assert rest == full[13:]
