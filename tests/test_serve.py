"""`dgm-scale serve`: the endpoints answer the model's own samples, refuse bad parameters with a
one-line 4xx and keep serving, an exported sampler shows the samples of its checkpoint, the
command prints its URL and stops cleanly on Ctrl-C, and the page renders its grid in headless
Chromium (another seed, another grid)."""
import argparse
import io
import json
import logging
import signal
import socket
import subprocess
import sys
from typing import ClassVar

import numpy as np
import pytest
import torch
from helpers import ROOT, TINY, TINY_RUN, get, grey_8bit, grid_cells, running
from PIL import Image

from dgm_scale.config import ConfigError, load_config
from dgm_scale.export import export_module
from dgm_scale.modules import build_module, load_module
from dgm_scale.modules.sampling import sampler_inputs
from dgm_scale.serve import (
    ExportSource,
    ModuleSource,
    add_serve_parser,
    open_source,
    serve,
)
from dgm_scale.training import train

AR_IMAGES = ["model.kind=autoregressive", *TINY_RUN, "model.width=8", "model.embed_dim=8", "model.layers=1"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny conditional GAN (10 classes, 8x8 grey digits)."""
    run_dir = tmp_path_factory.mktemp("serve") / "run"
    return train(load_config(overrides=TINY + ["model.num_classes=10", f"run.dir={run_dir}"])).checkpoint


@pytest.fixture(scope="module")
def gan(checkpoint):
    with running(open_source(checkpoint, "cpu")) as url:
        yield url


def png(body: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(body)) as image:
        assert image.format == "PNG"
        return np.asarray(image)


def test_meta_describes_the_model(gan):
    status, kind, body = get(gan + "api/meta")
    assert status == 200 and kind == "application/json"
    meta = json.loads(body)
    assert {key: meta[key] for key in ("family", "modality", "num_classes", "sample_shape", "latent_dim")} == \
        {"family": "gan", "modality": "images", "num_classes": 10, "sample_shape": [1, 8, 8], "latent_dim": 8}
    assert meta["options"] == {"truncation": {"default": 1.0, "max": 1.0}}
    assert meta["caps"] == {"num": 256, "steps": 32, "seed": 2**31 - 1} and meta["iteration"] == 3


def test_grid_and_batch_are_the_model_samples(gan, checkpoint):
    module = load_module(checkpoint)
    status, kind, body = get(gan + "api/grid.png?seed=3&num=10")
    grid = png(body)
    assert status == 200 and kind == "image/png" and grid.shape == (3 * 10 + 2, 4 * 10 + 2)  # 4 columns, 3 rows
    assert get(gan + "api/grid.png?seed=3&num=10")[2] == body
    assert get(gan + "api/grid.png?seed=4&num=10")[2] != body
    # sample i has class i % 10 unless a class is given: those of `dgm-scale sample --seed 3`
    np.testing.assert_array_equal(grid_cells(grid, 10, 4), grey_8bit(module.sample_batch(10, seed=3)))
    seven = torch.full((5,), 7)
    class_grid = png(get(gan + "api/grid.png?seed=3&num=5&class=7")[2])
    np.testing.assert_array_equal(grid_cells(class_grid, 5, 3), grey_8bit(module.sample_batch(5, 3, 0, seven)))
    archive = np.load(io.BytesIO(get(gan + "api/batch?seed=3&num=5&class=7&format=npz")[2]))
    assert archive["samples"].shape == (5, 8, 8, 1) and archive["samples"].dtype == np.uint8
    np.testing.assert_array_equal(archive["samples"][..., 0], grid_cells(class_grid, 5, 3))
    assert archive["labels"].tolist() == [7] * 5
    assert np.load(io.BytesIO(get(gan + "api/batch?seed=3&num=12")[2]))["labels"].tolist() == [i % 10 for i in range(12)]
    assert get(gan + "api/batch?seed=3&num=5&class=7&format=png")[2] == get(gan + "api/grid.png?seed=3&num=5&class=7")[2]
    # truncation psi: the latents scaled toward the mean
    truncated = np.load(io.BytesIO(get(gan + "api/batch?seed=3&num=5&class=7&truncation=0.5")[2]))["samples"]
    expected = grey_8bit(module.generate(module.latents(5, 3) * 0.5, seven))
    np.testing.assert_array_equal(truncated[..., 0], expected)
    assert not np.array_equal(truncated, archive["samples"])


def test_interpolation_runs_from_one_seed_to_the_other(gan, checkpoint):
    module = load_module(checkpoint)
    status, _, body = get(gan + "api/interpolate.png?seed_a=3&seed_b=4&steps=5&class=2")
    strip = png(body)
    assert status == 200 and strip.shape == (12, 5 * 10 + 2)
    frames = grid_cells(strip, 5, 5).astype(int)
    two = torch.tensor([2])
    first, last = grey_8bit(module.sample_batch(1, 3, 0, two))[0], grey_8bit(module.sample_batch(1, 4, 0, two))[0]
    assert np.abs(frames[0] - first).max() <= 1 and np.abs(frames[-1] - last).max() <= 1  # batch-size rounding
    assert not np.array_equal(frames[2], frames[0]) and not np.array_equal(frames[2], frames[-1])
    same = grid_cells(png(get(gan + "api/interpolate.png?seed_a=3&seed_b=3&steps=3&class=2")[2]), 3, 3)
    assert (same == same[0]).all()  # one latent: no direction to turn in, every frame is it


BAD = [  # (request, the parameter the one-line answer names, status)
    ("api/grid.png?num=-1", "num", 400), ("api/grid.png?num=100000", "num", 400), ("api/batch?num=257", "num", 400),
    ("api/grid.png?class=99", "class", 400), ("api/grid.png?class=-1", "class", 400),
    ("api/grid.png?seed=abc", "seed", 400), ("api/grid.png?seed=", "seed", 400), ("api/grid.png?seed=-3", "seed", 400),
    ("api/grid.png?seed=1&seed=2", "seed", 400), ("api/grid.png?colour=red", "colour", 400),
    ("api/grid.png?truncation=0", "truncation", 400), ("api/grid.png?truncation=1.5", "truncation", 400),
    ("api/grid.png?truncation=nan", "truncation", 400), ("api/grid.png?temperature=0.5", "temperature", 400),
    ("api/batch?format=gif", "format", 400), ("api/interpolate.png?steps=1", "steps", 400),
    ("api/interpolate.png?steps=33", "steps", 400), ("api/interpolate.png?seed_b=x", "seed_b", 400),
    ("api/meta?x=1", "x", 400), ("api/grid.png?junk", "junk", 400), ("api/nothing", "api/nothing", 404),
]


def test_bad_parameters_get_a_one_line_4xx_and_the_server_keeps_serving(gan):
    for request, name, status in BAD:
        code, kind, body = get(gan + request)
        text = body.decode()
        assert code == status and kind.startswith("text/plain"), (request, code, text)
        assert text.count("\n") == 1 and name in text, (request, text)
    assert get(gan + "api/grid.png?seed=5&num=4")[0] == 200


class Broken:
    """A source whose model fails: a 500 with one line, and the server goes on."""

    meta: ClassVar[dict] = {"name": "broken", "family": "gan", "modality": "images", "num_classes": 0, "sample_shape": [1, 8, 8],
            "latent_dim": 8, "options": {}, "iteration": 0}

    def images(self, seed, num, label=None, **options):
        if seed == 1:
            self._fail()
        return np.full((num, 8, 8, 1), 128, np.uint8)

    def _fail(self):
        raise RuntimeError("CUDA out of memory\nmore lines")


def test_a_failing_model_answers_500_in_one_line_and_logs_its_traceback(caplog):
    with running(Broken()) as url:
        with caplog.at_level(logging.ERROR, logger="dgm_scale.serve"):
            code, _, body = get(url + "api/grid.png?seed=1")
        assert code == 500 and body == b"internal error: RuntimeError: CUDA out of memory\n"
        logged = "\n".join(record.getMessage() + "\n" + (record.exc_text or "") for record in caplog.records)
        assert "Traceback" in logged and "in _fail" in logged  # the server's log has it, the client never
        assert get(url + "api/grid.png?class=0")[2] == b"class: this model is unconditional (it has no classes)\n"
        assert get(url + "api/grid.png?seed=2")[0] == 200


def test_an_autoregressive_model_takes_a_temperature_and_has_no_interpolation():
    module = build_module(load_config(overrides=AR_IMAGES))  # untrained: sampling is what is tested
    with running(ModuleSource(module)) as url:
        meta = json.loads(get(url + "api/meta")[2])
        assert meta["latent_dim"] is None and list(meta["options"]) == ["temperature"]
        grid = png(get(url + "api/grid.png?seed=2&num=4&temperature=0.5")[2])
        np.testing.assert_array_equal(grid_cells(grid, 4, 2), grey_8bit(module.sample_batch(4, 2, temperature=0.5)))
        for request, reason in [("api/interpolate.png", "interpolation needs a latent space"),
                                ("api/grid.png?class=1", "class: this model is unconditional"),
                                ("api/grid.png?truncation=0.5", "unknown parameter 'truncation'"),
                                ("api/grid.png?temperature=11", "temperature: 11 is outside (0, 10]")]:
            code, _, body = get(url + request)
            assert code == 400 and body.decode().startswith(reason), (request, body)
    text = build_module(load_config(overrides=["model.kind=autoregressive", "data.name=text", "data.seq_len=16",
                                               "data.path=builtin:pydoc", *AR_IMAGES[1:]]))
    with pytest.raises(ConfigError, match="^serve shows images; this model makes text"):
        ModuleSource(text)


DIFFUSION = [*TINY_RUN, "model.kind=diffusion", "model.denoiser.width=8", "model.denoiser.channel_mult=[1,2]",
             "loss.objective=flow", "sampler.steps=2"]
GUIDED = ["model.num_classes=10", "model.label_dropout=0.2"]
SAMPLERS = ["ddim", "ddpm", "dpmpp_2m", "euler", "heun"]


@pytest.fixture(scope="module")
def diffusion():
    """An untrained, guided diffusion model (sampling is what is tested) and its page's URL."""
    module = build_module(load_config(overrides=[*DIFFUSION, *GUIDED]))
    with running(ModuleSource(module)) as url:
        yield module, url


def test_a_diffusion_model_offers_its_sampler_steps_and_guidance(diffusion):
    """The family's controls: the page's images are sample_batch's with the sampler, steps and
    guidance asked for (and the configured ones by default)."""
    module, url = diffusion
    meta = json.loads(get(url + "api/meta")[2])
    assert meta["family"] == "diffusion" and meta["latent_dim"] is None
    assert meta["options"] == {"sampler": {"type": "choice", "default": "heun", "choices": SAMPLERS},
                               "steps": {"type": "integer", "default": 2, "min": 1, "max": 250},
                               "guidance": {"default": 1.0, "min": 0.0, "max": 10.0}}
    np.testing.assert_array_equal(grid_cells(png(get(url + "api/grid.png?seed=2&num=4")[2]), 4, 2),
                                  grey_8bit(module.sample_batch(4, 2)))
    asked = png(get(url + "api/grid.png?seed=2&num=4&class=3&sampler=ddpm&steps=3&guidance=2.5")[2])
    np.testing.assert_array_equal(grid_cells(asked, 4, 2), grey_8bit(module.sample_batch(
        4, 2, labels=torch.full((4,), 3), sampler="ddpm", steps=3, guidance=2.5)))
    assert not np.array_equal(grid_cells(asked, 4, 2), grid_cells(png(get(url + "api/grid.png?seed=2&num=4&class=3")[2]), 4, 2))
    unconditional = png(get(url + "api/grid.png?num=4&guidance=0")[2])  # the lower end, included: no class
    np.testing.assert_array_equal(grid_cells(unconditional, 4, 2), grey_8bit(module.sample_batch(4, 0, guidance=0.0)))


@pytest.mark.parametrize("request_, reason", [
    ("sampler=euler2", "sampler: 'euler2' is not one of ddim, ddpm, dpmpp_2m, euler, heun"),
    ("steps=0", "steps: 0 is outside 1 .. 250"), ("steps=251", "steps: 251 is outside 1 .. 250"),
    ("steps=2.5", "steps: '2.5' is not an integer"), ("guidance=-1", "guidance: -1 is outside [0, 10]"),
    ("guidance=nan", "guidance: nan is outside [0, 10]"), ("guidance=x", "guidance: 'x' is not a number"),
    ("truncation=0.5", "unknown parameter 'truncation' for /api/grid.png"),
])
def test_bad_diffusion_controls_get_a_one_line_400_naming_the_parameter(diffusion, request_, reason):
    code, _, body = get(diffusion[1] + "api/grid.png?" + request_)
    assert code == 400 and body.decode() == reason + "\n", body


def test_an_unguided_diffusion_model_offers_no_guidance_and_a_discrete_one_its_own_steps():
    for overrides, steps in ((DIFFUSION, 250), ([*DIFFUSION, "loss.objective=eps", "loss.timesteps=40"], 40)):
        with running(ModuleSource(build_module(load_config(overrides=overrides)))) as url:
            assert json.loads(get(url + "api/meta")[2])["options"]["steps"]["max"] == steps
            assert get(url + "api/grid.png?guidance=2")[2] == b"unknown parameter 'guidance' for /api/grid.png\n"
            assert get(url + f"api/grid.png?num=1&steps={steps + 1}")[2] == f"steps: {steps + 1} is outside 1 .. {steps}\n".encode()


def test_sources_that_cannot_open_and_a_taken_port_are_one_line_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        open_source(tmp_path / "missing.ckpt")
    (tmp_path / "generator.onnx").write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match=r"^'\S*generator.onnx' is neither a dgm_scale checkpoint nor an export "
                                          r"\(no sidecar 'generator.onnx.json' beside it\)$"):
        open_source(tmp_path / "generator.onnx")
    (tmp_path / "generator.onnx.json").write_text(json.dumps({"format": "onnx", "precision": "fp32", "inputs": []}))
    with pytest.raises(ConfigError, match=r"^export '\S*generator.onnx' does not load: "):
        open_source(tmp_path / "generator.onnx")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(ConfigError, match=f"--port {taken.getsockname()[1]}: cannot listen there"):
            serve(Broken(), "127.0.0.1", taken.getsockname()[1])


@pytest.fixture(scope="module", params=["dynamic", "fixed"])
def exported(request, checkpoint, tmp_path_factory):
    """The checkpoint's GAN exported with a dynamic batch (TorchScript) or for batches of 5 only
    (torch.export), served."""
    out = tmp_path_factory.mktemp("export")
    if request.param == "dynamic":
        path = out / "g.pt"
        export_module(load_module(checkpoint), path, "torchscript", dynamic_batch=True)
    else:
        path = out / "g.pt2"
        export_module(load_module(checkpoint), path, "exported", batch_size=5)
    with running(open_source(path)) as url:
        yield path, url


def served(url: str, request: str) -> np.ndarray:
    status, _, body = get(url + request)
    assert status == 200, (request, body)
    return png(body) if ".png" in request else np.load(io.BytesIO(body))["samples"]


def test_an_export_serves_the_samples_of_its_checkpoint(exported, gan):
    path, url = exported
    meta = json.loads(get(url + "api/meta")[2])
    assert {key: meta[key] for key in ("name", "family", "num_classes", "latent_dim", "options", "iteration")} == \
        {"name": path.name, "family": "gan", "num_classes": 10, "latent_dim": 8,
         "options": {"truncation": {"default": 1.0, "max": 1.0}}, "iteration": 3}
    # 12 samples: a fixed batch of 5 runs 5 + 5 + 2 (padded); labels i % 10, one class, truncated
    for request in ["api/grid.png?seed=3&num=12", "api/batch?seed=3&num=12&format=npz",
                    "api/batch?seed=3&num=7&class=7&truncation=0.5&format=npz", "api/grid.png?seed=9&num=1",
                    "api/interpolate.png?seed_a=3&seed_b=4&steps=6&class=2&truncation=0.8"]:
        mine, theirs = served(url, request).astype(int), served(gan, request).astype(int)
        assert mine.shape == theirs.shape and np.abs(mine - theirs).max() <= 1, request  # rounding
    labels = np.load(io.BytesIO(get(url + "api/batch?seed=3&num=12")[2]))["labels"]
    assert labels.tolist() == [i % 10 for i in range(12)]
    assert get(url + "api/grid.png?temperature=0.5")[0] == 400


def test_the_export_inputs_rule_is_the_families(checkpoint):
    """The inputs serve draws for an export (sampler_inputs), fed to the exported network, make
    the samples the module's own sample_batch draws: same noise, same labels."""
    gan = load_module(checkpoint)
    ar = build_module(load_config(overrides=[*AR_IMAGES, "model.num_classes=3"]))
    for module, noise, shape in [(gan, "latents", [8]), (ar, "uniforms", [64])]:
        got = sampler_inputs(5, 1021, 7, noise, shape, module.num_classes)  # across a keyed_noise block
        assert list(got) == [noise, "labels"]
        with torch.no_grad():
            exported = module.export_network()(*got.values())
        torch.testing.assert_close(exported, module.sample_batch(7, seed=5, start=1021), rtol=0, atol=0)


def test_an_autoregressive_export_has_its_fixed_temperature_and_no_interpolation(tmp_path):
    module = build_module(load_config(overrides=[*AR_IMAGES, "model.temperature=0.7"]))
    export_module(module, tmp_path / "ar.pt", "torchscript", batch_size=3)  # a fixed batch of 3
    source = open_source(tmp_path / "ar.pt", "cpu")
    assert isinstance(source, ExportSource)
    assert (source.meta["family"], source.meta["latent_dim"], source.meta["options"]) == ("autoregressive", None, {})
    np.testing.assert_array_equal(source.images(2, 4)[..., 0], grey_8bit(module.sample_batch(4, 2)))
    with running(source) as url:
        for request, reason in [("api/interpolate.png", "interpolation needs a latent space"),
                                ("api/grid.png?temperature=0.5", "unknown parameter 'temperature'")]:
            code, _, body = get(url + request)
            assert code == 400 and body.decode().startswith(reason), (request, body)
    with pytest.raises(ConfigError, match="^--device cuda: exported samplers are served on the CPU$"):
        open_source(tmp_path / "ar.pt", "cuda")


# `dgm-scale serve` as the CLI runs it (cli.py registers it with add_serve_parser)
CLI = ("import argparse, sys; from dgm_scale.serve import add_serve_parser; parser = argparse.ArgumentParser(); "
       "add_serve_parser(parser.add_subparsers()); args = parser.parse_args(sys.argv[1:]); sys.exit(args.func(args))")


def interruptible() -> None:
    """In the child before exec: Ctrl-C as in a terminal. A process inherits an ignored or
    blocked SIGINT, and in the full suite the server child was left deaf to it (30 s timeout)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGINT])


def test_the_command_prints_its_url_and_stops_on_ctrl_c(checkpoint):
    parser = argparse.ArgumentParser()
    add_serve_parser(parser.add_subparsers())
    args = parser.parse_args(["serve", str(checkpoint)])
    assert (args.host, args.port, args.device) == ("127.0.0.1", 8000, None)
    assert (args.queue, args.connections, args.timeout) == (8, 32, 10.0)  # the documented defaults
    proc = subprocess.Popen([sys.executable, "-c", CLI, "serve", str(checkpoint), "--port", "0", "--device", "cpu"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=interruptible)
    try:
        line = proc.stdout.readline()
        assert line.startswith(f"serving {checkpoint.name} at http://127.0.0.1:") and line.endswith("(Ctrl-C stops)\n")
        url = line.split(" at ")[1].split()[0]
        assert get(url + "api/grid.png?num=2")[0] == 200
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
        assert proc.stderr.read() == ""
    finally:
        proc.kill()
        proc.wait()


def screenshot(chromium: str, url: str, path) -> np.ndarray:
    subprocess.run([chromium, "--headless", "--disable-gpu", "--no-sandbox", "--hide-scrollbars",
                    "--virtual-time-budget=5000", f"--screenshot={path}", "--window-size=900,1000", url],
                   check=True, capture_output=True, timeout=120)
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB")).astype(int)


def test_the_page_renders_the_grid_and_follows_the_seed(gan, chromium, tmp_path):
    one = screenshot(chromium, gan + "?seed=1", tmp_path / "one.png")
    two = screenshot(chromium, gan + "?seed=2", tmp_path / "two.png")
    assert one.shape == (1000, 900, 3)
    # the grid: the 42 x 42 px image shown 12 times enlarged (504 px), pixels as they are; its top
    # padding is the first row of the page that is black for 500 px (the strip's is 492 px wide)
    black = (one == 0).all(axis=2)
    top = np.nonzero(black.sum(axis=1) >= 500)[0].min()
    left = np.nonzero(black[top])[0].min()
    region = (slice(top, top + 504), slice(left, left + 504))
    assert len(np.unique(one[region][..., 0])) > 20  # many grey levels: samples, not a blank box
    assert np.array_equal(one[region][:24, :24], np.zeros((24, 24, 3)))  # the padding corner, enlarged
    assert (one[region] != two[region]).any(axis=2).mean() > 0.2
    # an API error is shown on the page as its one-line text
    assert '<div id="grid-error" class="error">error: num: 999 is outside 1 .. 256</div>' in page_dom(chromium, gan + "?num=999")


def page_dom(chromium: str, url: str) -> str:
    return subprocess.run([chromium, "--headless", "--disable-gpu", "--no-sandbox", "--virtual-time-budget=5000",
                           "--dump-dom", url], check=True, capture_output=True, text=True, timeout=120).stdout


def test_the_page_builds_the_diffusion_controls_and_sends_them(diffusion, chromium):
    """A menu of samplers, a number box of steps, a guidance slider; a value from the page's
    query string reaches the API (a bad one comes back as the API's line)."""
    dom = page_dom(chromium, diffusion[1] + "?steps=999&sampler=ddim")
    assert '<select id="option-sampler">' in dom and '<option value="dpmpp_2m">dpmpp_2m</option>' in dom
    assert '<input type="number" min="1" max="250" step="1" id="option-steps">' in dom
    assert '<input type="range" min="0" max="10" step="0.05" id="option-guidance">' in dom
    assert 'href="api/batch?format=npz&amp;seed=0&amp;num=16&amp;sampler=ddim&amp;steps=999&amp;guidance=1"' in dom
    assert '<div id="grid-error" class="error">error: steps: 999 is outside 1 .. 250</div>' in dom
