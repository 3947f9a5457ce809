"""Sample dumps: one file per sample or one .npz, the same from 2 processes as from 1, byte for byte."""
import numpy as np
import pytest
from PIL import Image

from dgm_scale.cli import main
from dgm_scale.config import load_config
from dgm_scale.modules import load_module
from dgm_scale.training import train
from helpers import TINY, TINY_RUN, torchrun


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("dump") / "run"
    return train(load_config(overrides=TINY + ["model.num_classes=10", f"run.dir={run_dir}"])).checkpoint


def read_dir(folder):
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


def test_two_processes_write_the_same_files_as_one(checkpoint, tmp_path):
    for fmt in ("png", "npz"):
        assert main(["sample", str(checkpoint), "--num", "23", "--seed", "4", "--batch-size", "5",
                     "--out-dir", str(tmp_path / f"one-{fmt}"), "--format", fmt]) == 0
        proc = torchrun(["-m", "dgm_scale.cli", "sample", str(checkpoint), "--num-samples", "23", "--seed", "4",
                         "--batch-size", "5", "--out-dir", str(tmp_path / f"two-{fmt}"), "--format", fmt])
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert read_dir(tmp_path / f"one-{fmt}") == read_dir(tmp_path / f"two-{fmt}")
    files = read_dir(tmp_path / "one-png")
    assert list(files) == [f"{i:06d}.png" for i in range(23)]
    archive = np.load(tmp_path / "one-npz" / "samples.npz")
    assert archive["samples"].shape == (23, 8, 8, 1) and archive["samples"].dtype == np.uint8
    assert archive["labels"].tolist() == [i % 10 for i in range(23)]
    # the same pixels as the grid command's samples of this seed
    expected = ((load_module(checkpoint).sample(23, seed=4) + 1) * 127.5).round().clamp(0, 255).byte()
    assert np.array_equal(archive["samples"][..., 0], expected[:, 0].numpy())
    assert np.array_equal(np.asarray(Image.open(tmp_path / "one-png" / "000007.png")), archive["samples"][7, ..., 0])


def test_a_class_and_text_samples(checkpoint, tmp_path):
    assert main(["sample", str(checkpoint), "--num", "4", "--class", "3", "--out-dir", str(tmp_path / "c"),
                 "--format", "npz"]) == 0
    assert np.load(tmp_path / "c" / "samples.npz")["labels"].tolist() == [3, 3, 3, 3]
    text = train(load_config(overrides=["model.kind=autoregressive", "data.name=text", "data.path=builtin:pydoc",
                                        "data.seq_len=16", "model.width=8", "model.layers=1", *TINY_RUN,
                                        f"run.dir={tmp_path / 'text'}"]))
    assert main(["sample", str(text.checkpoint), "--num", "3", "--length", "10", "--prompt", "ab",
                 "--out-dir", str(tmp_path / "t")]) == 0
    assert [p.read_bytes()[:2] for p in sorted((tmp_path / "t").iterdir())] == [b"ab"] * 3
    assert main(["sample", str(checkpoint), "--num", "2", "--out-dir", str(tmp_path / "x"), "--batch-size", "0"]) == 2
