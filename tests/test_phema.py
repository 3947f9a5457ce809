"""Post-hoc EMA (EDM2's power-function EMA, modules/phema.py; the diffusion family's snapshots and
`dgm-scale ema`, families/diffusion/posthoc.py): the math against numerical integration of the
profiles' definition, reconstructions on known parameter trajectories, the command end to end,
its one-line errors, and resume (kill -9: test_kill_resume.py)."""
import json
import math

import numpy as np
import pytest
import torch

from dgm_scale.cli import main
from dgm_scale.config import ConfigError, load_config
from dgm_scale.families.diffusion.posthoc import reconstruct, snapshot_iterations, write_snapshot
from dgm_scale.modules import load_module
from dgm_scale.modules.phema import (PowerFunctionEMA, exponent_of, profile_error, profile_inner_products,
                                     sigma_rel_of, solve_weights)
from dgm_scale.training import train
from helpers import ROOT, TINY_RUN, assert_same_phema, one_line, stop_and_resume

WIDTHS = [0.01, 0.05, 0.08, 0.10, 0.2, 0.28]


def profile_density(u: np.ndarray, exponent: float) -> np.ndarray:
    """The definition: the power-function profile's density over tau / t in [0, 1]."""
    return (exponent + 1) * u ** exponent


def test_the_exponent_of_a_width_gives_a_profile_of_that_relative_std():
    """sigma_rel is the standard deviation of tau / t under the profile: integrated numerically
    (midpoint rule, 2M points); and EDM2's two widths have the exponents its paper states."""
    u = (np.arange(2_000_000) + 0.5) / 2_000_000
    for width in WIDTHS:
        density = profile_density(u, exponent_of(width))
        mass = density.mean()
        mean = (u * density).mean() / mass
        std = math.sqrt(((u - mean) ** 2 * density).mean() / mass)
        assert mass == pytest.approx(1, rel=1e-6)
        assert std == pytest.approx(width, rel=1e-5), width
        assert sigma_rel_of(exponent_of(width)) == pytest.approx(width, rel=1e-12)
    assert exponent_of(0.05) == pytest.approx(16.97, abs=0.01)  # Karras et al. 2024, sec. 3.1
    assert exponent_of(0.10) == pytest.approx(6.94, abs=0.01)


def trajectory(steps: int, shape=(3, 4), seed: int = 0) -> list[torch.Tensor]:
    """A known parameter trajectory: a drift, a slow oscillation and per-step noise."""
    generator = torch.Generator().manual_seed(seed)
    base, direction = torch.randn(shape, generator=generator), torch.randn(shape, generator=generator)
    return [base + direction * math.sin(k / steps * 5) + 0.3 * k / steps + 0.2 * torch.randn(shape, generator=generator)
            for k in range(1, steps + 1)]


def tracked(thetas: list[torch.Tensor], widths: list[float], every: int = 0) -> tuple[PowerFunctionEMA, dict]:
    """Track `widths` over the trajectory; snapshots {iteration: profiles} every `every` iterations."""
    ema, snapshots = PowerFunctionEMA(widths), {}
    for k, theta in enumerate(thetas, start=1):
        ema.update([theta], k)
        if every and k % every == 0:
            snapshots[k] = ema.profiles(["theta"])
    return ema, snapshots


def test_the_tracked_average_is_the_profile_integrated_over_the_trajectory():
    """Iteration k's weights hold on (k - 1, k]: the EMA after T updates must be the sum of
    theta_k times the profile's mass on that interval, integrated numerically."""
    steps = 40
    thetas = trajectory(steps)
    ema, _ = tracked(thetas, WIDTHS[:4])
    fine = 4000
    for width, average in zip(WIDTHS[:4], ema.averages):
        masses = [profile_density((k - 1 + (np.arange(fine) + 0.5) / fine) / steps, exponent_of(width)).mean() / steps
                  for k in range(1, steps + 1)]
        expected = sum(mass * theta.double() for mass, theta in zip(masses, thetas))
        torch.testing.assert_close(average[0].double(), expected, rtol=0, atol=2e-5)


def test_profile_inner_products_match_numerical_integration():
    grid = (np.arange(400_000) + 0.5) / 400_000 * 100  # tau in [0, 100]

    def profile(t, width):
        g = exponent_of(width)
        return np.where(grid <= t, (g + 1) * np.minimum(grid / t, 1) ** g / t, 0.0)
    for (t_a, s_a), (t_b, s_b) in [((30, 0.05), (100, 0.1)), ((100, 0.05), (30, 0.1)), ((70, 0.2), (70, 0.01)),
                                   ((10, 0.1), (90, 0.1))]:
        numeric = (profile(t_a, s_a) * profile(t_b, s_b)).mean() * 100
        closed = profile_inner_products(t_a, exponent_of(s_a), t_b, exponent_of(s_b))
        assert closed == pytest.approx(numeric, rel=1e-4)


def test_reconstructing_a_tracked_profile_gives_it_back():
    """The target is itself one of the snapshot profiles: weight 1 on it, the tracked average."""
    thetas = trajectory(120)
    ema, snapshots = tracked(thetas, [0.05, 0.10], every=20)
    inputs = [(t, s) for t in snapshots for s in (0.05, 0.10)]
    weights = solve_weights([t for t, _ in inputs], [exponent_of(s) for _, s in inputs], 120, exponent_of(0.05))
    expected = np.zeros(len(inputs))
    expected[inputs.index((120, 0.05))] = 1.0
    np.testing.assert_allclose(weights, expected, atol=1e-6)
    rebuilt = sum(w * snapshots[t][[0.05, 0.10].index(s)]["theta"].double() for w, (t, s) in zip(weights, inputs))
    torch.testing.assert_close(rebuilt.float(), ema.averages[0][0], rtol=0, atol=1e-5)


def test_an_intermediate_width_is_rebuilt_from_two_tracked_ones():
    """sigma_rel 0.08 from snapshots of 0.05 and 0.10 every 25 of 400 iterations, on a known
    trajectory, against the 0.08 EMA tracked directly. Tolerance: 2% of the distance between the
    two tracked averages (measured: 0.09%), and below the Cauchy-Schwarz bound
    |<p_rec - p_0.08, theta>| <= ||p_rec - p_0.08|| ||theta|| with both norms integrated numerically."""
    steps, every = 400, 25
    thetas = trajectory(steps, seed=1)
    ema, snapshots = tracked(thetas, [0.05, 0.10], every=every)
    direct, _ = tracked(thetas, [0.08])
    inputs = [(t, s) for t in snapshots for s in (0.05, 0.10)]
    weights = solve_weights([t for t, _ in inputs], [exponent_of(s) for _, s in inputs], steps, exponent_of(0.08))
    rebuilt = sum(w * snapshots[t][[0.05, 0.10].index(s)]["theta"].double() for w, (t, s) in zip(weights, inputs))
    error = (rebuilt - direct.averages[0][0].double()).abs().max().item()
    spread = (ema.averages[0][0] - ema.averages[1][0]).abs().max().item()
    assert error < 0.02 * spread, (error, spread)
    tau = (np.arange(steps * 50) + 0.5) / 50  # iteration k holds theta_k on (k - 1, k]

    def profile(t, width):
        g = exponent_of(width)
        return np.where(tau <= t, (g + 1) * np.minimum(tau / t, 1) ** g / t, 0.0)
    residual = sum(w * profile(t, s) for w, (t, s) in zip(weights, inputs)) - profile(steps, 0.08)
    residual_norm = math.sqrt((residual ** 2).mean() * steps)
    wanted_norm = math.sqrt((profile(steps, 0.08) ** 2).mean() * steps)
    closed = profile_error([t for t, _ in inputs], [exponent_of(s) for _, s in inputs], weights, steps, exponent_of(0.08))
    assert closed == pytest.approx(residual_norm / wanted_norm, rel=0.02) and 0 < closed < 0.05
    values = torch.stack([theta.double() for theta in thetas]).flatten(1).numpy()  # [steps, coordinates]
    theta_norms = np.sqrt((values ** 2).sum(0))  # per coordinate: each value holds for one unit of tau
    bound = residual_norm * theta_norms
    assert (np.abs(rebuilt - direct.averages[0][0].double()).flatten().numpy() <= bound + 1e-6).all()


TINY_PHEMA = [*TINY_RUN, "model.kind=diffusion", "loss.objective=edm", "model.denoiser.width=8",
              "model.denoiser.channel_mult=[1,2]", "model.denoiser.blocks=1", "sampler.steps=3",
              "model.phema.snapshot_every=2", "model.ema_decay=0.9", "run.checkpoint_every=2",
              "likelihood.method=none"]  # `evaluate`'s held-out ODE bits/dim: not what these tests check


@pytest.fixture(scope="module")
def phema_run(tmp_path_factory):
    """A tiny diffusion run of 5 iterations with snapshots at 2, 4 and 5 (the last)."""
    run_dir = tmp_path_factory.mktemp("phema") / "run"
    train(load_config(overrides=[*TINY_PHEMA, "trainer.max_steps=5", f"run.dir={run_dir}"]))
    return run_dir


def test_the_command_writes_a_checkpoint_that_samples(phema_run, tmp_path, capsys):
    assert snapshot_iterations(phema_run) == [2, 4, 5]
    out = tmp_path / "ema.ckpt"
    assert main(["ema", str(phema_run), "--sigma-rel", "0.08", "--at", "4", "--out", str(out)]) == 0
    module = load_module(out)
    assert module.checkpoint_iteration == 4
    expected = reconstruct(phema_run, 0.08, at=4).parameters
    for name, value in module.denoiser_ema.named_parameters():
        torch.testing.assert_close(value, expected[name].float(), rtol=0, atol=0)
    run = load_module(phema_run / "checkpoints" / "iter_0000004.ckpt")  # the rest: the run's iteration-4 model
    for (name, value), (_, raw) in zip(module.denoiser.named_parameters(), run.denoiser.named_parameters()):
        assert torch.equal(value, raw), name
    assert any(not torch.equal(a, b) for a, b in zip(module.denoiser_ema.parameters(), run.denoiser_ema.parameters()))
    png = tmp_path / "samples.png"
    assert main(["sample", str(out), "--num", "4", "--out", str(png)]) == 0
    assert png.stat().st_size > 0
    assert main(["ema", str(phema_run), "--sigma-rel", "0.12"]) == 0  # default --out: RUN/posthoc/, newest snapshot
    assert (phema_run / "posthoc" / "ema-0.120-0000005.ckpt").is_file()


@pytest.mark.parametrize("args, culprit", [
    (["--sigma-rel", "0.5"], "--sigma-rel 0.5"),
    (["--sigma-rel", "0"], "--sigma-rel 0.0"),
    (["--sigma-rel", "0.1", "--at", "3"], "--at 3"),
    (["--sigma-rel", "0.1", "--out", "{tmp}"], "--out '{tmp}' is a directory"),
    (["--sigma-rel", "0.1", "--out", "{tmp}/file.txt/x.ckpt"], "is a file, not a folder"),
    (["--sigma-rel", "0.1", "--out", "{run}/checkpoints/last.ckpt"], "--out '{run}/checkpoints/last.ckpt'"),
])
def test_bad_arguments_stop_with_one_line_naming_them(phema_run, tmp_path, capsys, args, culprit):
    (tmp_path / "file.txt").write_text("x")
    before = (phema_run / "checkpoints" / "last.ckpt").read_bytes()
    args = [arg.format(tmp=tmp_path, run=phema_run) for arg in args]
    assert main(["ema", str(phema_run), *args]) == 2
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and culprit.format(tmp=tmp_path, run=phema_run) in error
    assert (phema_run / "checkpoints" / "last.ckpt").read_bytes() == before


@pytest.mark.parametrize("damaged", ["phema/phema_0000004.pt", "checkpoints/last.ckpt"])
def test_a_damaged_snapshot_or_checkpoint_is_named(phema_run, tmp_path, capsys, damaged):
    import shutil

    run = shutil.copytree(phema_run, tmp_path / "run")
    (run / damaged).write_bytes((run / damaged).read_bytes()[:200])
    assert main(["ema", str(run), "--sigma-rel", "0.1", "--out", str(tmp_path / "x.ckpt")]) == 2
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and f"'{run / damaged}' does not load" in error
    assert not (tmp_path / "x.ckpt").exists()


def test_a_run_without_snapshots_and_bad_config_values_are_named(tmp_path, capsys):
    assert main(["ema", str(tmp_path), "--sigma-rel", "0.1"]) == 2
    assert "not a run directory" in capsys.readouterr().err
    (tmp_path / "config.yaml").write_text("{}")
    assert main(["ema", str(tmp_path), "--sigma-rel", "0.1"]) == 2
    assert "no post-hoc EMA snapshots" in capsys.readouterr().err
    for override, key in [("model.phema.sigma_rels=[0.05,0.3]", "model.phema.sigma_rels"),
                          ("model.phema.sigma_rels=[0.1,0.1]", "model.phema.sigma_rels"),
                          ("model.phema.snapshot_every=-1", "model.phema.snapshot_every")]:
        with pytest.raises(ConfigError) as error:
            load_config(overrides=[*TINY_PHEMA, override])
        assert f"'{key}'" in one_line(error.value)


def test_a_resumed_run_tracks_and_snapshots_what_the_straight_one_did(tmp_path):
    """3 + 3 iterations with a resume equal 6 straight: the averages in last.ckpt and every
    snapshot file, bit for bit (kill -9 at random: test_kill_resume.py)."""
    def run_train(overrides):
        train(load_config(overrides=[*TINY_PHEMA, *overrides]))
    full, part = stop_and_resume(run_train, tmp_path, [])
    assert snapshot_iterations(full) == [2, 4, 6]
    assert snapshot_iterations(part) == [2, 3, 4, 6]  # 3: the first part's last iteration
    assert_same_phema(full, part, [2, 4, 6])


def test_the_report_draws_fid_against_the_width(phema_run):
    from dgm_scale.tracking.report import build_report

    table = {"iteration": 5, "num_samples": 64, "fixed_ema": 30.0, "fixed_label": "decay 0.9",
             "rows": [{"sigma_rel": 0.05, "fid": 40.0}, {"sigma_rel": 0.1, "fid": 20.0}]}
    (phema_run / "phema" / "fid.json").write_text(json.dumps(table))
    build_report(phema_run)
    assert (phema_run / "plots" / "phema_fid.png").is_file()
    assert "plots/phema_fid.png" in (phema_run / "report.html").read_text()
    (phema_run / "phema" / "fid.json").write_text('{"rows": [{"sigma": 1}]}')  # damaged: the rest is drawn
    (phema_run / "plots" / "phema_fid.png").unlink()
    build_report(phema_run)
    assert not (phema_run / "plots" / "phema_fid.png").exists()
    assert (phema_run / "plots" / "loss_by_noise.png").is_file()


def test_the_fid_table_script_runs_and_feeds_the_report(phema_run, capsys):
    """benchmarks/phema_fid.py at a tiny scale (32 samples, raw-pixel features): a table row per
    width, the fixed EMA's FID equal to `evaluate` of the run's checkpoint with the same samples."""
    import importlib.util

    from dgm_scale.score import evaluate

    spec = importlib.util.spec_from_file_location("phema_fid", ROOT / "benchmarks" / "phema_fid.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.main([str(phema_run), "--sigma-rels", "0.05,0.15", "--num-samples", "32", "--seeds", "3",
                        "--extractor", "identity"]) == 0
    table = json.loads((phema_run / "phema" / "fid.json").read_text())
    assert [row["sigma_rel"] for row in table["rows"]] == [0.05, 0.15] and table["iteration"] == 5
    reference = evaluate(phema_run / "checkpoints" / "last.ckpt", out=phema_run / "ref.eval.json", num_samples=32,
                         seed=3, extractor="identity", metrics="fid", device="cpu")
    assert table["fixed_ema"] == pytest.approx(reference["fid"], rel=1e-9)
    assert table["raw"] == pytest.approx(reference["raw/fid"], rel=1e-9)
    assert "| post-hoc sigma_rel 0.150 |" in capsys.readouterr().out
