"""Bad and unusual image files in both image sources (an image folder, tar shards), through
both decoders (libspng for plain PNGs, PIL): each file kind is either decoded to the pixels an
independent computation gives, or skipped and counted (data.strict=true: a one-line error naming
the file, and the shard); training counts the skips in metrics.csv and the end-of-run summary."""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Callable, Dict, NamedTuple, Optional

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import (TINY, assert_same_weights, bomb_png, encode_image, hang_guard, metrics_rows, png_file, random_rgb,
                     stop_and_resume, tar_bytes, torchrun)
from dgm_scale.cli import main
from dgm_scale.config import load_config
from dgm_scale.config.schema import DataConfig
from dgm_scale.data import DataError, build_dataset, transforms
from dgm_scale.data.shards.stream import ShardStream
from dgm_scale.data.transforms import to_8bit
from dgm_scale.training import train

R = 8  # every convertible file is R x R (no resize), so the expected pixels are exact


class Kind(NamedTuple):
    ext: str
    data: Callable[[], bytes]
    # the expected uint8 [R, R, 3] (RGB truth; grey is derived by luma) or [R, R] (grey truth);
    # None: the file cannot be used and is skipped
    expected: Optional[Callable[[], np.ndarray]] = None
    tolerance: int = 0  # levels (lossy JPEG)


def luma(rgb: np.ndarray) -> np.ndarray:
    """ITU-R 601-2 luma, the conversion PIL documents for RGB -> L."""
    return rgb.astype(np.float64) @ np.array([0.299, 0.587, 0.114])


def as_channels(truth: np.ndarray, channels: int) -> np.ndarray:
    """The truth in `channels`: colour -> grey by luma, grey -> colour by repetition (float)."""
    truth = truth.astype(np.float64)
    if channels == 1:
        return luma(truth) if truth.ndim == 3 else truth
    return truth if truth.ndim == 3 else np.repeat(truth[..., None], 3, axis=2)


def _cut(data: bytes, fraction: float) -> bytes:
    return data[:int(len(data) * fraction)]


def _grey16() -> np.ndarray:
    return np.random.default_rng(1).integers(0, 65536, (R, R), dtype=np.uint16)


def _rgb16_levels() -> np.ndarray:
    return np.random.default_rng(2).integers(0, 256, (R, R, 3), dtype=np.uint16)


def _rgb16_png() -> bytes:  # 16-bit RGB (colour type 2): v = 257 k holds level k exactly
    rows = (_rgb16_levels() * 257).astype(">u2").reshape(R, R * 3)
    return png_file(R, R, 16, 2, b"".join(b"\0" + row.tobytes() for row in rows))


def _palette() -> tuple:
    rng = np.random.default_rng(3)
    return rng.integers(0, 256, (16, 3), dtype=np.uint8), rng.integers(0, 16, (R, R), dtype=np.uint8)


def _palette_png(transparent: Optional[int] = None) -> bytes:
    colours, indices = _palette()
    image = Image.frombytes("P", (R, R), indices.tobytes())
    image.putpalette(colours.flatten().tolist())
    return encode_image(image, **({} if transparent is None else {"transparency": transparent}))


def _palette_truth(transparent: Optional[int] = None) -> np.ndarray:
    colours, indices = _palette()
    rgb = colours[indices]
    if transparent is not None:
        rgb[indices == transparent] = 0  # transparency is composited over black
    return rgb


def _rgba() -> np.ndarray:
    return np.random.default_rng(4).integers(0, 256, (R, R, 4), dtype=np.uint8)


def _premultiplied(pixels: np.ndarray) -> np.ndarray:
    colour, alpha = pixels[..., :-1].astype(np.float64), pixels[..., -1:].astype(np.float64)
    out = np.floor(colour * alpha / 255 + 0.5)
    return out[..., 0] if out.shape[-1] == 1 else out


def _la() -> np.ndarray:
    return np.random.default_rng(5).integers(0, 256, (R, R, 2), dtype=np.uint8)


def _exif(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif.tobytes()


def _halves() -> np.ndarray:
    """16 wide x 8 high: left half red, right half blue (survives JPEG)."""
    pixels = np.zeros((R, 2 * R, 3), dtype=np.uint8)
    pixels[:, :R] = (255, 0, 0)
    pixels[:, R:] = (0, 0, 255)
    return pixels


def _halves_rotated_truth() -> np.ndarray:
    # Orientation 6: the stored image is shown turned 90 degrees clockwise, so the left (red) half
    # is on top; the centre R x R crop of the upright 8 x 16 picture is half red over half blue.
    upright = np.rot90(_halves(), k=-1)
    top = (upright.shape[0] - R) // 2
    return upright[top:top + R]


def _jpeg_header_size(width: int, height: int) -> bytes:
    """A small JPEG whose frame header claims width x height (PIL reads the size from it)."""
    data = bytearray(encode_image(Image.fromarray(random_rgb(6)), "JPEG"))
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = height.to_bytes(2, "big") + width.to_bytes(2, "big")
    return bytes(data)


KINDS: Dict[str, Kind] = {
    # cannot be used: skipped and counted
    "truncated_png": Kind("png", lambda: _cut(encode_image(Image.fromarray(random_rgb(7, 64))), 0.5)),
    "truncated_jpeg": Kind("jpg", lambda: _cut(encode_image(Image.fromarray(random_rgb(8, 64)), "JPEG"), 0.6)),
    "zero_bytes": Kind("png", lambda: b""),
    "text_named_jpg": Kind("jpg", lambda: b"name,label\ncat,1\n" * 20),
    # 9500 x 9500: over PIL's limit, under twice it, where PIL itself only warns and decodes
    "bomb_png": Kind("png", functools.lru_cache(1)(lambda: bomb_png(9500))),
    "bomb_jpeg": Kind("jpg", lambda: _jpeg_header_size(30000, 30000)),
    # converted
    "grey16_png": Kind("png", lambda: encode_image(Image.fromarray(_grey16())),
                       lambda: np.floor(_grey16() / 257 + 0.5)),
    "rgb16_png": Kind("png", _rgb16_png, _rgb16_levels),
    "palette_png": Kind("png", _palette_png, _palette_truth),
    "palette_transparent_png": Kind("png", lambda: _palette_png(transparent=0), lambda: _palette_truth(0)),
    "rgba_png": Kind("png", lambda: encode_image(Image.fromarray(_rgba())), lambda: _premultiplied(_rgba())),
    "la_png": Kind("png", lambda: encode_image(Image.fromarray(_la())), lambda: _premultiplied(_la())),
    "cmyk_jpeg": Kind("jpg", lambda: encode_image(Image.new("CMYK", (R, R), (0, 255, 255, 0)), "JPEG", quality=100),
                      lambda: np.tile(np.array([255, 0, 0]), (R, R, 1)), tolerance=2),
    "grey_png": Kind("png", lambda: encode_image(Image.fromarray(random_rgb(9)[..., 0])), lambda: random_rgb(9)[..., 0]),
    "rgb_png": Kind("png", lambda: encode_image(Image.fromarray(random_rgb(10))), lambda: random_rgb(10)),
    "exif_rotated_png": Kind("png", lambda: encode_image(Image.fromarray(random_rgb(11)), exif=_exif(6)),
                             lambda: np.rot90(random_rgb(11), k=-1)),
    "exif_upside_down_png": Kind("png", lambda: encode_image(Image.fromarray(random_rgb(12)), exif=_exif(3)),
                                 lambda: np.rot90(random_rgb(12), k=2)),
    "exif_rotated_jpeg": Kind("jpg", lambda: encode_image(Image.fromarray(_halves()), "JPEG", quality=100, subsampling=0,
                                                             exif=_exif(6)),
                              _halves_rotated_truth, tolerance=8),
}
UNUSABLE = [name for name, kind in KINDS.items() if kind.expected is None]
GOOD = random_rgb(0)


@pytest.fixture(params=["libspng", "pil"])
def decoder(request, monkeypatch):
    """Both decoders: libspng (plain 8-bit PNGs, when installed) and PIL alone."""
    if request.param == "libspng" and transforms.pyspng is None:
        pytest.skip("pyspng is not installed")
    if request.param == "pil":
        monkeypatch.setattr(transforms, "pyspng", None)
    return request.param


def check_pixels(name: str, x: torch.Tensor, channels: int) -> None:
    """x [C, R, R] in [-1, 1] holds the kind's expected pixels (to the kind's tolerance, +1 for luma)."""
    kind = KINDS[name]
    levels = to_8bit(x).permute(1, 2, 0).numpy().astype(np.float64)
    expected = as_channels(kind.expected(), channels)
    expected = expected[..., None] if expected.ndim == 2 else expected
    slack = kind.tolerance + (1 if channels == 1 and kind.expected().ndim == 3 else 0)
    assert levels.shape == expected.shape, name
    assert np.abs(levels - expected).max() <= slack, (name, np.abs(levels - expected).max())


# ----------------------------------------------------------------------------- folder
def folder_with(tmp_path: Path, name: str) -> Path:
    (tmp_path / "a_good.png").write_bytes(encode_image(Image.fromarray(GOOD)))
    path = tmp_path / f"b_{name}.{KINDS[name].ext}"
    path.write_bytes(KINDS[name].data())
    return path


def folder_set(root: Path, channels: int, strict: bool = False):
    return build_dataset(DataConfig(name="folder", path=str(root), resolution=R, channels=channels,
                                    val_fraction=0.0, strict=strict), "train")


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("name", list(KINDS))
def test_folder_decodes_or_skips_each_kind(name, channels, decoder, tmp_path):
    path = folder_with(tmp_path, name)
    dataset = folder_set(tmp_path, channels)
    good, _, good_replaced = dataset[0]
    x, _, replaced = dataset[1]
    assert x.shape == (channels, R, R) and int(good_replaced) == 0
    if name in UNUSABLE:  # the stand-in is the readable file, and the item says so
        assert int(replaced) == 1 and torch.equal(x, good)
        with pytest.raises(DataError) as err:
            folder_set(tmp_path, channels, strict=True)[1]
        message = str(err.value)
        assert str(path) in message and "data.strict=true" in message and "\n" not in message
    else:
        assert int(replaced) == 0
        check_pixels(name, x, channels)
        assert torch.equal(folder_set(tmp_path, channels, strict=True)[1][0], x)


# ----------------------------------------------------------------------------- shards
def stream_items(shard: Path, channels: int, strict: bool = False):
    """{key: x [C, R, R]} of one pass over `shard`, and the faults counted."""
    stream = ShardStream(str(shard), batch_size=1, resolution=R, channels=channels, shuffle_buffer=0,
                         drop_last=False, strict=strict, return_keys=True)
    items, faults = {}, {}
    for x, _, info in stream:
        items[info["keys"][0]] = x[0]
        faults = info["faults"]
    return items, faults


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("name", list(KINDS))
def test_shard_decodes_or_skips_each_kind(name, channels, decoder, tmp_path):
    shard = tmp_path / "x-000000.tar"
    # the odd sample between two good ones: its fault is counted in a batch that is delivered
    shard.write_bytes(tar_bytes([("a.png", encode_image(Image.fromarray(GOOD))), ("a.cls", b"1"),
                                 (f"b.{KINDS[name].ext}", KINDS[name].data()),
                                 ("c.png", encode_image(Image.fromarray(GOOD)))]))
    items, faults = stream_items(shard, channels)
    assert all(x.shape == (channels, R, R) for x in items.values())
    if name in UNUSABLE:
        assert sorted(items) == ["a", "c"] and faults["bad_image"] == 1
        with pytest.raises(DataError) as err:
            stream_items(shard, channels, strict=True)
        message = str(err.value)
        assert f"{shard.name}' sample 'b'" in message and "data.strict=true" in message and "\n" not in message
    else:
        assert sorted(items) == ["a", "b", "c"] and faults["bad_image"] == 0
        check_pixels(name, items["b"], channels)


def test_both_sources_give_the_same_pixels(tmp_path):
    """The folder and the shard stream decode each convertible kind identically (one decode)."""
    for name in (name for name in KINDS if name not in UNUSABLE):
        folder = tmp_path / name
        folder.mkdir()
        folder_with(folder, name)
        shard = folder / "x.tar"
        shard.write_bytes(tar_bytes([("b." + KINDS[name].ext, KINDS[name].data())]))
        for channels in (1, 3):
            assert torch.equal(folder_set(folder, channels)[1][0], stream_items(shard, channels)[0]["b"]), name


def test_extreme_aspect_ratio_is_cropped_before_resizing(monkeypatch):
    """A 1 x 200,000 strip: resized whole it would be R x 1.6 million pixels, of which the crop
    keeps R x R; it is cut to MAX_ASPECT around its centre first, and the centre is what shows."""
    strip = np.zeros((200_000, 1), dtype=np.uint8)
    strip[100_000 - 4:100_000 + 4] = 200  # the centre rows, all the R x R crop can show
    resized = []
    resize = transforms._resize_shorter_side
    monkeypatch.setattr(transforms, "_resize_shorter_side", lambda img, res: resized.append(img.size) or resize(img, res))
    array = transforms.decode_square(encode_image(Image.fromarray(strip)), 1, R, fast=False)
    assert array.shape == (R, R) and array.min() == array.max() == 200
    assert resized == [(1, transforms.MAX_ASPECT)]


def test_a_decoder_giving_the_wrong_shape_is_a_skip_not_a_wrong_tensor(tmp_path, monkeypatch):
    """Were a decoder to return another layout than asked for (here libspng, faked, giving 4
    channels for an RGB PNG), the image is skipped: no batch of the wrong shape reaches a model."""
    from types import SimpleNamespace

    folder_with(tmp_path, "rgb_png")
    odd = KINDS["rgb_png"].data()
    good = np.asarray(Image.fromarray(GOOD))
    monkeypatch.setattr(transforms, "pyspng", SimpleNamespace(
        load=lambda data: np.zeros((R, R, 4), np.uint8) if data == odd else good))
    _, _, replaced = folder_set(tmp_path, 3)[1]
    assert int(replaced) == 1
    with pytest.raises(DataError, match="decoded to uint8 \\(8, 8, 4\\), expected uint8 \\(8, 8, 3\\)"):
        folder_set(tmp_path, 3, strict=True)[1]


# ----------------------------------------------------------------------------- training
FOLDER_RUN = [*TINY, "data.name=folder", "data.channels=1", "data.val_fraction=0", "data.batch_size=8",
              "run.checkpoint_every=3", "run.sample_every=100"]


def mixed_folder(root: Path, bad: int = 4, good: int = 12) -> Path:
    """`good` readable and `bad` unreadable files (of four kinds) under root."""
    root.mkdir(parents=True, exist_ok=True)
    for i in range(good):
        (root / f"{i:02d}.png").write_bytes(encode_image(Image.fromarray(random_rgb(100 + i))))
    broken = ["truncated_png", "zero_bytes", "text_named_jpg", "truncated_jpeg"]
    for i in range(bad):
        kind = KINDS[broken[i % len(broken)]]
        (root / f"{i:02d}_bad.{kind.ext}").write_bytes(kind.data())
    return root


def test_training_on_a_folder_counts_skips_in_metrics_and_summary(tmp_path, capsys):
    """16 files, 4 unreadable, batches of 8: an epoch is 2 iterations and meets each bad file once,
    so after 4 iterations (2 epochs) the run skipped 8; the column and the summary say so."""
    root = mixed_folder(tmp_path / "images")
    with hang_guard(120):
        code = main(["train", *FOLDER_RUN, f"data.path={root}", "trainer.max_steps=4", f"run.dir={tmp_path / 'run'}"])
    assert code == 0
    counts = [int(float(row["data/skipped_bad_image"])) for row in metrics_rows(tmp_path / "run")]
    assert len(counts) == 4 and counts == sorted(counts)  # a run total, logged every iteration
    assert counts[1] == 4 and counts[3] == 8  # epoch ends: 4 bad files met per epoch
    assert "skipped data:  8 bad images" in capsys.readouterr().out


def test_folder_resume_with_skips_equals_uninterrupted_run(tmp_path):
    """Stop at iteration 3 (mid-epoch) and resume: the same batches (stand-ins included), the
    same weights, and the same skip counts in every logged row as the straight run."""
    root = mixed_folder(tmp_path / "images")
    run = lambda overrides: train(load_config(overrides=overrides))  # noqa: E731
    full, part = stop_and_resume(run, tmp_path, FOLDER_RUN + [f"data.path={root}"])
    assert_same_weights(full / "checkpoints" / "last.ckpt", part / "checkpoints" / "last.ckpt")
    rows = metrics_rows(full)
    assert rows == metrics_rows(part) and int(float(rows[-1]["data/skipped_bad_image"])) == 12  # 3 epochs x 4


@pytest.mark.parametrize("strict", ["data.strict=true", "--strict"])
def test_strict_folder_stops_with_one_line_naming_the_file(tmp_path, capsys, strict):
    """data.strict=true (or --strict), decoding in a loader worker: the CLI prints one line naming the file."""
    root = mixed_folder(tmp_path / "images", bad=1)
    with hang_guard(120):
        code = main(["train", *FOLDER_RUN, f"data.path={root}", strict, "data.num_workers=1",
                     f"run.dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert err[0] == f"dgm-scale: error: cannot decode image '{root / '00_bad.png'}': image file is truncated (data.strict=true)"


@pytest.mark.slow
def test_two_ranks_sum_their_skips(tmp_path):
    """DDP: each rank meets half the bad files of an epoch; the logged count is their sum."""
    root = mixed_folder(tmp_path / "images", bad=4, good=28)  # 32 files: 2 iterations of 2 x 8 per epoch
    proc = torchrun(["tests/ddp_worker.py", "configs/nsgan.yaml", str(tmp_path), *FOLDER_RUN, f"data.path={root}",
                     "trainer.devices=2", "trainer.max_steps=4", f"run.dir={tmp_path / 'run'}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert int(float(metrics_rows(tmp_path / "run")[-1]["data/skipped_bad_image"])) == 8
