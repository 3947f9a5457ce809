"""Tests for dgm_scale.data.shards: the shard writer, manifest and `shards inspect`.

Truth is independent of the writer: tars are read back with Python's tarfile (or
webdataset) and pixels compared with the source files / arrays / scikit-learn's digits.
"""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dgm_scale.cli import main
from dgm_scale.data import DataError
from dgm_scale.data.shards import BuildOptions, build_shards, parse_size, read_manifest
from dgm_scale.data.shards import writer as writer_module

QUIET = dict(progress=False)


# ----------------------------------------------------------------------------- helpers
def read_tars(out: Path) -> list:
    """[(key, {ext: bytes})] of every shard listed in OUT's manifest, via tarfile."""
    manifest = json.loads((out / "manifest.json").read_text())
    samples = []
    for shard in manifest["shards"]:
        with tarfile.open(out / shard["name"]) as tar:
            for info in tar.getmembers():
                key, ext = info.name.split(".", 1)
                if not samples or samples[-1][0] != key:
                    samples.append((key, {}))
                samples[-1][1][ext] = tar.extractfile(info).read()
    return samples


def pixels(fields: dict) -> np.ndarray:
    """Decode a sample's image member to uint8 H x W x C."""
    if "npy" in fields:
        return np.load(io.BytesIO(fields["npy"]))
    ext = next(e for e in ("png", "jpg", "webp") if e in fields)
    array = np.asarray(Image.open(io.BytesIO(fields[ext])))
    return array[..., None] if array.ndim == 2 else array


def labels_of(samples: list) -> list:
    return [int(f["cls"]) if "cls" in f else None for _, f in samples]


def shard_bytes(out: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


@pytest.fixture
def class_folder(tmp_path) -> tuple:
    """3 classes x 4 RGB images of assorted small sizes; returns (root, [(file, label)])."""
    rng = np.random.default_rng(0)
    root, truth = tmp_path / "imgs", []
    for label, cls in enumerate(["cat", "dog", "eel"]):
        (root / cls).mkdir(parents=True)
        for i in range(4):
            path = root / cls / f"{i}.png"
            Image.fromarray(rng.integers(0, 256, (5 + i, 6, 3), dtype=np.uint8)).save(path)
            truth.append((path, label))
    return root, truth


@pytest.fixture
def npz_file(tmp_path) -> tuple:
    """20 grey 4x5 images with labels 0..3; returns (path, x, y)."""
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, (20, 4, 5), dtype=np.uint8)
    y = np.arange(20) % 4
    path = tmp_path / "toy.npz"
    np.savez(path, x=x, y=y)
    return path, x, y


# ----------------------------------------------------------------------------- sources
def test_folder_with_classes_roundtrip(class_folder, tmp_path):
    root, truth = class_folder
    out = tmp_path / "out"
    build_shards(str(root), out, BuildOptions(samples_per_shard=5, **QUIET))
    samples = read_tars(out)
    assert [k for k, _ in samples] == [f"{i:09d}" for i in range(12)]
    for (path, label), (_, fields) in zip(truth, samples):
        assert np.array_equal(pixels(fields), np.asarray(Image.open(path).convert("RGB")))
        assert int(fields["cls"]) == label
    m = read_manifest(out)
    assert (m["name"], m["num_samples"], m["encoding"]) == ("imgs", 12, "png")
    assert [s["num_samples"] for s in m["shards"]] == [5, 5, 2]
    assert m["labels"] == {"num_classes": 3, "names": ["cat", "dog", "eel"], "counts": [4, 4, 4]}
    assert m["image"]["channels"] == 3
    assert (m["image"]["min_height"], m["image"]["max_height"]) == (5, 8)
    assert (m["image"]["min_width"], m["image"]["max_width"]) == (6, 6)


def test_folder_resolution_grey_and_unlabelled(tmp_path):
    root = tmp_path / "flat"
    root.mkdir()
    for i in range(3):
        Image.fromarray(np.full((10, 20, 3), 40 * i, np.uint8)).save(root / f"{i}.jpg")
    out = tmp_path / "out"
    build_shards(str(root), out, BuildOptions(resolution=4, channels=1, encoding="npy", **QUIET))
    samples = read_tars(out)
    assert labels_of(samples) == [None] * 3
    for i, (_, fields) in enumerate(samples):
        array = pixels(fields)
        assert array.shape == (4, 4, 1) and array.dtype == np.uint8
        assert abs(int(array.mean()) - 40 * i) <= 2  # flat colour survives jpg + resize
    assert read_manifest(out)["labels"] == {"num_classes": 0, "names": None, "counts": []}


@pytest.mark.parametrize("encoding", ["png", "npy"])
def test_npz_with_labels_roundtrip(npz_file, tmp_path, encoding):
    path, x, y = npz_file
    out = tmp_path / "out"
    build_shards(str(path), out, BuildOptions(encoding=encoding, **QUIET))
    samples = read_tars(out)
    assert np.array_equal(np.stack([pixels(f)[..., 0] for _, f in samples]), x)
    assert labels_of(samples) == y.tolist()
    m = read_manifest(out)
    assert m["labels"]["counts"] == [5, 5, 5, 5] and m["encoding"] == encoding


def test_npy_rgb_with_images_and_labels_names(tmp_path):
    x = np.random.default_rng(2).integers(0, 256, (3, 4, 4, 3), dtype=np.uint8)
    np.save(tmp_path / "a.npy", x)
    np.savez(tmp_path / "b.npz", images=x, labels=np.array([2, 0, 2]))
    build_shards(str(tmp_path / "a.npy"), tmp_path / "A", BuildOptions(**QUIET))
    build_shards(str(tmp_path / "b.npz"), tmp_path / "B", BuildOptions(**QUIET))
    a, b = read_tars(tmp_path / "A"), read_tars(tmp_path / "B")
    assert np.array_equal(np.stack([pixels(f) for _, f in a]), x)
    assert labels_of(a) == [None] * 3 and labels_of(b) == [2, 0, 2]
    assert read_manifest(tmp_path / "B")["labels"]["counts"] == [1, 0, 2]


def test_builtin_digits_matches_sklearn(tmp_path):
    import webdataset as wds
    from sklearn.datasets import load_digits

    out = tmp_path / "digits"
    build_shards("builtin:digits", out, BuildOptions(resolution=8, samples_per_shard=1000, **QUIET))
    m = read_manifest(out)
    urls = [str(out / s["name"]) for s in m["shards"]]
    got = list(wds.WebDataset(urls, shardshuffle=False).decode("l8").to_tuple("png", "cls"))
    digits = load_digits()
    truth = np.round(digits.images / 16.0 * 255.0)
    assert len(got) == 1797 and m["num_samples"] == 1797
    assert np.abs(np.stack([g[0] for g in got]) - truth).max() <= 1
    assert [g[1] for g in got] == digits.target.tolist()
    assert m["labels"]["num_classes"] == 10 and sum(m["labels"]["counts"]) == 1797


# ----------------------------------------------------------------------------- re-shard
def test_reshard_preserves_every_sample(npz_file, tmp_path):
    path, _, y = npz_file
    first, second, third = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    build_shards(str(path), first, BuildOptions(samples_per_shard=7, **QUIET))
    build_shards(str(first), second, BuildOptions(samples_per_shard=5, **QUIET))
    pattern = str(first / "toy-{000000..000002}.tar")
    build_shards(pattern, third, BuildOptions(encoding="npy", name="re", **QUIET))
    a, b, c = read_tars(first), read_tars(second), read_tars(third)
    assert a == b  # same keys, byte-identical payloads and labels
    assert [s["num_samples"] for s in read_manifest(second)["shards"]] == [5, 5, 5, 5]
    assert [pixels(f)[..., 0].tolist() for _, f in c] == [pixels(f)[..., 0].tolist() for _, f in a]
    assert labels_of(c) == y.tolist()
    assert read_manifest(second)["labels"] == read_manifest(first)["labels"]


def test_reshard_detects_short_source_and_refuses_same_dir(npz_file, tmp_path, capsys):
    path, _, _ = npz_file
    out = tmp_path / "a"
    build_shards(str(path), out, BuildOptions(samples_per_shard=10, **QUIET))
    with pytest.raises(DataError, match="another directory"):
        build_shards(str(out), out, BuildOptions(overwrite=True, **QUIET))
    shard = out / "toy-000001.tar"
    with tarfile.open(shard) as tar:  # rewrite shard 1 without its last sample: a clean cut
        members = [(i, tar.extractfile(i).read()) for i in tar.getmembers()][:-2]
    with tarfile.open(shard, "w") as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data))
    assert main(["shards", "inspect", str(out)]) == 1
    assert "count mismatch: manifest 10, tar 9" in capsys.readouterr().out
    with pytest.raises(DataError, match="read 19 samples, its manifest says 20"):
        build_shards(str(out), tmp_path / "b", BuildOptions(**QUIET))
    assert not (tmp_path / "b" / "manifest.json").exists()


# ----------------------------------------------------------------------------- splitting
def test_bytes_per_shard_splitting(npz_file, tmp_path):
    path, _, _ = npz_file
    out = tmp_path / "out"
    build_shards(str(path), out, BuildOptions(bytes_per_shard=20480, encoding="npy", **QUIET))
    m = read_manifest(out)
    sizes = [(out / s["name"]).stat().st_size for s in m["shards"]]
    assert len(sizes) > 1 and max(sizes) <= 20480
    assert sizes == [s["bytes"] for s in m["shards"]]
    assert sum(s["num_samples"] for s in m["shards"]) == 20
    assert len(read_tars(out)) == 20


def test_parse_size():
    assert parse_size("64MB") == 64_000_000
    assert parse_size("1GiB") == 2**30
    assert parse_size("1.5 kb") == 1500
    assert parse_size("4096") == 4096
    with pytest.raises(DataError, match="bytes-per-shard"):
        parse_size("64XB")


def test_workers_give_identical_shards(class_folder, npz_file, tmp_path, monkeypatch):
    monkeypatch.setattr(writer_module, "WINDOW", 4)  # several pool windows in flight
    for src in (str(class_folder[0]), str(npz_file[0])):
        outs = []
        for workers in (1, 2):
            out = tmp_path / f"{Path(src).stem}-w{workers}"
            build_shards(src, out, BuildOptions(workers=workers, samples_per_shard=3, **QUIET))
            outs.append(shard_bytes(out))
        assert outs[0] == outs[1] and len(outs[0]) > 2


def test_rebuild_is_byte_identical(npz_file, tmp_path):
    path, _, _ = npz_file
    build_shards(str(path), tmp_path / "a", BuildOptions(**QUIET))
    first = shard_bytes(tmp_path / "a")
    build_shards(str(path), tmp_path / "a", BuildOptions(overwrite=True, **QUIET))
    assert shard_bytes(tmp_path / "a") == first


# ----------------------------------------------------------------------------- safety
def test_refuses_to_overwrite_and_removes_stale_shards(npz_file, tmp_path):
    path, _, _ = npz_file
    out = tmp_path / "out"
    build_shards(str(path), out, BuildOptions(samples_per_shard=5, **QUIET))
    with pytest.raises(DataError, match="--overwrite"):
        build_shards(str(path), out, BuildOptions(**QUIET))
    build_shards(str(path), out, BuildOptions(samples_per_shard=10, overwrite=True, **QUIET))
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "toy-000000.tar", "toy-000001.tar"]
    assert main(["shards", "build", str(path), str(out), "--quiet"]) == 2


def test_failed_overwrite_leaves_the_old_set_untouched(class_folder, tmp_path):
    root, _ = class_folder
    out = tmp_path / "out"
    build_shards(str(root), out, BuildOptions(samples_per_shard=4, **QUIET))
    before = {path.name: path.read_bytes() for path in out.iterdir()}
    (root / "eel" / "9.png").write_bytes(b"not a png")  # the rebuild fails at its last image
    with pytest.raises(DataError, match=r"9\.png.*shard set in '.*out' is unchanged"):
        build_shards(str(root), out, BuildOptions(samples_per_shard=3, overwrite=True, **QUIET))
    assert {path.name: path.read_bytes() for path in out.iterdir()} == before  # no staging left either
    assert main(["shards", "inspect", str(out)]) == 0


@pytest.mark.parametrize("workers", [1, 2])
def test_failure_midway_writes_no_manifest(class_folder, tmp_path, workers):
    root, _ = class_folder
    (root / "eel" / "9.png").write_bytes(b"not a png")  # the last of 13 images
    out = tmp_path / "out"
    with pytest.raises(DataError, match=r"9\.png.*no manifest written"):
        build_shards(str(root), out, BuildOptions(samples_per_shard=4, workers=workers, **QUIET))
    left = sorted(p.name for p in out.iterdir())  # finished shards only: no manifest, no temp
    assert left == [f"imgs-00000{i}.tar" for i in range(len(left))]
    if workers == 1:
        assert len(left) == 2  # samples 8-11 were still an open shard: dropped
        with pytest.raises(DataError, match="unfinished build"):
            build_shards(str(root), out, BuildOptions(**QUIET))


@pytest.mark.parametrize("src, message", [
    ("missing_dir", "no such file"),
    ("empty", "no images"),
    ("notes.txt", "not an image folder"),
    ("float.npy", "must be uint8"),
    ("nox.npz", "no image array named x or images"),
    ("bad.npy", "cannot read"),
    ("builtin:nope", "unknown dataset"),
    ("builtin:ring8", "not an image dataset"),
])
def test_bad_sources(tmp_path, capsys, src, message):
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.txt").write_text("hi")
    np.save(tmp_path / "float.npy", np.zeros((2, 4, 4), np.float32))
    np.savez(tmp_path / "nox.npz", z=np.zeros(3))
    (tmp_path / "bad.npy").write_bytes(b"garbage")
    arg = src if src.startswith("builtin:") else str(tmp_path / src)
    assert main(["shards", "build", arg, str(tmp_path / "out"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert message in err and arg in err and len(err.strip().splitlines()) == 1


# ----------------------------------------------------------------------------- inspect
def test_inspect_ok_and_detects_damage(npz_file, tmp_path, capsys):
    path, _, _ = npz_file
    out = tmp_path / "out"
    assert main(["shards", "build", str(path), str(out), "--samples-per-shard", "5",
                 "--workers", "1", "--quiet"]) == 0
    assert main(["shards", "inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert "20 in 4 shards" in text and "classes   4" in text and "verified" in text

    shards = [out / f"toy-00000{i}.tar" for i in range(4)]
    data = shards[0].read_bytes()
    shards[0].write_bytes(data[: len(data) // 2])  # truncated
    flipped = bytearray(shards[1].read_bytes())
    flipped[700] ^= 0xFF  # inside the first payload
    shards[1].write_bytes(bytes(flipped))
    shards[3].unlink()  # missing
    assert main(["shards", "inspect", str(out)]) == 1
    lines = capsys.readouterr().out.splitlines()
    bad = {line.split()[1].rstrip(":"): line for line in lines if line.startswith("BAD ")}
    assert sorted(bad) == ["toy-000000.tar", "toy-000001.tar", "toy-000003.tar"]
    assert "truncated" in bad["toy-000000.tar"]
    assert "checksum mismatch" in bad["toy-000001.tar"]
    assert "missing" in bad["toy-000003.tar"]
    assert main(["shards", "inspect", str(out), "--no-verify"]) == 0


def test_inspect_without_manifest_and_read_manifest_validation(tmp_path, capsys):
    assert main(["shards", "inspect", str(tmp_path)]) == 2
    assert "no shard manifest" in capsys.readouterr().err
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "dgm_scale.shards/1"}))
    with pytest.raises(DataError, match="missing keys"):
        read_manifest(tmp_path)
