"""`dgm-scale encode` (features of real data as an .npz, torchrun splitting the work, bad samples
skipped or --strict), `dgm-scale probe` (clustering and few-label linear probes, checked
against independent truths), and the same probe as the evaluation metric `probe` with the
report's projection and latent interpolation strip."""
import csv
import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

from dgm_scale.cli import main
from dgm_scale.config import load_config
from dgm_scale.metrics.evaluation import EvalSettings
from dgm_scale.metrics.probe_metric import ProbeEvaluator, probe_scores
from dgm_scale.tracking.report import projection_title, read_projection, save_projection
from dgm_scale.serve.sources import ModuleSource
from dgm_scale.config.schema import NetConfig
from dgm_scale.core.errors import ConfigError
from dgm_scale.data.shards.sources import open_source
from dgm_scale.metrics.real_data import raw_to_image, to_model_space
from dgm_scale.modules import load_module
from dgm_scale.nets import build_discriminator, discriminator_features
from dgm_scale.nets.stylegan2 import MinibatchStd
from dgm_scale.represent.probe import cluster_accuracy, kmeans_scores, linear_probe, representations
from dgm_scale.training import train
from helpers import TINY, TINY_RUN, TOY_FAMILY, adapt, torchrun

VAE = "configs/vae.yaml"
#: the probe metric at the end of the tiny runs (300 digits: 210 train, 90 test rows)
PROBE_AT_END = ["eval.at_end=true", "eval.metrics=[probe]", "eval.options.probe_samples=300"]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Tiny trained models at 8x8 grey, probed at the end: a VAE, a GAN, an autoregressive model."""
    root = tmp_path_factory.mktemp("represent")
    vae = train(load_config(VAE, adapt(VAE, TINY) + PROBE_AT_END + [f"run.dir={root / 'vae'}"])).checkpoint
    gan = train(load_config(overrides=TINY + PROBE_AT_END + [f"run.dir={root / 'gan'}"])).checkpoint
    ar = train(load_config(overrides=["model.kind=autoregressive", "model.width=8", "model.layers=1",
                                      *TINY_RUN, *PROBE_AT_END, f"run.dir={root / 'ar'}"]))
    return {"vae": vae, "gan": gan, "autoregressive": ar.checkpoint}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """Two class folders of 3 PNGs each (10x10 RGB: resized and greyed on reading)."""
    root = tmp_path_factory.mktemp("folder") / "images"
    rng = np.random.default_rng(0)
    for cls in ("cat", "dog"):
        (root / cls).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 256, (10, 10, 3), dtype=np.uint8)).save(root / cls / f"{i}.png")
    return root


def model_images(src, channels=1, resolution=8):
    """The source's images as encode reads them: [N, C, R, R] in [-1, 1], and the labels."""
    raws = list(open_source(str(src), resolution, channels).samples())
    return to_model_space([raw_to_image(raw, channels, resolution) for raw in raws]), [raw.label for raw in raws]


@pytest.mark.parametrize("family,names", [("vae", {"mu": 8, "logvar": 8}), ("gan", {"features": 4 * 16}),
                                          ("autoregressive", {"hidden": 8})])
def test_encode_writes_the_features_of_every_sample(checkpoints, folder, tmp_path, family, names):
    out = tmp_path / "f.npz"
    assert main(["encode", str(checkpoints[family]), "--data", str(folder), "--out", str(out),
                 "--batch-size", "4"]) == 0
    with np.load(out, allow_pickle=False) as npz:  # plain numpy, no pickles
        arrays = {key: npz[key] for key in npz.files}
    assert set(arrays) == {*names, "labels", "keys", "class_names"}
    for name, dim in names.items():
        assert arrays[name].shape == (6, dim) and arrays[name].dtype == np.float32
    assert arrays["labels"].tolist() == [0, 0, 0, 1, 1, 1] and arrays["labels"].dtype == np.int64
    assert arrays["keys"].tolist() == [f"{c}/{i}.png" for c in ("cat", "dog") for i in range(3)]
    assert arrays["class_names"].tolist() == ["cat", "dog"]
    module = load_module(checkpoints[family]).eval()
    images, labels = model_images(folder)
    with torch.no_grad():
        direct = module.encode_features(images, torch.tensor(labels))
    for name in names:
        np.testing.assert_allclose(arrays[name], direct[name].numpy(), rtol=1e-5, atol=1e-6)


def test_encode_builtin_labels_and_two_processes(checkpoints, tmp_path):
    one, two = tmp_path / "one.npz", tmp_path / "two.npz"
    args = ["encode", str(checkpoints["vae"]), "--data", "builtin:digits", "--batch-size", "100"]
    assert main([*args, "--out", str(one)]) == 0
    proc = torchrun(["-m", "dgm_scale.cli", *args, "--out", str(two)])
    assert proc.returncode == 0, proc.stderr[:6000]
    assert one.read_bytes() == two.read_bytes()
    with np.load(one) as npz:
        assert sorted(npz.files) == ["labels", "logvar", "mu"]  # builtin samples have no names
        _, labels = model_images("builtin:digits")
        assert npz["labels"].tolist() == labels and npz["mu"].shape == (len(labels), 8)


def test_a_corrupt_image_is_skipped_or_stops_under_strict(checkpoints, folder, tmp_path, capsys):
    broken = tmp_path / "broken"
    for path in folder.rglob("*.png"):
        (broken / path.relative_to(folder)).parent.mkdir(parents=True, exist_ok=True)
        (broken / path.relative_to(folder)).write_bytes(path.read_bytes())
    (broken / "dog" / "1.png").write_bytes(b"not a png")
    out = tmp_path / "f.npz"
    assert main(["encode", str(checkpoints["gan"]), "--data", str(broken), "--out", str(out)]) == 0
    assert f"skipped 1 unreadable sample: {broken / 'dog' / '1.png'} (cannot decode" in capsys.readouterr().out
    with np.load(out) as npz:
        assert npz["keys"].tolist() == ["cat/0.png", "cat/1.png", "cat/2.png", "dog/0.png", "dog/2.png"]
        assert npz["features"].shape[0] == 5 and npz["labels"].tolist() == [0, 0, 0, 1, 1]
    out.unlink()
    assert main(["encode", str(checkpoints["gan"]), "--data", str(broken), "--out", str(out), "--strict"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "dog/1.png" in err[0] and "--strict" in err[0]
    assert not out.exists()


def test_discriminator_features_are_per_sample_and_need_a_body():
    torch.manual_seed(0)
    d = build_discriminator(NetConfig(arch="stylegan2", width=4), (1, 8, 8)).eval()
    x = torch.randn(8, 1, 8, 8)
    with torch.no_grad():  # the minibatch-std layer sees each image alone: rows do not depend on the batch
        torch.testing.assert_close(discriminator_features(d, x)[:3], discriminator_features(d, x[:3]))
    assert [m.group for m in d.body.modules() if isinstance(m, MinibatchStd)] == [4]  # left as it was
    with pytest.raises(NotImplementedError, match="has no `body`"):
        discriminator_features(torch.nn.Linear(64, 1), x.flatten(1))


# ----------------------------------------------------------------------------- probe: metrics
def test_cluster_accuracy_matches_clusters_to_classes():
    labels = np.array([0, 0, 0, 1, 1, 1, 2, 2, 2, 2])
    # clusters: {a: 3 x class 0}, {b: 2 x class 1, 1 x class 2}, {c: 1 x class 1, 3 x class 2}
    clusters = np.array([7, 7, 7, 5, 5, 9, 5, 9, 9, 9])
    # confusion (rows 5, 7, 9; columns classes 0..2): [[0, 2, 1], [3, 0, 0], [0, 1, 3]] -> 3 + 2 + 3
    assert cluster_accuracy(labels, clusters) == pytest.approx(8 / 10)
    # two clusters for three classes: the best matching covers two classes only
    assert cluster_accuracy(labels, np.array([1, 1, 1, 1, 1, 1, 0, 0, 0, 0])) == pytest.approx(7 / 10)


def test_kmeans_recovers_separated_clusters_whatever_the_label_ids():
    rng = np.random.default_rng(0)
    centres = np.eye(4) * 50
    ids = np.repeat([3, 0, 2, 1], 25)  # permuted ids: cluster order says nothing about the labels
    x = centres[np.repeat(np.arange(4), 25)] + rng.normal(size=(100, 4))
    accuracy, nmi = kmeans_scores(x, ids)
    assert accuracy == 1.0 and nmi == pytest.approx(1.0)


def test_linear_probe_on_perfect_and_on_useless_features():
    rng = np.random.default_rng(0)
    train_y, test_y = np.repeat(np.arange(5), 40), np.repeat(np.arange(5), 40)
    perfect = linear_probe(np.eye(5)[train_y], train_y, np.eye(5)[test_y], test_y, per_class=2, seeds=3)
    assert perfect["mean"] == 1.0 and perfect["min"] == 1.0 and len(perfect["runs"]) == 3
    noise = linear_probe(rng.normal(size=(200, 20)), train_y, rng.normal(size=(200, 20)), test_y, 10, seeds=5)
    assert 0.1 < noise["mean"] < 0.3 and noise["std"] > 0  # chance is 0.2
    with pytest.raises(ConfigError, match="--labels-per-class 41: class 0 has only 40"):
        linear_probe(np.eye(5)[train_y], train_y, np.eye(5)[test_y], test_y, per_class=41)


def test_pca_has_the_model_dimension_and_is_left_out_for_wider_models():
    rng = np.random.default_rng(0)
    pixels = {"pixels": rng.normal(size=(30, 16))}
    narrow = representations({**pixels, "mu": np.zeros((30, 4))}, {**pixels, "mu": np.zeros((30, 4))}, "mu", 0)
    assert [(label, x.shape[1]) for label, x, _ in narrow] == [("raw pixels", 16), ("PCA of pixels", 4),
                                                                ("model: mu", 4)]
    wide = representations({**pixels, "h": np.zeros((30, 16))}, {**pixels, "h": np.zeros((30, 16))}, "h", 0)
    assert [label for label, _, _ in wide] == ["raw pixels", "model: h"]


# ----------------------------------------------------------------------------- probe: the command
def test_probe_prints_and_writes_a_table(checkpoints, tmp_path, capsys):
    out = tmp_path / "probe.json"
    assert main(["probe", str(checkpoints["vae"]), "--data", "builtin:digits", "--labels-per-class", "2,5",
                 "--seeds", "2", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    for row in ("raw pixels", "PCA of pixels", "model: mu"):
        assert row in printed
    assert "seeded split of --data builtin:digits" in printed
    result = json.loads(out.read_text())
    rows = {row["representation"]: row for row in result["representations"]}
    assert [rows[name]["dim"] for name in ("raw pixels", "PCA of pixels", "model: mu")] == [64, 8, 8]
    assert result["num_classes"] == 10 and result["num_train"] + result["num_test"] == 1797
    probe = rows["raw pixels"]["linear_probe"]["5"]
    assert len(probe["runs"]) == 2 and probe["min"] <= probe["mean"] <= probe["max"]
    assert 0 < rows["raw pixels"]["kmeans_accuracy"] <= 1 and 0 <= rows["model: mu"]["nmi"] <= 1
    # The evaluation metric on all of the source (probe_samples >= its 1797 images), with the
    # same seed, split and label draws, gives the command's `model:` row.
    settings = EvalSettings(real="builtin:digits", extractor="digits", metrics=["probe"], seed=0, batch_size=256,
                            options={"probe_samples": 5000, "probe_labels_per_class": 5, "probe_seeds": 2})
    metric = ProbeEvaluator(settings, (1, 8, 8)).evaluate(load_module(checkpoints["vae"]))
    model = rows["model: mu"]
    assert metric["probe_kmeans_accuracy"] == model["kmeans_accuracy"] and metric["probe_nmi"] == model["nmi"]
    assert metric["probe_linear_accuracy"] == model["linear_probe"]["5"]["mean"]
    assert metric["probe_linear_accuracy_std"] == model["linear_probe"]["5"]["std"]
    pixels = rows["raw pixels"]  # and the baseline it logs beside them, the command's first row
    assert metric["probe_pixels_kmeans_accuracy"] == pixels["kmeans_accuracy"]
    assert metric["probe_pixels_nmi"] == pixels["nmi"]
    assert metric["probe_pixels_linear_accuracy"] == pixels["linear_probe"]["5"]["mean"]


@pytest.mark.parametrize("options,message", [
    (["--labels-per-class", "0"], "--labels-per-class must be >= 1"),
    (["--labels-per-class", "x"], "--labels-per-class 'x'"),
    (["--labels-per-class", "500"], "--labels-per-class 500: class"),
    (["--labels-per-class", "1", "--data", "UNLABELLED"], "--data 'UNLABELLED': the source has no labels"),
])
def test_probe_bad_input_is_one_line(checkpoints, tmp_path, capsys, options, message):
    unlabelled = tmp_path / "plain.npz"
    np.savez(unlabelled, x=np.zeros((4, 8, 8), dtype=np.uint8))
    options = [str(unlabelled) if item == "UNLABELLED" else item for item in options]
    data = [] if "--data" in options else ["--data", "builtin:digits"]
    assert main(["probe", str(checkpoints["vae"]), *data, *options]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message.replace("UNLABELLED", str(unlabelled)) in err[0]


# ----------------------------------------------------------------------------- probe: the evaluation metric
class LabelEncoder(torch.nn.Module):
    """A 'model' whose features are its labels, one-hot (perfect), or pure noise."""

    device = torch.device("cpu")

    def __init__(self, perfect: bool):
        super().__init__()
        self.perfect = perfect

    def encode_features(self, images, labels=None):
        if self.perfect:
            return {"onehot": torch.nn.functional.one_hot(labels, 10).float()}
        return {"noise": torch.randn(len(images), 16, generator=torch.Generator().manual_seed(int(labels.sum())))}


def test_the_probe_metric_scores_perfect_features_perfectly_and_noise_at_chance():
    settings = EvalSettings(real="builtin:digits", extractor="digits", metrics=["probe"], batch_size=100,
                            options={"probe_samples": 400, "probe_seeds": 2})
    probe = ProbeEvaluator(settings, (1, 8, 8))
    perfect = probe.evaluate(LabelEncoder(perfect=True))
    assert perfect["probe_kmeans_accuracy"] == 1.0 and perfect["probe_nmi"] == pytest.approx(1.0)
    assert perfect["probe_linear_accuracy"] == 1.0 and perfect["probe_linear_accuracy_std"] == 0.0
    projection = probe.projection  # the 30% test rows (stratified: every class)
    assert projection.feature == "onehot" and projection.points.shape == (120, 2)
    assert set(projection.labels.tolist()) == set(range(10))
    noise = probe.evaluate(LabelEncoder(perfect=False))
    assert noise["probe_linear_accuracy"] < 0.3 and noise["probe_nmi"] < 0.3  # chance: 0.1


def test_a_tsne_projection_keeps_the_classes_apart_and_the_report_names_it(tmp_path):
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(10), 20)
    features = np.eye(10)[labels] * 3 + rng.normal(0, 0.3, (200, 10))  # ten tight clusters
    scores, projection = probe_scores(features, labels, 5, 2, 0, 0.3, "onehot", method="tsne")
    assert projection.method == "tsne" and projection.points.shape == (60, 2) and scores["probe_nmi"] > 0.95
    distances = np.linalg.norm(projection.points[:, None] - projection.points[None], axis=-1)
    np.fill_diagonal(distances, np.inf)
    assert (projection.labels[distances.argmin(1)] == projection.labels).all()  # each point's 2-D neighbour
    save_projection(tmp_path, projection, 7)
    assert read_projection(tmp_path)["method"] == "tsne"
    assert projection_title(read_projection(tmp_path)).startswith("t-SNE of the model's onehot: 60 held-out")


@pytest.mark.parametrize("family", ["vae", "gan", "autoregressive"])
def test_training_logs_the_probe_and_the_report_shows_projection_and_strip(checkpoints, family):
    run = checkpoints[family].parent.parent
    (record,) = [json.loads(line) for line in (run / "eval" / "metrics.jsonl").read_text().splitlines()]
    names = {"probe_kmeans_accuracy", "probe_nmi", "probe_linear_accuracy", "probe_linear_accuracy_std"}
    assert names <= set(record) and all(0 <= record[name] <= 1 for name in names)
    with open(run / "metrics.csv", newline="") as handle:
        assert {f"eval/{name}" for name in names} <= set(next(csv.reader(handle)))
    html = (run / "report.html").read_text()
    sources = set(re.findall(r'<img src="([^"]+)"', html))
    assert {"plots/projection.png", "plots/eval_probe.png"} <= sources  # every family here encodes
    assert all((run / source).is_file() for source in sources)
    latent = family != "autoregressive"  # no latent space, no strip
    assert ("samples/interpolation.png" in sources) == latent == (run / "samples" / "interpolation.png").exists()
    if latent:  # the strip is the one `dgm-scale serve` draws first: seed 0 -> 1 in 8 steps
        served = ModuleSource(load_module(checkpoints[family])).interpolate(0, 1, 8)[..., 0].astype(int)
        with Image.open(run / "samples" / "interpolation.png") as image:
            strip = np.asarray(image.convert("L")).astype(int)
        scale = 64 // 8  # 8-pixel images, enlarged as the sample grid is
        frames = [strip[2 * scale:10 * scale:scale, (2 + 10 * i) * scale:(10 + 10 * i) * scale:scale] for i in range(8)]
        assert np.abs(np.stack(frames) - served).max() <= 1


@pytest.mark.parametrize("base,extra,message", [
    (["--import", str(TOY_FAMILY), "model.kind=toy_gaussian", *TINY_RUN], [],
     "config key 'eval.metrics': 'probe' needs the model's features of real images: the toy_gaussian family "
     "does not encode data"),
    (TINY, ["eval.options.probe_labels_per_class=80"], "eval.options.probe_labels_per_class 80: class"),
    (TINY, ["eval.options.probe_labels_per_class=0"], "config key 'eval.options.probe_labels_per_class' must be >= 1"),
    (TINY, ["eval.metrics=[probe,fidd]"], "config key 'eval.metrics': unknown metric(s) ['fidd']"),
    (TINY, ["eval.options.probe_projection=umap"], "config key 'eval.options.probe_projection'"),
    (["model.kind=autoregressive", "data.name=text", "data.path=builtin:pydoc", *TINY_RUN], [],
     "config key 'eval.metrics': 'probe' encodes labelled images; 'text' holds text"),
])
def test_a_bad_probe_setup_stops_before_training_in_one_line(tmp_path, capsys, base, extra, message):
    run = tmp_path / "run"
    assert main(["train", *base, *PROBE_AT_END, *extra, f"run.dir={run}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not run.exists()
