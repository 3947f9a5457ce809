"""Tests for dgm_scale.data: transforms, dataset registry and the Lightning data module."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from helpers import under_ci

from dgm_scale.config.schema import DataConfig
from dgm_scale.data import (
    DATASETS,
    TOY_DATASETS,
    DataError,
    DataModule,
    build_dataset,
    from_model_range,
    load_image,
    resize_tensor,
    to_model_range,
    toy_centers,
)


def make_cfg(**overrides):
    cfg = OmegaConf.structured(DataConfig)
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


def stack(ds):
    xs, ys = zip(*(ds[i] for i in range(len(ds))))
    return torch.stack(xs), torch.stack(ys)


# ----------------------------------------------------------------------------- transforms
def test_range_maps_roundtrip():
    x = torch.rand(2, 3, 4, 4)
    y = to_model_range(x)
    assert y.min() >= -1 and y.max() <= 1
    assert torch.allclose(from_model_range(y), x, atol=1e-6)


def test_resize_tensor_shapes():
    x = torch.rand(2, 1, 8, 8)
    assert resize_tensor(x, 16).shape == (2, 1, 16, 16)
    assert resize_tensor(x, 4).shape == (2, 1, 4, 4)
    assert resize_tensor(torch.rand(1, 3, 10, 20), 8).shape == (1, 3, 8, 8)
    assert resize_tensor(x, 8) is x


def test_registry_contents():
    assert set(DATASETS) == {"digits", "ring8", "grid25", "folder", "text"}
    assert TOY_DATASETS == ("ring8", "grid25")


def test_unknown_dataset_and_bad_split():
    with pytest.raises(DataError, match="data.name"):
        build_dataset(make_cfg(name="nope"), "train")
    with pytest.raises(ValueError):
        build_dataset(make_cfg(), "test")


# ----------------------------------------------------------------------------- digits
def test_digits_sizes_shapes_range_labels():
    train = build_dataset(make_cfg(resolution=16, channels=1), "train")
    val = build_dataset(make_cfg(resolution=16, channels=1), "val")
    assert len(train) + len(val) == 1797
    assert len(val) == round(1797 * 0.1)
    x, y = stack(train)
    assert x.shape[1:] == (1, 16, 16) and x.dtype == torch.float32
    assert y.dtype == torch.int64 and y.shape == (len(train),)
    assert x.min() >= -1 and x.max() <= 1
    assert x.min() < -0.99 and x.max() > 0.9
    assert set(y.tolist()) <= set(range(10)) and len(set(y.tolist())) == 10
    assert train.num_classes == 10


def test_digits_rgb_native_resolution():
    ds = build_dataset(make_cfg(resolution=8, channels=3), "train")
    x, _ = ds[0]
    assert x.shape == (3, 8, 8)
    assert torch.equal(x[0], x[1]) and torch.equal(x[1], x[2])


def test_digits_fixed_split_and_empty_val():
    a, _ = stack(build_dataset(make_cfg(), "val"))
    torch.manual_seed(123)  # the split must not depend on the run seed
    b, _ = stack(build_dataset(make_cfg(), "val"))
    assert torch.equal(a, b)
    assert len(build_dataset(make_cfg(val_fraction=0.0), "val")) == 0
    assert len(build_dataset(make_cfg(val_fraction=0.0), "train")) == 1797


# ----------------------------------------------------------------------------- toy
def test_toy_centers():
    ring = toy_centers("ring8")
    assert ring.shape == (8, 2)
    assert torch.allclose(ring.norm(dim=1), torch.full((8,), 2.0), atol=1e-5)
    angles = torch.atan2(ring[:, 1], ring[:, 0]).remainder(2 * math.pi)
    expected = torch.arange(8) * (2 * math.pi / 8)
    assert torch.allclose(angles.sort().values, expected.float(), atol=1e-5)
    grid = toy_centers("grid25")
    assert grid.shape == (25, 2)
    assert len({tuple(p) for p in grid.tolist()}) == 25
    assert set(grid.flatten().tolist()) == {-4.0, -2.0, 0.0, 2.0, 4.0}


@pytest.mark.parametrize("name", TOY_DATASETS)
def test_toy_samples_near_centers_and_deterministic(name):
    cfg = make_cfg(name=name, toy_samples=2000, toy_std=0.05, val_fraction=0.1)
    train = build_dataset(cfg, "train")
    val = build_dataset(cfg, "val")
    assert len(train) == 2000 and len(val) == 200
    x, y = stack(train)
    assert x.shape == (2000, 2) and x.dtype == torch.float32 and y.dtype == torch.int64
    centers = toy_centers(name)
    assert torch.cdist(x, centers).min(dim=1).values.max() < 5 * 0.05
    assert torch.equal(y, torch.cdist(x, centers).argmin(dim=1))
    torch.manual_seed(99)
    x2, y2 = stack(build_dataset(cfg, "train"))
    assert torch.equal(x, x2) and torch.equal(y, y2)
    assert not torch.equal(stack(val)[0], x[:200])
    assert len(build_dataset(make_cfg(name=name, toy_samples=10, val_fraction=0.0), "val")) == 1


# ----------------------------------------------------------------------------- folder
def write_image(path: Path, size, mode="RGB", color=(255, 0, 0)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color if mode == "RGB" else color[0]).save(path)


@pytest.fixture()
def image_folder(tmp_path):
    root = tmp_path / "imgs"
    write_image(root / "cats" / "a.png", (40, 20))
    write_image(root / "cats" / "b.JPG", (20, 40), color=(0, 255, 0))
    write_image(root / "cats" / "nested" / "c.png", (16, 16), mode="L", color=(128,))
    write_image(root / "dogs" / "d.png", (33, 17), mode="L", color=(255,))
    write_image(root / "dogs" / "e.bmp", (64, 48), color=(0, 0, 255))
    (root / "dogs" / "notes.txt").write_text("not an image")
    (root / "empty_dir").mkdir()
    return root


def test_folder_labels_classes_shapes(image_folder):
    cfg = make_cfg(name="folder", path=str(image_folder), resolution=16, channels=3,
                   val_fraction=0.0)
    ds = build_dataset(cfg, "train")
    assert ds.classes == ["cats", "dogs"] and ds.num_classes == 2
    assert len(ds) == 5
    names = {p.name: label for p, label in ds.samples}
    assert names == {"a.png": 0, "b.JPG": 0, "c.png": 0, "d.png": 1, "e.bmp": 1}
    for i in range(len(ds)):
        x, y, replaced = ds[i]
        assert int(replaced) == 0
        assert x.shape == (3, 16, 16) and x.dtype == torch.float32
        assert y.dtype == torch.int64 and y.dim() == 0
        assert x.min() >= -1 and x.max() <= 1
    grey = build_dataset(make_cfg(name="folder", path=str(image_folder), channels=1,
                                  resolution=8, val_fraction=0.0), "train")
    assert grey[0][0].shape == (1, 8, 8)


def test_folder_split_is_fixed_and_partitions(image_folder):
    cfg = make_cfg(name="folder", path=str(image_folder), val_fraction=0.4)
    train, val = build_dataset(cfg, "train"), build_dataset(cfg, "val")
    assert len(train) == 3 and len(val) == 2
    assert not {p for p, _ in train.samples} & {p for p, _ in val.samples}
    assert build_dataset(cfg, "val").samples == val.samples


def test_folder_without_classes(tmp_path):
    write_image(tmp_path / "x.webp", (20, 20))
    write_image(tmp_path / "y.jpeg", (30, 20))
    ds = build_dataset(make_cfg(name="folder", path=str(tmp_path), val_fraction=0.0), "train")
    assert ds.classes == [] and ds.num_classes == 0
    assert [int(ds[i][1]) for i in range(2)] == [0, 0]


def test_load_image_center_crop_exact(tmp_path):
    # 32x16 image: no resize needed (shorter side = 16); the centre 16 columns are red.
    array = np.zeros((16, 32, 3), dtype=np.uint8)
    array[:, :, 2] = 255
    array[:, 8:24] = (255, 0, 0)
    Image.fromarray(array).save(tmp_path / "wide.png")
    x = load_image(tmp_path / "wide.png", channels=3, resolution=16)
    assert x.shape == (3, 16, 16)
    assert torch.equal(x[0], torch.ones(16, 16)) and x[1:].abs().max() == 0


def test_load_image_resize_then_crop(tmp_path):
    # 40 high x 80 wide -> 8 x 16 after resize -> centre 8x8 = original columns 20..60.
    array = np.zeros((40, 80), dtype=np.uint8)
    array[:, 20:60] = 255
    Image.fromarray(array).save(tmp_path / "tall.png")
    x = load_image(tmp_path / "tall.png", channels=1, resolution=8)
    assert x.shape == (1, 8, 8)
    assert x[:, :, 1:7].min() > 0.95  # interior is white; only the border may blur
    rgb = load_image(tmp_path / "tall.png", channels=3, resolution=8)
    assert rgb.shape == (3, 8, 8) and torch.allclose(rgb[0], rgb[2])


def test_folder_hflip(tmp_path):
    array = np.zeros((8, 8), dtype=np.uint8)
    array[:, :4] = 255  # left half white: a flip is visible
    for i in range(12):
        Image.fromarray(array).save(tmp_path / f"{i:02d}.png")
    cfg = make_cfg(name="folder", path=str(tmp_path), resolution=8, hflip=True,
                   val_fraction=0.0)
    ds = build_dataset(cfg, "train")
    left_white = [bool(ds[(i, 7)][0][0, 0, 0] > 0) for i in range(len(ds))]
    assert any(left_white) and not all(left_white)
    torch.manual_seed(123)  # flips are keyed to (epoch key, index), not drawn from an RNG
    assert left_white == [bool(ds[(i, 7)][0][0, 0, 0] > 0) for i in range(len(ds))]
    assert left_white != [bool(ds[(i, 8)][0][0, 0, 0] > 0) for i in range(len(ds))]  # another epoch
    no_flip = build_dataset(make_cfg(name="folder", path=str(tmp_path), resolution=8,
                                     val_fraction=0.0), "train")
    assert all(bool(no_flip[i][0][0, 0, 0] > 0) for i in range(len(no_flip)))


def test_folder_errors(tmp_path):
    missing = tmp_path / "missing"
    with pytest.raises(DataError, match="data.path") as err:
        build_dataset(make_cfg(name="folder", path=str(missing)), "train")
    assert str(missing) in str(err.value)
    with pytest.raises(DataError, match="data.path"):
        build_dataset(make_cfg(name="folder", path=None), "train")
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "readme.txt").write_text("x")
    with pytest.raises(DataError, match="no images"):
        build_dataset(make_cfg(name="folder", path=str(tmp_path / "empty")), "train")


def test_folder_corrupt_image(tmp_path):
    """Skipped: the item is the readable image, flagged replaced; strict: one line naming it."""
    bad = tmp_path / "bad.png"
    bad.write_bytes(np.random.default_rng(0).bytes(256))
    write_image(tmp_path / "good.png", (8, 8))
    cfg = make_cfg(name="folder", path=str(tmp_path), resolution=8, val_fraction=0.0)
    ds = build_dataset(cfg, "train")  # construction is lazy: no error
    index = [p.name for p, _ in ds.samples].index("bad.png")
    x, _, replaced = ds[index]
    assert int(replaced) == 1 and torch.equal(x, ds[1 - index][0])
    cfg.strict = True
    with pytest.raises(DataError, match="cannot decode image") as err:
        build_dataset(cfg, "train")[index]
    assert str(bad) in str(err.value) and "\n" not in str(err.value)


# ----------------------------------------------------------------------------- datamodule
def test_datamodule_digits_batches():
    cfg = make_cfg(batch_size=32)
    dm = DataModule(cfg)
    dm.setup("fit")
    train_set = dm.train_set
    dm.setup("fit")  # idempotent
    assert dm.train_set is train_set
    assert dm.sample_shape == (1, 16, 16) and dm.num_classes == 10
    loader = dm.train_dataloader()
    assert len(loader) == len(train_set) // 32  # drop_last
    x, y = next(iter(loader))
    assert x.shape == (32, 1, 16, 16) and y.shape == (32,) and y.dtype == torch.int64
    val_loader = dm.val_dataloader()
    assert sum(b[0].shape[0] for b in val_loader) == len(dm.val_set)


def test_datamodule_batch_override_and_toy_shape():
    cfg = make_cfg(name="ring8", toy_samples=500, batch_size=16)
    dm = DataModule(cfg, batch_size=80)
    assert dm.sample_shape == (2,)
    batches = list(dm.train_dataloader())
    assert len(batches) == 500 // 80
    assert all(b[0].shape == (80, 2) for b in batches)
    assert dm.num_classes == 8


def test_datamodule_batch_too_large():
    dm = DataModule(make_cfg(name="grid25", toy_samples=100, batch_size=128))
    with pytest.raises(DataError, match="data.batch_size") as err:
        dm.setup("fit")
    assert "100" in str(err.value)
    with pytest.raises(DataError, match="data.batch_size"):
        DataModule(make_cfg(), batch_size=5000).train_dataloader()


def test_datamodule_accepts_plain_dataclass():
    dm = DataModule(DataConfig(resolution=8, batch_size=16))
    x, _ = next(iter(dm.train_dataloader()))
    assert x.shape == (16, 1, 8, 8)


def test_open_image_applies_exif_orientation_only_when_present(tmp_path):
    from PIL import Image

    from dgm_scale.data.transforms import open_image

    wide = Image.new("RGB", (6, 2), (200, 10, 10))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    wide.save(tmp_path / "rotated.jpg", exif=exif.tobytes())
    wide.save(tmp_path / "plain.png")
    assert open_image(tmp_path / "rotated.jpg", channels=3).size == (2, 6)  # turned upright
    assert open_image(tmp_path / "plain.png", channels=3).size == (6, 2)


def test_the_fast_png_decoder_is_active_where_pyspng_is_installed():
    """Else the parity test below compares PIL with PIL: pyspng is in the `test` extra, so CI
    has it; a package that is there but fails to import is a failure, not a slow fallback."""
    import importlib.util

    from dgm_scale.data import transforms

    if importlib.util.find_spec("pyspng") is None and not under_ci():
        pytest.skip("pyspng not installed (pip install dgm_scale[fast])")
    assert transforms.pyspng is not None, "pyspng is installed but dgm_scale.data.transforms did not import it"


@pytest.mark.parametrize("mode, channels", [("L", 1), ("RGB", 3), ("RGB", 1), ("L", 3), ("RGBA", 3), ("P", 3),
                                            ("I;16", 1), ("LA", 1)])
@pytest.mark.parametrize("size", [(16, 16), (23, 17)])
def test_fast_png_decode_equals_pils(mode, channels, size, tmp_path):
    """The libspng path (when installed) gives exactly PIL's pixels, resized or not; PNGs it
    cannot match (palette, alpha, 16 bit, conversions) fall back to PIL."""
    from dgm_scale.data import transforms

    generator = np.random.default_rng(0)
    pixels = generator.integers(0, 255, size=(size[1], size[0], 3), dtype=np.uint8)
    image = Image.fromarray(pixels).convert(mode if mode != "I;16" else "L")
    if mode == "I;16":
        image = Image.fromarray(np.asarray(image).astype(np.uint16) * 257)
    path = tmp_path / "x.png"
    image.save(path)
    direct = transforms._direct_png(path.read_bytes(), channels) is not None
    assert direct == (transforms.pyspng is not None and (mode, channels) in (("L", 1), ("RGB", 3)))
    for target in (16, 8):
        fast = transforms.decode_square(path, channels, target)
        reference = transforms.decode_square(path, channels, target, fast=False)
        assert fast.dtype == reference.dtype == np.uint8
        np.testing.assert_array_equal(fast, reference)
    damaged = path.read_bytes()[:60]
    with pytest.raises((ValueError, OSError)):
        transforms.decode_square(damaged, channels, 16)
