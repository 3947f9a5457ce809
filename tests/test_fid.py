"""`dgm-scale fid A B`: any two data sources, evaluate's pipeline; equal to evaluate on the same samples."""
import json

import numpy as np
import pytest
import torch

from dgm_scale.cli import main
from dgm_scale.config import load_config
from dgm_scale.data.datasets import _digits_tensors
from dgm_scale.data.transforms import to_8bit
from dgm_scale.training import train
from helpers import TINY


def write_npz(path, images: torch.Tensor):
    np.savez(path, x=to_8bit(images).to(torch.uint8).permute(0, 2, 3, 1).numpy())
    return str(path)


def fid_json(capsys, *args) -> dict:
    capsys.readouterr()
    assert main(["fid", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_halves_of_the_digits_are_close_and_rings_are_far(tmp_path, capsys):
    digits = _digits_tensors(16, 1)[0][torch.randperm(1797, generator=torch.Generator().manual_seed(0))]
    first, second = write_npz(tmp_path / "a.npz", digits[:800]), write_npz(tmp_path / "b.npz", digits[800:1600])
    grid = torch.stack(torch.meshgrid(torch.arange(16.0), torch.arange(16.0), indexing="ij")) - 7.5
    radius = grid.norm(dim=0)
    rings = torch.stack([((radius - r).abs() < 1).float() * 2 - 1 for r in torch.rand(800) * 6 + 1]).unsqueeze(1)
    noise = write_npz(tmp_path / "rings.npz", rings)
    close = fid_json(capsys, first, second, "--extractor", "digits")  # (auto: inception, a download)
    far = fid_json(capsys, first, noise, "--extractor", "digits")
    assert close["fid"] < 5 < 100 < far["fid"], (close["fid"], far["fid"])
    assert close["precision"] > 0.8 and far["precision"] < 0.2
    assert main(["fid", first, str(tmp_path / "missing"), "--extractor", "digits"]) == 2
    assert "missing" in capsys.readouterr().err


def test_fid_of_a_sample_dump_equals_evaluate_on_the_same_samples(tmp_path, capsys):
    cfg = load_config(overrides=TINY + ["data.resolution=16", "trainer.max_steps=6", f"run.dir={tmp_path / 'run'}"])
    checkpoint = str(train(cfg).checkpoint)
    assert main(["sample", checkpoint, "--num", "200", "--seed", "0", "--out-dir", str(tmp_path / "dump"),
                 "--format", "npz"]) == 0
    scored = fid_json(capsys, "builtin:digits", str(tmp_path / "dump" / "samples.npz"), "--num-a", "400",
                      "--metrics", "fid,kid,pr")
    assert main(["evaluate", checkpoint, "--num-samples", "200", "--num-real", "400", "--seed", "0",
                 "--metrics", "fid,kid,pr", "--out", str(tmp_path / "eval.json")]) == 0
    evaluated = json.loads((tmp_path / "eval.json").read_text())["results"]
    for name in ("fid", "kid_mean", "precision", "recall"):
        assert scored[name] == pytest.approx(evaluated[name], rel=1e-6, abs=1e-9), name
