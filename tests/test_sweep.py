"""Sweep files: points from a grid and a list, their run directories, checks naming the point."""
import pytest

from dgm_scale.cli import main
from dgm_scale.config import ConfigError
from dgm_scale.sweep import check_points, point_args, read_sweep


def write(tmp_path, text: str):
    path = tmp_path / "sweep.yaml"
    path.write_text(text)
    return path


def test_grid_and_points_make_one_run_directory_each(tmp_path):
    sweep = read_sweep(write(tmp_path, "name: s\noverrides: [trainer.max_steps=5]\n"
                                       "grid: {optim.g.lr: [0.1, 0.2], loss.name: [hinge, lsgan]}\n"
                                       "points: [{model.latent_dim: 8}]\n"))
    assert [p for p in sweep.points] == [{"optim.g.lr": 0.1, "loss.name": "hinge"}, {"optim.g.lr": 0.1, "loss.name": "lsgan"},
                                        {"optim.g.lr": 0.2, "loss.name": "hinge"}, {"optim.g.lr": 0.2, "loss.name": "lsgan"},
                                        {"model.latent_dim": 8}]
    assert str(sweep.run_dir(4, "runs")) == "runs/s/004-latent_dim=8"
    assert point_args(sweep, 1, "runs") == ["trainer.max_steps=5", "optim.g.lr=0.1", "loss.name=lsgan",
                                            "run.dir=runs/s/001-lr=0.1,name=lsgan", "resume=auto"]
    check_points(sweep)  # every point loads
    with pytest.raises(ConfigError, match="--point 5: the sweep has points 0..4"):
        point_args(sweep, 5, "runs")


@pytest.mark.parametrize("text, message", [
    ("grid: {optim.g.lr: [0.1]}\nbogus: 1\n", "unknown key"),
    ("name: x\n", "no points"),
    ("grid: {optim.g.lr: 0.1}\n", "non-empty lists"),
])
def test_malformed_sweep_files_are_named(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message):
        read_sweep(write(tmp_path, text))


def test_a_bad_point_is_named_before_anything_is_submitted(tmp_path, capsys):
    path = write(tmp_path, "grid: {loss.name: [hinge, hinj]}\n")
    assert main(["sweep", str(path), "--submit"]) == 2
    error = capsys.readouterr().err
    assert "point 1 {'loss.name': 'hinj'}" in error and "loss.name" in error and error.count("\n") == 1
