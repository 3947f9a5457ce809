"""The docs' pictures (docs/img/*.png): present, valid, small, and made by the project's own code
through docs/make_pictures.py. The cheap legs run the script's functions on a tiny run (the
samples grid is the model's own samples, the projection the report's chart, the two screenshots
real pages); `-m slow` regenerates all four as the script does."""
import importlib.util
import urllib.error
import urllib.request

import numpy as np
import pytest
from helpers import ROOT, grey_8bit, grid_cells
from PIL import Image

from dgm_scale.modules import load_module
from dgm_scale.tracking.report import projection_image, read_projection

spec = importlib.util.spec_from_file_location("make_pictures", ROOT / "docs" / "make_pictures.py")
make_pictures = importlib.util.module_from_spec(spec)
spec.loader.exec_module(make_pictures)

IMG = ROOT / "docs" / "img"
LIMIT = 150 * 1024  # bytes a picture may take
#: the script's run made tiny (8 px digits, narrow nets), with the probe metric for the projection
TINY_PICTURES = ["data.resolution=8", "data.batch_size=8", "model.generator.width=4", "model.discriminator.width=4",
                 "model.latent_dim=8", "trainer.log_every=1", "eval.metrics=[probe]", "eval.options.probe_samples=300"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """(run directory, checkpoint) of the script's run, 2 iterations of TINY_PICTURES."""
    run_dir = tmp_path_factory.mktemp("pictures") / "run"
    return run_dir, make_pictures.train_run(run_dir, steps=2, extra=tuple(TINY_PICTURES))


def opened(path) -> Image.Image:
    """The picture at `path`, checked to be a whole PNG naming its maker."""
    with Image.open(path) as image:
        image.verify()
    image = Image.open(path)
    assert image.format == "PNG" and image.info.get("Software") == make_pictures.SOFTWARE, path
    return image


def ink_rows(image: Image.Image) -> np.ndarray:
    """Per row of a screenshot: whether anything differs from the page's background."""
    pixels = np.asarray(image.convert("RGB")).astype(int)
    return (np.abs(pixels - pixels[0, 0]).sum(axis=2) > 60).any(axis=1)


def test_the_committed_pictures_are_the_scripts_small_and_whole():
    assert sorted(path.name for path in IMG.glob("*.png")) == sorted(make_pictures.PICTURES)
    sizes = {}
    for name in make_pictures.PICTURES:
        assert 1024 < (IMG / name).stat().st_size <= LIMIT, name
        with opened(IMG / name) as image:
            sizes[name] = image.size
    width, height = sizes["samples.png"]
    assert width == height and width % (8 * 18 + 2) == 0  # 64 digits of 16 px, 8 a row, 2 px padding, enlarged
    assert sizes["report.png"] == make_pictures.REPORT_WINDOW and sizes["serve.png"] == make_pictures.SERVE_WINDOW
    assert sizes["projection.png"] == (560, 460)  # the report's scatter chart


def test_samples_picture_is_the_models_own_grid(run, tmp_path):
    out = make_pictures.samples_picture(run[1], tmp_path / "samples.png")
    with opened(out) as image:
        grid = np.asarray(image.convert("L"))
    native = 8 * (8 + 2) + 2  # 64 samples of 8 px, 8 a row, 2 px padding
    assert grid.shape[0] == grid.shape[1] and grid.shape[0] % native == 0
    scale = grid.shape[0] // native
    small = grid[::scale, ::scale]
    np.testing.assert_array_equal(grid, np.kron(small, np.ones((scale, scale), np.uint8)))  # enlarged, not smoothed
    np.testing.assert_array_equal(grid_cells(small, 64, 8), grey_8bit(load_module(run[1]).sample_batch(64, seed=0)))


def test_projection_picture_is_the_reports_chart(run, tmp_path):
    out = make_pictures.projection_picture(run[0], tmp_path / "projection.png")
    with opened(out) as image:
        drawn = np.asarray(image.convert("RGB"))
    redrawn = np.asarray(projection_image(read_projection(run[0])).convert("RGB"))  # from eval/projection.npz
    np.testing.assert_array_equal(drawn, redrawn)
    with pytest.raises(make_pictures.PictureError, match="no projection"):
        make_pictures.projection_picture(tmp_path, tmp_path / "none.png")


def test_report_picture_shows_the_runs_report(run, chromium, tmp_path):
    # the run's last evaluation is logged at its last iteration (see run_overrides)
    assert "iteration <b>2</b> of 2 (100%)" in (run[0] / "report.html").read_text()
    out = make_pictures.report_picture(chromium, run[0], tmp_path / "report.png")
    with opened(out) as image:
        assert image.size == make_pictures.REPORT_WINDOW and image.mode == "P"
        assert 20 < len(image.getcolors()) <= make_pictures.PALETTE
        rows = ink_rows(image)
    height = len(rows)
    assert rows[:height // 2].mean() > 0.2 and rows[height // 2:].mean() > 0.2  # a page, top to bottom


def test_serve_picture_shows_the_page_and_stops_the_server(run, chromium, tmp_path, monkeypatch):
    urls = []
    shoot = make_pictures.screenshot

    def recording(chromium, url, *args):
        urls.append(url)
        return shoot(chromium, url, *args)

    monkeypatch.setattr(make_pictures, "screenshot", recording)
    out = make_pictures.serve_picture(chromium, run[1], tmp_path / "serve.png")
    assert urls and urls[0].startswith("http://127.0.0.1:")
    with pytest.raises(urllib.error.URLError):  # the server is stopped
        urllib.request.urlopen(urls[0] + "api/meta", timeout=10)
    with opened(out) as image:
        assert image.size == make_pictures.SERVE_WINDOW
        page = np.asarray(image.convert("L")).astype(int)
    # the grid: 16 samples of 8 px, 4 a row, 2 px padding (42 px) shown 12 times enlarged (504 px):
    # its padding lines, 10 px (120 shown) apart, are dark across it; many grey levels inside
    dark = page < 16
    top = np.nonzero(dark.sum(axis=1) >= 500)[0].min()
    left = np.nonzero(dark[top])[0].min()
    grid = dark[top:top + 504, left:left + 504]
    lines = [12 + 120 * k for k in range(5)]  # the middle of each 24 px padding band
    assert grid.shape == (504, 504) and grid[lines].all() and grid[:, lines].all()
    assert len(np.unique(page[top:top + 504, left:left + 504])) > 20


def test_without_chromium_the_script_stops_in_one_line_before_training(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PATH", str(tmp_path))  # no chromium on it
    monkeypatch.setattr(make_pictures, "train_run", lambda *args: pytest.fail("trained without Chromium"))
    assert make_pictures.main(["--out", str(tmp_path / "img")]) == 1
    error = capsys.readouterr().err
    assert error.startswith("make_pictures: no Chromium on PATH") and error.count("\n") == 1
    assert not (tmp_path / "img").exists()


@pytest.mark.slow
def test_the_script_regenerates_every_picture(chromium, tmp_path):
    written = make_pictures.make_pictures(tmp_path / "img", keep_run=tmp_path / "run")
    assert sorted(written) == sorted(make_pictures.PICTURES)
    steps = make_pictures.STEPS
    assert f"iteration <b>{steps}</b> of {steps} (100%)" in (tmp_path / "run" / "report.html").read_text()
    for name, path in written.items():
        assert path == tmp_path / "img" / name and path.stat().st_size <= LIMIT, name
        with opened(path) as image, Image.open(IMG / name) as committed:
            assert image.size == committed.size, name
