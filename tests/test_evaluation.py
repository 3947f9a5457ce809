"""Evaluation end to end: real data subsets and per-rank shares, the Evaluator (identity and
classifier features), the cache, 2-process evaluation == one process, the training callback
(periodic metrics, best checkpoint, resume), and the `evaluate` / `train-classifier` CLI."""
import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image

from dgm_scale.cli import main
from dgm_scale.config import load_config
from dgm_scale.data.datasets import DataError
from dgm_scale.metrics import evaluation as evaluation_module
from dgm_scale.metrics.evaluation import (EvalSettings, Evaluator, evaluate_module, generated_batches, heldout_averages,
                                          heldout_likelihood)
from dgm_scale.metrics.extractors import build_extractor
from dgm_scale.metrics.probe_metric import ProbeEvaluator
from dgm_scale.metrics.real_data import rank_share, real_batches
from dgm_scale.modules import build_module, load_module
from dgm_scale.training import train

TOY = ["trainer.progress_bar=false", "data.toy_samples=2000", "model.generator.width=16",
       "model.discriminator.width=16", "model.generator.depth=1", "model.discriminator.depth=1"]


@pytest.fixture(scope="session")
def eval_cache(tmp_path_factory) -> Path:
    """One cache for the session: the digits classifier is trained once (~15 s)."""
    return tmp_path_factory.mktemp("eval-cache")


class ReplayModule:
    """A 'generator' whose sample i is row i of a fixed tensor: evaluates a known sample set
    through the sampling contract (`sample_batch`)."""

    def __init__(self, rows: torch.Tensor):
        self.rows, self.num_classes = rows, 0  # (unconditional)
        self.sample_shape = tuple(rows.shape[1:])

    def sampler_variants(self):
        return {"": "replay"}

    def sample_batch(self, num, seed=0, start=0, labels=None, variant=""):
        return self.rows[start:start + num]


@pytest.mark.parametrize("total,world", [(10, 3), (2, 4), (7, 1), (0, 2)])
def test_rank_shares_are_contiguous_balanced_and_cover_everything(total, world):
    shares = [rank_share(total, rank, world) for rank in range(world)]
    assert shares[0][0] == 0 and shares[-1][1] == total
    assert all(a[1] == b[0] for a, b in zip(shares[:-1], shares[1:], strict=True))
    sizes = [end - start for start, end in shares]
    assert max(sizes) - min(sizes) <= 1


def test_real_subset_is_seeded_and_rank_shares_concatenate_to_one_process():
    whole = torch.cat(list(real_batches("builtin:digits", (1, 8, 8), 101, seed=3, batch_size=16)))
    assert whole.shape == (101, 1, 8, 8) and whole.min() >= -1 and whole.max() <= 1
    parts = [torch.cat(list(real_batches("builtin:digits", (1, 8, 8), 101, 3, rank, 3, 16))) for rank in range(3)]
    assert torch.equal(torch.cat(parts), whole)
    other_seed = torch.cat(list(real_batches("builtin:digits", (1, 8, 8), 101, seed=4)))
    assert not torch.equal(other_seed, whole)


def test_real_data_errors_name_the_source(tmp_path):
    with pytest.raises(DataError, match="eval.num_real.*1797"):
        list(real_batches("builtin:digits", (1, 8, 8), 5000))
    assert len(torch.cat(list(real_batches("builtin:digits", (1, 8, 8), 5000, exact=False)))) == 1797
    with pytest.raises(DataError, match="nothing-here"):
        list(real_batches(str(tmp_path / "nothing-here"), (1, 8, 8), 10))


def test_generated_shares_concatenate_to_one_process():
    cfg = load_config(overrides=["data.resolution=8", "model.generator.width=4", "model.num_classes=10"])
    module = build_module(cfg)
    whole = torch.cat(list(generated_batches(module, 23, seed=1, batch_size=5)))
    parts = [torch.cat(list(generated_batches(module, 23, 1, 5, rank, 2))) for rank in range(2)]
    assert torch.allclose(torch.cat(parts), whole, atol=1e-6)


def test_a_generator_replaying_the_real_set_scores_perfectly(eval_cache):
    real = torch.cat(list(real_batches("builtin:digits", (1, 16, 16), 400, seed=0)))
    settings = EvalSettings(real="builtin:digits", extractor="digits", metrics=["fid", "pr", "is"], num_samples=400,
                            num_real=400, cache_dir=str(eval_cache), batch_size=64, options={"is_splits": 1})
    evaluator = Evaluator(settings, (1, 16, 16), torch.device("cpu"))
    perfect = evaluator.evaluate(ReplayModule(real))
    assert abs(perfect["fid"]) < 1e-6 and perfect["precision"] == 1.0 and perfect["recall"] == 1.0
    assert perfect["is_mean"] > 5.0  # 10 balanced classes, classified 97% right: IS well above 1
    noise = evaluator.evaluate(ReplayModule(torch.rand(400, 1, 16, 16) * 2 - 1))
    assert noise["fid"] > 100 * max(perfect["fid"], 1e-3) and noise["is_mean"] < perfect["is_mean"]


def test_held_out_digits_score_far_better_than_noise(eval_cache):
    """Features are meaningful: another subset of real digits is close, noise is far."""
    settings = EvalSettings(real="builtin:digits", extractor="digits", metrics=["fid", "kid"], num_samples=500,
                            num_real=500, cache_dir=str(eval_cache),
                            options={"kid_subset_size": 200, "kid_subsets": 20})
    evaluator = Evaluator(settings, (1, 16, 16), torch.device("cpu"))
    other_half = torch.cat(list(real_batches("builtin:digits", (1, 16, 16), 500, seed=99)))
    held_out = evaluator.evaluate(ReplayModule(other_half))
    blobs = evaluator.evaluate(ReplayModule(torch.rand(500, 1, 16, 16).round() * 2 - 1))
    assert held_out["fid"] * 10 < blobs["fid"] and held_out["kid_mean"] * 10 < blobs["kid_mean"]


def test_real_features_are_cached_on_disk(tmp_path, monkeypatch):
    settings = EvalSettings(real="builtin:ring8", extractor="identity", metrics=["fid"], num_samples=300,
                            num_real=300, cache_dir=str(tmp_path))
    first = Evaluator(settings, (2,), torch.device("cpu")).real_features()
    assert len(list(tmp_path.glob("real-features-*.pt"))) == 1

    def no_reading(*args, **kwargs):
        raise AssertionError("the cached features should have been used")

    monkeypatch.setattr(evaluation_module, "real_batches", no_reading)
    assert torch.equal(Evaluator(settings, (2,), torch.device("cpu")).real_features(), first)
    settings.num_real = 200  # another key: not the cached entry
    with pytest.raises(AssertionError, match="cached features"):
        Evaluator(settings, (2,), torch.device("cpu")).real_features()


class PixelEncoder(torch.nn.Module):
    """A 'model' whose features of an image are its pixels: the probe metric's plumbing alone."""

    device = torch.device("cpu")

    def encode_features(self, images, labels=None):
        return {"pixels": images.flatten(1)}


class KnownHeldout(torch.nn.Module):
    """A 'model' whose held-out numbers are known functions of each batch: the summing alone.
    Its NLL: the batch's sum plus the seed the evaluation keys it with (the batch's index), over
    one dimension per element; its scores: 'positive' in every batch, 'wide' only in batches of
    more than 4 rows."""

    device = torch.device("cpu")
    modality = "images"
    heldout_score_names = ("positive", "wide")

    def heldout_nll(self, batch, seed: int = 0):
        return batch[0].sum() + seed, batch[0].numel()

    def heldout_scores(self, batch):
        x = batch[0]
        scores = {"positive": ((x > 0).sum(), x.numel())}
        if len(x) > 4:
            scores["wide"] = ((x[:, 0] > 0).sum(), len(x))
        return scores


SIZES = (3, 5, 2, 7, 1)  # on 2 ranks: batches 0, 2, 4 (6 rows, none 'wide') and 1, 3 (12 rows)


def known_batches() -> list:
    generator = torch.Generator().manual_seed(0)
    return [(torch.randn(n, 4, generator=generator, dtype=torch.float64), torch.zeros(n)) for n in SIZES]


def heldout_numbers() -> dict:
    return {**heldout_likelihood(KnownHeldout(), known_batches()), **heldout_averages(KnownHeldout(), known_batches())}


def test_heldout_sums_are_the_closed_form():
    """heldout_likelihood / heldout_averages in one process (2 processes, uneven
    shares: test_two_processes_equal_one_process_with_uneven_shares)."""
    x = torch.cat([images for images, _ in known_batches()])
    wide = torch.cat([images[:, 0] for images, _ in known_batches() if len(images) > 4])
    expected = {"bits_per_dim": (x.sum().item() + sum(range(len(SIZES)))) / (x.numel() * math.log(2)),
                "positive": (x > 0).double().mean().item(), "wide": (wide > 0).double().mean().item()}
    assert heldout_numbers() == pytest.approx(expected, rel=1e-12)


def _evaluate_worker(rank: int, world: int, init_file: str, checkpoint: str, out: str, num: int) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        module = load_module(checkpoint)
        settings = EvalSettings(real="builtin:ring8", extractor="identity", metrics=["fid", "kid", "pr", "ndb"],
                                num_samples=num, num_real=num, cache_dir=str(Path(out).parent / "cache"),
                                batch_size=37, options={"kid_subset_size": 100, "kid_subsets": 10})
        # both samplers (the EMA and the raw generator), as a training evaluation scores them
        results = evaluate_module(module, Evaluator(settings, module.sample_shape, torch.device("cpu")))
        probe = EvalSettings(real="builtin:digits", extractor="digits", metrics=["probe"], batch_size=37,
                             options={"probe_samples": num, "probe_seeds": 2})  # uneven shares of digits
        results.update(ProbeEvaluator(probe, (1, 8, 8)).evaluate(PixelEncoder()))
        results.update(heldout_numbers())  # the held-out sums over ranks (uneven shares: SIZES)
        torch.save(results, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_two_processes_equal_one_process_with_uneven_shares(tmp_path):
    cfg = load_config("configs/ring8.yaml", TOY + ["trainer.max_steps=20", "eval.every=0", "eval.at_end=false",
                                                   "model.ema_decay=0.9", f"run.dir={tmp_path / 'run'}"])
    checkpoint = train(cfg).checkpoint
    num = 301  # odd: the shares are 151 and 150
    mp.spawn(_evaluate_worker, args=(2, str(tmp_path / "init"), str(checkpoint), str(tmp_path / "two"), num),
             nprocs=2, join=True)
    _evaluate_worker(0, 1, str(tmp_path / "init1"), str(checkpoint), str(tmp_path / "one"), num)
    one = torch.load(tmp_path / "one.0")
    two = [torch.load(tmp_path / f"two.{rank}") for rank in range(2)]
    assert two[0] == two[1]  # every rank gets rank 0's numbers
    for name in ("fid", "kid_mean", "precision", "recall", "ndb", "raw/fid", "probe_kmeans_accuracy", "probe_nmi",
                 "probe_linear_accuracy", "probe_linear_accuracy_std", "probe_pixels_linear_accuracy",
                 "bits_per_dim", "positive", "wide"):
        assert two[0][name] == pytest.approx(one[name], rel=1e-9, abs=1e-12), name


def test_training_evaluates_keeps_the_best_checkpoint_and_resumes_it(tmp_path, monkeypatch):
    common = TOY + [f"run.dir={tmp_path / 'run'}", "eval.every=10", "eval.num_samples=400",
                    f"eval.cache_dir={tmp_path / 'cache'}", "run.checkpoint_every=10"]
    cfg = load_config("configs/ring8.yaml", common + ["trainer.max_steps=20"])
    built = []
    monkeypatch.setattr(evaluation_module, "build_extractor",
                        lambda *args, **kwargs: built.append(args) or build_extractor(*args, **kwargs))
    train(cfg)
    assert len(built) == 1  # before the run directory exists; the evaluator reuses it
    run = tmp_path / "run"
    lines = [json.loads(line) for line in (run / "eval" / "metrics.jsonl").read_text().splitlines()]
    assert [line["iteration"] for line in lines] == [10, 20]
    best = json.loads((run / "checkpoints" / "best.json").read_text())
    assert best["fid"] == min(line["fid"] for line in lines)
    state = torch.load(run / "checkpoints" / "best.ckpt", weights_only=False)
    assert state["global_step"] == best["iteration"] * (cfg.loss.n_critic + 1)  # optimizer steps per iteration
    with open(run / "metrics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert {"eval/fid", "eval/precision", "eval/ndb", "perf/images_per_s", "perf/step_time_s"} <= set(rows[0])
    # One row per logged iteration: no value is repeated in later rows.
    logged = [row["train/iteration"] for row in rows if row["train/iteration"]]
    assert logged == ["10.0", "20.0"]
    assert [row["eval/fid"] != "" for row in rows].count(True) == 2
    # Resume to 30: the best-so-far comes back from the checkpoint, and no iteration is evaluated twice.
    train(load_config("configs/ring8.yaml", common + ["trainer.max_steps=30", "resume=auto"]))
    lines = [json.loads(line) for line in (run / "eval" / "metrics.jsonl").read_text().splitlines()]
    assert [line["iteration"] for line in lines] == [10, 20, 30]
    best = json.loads((run / "checkpoints" / "best.json").read_text())
    assert best["fid"] == min(line["fid"] for line in lines)


def test_evaluate_cli_prints_a_table_and_writes_json(tmp_path, capsys):
    cfg = load_config("configs/ring8.yaml", TOY + ["trainer.max_steps=5", "eval.every=0", "eval.at_end=false",
                                                   f"run.dir={tmp_path / 'run'}"])
    checkpoint = train(cfg).checkpoint
    out = tmp_path / "report.json"
    args = ["evaluate", str(checkpoint), "--num-samples", "300", "--metrics", "fid,pr",
            "--cache-dir", str(tmp_path / "cache"), "--out", str(out)]
    assert main(args) == 0
    table = capsys.readouterr().out
    assert "fid" in table and "precision" in table
    report = json.loads(out.read_text())
    assert set(report["results"]) == {"fid", "precision", "recall", "eval_seconds"}
    assert report["iteration"] == 5 and report["settings"]["num_samples"] == 300
    assert main(args[:-2] + ["--out", str(tmp_path / "again.json")]) == 0  # same seed, same numbers
    assert json.loads((tmp_path / "again.json").read_text())["results"]["fid"] == report["results"]["fid"]
    assert main(["evaluate", str(checkpoint), "--metrics", "fid,nope"]) == 2
    assert "nope" in capsys.readouterr().err
    assert main(["evaluate", str(checkpoint), "--extractor", "inception", "--cache-dir", str(tmp_path)]) == 2
    assert "'inception' scores images" in capsys.readouterr().err


def _write_shapes(root: Path, count: int) -> None:
    """Two visually distinct classes: bright squares and dark rings (random sizes, positions)."""
    rng = np.random.default_rng(0)
    for label in ("squares", "rings"):
        (root / label).mkdir(parents=True)
        for index in range(count):
            canvas = np.zeros((16, 16), np.uint8)
            lo = int(rng.integers(1, 6))
            hi = int(rng.integers(10, 15))
            if label == "squares":
                canvas[lo:hi, lo:hi] = 255
            else:
                canvas[lo:hi, lo:hi] = 255
                canvas[lo + 2:hi - 2, lo + 2:hi - 2] = 0
            Image.fromarray(canvas).save(root / label / f"{index}.png")


def test_train_classifier_cli_and_classifier_extractor(tmp_path, capsys):
    _write_shapes(tmp_path / "shapes", 60)
    out = tmp_path / "shapes-classifier.pt"
    assert main(["train-classifier", str(tmp_path / "shapes"), str(out), "--resolution", "16", "--channels", "1",
                 "--epochs", "20"]) == 0
    summary = capsys.readouterr().out
    accuracy = float(summary.split("accuracy ")[1].split()[0])
    assert accuracy >= 0.9, summary
    settings = EvalSettings(real=str(tmp_path / "shapes"), extractor=f"classifier:{out}", metrics=["fid", "is"],
                            num_samples=120, num_real=120, cache_dir=str(tmp_path / "cache"), options={"is_splits": 1})
    evaluator = Evaluator(settings, (1, 16, 16), torch.device("cpu"))
    real = torch.cat(list(real_batches(str(tmp_path / "shapes"), (1, 16, 16), 120)))
    assert evaluator.evaluate(ReplayModule(real))["is_mean"] > 1.8  # two confident, balanced classes
    assert main(["train-classifier", "builtin:ring8", str(out), "--resolution", "16", "--channels", "1"]) == 2


def test_an_empty_share_yields_zero_rows_of_the_right_width(eval_cache):
    """A rank with no samples (more ranks than samples) still joins the gathers with [0, D] rows."""
    from dgm_scale.metrics.evaluation import extract_all
    from dgm_scale.metrics.extractors import build_extractor

    extractor = build_extractor("digits", (1, 16, 16), eval_cache)
    empty = extract_all(extractor, [], (1, 16, 16), torch.device("cpu"))
    assert empty.features.shape == (0, extractor.feature_dim) and empty.logits.shape == (0, 10)
    assert list(generated_batches(ReplayModule(torch.zeros(1, 2)), 1, 0, 8, rank=1, world=2)) == []


def test_evaluate_cli_against_a_shard_set(tmp_path, eval_cache, capsys):
    """--real accepts shards (here built from the digits); the shard set's manifest keys the cache."""
    assert main(["shards", "build", "builtin:digits", str(tmp_path / "shards"), "--resolution", "8",
                 "--samples-per-shard", "500", "--quiet", "--workers", "1"]) == 0
    cfg = load_config(overrides=["data.resolution=8", "model.generator.width=4", "model.discriminator.width=4",
                                 "trainer.max_steps=2", "trainer.progress_bar=false", "eval.every=0",
                                 "eval.at_end=false", f"run.dir={tmp_path / 'run'}"])
    checkpoint = train(cfg).checkpoint
    capsys.readouterr()
    args = ["evaluate", str(checkpoint), "--real", str(tmp_path / "shards"), "--num-samples", "200",
            "--extractor", "digits", "--metrics", "fid,is", "--cache-dir", str(eval_cache)]
    assert main(args) == 0
    report = json.loads(checkpoint.with_suffix(".eval.json").read_text())
    assert report["settings"]["real"] == str(tmp_path / "shards") and report["results"]["fid"] > 0
    cached = set(eval_cache.glob("real-features-*.pt"))
    assert main(args) == 0 and set(eval_cache.glob("real-features-*.pt")) == cached  # a cache hit
    # The same images re-sharded: a new manifest, so a miss that computes and stores a new entry.
    assert main(["shards", "build", "builtin:digits", str(tmp_path / "shards"), "--resolution", "8",
                 "--samples-per-shard", "600", "--quiet", "--workers", "1", "--overwrite"]) == 0
    assert main(args) == 0 and len(set(eval_cache.glob("real-features-*.pt")) - cached) == 1
