"""The semi-supervised GAN family and `data.labels_per_class` (the 2-process DDP check is a case
of tests/test_distributed.py, the kill -9 resume one of tests/test_kill_resume.py)."""
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dgm_scale.cli import main
from dgm_scale.config import ConfigError, load_config
from dgm_scale.data import DataModule
from dgm_scale.data.labels import HIDDEN
from dgm_scale.families.ssgan.module import (d_supervised_loss, d_unsupervised_loss, g_feature_matching_loss,
                                             g_nonsaturating_loss, labelled_accuracy)
from dgm_scale.modules import load_module
from dgm_scale.training import train
from helpers import ROOT, TINY

CONFIG = str(ROOT / "configs" / "ssgan.yaml")
LOG = math.log


def one_line(error: Exception) -> str:
    assert "\n" not in str(error)
    return str(error)


def test_losses_equal_their_closed_forms_on_fixed_logits():
    # class logits [N, K=2]: Z = sum_k exp(l_k) is 2 and 4 for the real images, 1 for the fakes
    real = torch.tensor([[0.0, 0.0], [LOG(3.0), 0.0]])
    fake = torch.tensor([[LOG(0.5), LOG(0.5)]])
    # D(x) = Z / (Z + 1): -log D(x) = log(1 + 1/Z) on real images, -log(1 - D(x)) = log(1 + Z) on fakes
    expected = (LOG(1.5) + LOG(1.25)) / 2 + LOG(2.0)
    assert d_unsupervised_loss(real, fake).item() == pytest.approx(expected, rel=1e-6)
    # the same as the (K+1)-way softmax with the fake logit fixed at 0
    with_fake = F.log_softmax(torch.cat([real, torch.zeros(2, 1)], 1), 1)
    assert (-torch.log1p(-with_fake[:, 2].exp())).tolist() == pytest.approx([LOG(1.5), LOG(1.25)], rel=1e-6)
    # cross-entropy over the labelled images only: image 0 (class 1, p = 1/2); image 1 is hidden
    assert d_supervised_loss(real, torch.tensor([1, HIDDEN])).item() == pytest.approx(LOG(2.0), rel=1e-6)
    assert d_supervised_loss(real, torch.tensor([1, 0])).item() == pytest.approx((LOG(2.0) + LOG(4 / 3)) / 2, rel=1e-6)
    assert d_supervised_loss(real, torch.tensor([HIDDEN, HIDDEN])).item() == 0.0
    # G: -log D(G(z)) = log(1 + 1/Z) with Z = 1; feature matching: batch means [2, 3] vs [1, 1]
    assert g_nonsaturating_loss(fake).item() == pytest.approx(LOG(2.0), rel=1e-6)
    fm = g_feature_matching_loss(torch.tensor([[1.0, 2.0], [3.0, 4.0]]), torch.tensor([[0.0, 0.0], [2.0, 2.0]]))
    assert fm.item() == pytest.approx((1.0 + 4.0) / 2)
    predicted_1_0 = torch.tensor([[0.0, 1.0], [LOG(3.0), 0.0]])
    assert labelled_accuracy(predicted_1_0, torch.tensor([1, 1])).item() == pytest.approx(0.5)
    assert labelled_accuracy(predicted_1_0, torch.tensor([HIDDEN, 0])).item() == pytest.approx(1.0)
    assert math.isnan(labelled_accuracy(real, torch.tensor([HIDDEN, HIDDEN])).item())


def training_labels(overrides: list[str], seed: int = 0):
    cfg = load_config(CONFIG, [*overrides, f"run.seed={seed}"])
    datamodule = DataModule(cfg.data, seed=cfg.run.seed)
    datamodule.setup("fit")
    return datamodule, torch.stack([datamodule.train_set[i][1] for i in range(len(datamodule.train_set))])


def test_labels_per_class_keeps_exactly_k_per_class_seeded():
    datamodule, labels = training_labels(["data.labels_per_class=3"])
    true_labels = datamodule.train_set.dataset.labels
    kept = labels != HIDDEN
    assert torch.bincount(labels[kept], minlength=10).tolist() == [3] * 10
    assert (labels == HIDDEN).sum() == len(labels) - 30
    assert torch.equal(labels[kept], true_labels[kept])  # the kept ones are the true labels
    assert torch.equal(training_labels(["data.labels_per_class=3"])[1], labels)  # a function of the seed
    assert not torch.equal(training_labels(["data.labels_per_class=3"], seed=1)[1], labels)
    assert datamodule.num_classes == 10
    # unset: every label, as for every other family
    _, every = training_labels(["data.labels_per_class=null"])
    assert (every != HIDDEN).all()


def test_heldout_split_is_disjoint_from_the_training_images():
    datamodule, _ = training_labels([])
    train_x = datamodule.train_set.dataset.x.flatten(1)
    val_x = datamodule.val_set.x.flatten(1)
    assert len(train_x) + len(val_x) == 1797 and len(val_x) == 539
    # no held-out image is any training image (labelled or not): compare the pixels
    distances = torch.cdist(val_x, train_x)
    assert distances.min() > 0


def test_labels_per_class_errors_are_one_line_naming_the_key(tmp_path):
    with pytest.raises(ConfigError) as error:
        load_config(CONFIG, ["data.labels_per_class=0"])
    assert "data.labels_per_class" in one_line(error.value) and ">= 1" in str(error.value)
    with pytest.raises(ConfigError) as error:
        training_labels(["data.labels_per_class=500"])
    assert "'data.labels_per_class': 500 labels per class asked for, class" in one_line(error.value)
    with pytest.raises(ConfigError, match="'data.labels_per_class': text data has no labels"):
        load_config(overrides=["model.kind=autoregressive", "data.name=text", "data.path=builtin:pydoc",
                               "data.labels_per_class=5"])
    folder = tmp_path / "flat"
    folder.mkdir()
    from PIL import Image

    for index in range(3):
        Image.new("L", (8, 8), color=index * 80).save(folder / f"{index}.png")
    with pytest.raises(ConfigError) as error:
        DataModule(load_config(overrides=["data.name=folder", f"data.path={folder}", "data.labels_per_class=1",
                                          "data.batch_size=2"]).data).setup("fit")
    assert "'data.labels_per_class': dataset 'folder' has no labels" in one_line(error.value)
    with pytest.raises(ConfigError, match="'data.labels_per_class': a class-conditional model"):
        load_config(overrides=["model.num_classes=10", "data.labels_per_class=5"])
    # through the CLI: refused before a run directory exists
    assert main(["train", CONFIG, *TINY, "data.labels_per_class=500", f"run.dir={tmp_path / 'run'}"]) == 2
    assert not (tmp_path / "run").exists()


def test_test_accuracy_is_an_evaluation_metric_and_the_report_shows_it(tmp_path):
    run_dir = tmp_path / "run"
    result = train(load_config(CONFIG, [*TINY, "eval.at_end=true", "eval.metrics=[fid]",
                                        "eval.num_samples=64", "tracking.report=true", f"run.dir={run_dir}"]))
    (record,) = [json.loads(line) for line in (run_dir / "eval" / "metrics.jsonl").read_text().splitlines()]
    assert {"fid", "raw/fid", "test_accuracy"} <= set(record) and record["iteration"] == 3
    # the held-out accuracy of the checkpoint's D, computed here directly
    module = load_module(result.checkpoint).eval()
    datamodule = DataModule(module.cfg.data, seed=0)
    datamodule.setup("validate")
    correct = sum(int((module.encode_features(x)["logits"].argmax(1) == y).sum()) for x, y in datamodule.val_dataloader())
    assert record["test_accuracy"] == pytest.approx(correct / len(datamodule.val_set), abs=1e-12)
    features = module.encode_features(torch.zeros(2, 1, 8, 8))
    assert list(features) == ["features", "logits"] and features["logits"].shape == (2, 10)
    assert module.sample(4).shape == (4, 1, 8, 8) and module.num_classes == 0  # G is unconditional
    report = (run_dir / "report.html").read_text()
    assert "plots/eval_test_accuracy.png" in report and "plots/semi_supervised.png" in report
    assert "semi-supervised GAN" in report and (run_dir / "plots" / "eval_test_accuracy.png").is_file()
    rows = (run_dir / "metrics.csv").read_text().splitlines()[0]
    assert all(key in rows for key in ("train/d_supervised", "train/d_unsupervised", "train/labelled_accuracy"))


def test_ssgan_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="'loss.generator': 'minimax' is not one of feature_matching, nsgan"):
        load_config(CONFIG, ["loss.generator=minimax"])
    with pytest.raises(ConfigError, match="'data.val_fraction'"):
        load_config(CONFIG, ["data.val_fraction=0"])
    cfg = load_config(CONFIG, [*TINY, "model.classes=7"])
    with pytest.raises(ConfigError, match="'model.classes': 7 does not match the 10 classes"):
        train(cfg)
    assert np.isclose(load_config(CONFIG).data.val_fraction, 0.3)
