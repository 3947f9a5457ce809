"""The run report: charts land where their data says, report.html shows the run's files
(escaped), training writes it, `dgm-scale report` rebuilds it, and Chromium renders it."""
import csv
import json
import math
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dgm_scale.cli import main
from dgm_scale.config import load_config, to_yaml
from dgm_scale.tracking import report as report_module
from dgm_scale.metrics.probe_metric import Projection
from dgm_scale.tracking.plots import GRID, PALETTE, Series, format_tick, line_chart, nice_ticks, scatter_chart
from dgm_scale.families import get_family
from dgm_scale.tracking.report import build_report, iterations, load_run, save_projection, training_groups
from dgm_scale.training import train

HOSTILE_NAME = "<script>alert('x')</script>&run"


def colored_pixels(image: Image.Image, color) -> np.ndarray:
    """(row, column) of every pixel of exactly this colour."""
    pixels = np.asarray(image.convert("RGB")).astype(int)
    return np.argwhere(np.abs(pixels - np.array(color)).sum(axis=2) == 0)


def test_nice_ticks_and_labels_are_readable():
    ticks, step = nice_ticks(0.0, 300.0)
    assert step == 100 and list(ticks) == [0, 100, 200, 300]
    ticks, step = nice_ticks(0.13, 0.92)
    assert step == 0.2 and [format_tick(t, step) for t in ticks] == ["0", "0.2", "0.4", "0.6", "0.8", "1.0"]
    ticks, step = nice_ticks(0.0, 1.2e6)
    assert [format_tick(t, step) for t in ticks] == ["0", "500k", "1.0M", "1.5M"]
    assert format_tick(2.5e-5, 5e-6) == "2.5e-05"


def test_curve_pixels_land_on_the_axis_mapping():
    x = np.arange(0, 101, dtype=float)
    chart = line_chart([Series("rising", x, 2 * x)], "test", size=(560, 320))
    assert chart.image.size == (560, 320)
    color = chart.colors[0]
    found = colored_pixels(chart.image, color)
    # Every data point is drawn at its mapped pixel (up to the line width).
    for value in (0.0, 25.0, 50.0, 100.0):
        column, row = chart.to_pixel(value, 2 * value)
        near = np.abs(found[:, 0] - row) + np.abs(found[:, 1] - column)
        assert near.min() <= 2, value
    # The mapping itself is right: larger x is further right, larger y is higher (smaller row),
    # and the data span the plot area from its left edge to its right edge.
    left, top, right, bottom = chart.box
    curve = found[(found[:, 1] > left + 5) & (found[:, 1] < right - 5) & (found[:, 0] > top) & (found[:, 0] < bottom)]
    first, last = curve[curve[:, 1].argmin()], curve[curve[:, 1].argmax()]
    assert first[0] > last[0] + 0.8 * (bottom - top) * 0.9
    margin = 0.05 * (right - left)
    assert chart.to_pixel(0, 0)[0] < left + margin and chart.to_pixel(100, 0)[0] > right - margin
    # The horizontal grid lines sit at the tick values under the same mapping as the curve: look
    # down a column halfway between two vertical grid lines (the curve crosses it once).
    x_ticks, _ = nice_ticks(*chart.x_range)
    column = round((chart.to_pixel(x_ticks[1], 0)[0] + chart.to_pixel(x_ticks[2], 0)[0]) / 2)
    grid_rows = colored_pixels(chart.image.crop((column, top + 1, column + 1, bottom)), GRID)[:, 0] + top + 1
    tick_rows = [row for row in (chart.to_pixel(0, t)[1] for t in nice_ticks(*chart.y_range)[0]) if top < row < bottom]
    assert len(tick_rows) >= 3 and len(grid_rows) > 0
    for row in grid_rows:
        assert min(abs(row - tick) for tick in tick_rows) <= 1, row
    curve_row = chart.to_pixel(np.mean(x_ticks[1:3]), 2 * np.mean(x_ticks[1:3]))[1]
    for tick in tick_rows:
        if abs(tick - curve_row) > 4:
            assert min(abs(row - tick) for row in grid_rows) <= 1, tick


def test_charts_differ_with_data_and_survive_nan_and_flat_series():
    x = np.arange(10, dtype=float)
    one = line_chart([Series("a", x, x)], "t").image
    two = line_chart([Series("a", x, x[::-1].copy())], "t").image
    assert one.tobytes() != two.tobytes()
    with_gaps = Series("loss", x, np.where(x == 4, np.nan, x))
    assert with_gaps.nonfinite == 1
    line_chart([with_gaps, Series("flat", x, np.zeros(10))], "t")  # gaps and a constant curve draw
    with pytest.raises(ValueError, match="no finite"):
        line_chart([Series("all nan", x, np.full(10, np.nan))], "t")


def write_synthetic_run(run_dir: Path, g_loss_scale: float = 1.0) -> Path:
    """A GAN run directory as training leaves it: known losses, two evaluations, a best one."""
    cfg = load_config(None, [f"run.name={HOSTILE_NAME}", "trainer.max_steps=100"])
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(to_yaml(cfg))
    (run_dir / "hparams.yaml").write_text("params/generator: 263553\nparams/discriminator: 134465\n")
    fields = ["epoch", "step", "train/iteration", "train/d_loss", "train/g_loss", "train/d_real", "train/d_fake",
              "perf/images_per_s", "eval/fid"]
    with open(run_dir / "metrics.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        for iteration in range(10, 101, 10):
            writer.writerow({"epoch": 0, "step": iteration - 1, "train/iteration": iteration,
                             "train/d_loss": 1.0 - iteration / 200, "train/g_loss": g_loss_scale * iteration / 50,
                             "train/d_real": 0.5, "train/d_fake": "nan" if iteration == 30 else -0.5,
                             "perf/images_per_s": 1000 + iteration})
        writer.writerow({"epoch": 0, "step": 49, "eval/fid": 40.0})  # an evaluation's row: no train/iteration
    (run_dir / "eval").mkdir()
    records = [{"iteration": 50, "fid": 40.0, "kid_mean": 0.5, "eval_seconds": 3.0},
               {"iteration": 100, "fid": 12.3456, "kid_mean": 0.25, "eval_seconds": 3.5}]
    (run_dir / "eval" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + '{"torn')
    (run_dir / "checkpoints").mkdir()
    (run_dir / "checkpoints" / "best.json").write_text(json.dumps({**records[1], "metric": "fid"}))
    (run_dir / "samples").mkdir()
    Image.new("L", (66, 66), 128).save(run_dir / "samples" / "latest.png")
    Image.new("L", (66, 66), 128).save(run_dir / "samples" / "iter_0000100.png")
    return run_dir


def test_run_data_groups_columns_and_maps_iterations(tmp_path):
    run = load_run(write_synthetic_run(tmp_path / "run"))
    assert run.params == {"generator": 263553, "discriminator": 134465}
    assert len(run.evaluations) == 2  # the torn last line is skipped
    groups = {stem: series for stem, _, series in training_groups(run.rows, get_family("gan"))}
    assert [s.name for s in groups["losses"]] == ["train/d_loss", "train/g_loss"]
    assert [s.name for s in groups["critic_outputs"]] == ["train/d_real", "train/d_fake"]
    d_fake = groups["critic_outputs"][1]
    assert d_fake.nonfinite == 1 and len(d_fake.x) == 10  # logged rows only; the NaN counted
    g_loss = groups["losses"][1]
    np.testing.assert_allclose(g_loss.x, np.arange(10, 101, 10))
    np.testing.assert_allclose(g_loss.y, np.arange(10, 101, 10) / 50)


def test_report_html_shows_the_run_escaped_with_existing_images(tmp_path):
    run_dir = write_synthetic_run(tmp_path / "run")
    html = build_report(run_dir).read_text()
    assert "<script>" not in html and "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;&amp;run" in html
    assert "finished" in html and "<b>100</b> of 100" in html
    assert "12.35" in html and "40" in html and "0.25" in html  # latest/best fid, kid
    assert "best by fid (iteration 100)" in html
    assert "263,553" in html and "398,018" in html  # parameters and their total
    sources = re.findall(r'<img src="([^"]+)"', html)
    assert "samples/latest.png" in sources and "plots/losses.png" in sources and "plots/eval_fid.png" in sources
    assert "plots/projection.png" not in sources and "samples/interpolation.png" not in sources  # none made
    for source in sources:
        with Image.open(run_dir / source) as image:
            image.load()
    with Image.open(run_dir / "plots" / "losses.png") as image:
        assert image.size == (560, 320)
    assert not list(run_dir.rglob(".*.tmp"))  # atomic writes leave no temporary files


def test_the_projection_lands_on_its_points_and_the_report_shows_it_with_the_strip(tmp_path):
    run_dir = write_synthetic_run(tmp_path / "run")
    points, labels = np.array([[0.0, 0.0], [1.0, 2.0], [2.0, 1.0], [0.5, 1.5]]), np.array([3, 7, 7, 3])
    save_projection(run_dir, Projection(points.astype(np.float32), labels, "mu"), 100)
    Image.new("L", (82, 12), 200).save(run_dir / "samples" / "interpolation.png")
    html = build_report(run_dir).read_text()
    sources = re.findall(r'<img src="([^"]+)"', html)
    assert "plots/projection.png" in sources and "samples/interpolation.png" in sources
    assert "PCA of the model&#x27;s mu: 4 held-out images by class (iteration 100)" in html
    chart = scatter_chart(points, labels, "t")
    assert chart.colors == [PALETTE[0], PALETTE[1]]  # classes 3 and 7, in order
    for (x, y), label in zip(points, labels):
        column, row = chart.to_pixel(x, y)
        assert chart.image.getpixel((round(column), round(row))) == PALETTE[[3, 7].index(label)]


def test_loss_plot_follows_the_data(tmp_path):
    first = write_synthetic_run(tmp_path / "a")
    second = write_synthetic_run(tmp_path / "b", g_loss_scale=-1.0)
    build_report(first), build_report(second)
    assert (first / "plots" / "losses.png").read_bytes() != (second / "plots" / "losses.png").read_bytes()
    assert (first / "plots" / "eval_fid.png").read_bytes() == (second / "plots" / "eval_fid.png").read_bytes()


def test_report_command_on_a_run_and_on_another_directory(tmp_path, capsys):
    run_dir = write_synthetic_run(tmp_path / "run")
    assert main(["report", str(run_dir)]) == 0
    assert str(run_dir / "report.html") in capsys.readouterr().out
    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not a run directory" in err


TOY = ["trainer.progress_bar=false", "data.toy_samples=2000", "data.batch_size=32", "model.generator.width=16",
       "model.discriminator.width=16", "model.generator.depth=1", "model.discriminator.depth=1",
       "trainer.max_steps=4", "trainer.log_every=1", "run.sample_every=2", "run.checkpoint_every=2",
       "run.num_samples=200", "eval.every=2", "eval.num_samples=200"]


def test_training_refreshes_the_report_at_evaluations_and_the_end(tmp_path, monkeypatch):
    calls = []

    def recording_build(run_dir, unsaved_rows=(), status=None):
        unsaved_rows = list(unsaved_rows)
        calls.append((status, len(unsaved_rows)))
        return build_report(run_dir, unsaved_rows, status)

    monkeypatch.setattr(report_module, "build_report", recording_build)
    # evaluations at 3 (periodic) and 4 (eval.at_end: logged after the last batch)
    cfg = load_config("configs/ring8.yaml", TOY + [f"run.dir={tmp_path / 'run'}", "eval.every=3",
                                                   f"eval.cache_dir={tmp_path / 'cache'}"])
    train(cfg)
    assert [status for status, _ in calls] == ["running (iteration 3)", "finished"]
    assert calls[0][1] > 0  # metrics.csv is not written yet at iteration 3: the logger's rows are used
    run_dir = tmp_path / "run"
    html = (run_dir / "report.html").read_text()
    assert "<b>4</b> of 4" in html and "finished" in html
    run = load_run(run_dir)
    fid_rows = [i for i, row in zip(iterations(run.rows), run.rows) if "eval/fid" in row]
    assert fid_rows == [3, 4]  # each evaluation's metrics.csv row maps to its own iteration
    for name in ("losses", "critic_outputs", "grad_norms", "eval_fid"):
        assert (run_dir / "plots" / f"{name}.png").is_file(), name
    for source in re.findall(r'<img src="([^"]+)"', html):
        assert (run_dir / source).is_file(), source


def test_report_off_writes_nothing(tmp_path):
    cfg = load_config("configs/ring8.yaml", TOY + [f"run.dir={tmp_path / 'run'}", "tracking.report=false",
                                                   "eval.every=0", "eval.at_end=false"])
    train(cfg)
    assert not (tmp_path / "run" / "report.html").exists() and not (tmp_path / "run" / "plots").exists()


def test_report_renders_in_headless_chromium(tmp_path, chromium):
    run_dir = write_synthetic_run(tmp_path / "run")
    html = build_report(run_dir)
    shot = tmp_path / "shot.png"
    subprocess.run([chromium, "--headless", "--disable-gpu", "--no-sandbox", "--hide-scrollbars",
                    f"--screenshot={shot}", "--window-size=1200,1600", html.resolve().as_uri()],
                   check=True, capture_output=True, timeout=120)
    with Image.open(shot) as image:
        assert image.size == (1200, 1600)
        pixels = np.asarray(image.convert("RGB")).astype(int)
    # Not blank: text, tables and curves give many colours and a varied page, top to bottom.
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 100
    rows_with_ink = (np.abs(pixels - pixels[0, 0]).sum(axis=2) > 60).any(axis=1)
    assert rows_with_ink[:400].mean() > 0.2 and rows_with_ink[800:].mean() > 0.2
    tab_blue = (np.abs(pixels - np.array([31, 119, 180])).sum(axis=2) < 30).sum()
    assert tab_blue > 200  # the first series' colour: the chart images were loaded
    assert not math.isnan(pixels.mean())
