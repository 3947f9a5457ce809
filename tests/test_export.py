"""`dgm-scale export`: files that run without dgm_scale and give `sample`'s images; int8; refusals."""
import json

import numpy as np
import pytest
import torch

from dgm_scale.cli import main
from dgm_scale.config import load_config
from dgm_scale.core.errors import ConfigError
from dgm_scale.export import load_export
from dgm_scale.export.build import export_module
from dgm_scale.modules import build_module, load_module
from dgm_scale.training import train
from helpers import TINY, TINY_RUN, plain_site, run_plain

CONDITIONAL_GAN = TINY + ["model.num_classes=10", "data.resolution=16", "model.generator.width=8"]

# What a user without dgm_scale runs (docs/generators.md, "Export"): plain torch / onnxruntime.
PLAIN_LOADER = """
import json, sys
import numpy as np
import torch
try:
    import dgm_scale
    sys.exit("dgm_scale is importable: not a plain environment")
except ImportError:
    pass
inputs = dict(np.load("inputs.npz"))
out = {}
for path in sys.argv[1:] if len(sys.argv) > 1 else json.load(open("files.json")):
    meta = json.load(open(path + ".json"))
    args = [torch.from_numpy(inputs[spec["name"]]) for spec in meta["inputs"]]
    if meta["format"] == "torchscript":
        if meta["quantized_engine"]:
            torch.backends.quantized.engine = meta["quantized_engine"]
        images = torch.jit.load(path)(*args)
    elif meta["format"] == "exported":
        images = torch.export.load(path).module()(*args)
    else:
        import onnxruntime
        session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
        images = torch.from_numpy(session.run(None, {i.name: a.numpy() for i, a in zip(session.get_inputs(), args)})[0])
    out[path] = images.detach().float().numpy()
np.savez("outputs.npz", **{str(i): value for i, value in enumerate(out.values())})
"""


@pytest.fixture(scope="module")
def gan_checkpoint(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("export") / "run"
    return train(load_config(overrides=CONDITIONAL_GAN + [f"run.dir={run_dir}"])).checkpoint


def test_exports_load_without_dgm_scale_and_equal_sample(gan_checkpoint, tmp_path):
    module = load_module(gan_checkpoint)
    files = []
    for fmt, suffix in (("torchscript", "pt"), ("exported", "pt2"), ("onnx", "onnx")):
        path = tmp_path / f"g.{suffix}"
        assert main(["export", str(gan_checkpoint), "--out", str(path), "--format", fmt, "--dynamic-batch"]) == 0
        files.append(str(path))
    inputs = module.export_inputs(7, seed=11, start=5)  # another batch size and seed than traced
    np.savez(tmp_path / "inputs.npz", **{name: value.numpy() for name, value in inputs.items()})
    (tmp_path / "files.json").write_text(json.dumps(files))
    site = plain_site(tmp_path / "site", ("torch", "onnxruntime"))
    proc = run_plain(PLAIN_LOADER, site, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    outputs = np.load(tmp_path / "outputs.npz")
    # what `dgm-scale sample --seed 11` draws for samples 5..11 (EMA generator, labels i % 10)
    expected = module.sample_batch(7, seed=11, start=5).clamp(-1, 1).numpy()
    for index, tolerance in ((0, 1e-5), (1, 1e-5), (2, 1e-4)):
        assert outputs[str(index)].shape == expected.shape
        assert np.abs(outputs[str(index)] - expected).max() <= tolerance, files[index]
    meta = json.loads((tmp_path / "g.onnx.json").read_text())
    assert meta["inputs"] == [{"name": "latents", "shape": ["batch", 8], "dtype": "float32"},
                              {"name": "labels", "shape": ["batch"], "dtype": "int64"}]
    assert (meta["num_classes"], meta["sample_shape"], meta["output"]["value_range"]) == (10, [1, 16, 16], [-1.0, 1.0])
    assert meta["config"]["model"]["num_classes"] == 10


def test_reduced_precisions_and_int8(gan_checkpoint, tmp_path):
    module = load_module(gan_checkpoint)
    inputs = module.export_inputs(64, seed=3)
    expected = module.sample_batch(64, seed=3).clamp(-1, 1)
    for precision, bound in (("fp16", 0.01), ("bf16", 0.05)):
        export_module(module, tmp_path / f"{precision}.pt2", "exported", precision, batch_size=64)
        error = (load_export(tmp_path / f"{precision}.pt2")(**inputs) - expected).abs().max()
        assert 0 < error < bound, (precision, error)
    meta = export_module(module, tmp_path / "int8.pt", "torchscript", "int8", dynamic_batch=True)
    assert meta["quantized_engine"] == "fbgemm"
    torch.backends.quantized.engine = "x86"  # a fresh process's default: the loader sets the engine
    quantized = load_export(tmp_path / "int8.pt")(**inputs)
    error = (quantized - expected).abs()
    # 8-bit activations, a different network than fp32. Observed (3 trained nets x 4 input seeds):
    # mean 0.0031-0.0037 (half a grey level, 2/255), max 0.016-0.032; bounds about 3x those
    assert 0 < error.mean() < 0.01 and error.max() < 0.1, (error.mean(), error.max())
    traced = torch.jit.load(tmp_path / "int8.pt")
    assert any("quantized" in node.kind() for node in traced.inlined_graph.nodes())


def test_vae_and_autoregressive_samplers_export(tmp_path):
    vae = build_module(load_config(overrides=["model.kind=vae", "loss.likelihood=bernoulli",
                                              *[item.replace("generator", "decoder").replace("discriminator", "encoder")
                                                for item in TINY]]))
    export_module(vae, tmp_path / "vae.pt", "torchscript", dynamic_batch=True)
    inputs = vae.export_inputs(5, seed=2)
    torch.testing.assert_close(load_export(tmp_path / "vae.pt")(**inputs), vae.sample_batch(5, seed=2).clamp(-1, 1),
                               rtol=0, atol=1e-5)
    ar = build_module(load_config(overrides=["model.kind=autoregressive", "model.width=8", "model.layers=1",
                                             "model.num_classes=10", *TINY_RUN]))
    export_module(ar, tmp_path / "ar.pt", "torchscript", dynamic_batch=True, batch_size=2)
    inputs = ar.export_inputs(5, seed=2)
    assert list(inputs) == ["uniforms", "labels"] and inputs["uniforms"].shape == (5, 64)
    assert torch.equal(load_export(tmp_path / "ar.pt")(**inputs), ar.sample_batch(5, seed=2))
    with pytest.raises(ConfigError, match="--format onnx: the autoregressive family exports as torchscript"):
        export_module(ar, tmp_path / "ar.onnx", "onnx")


def test_refusals_are_one_line_and_leave_files_alone(gan_checkpoint, tmp_path, capsys):
    module = load_module(gan_checkpoint)
    existing = tmp_path / "g.onnx"
    existing.write_bytes(b"an earlier export")
    for args, culprit in ((["--format", "onnx", "--precision", "int8"], "--precision int8"),
                          (["--format", "onnx", "--precision", "bf16"], "--format onnx --precision bf16"),
                          (["--variant", "nope"], "--variant 'nope'"),
                          (["--batch-size", "0"], "--batch-size")):
        capsys.readouterr()
        assert main(["export", str(gan_checkpoint), "--out", str(existing), *args]) == 2
        err = capsys.readouterr().err.strip()
        assert culprit in err and len(err.splitlines()) == 1, err
    assert existing.read_bytes() == b"an earlier export" and not (tmp_path / "g.onnx.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g.onnx"]  # no temporary file left
    assert main(["export", str(tmp_path / "missing.ckpt")]) == 2
    assert "missing.ckpt" in capsys.readouterr().err
    export_module(module, tmp_path / "fixed.pt", "torchscript", batch_size=4)
    with pytest.raises(ValueError, match="batches of exactly 4"):
        load_export(tmp_path / "fixed.pt")(**module.export_inputs(3))
