"""The pictures of the docs (docs/img/*.png), made by the project's own code.

Regenerate them from the repository root (CPU only; Chromium on PATH, e.g. Debian's
`apt-get install chromium`):

    python docs/make_pictures.py                 # rewrites docs/img/{samples,report,serve,projection}.png
    python docs/make_pictures.py --out DIR       # writes them into DIR instead
    python docs/make_pictures.py --keep-run RUN  # also keeps the run directory they came from

It trains the default job (`dgm-scale train`: a DCGAN with the non-saturating loss on the built-in
digits) for a few hundred iterations on the CPU, seeded, evaluating it at the end with FID, KID and
the `probe` metric, then writes:

- samples.png: the grid `dgm-scale sample CHECKPOINT --num 64 --seed 0` writes;
- report.png: the run's own report.html in headless Chromium;
- serve.png: the page of `dgm-scale serve CHECKPOINT` (its server, on 127.0.0.1 at a free port) in
  headless Chromium;
- projection.png: the report's plots/projection.png (the 2-D PCA of the probe's test images,
  encoded by the discriminator, coloured by class).

Each is saved again as an optimised PNG (the screenshots with a palette of at most 128 colours)
carrying a text chunk that names this script; tests/test_docs_pictures.py checks them. Training is
seeded, so the samples and the projection come out the same on one machine; the two pages show
dates and durations, so their screenshots differ there.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

from PIL import Image, PngImagePlugin

ROOT = Path(__file__).resolve().parents[1]
IMG = ROOT / "docs" / "img"
PICTURES = ("samples.png", "report.png", "serve.png", "projection.png")
#: the PNG text chunk every picture carries (tests check it): which code made it
SOFTWARE = "dgm_scale docs/make_pictures.py"
STEPS = 400  # iterations of the run: enough for digits that read as digits
REPORT_WINDOW = (1200, 1400)
SERVE_WINDOW = (900, 1000)
PALETTE = 128  # colours of a screenshot


class PictureError(RuntimeError):
    """A picture could not be made (no Chromium, a command that failed); one line."""


def find_chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    raise PictureError("no Chromium on PATH (chromium, chromium-browser or google-chrome): "
                       "install it, e.g. Debian's `apt-get install chromium`")


def run_overrides(run_dir: Path, steps: int) -> list[str]:
    """The default job, shortened, on the CPU, evaluated once, at its last iteration (the probe
    metric gives the report its projection). eval.every=steps, not eval.at_end alone: the
    evaluation after training is logged one step late, and the report then reads
    "iteration 401 of 400"."""
    return [f"run.dir={run_dir}", f"trainer.max_steps={steps}", f"eval.every={steps}", "eval.at_end=true",
            "eval.metrics=[fid,kid,probe]", f"run.sample_every={max(steps // 2, 1)}",
            f"run.checkpoint_every={steps}", "trainer.accelerator=cpu", "trainer.progress_bar=false",
            "trainer.log_every=10", "tracking.wandb.mode=disabled"]


def train_run(run_dir: Path, steps: int = STEPS, extra: tuple[str, ...] = ()) -> Path:
    """Train the picture run into `run_dir`; returns its checkpoint."""
    from dgm_scale.api import train

    return train(None, [*run_overrides(run_dir, steps), *extra]).checkpoint


def save_optimised(image: Image.Image, out: Path, what: str, colours: Optional[int] = None) -> Path:
    """`image` as a small PNG at `out` (quantised to `colours` if given) naming its maker."""
    if colours is not None:
        image = image.convert("RGB").quantize(colours, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    info = PngImagePlugin.PngInfo()
    info.add_text("Software", SOFTWARE)
    info.add_text("Description", what)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    image.save(partial, format="PNG", optimize=True, pnginfo=info)
    partial.replace(out)  # never a half-written picture
    return out


def samples_picture(checkpoint: Path, out: Path, num: int = 64, seed: int = 0) -> Path:
    """The grid of `dgm-scale sample CHECKPOINT --num NUM --seed SEED`."""
    from dgm_scale.cli import main

    with tempfile.TemporaryDirectory() as scratch:
        grid = Path(scratch) / "samples.png"
        with contextlib.redirect_stdout(io.StringIO()):  # its "wrote ... to SCRATCH" line
            status = main(["sample", str(checkpoint), "--num", str(num), "--seed", str(seed), "--out", str(grid)])
        if status != 0:
            raise PictureError(f"dgm-scale sample {checkpoint} failed")
        with Image.open(grid) as image:
            return save_optimised(image.copy(), out, f"dgm-scale sample --num {num} --seed {seed}")


def screenshot(chromium: str, url: str, out: Path, window: tuple[int, int], what: str) -> Path:
    """`url` as headless Chromium draws it in a `window` (width, height), as the page tests do."""
    with tempfile.TemporaryDirectory() as scratch:
        shot = Path(scratch) / "shot.png"
        command = [chromium, "--headless", "--disable-gpu", "--no-sandbox", "--hide-scrollbars",
                   "--virtual-time-budget=5000", f"--screenshot={shot}",
                   f"--window-size={window[0]},{window[1]}", url]
        done = subprocess.run(command, capture_output=True, text=True, timeout=120)
        if done.returncode != 0 or not shot.is_file():
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise PictureError(f"Chromium could not screenshot {url}: {last}")
        with Image.open(shot) as image:
            return save_optimised(image.copy(), out, what, colours=PALETTE)


def report_picture(chromium: str, run_dir: Path, out: Path) -> Path:
    """The run's report.html (as training last wrote it) in headless Chromium."""
    page = run_dir / "report.html"
    if not page.is_file():
        raise PictureError(f"{page}: no report (tracking.report=false?)")
    return screenshot(chromium, page.resolve().as_uri(), out, REPORT_WINDOW, "RUN/report.html in Chromium")


def serve_picture(chromium: str, checkpoint: Path, out: Path) -> Path:
    """The page `dgm-scale serve CHECKPOINT --device cpu` shows (seed 0), in headless Chromium:
    served by the command's own server in a thread, on 127.0.0.1 at a free port, then stopped."""
    from dgm_scale.serve import open_source, serving

    with serving(open_source(checkpoint, "cpu"), "127.0.0.1", 0) as url:
        return screenshot(chromium, url, out, SERVE_WINDOW, "the dgm-scale serve page in Chromium")


def projection_picture(run_dir: Path, out: Path) -> Path:
    """The report's projection chart (plots/projection.png, drawn from eval/projection.npz)."""
    chart = run_dir / "plots" / "projection.png"
    if not chart.is_file():
        raise PictureError(f"{chart}: no projection (the run's eval.metrics lacks probe?)")
    with Image.open(chart) as image:
        return save_optimised(image.copy(), out, "RUN/plots/projection.png (the probe's 2-D PCA)")


def make_pictures(out_dir: Path = IMG, steps: int = STEPS, keep_run: Optional[Path] = None) -> dict[str, Path]:
    """Train the picture run and write PICTURES into `out_dir`; returns name -> path."""
    chromium = find_chromium()  # before training: no minute spent for nothing
    with tempfile.TemporaryDirectory() as scratch:
        run_dir = Path(keep_run) if keep_run is not None else Path(scratch) / "runs" / "default"
        checkpoint = train_run(run_dir, steps)
        return {"samples.png": samples_picture(checkpoint, out_dir / "samples.png"),
                "report.png": report_picture(chromium, run_dir, out_dir / "report.png"),
                "serve.png": serve_picture(chromium, checkpoint, out_dir / "serve.png"),
                "projection.png": projection_picture(run_dir, out_dir / "projection.png")}


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=IMG, help=f"folder of the pictures (default {IMG})")
    parser.add_argument("--steps", type=int, default=STEPS, help=f"training iterations (default {STEPS})")
    parser.add_argument("--keep-run", type=Path, default=None, help="train into this run directory and keep it")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        written = make_pictures(args.out, args.steps, args.keep_run)
    except PictureError as error:
        print(f"make_pictures: {error}", file=sys.stderr)
        return 1
    for path in written.values():
        with Image.open(path) as image:
            print(f"wrote {path} ({image.width}x{image.height}, {path.stat().st_size / 1024:.0f} KiB)")
    print(f"in {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
