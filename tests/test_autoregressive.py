"""The autoregressive family and text data: exact likelihood, keyed sampling, text sources,
training through every path (CLI, DDP, DeepSpeed), evaluation and sampling commands."""
import io
import json
import math
import tarfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dgm_scale.cli import main
from dgm_scale.config import ConfigError, load_config
from dgm_scale.core.errors import DataError, NonFiniteError
from dgm_scale.data import DataModule
from dgm_scale.data.text import TextWindows, read_corpus, split_bounds, unigram_bits_per_char
from dgm_scale.families.autoregressive.module import image_to_symbols, symbols_to_image
from dgm_scale.modules import build_module, load_module
from dgm_scale.nets.sequence import START
from dgm_scale.score import heldout_batches
from dgm_scale.training import train
from helpers import ROOT, TINY_RUN, torchrun
from nan_injection import install

AR_TINY = TINY_RUN + ["model.width=16", "model.embed_dim=8", "model.layers=1"]
IMAGES = ["model.kind=autoregressive", *AR_TINY]
TEXT = ["model.kind=autoregressive", "data.name=text", "data.path=builtin:pydoc", "data.seq_len=16", *AR_TINY]


def test_symbols_are_the_raster_scan_of_the_8bit_levels():
    images = torch.rand(2, 3, 4, 4) * 2 - 1
    symbols = image_to_symbols(images)
    assert symbols.shape == (2, 48) and symbols.dtype == torch.int64
    assert symbols[0, 5].item() == round((images[0, 2, 0, 1].item() + 1) * 127.5)  # pixel (0, 1), blue
    torch.testing.assert_close(symbols_to_image(symbols, (3, 4, 4)), images, atol=1 / 255, rtol=0)


def test_heldout_likelihood_is_the_exact_chain_rule_of_the_sampling_path():
    """Teacher forcing (one pass) and the step-by-step path the sampler takes (carried state)
    give the same log-probability of every symbol: the likelihood is that of the sampler."""
    module = build_module(load_config(overrides=IMAGES + ["model.num_classes=10"]))
    module.eval()
    images, labels = torch.rand(3, 1, 8, 8) * 2 - 1, torch.tensor([1, 4, 9])
    nats, count = module.heldout_nll((images, labels))
    assert count == 3 * 64
    symbols = image_to_symbols(images)
    logits, state = module.rnn(torch.full((3, 1), START), labels)
    total = 0.0
    for step in range(64):
        total += F.cross_entropy(logits[:, -1], symbols[:, step], reduction="sum").item()
        logits, state = module.rnn(symbols[:, step:step + 1], labels, state, offset=step + 1)
    assert math.isclose(nats.item(), total, rel_tol=1e-5)


def test_sampling_is_keyed_to_seed_and_index_and_follows_the_temperature():
    module = build_module(load_config(overrides=IMAGES))
    whole = module.sample_batch(6, seed=2)
    assert whole.shape == (6, 1, 8, 8) and whole.min() >= -1 and whole.max() <= 1
    torch.testing.assert_close(torch.cat([module.sample_batch(2, 2, 0), module.sample_batch(4, 2, 2)]), whole,
                               rtol=0, atol=0)
    assert not torch.equal(module.sample_batch(6, seed=3), whole)
    # near-zero temperature: the most likely symbol at every step, whatever the noise (greedy decoding)
    module.eval()
    logits, state, greedy = *module.rnn(torch.full((1, 1), START)), []
    for step in range(64):
        greedy.append(logits[:, -1].argmax(-1, keepdim=True))
        logits, state = module.rnn(greedy[-1], None, state, offset=step + 1)
    expected = symbols_to_image(torch.cat(greedy, dim=1), (1, 8, 8))
    for seed in (0, 1):
        torch.testing.assert_close(module.sample_batch(1, seed=seed, temperature=1e-6), expected, rtol=0, atol=0)
    with pytest.raises(ValueError, match="prompt is for text"):
        module.sample_batch(1, prompt="hi")


def test_text_sources_split_and_windows(tmp_path):
    corpus = read_corpus("builtin:pydoc")
    assert len(corpus) > 400_000 and b"assert" in corpus[:2000].tobytes()
    (tmp_path / "a.txt").write_text("hello world " * 20)
    assert read_corpus(str(tmp_path / "a.txt")).tobytes() == b"hello world " * 20
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "1.txt").write_text("one")
    (tmp_path / "docs" / "2.txt").write_text("two")
    assert read_corpus(str(tmp_path / "docs")).tobytes() == b"one\n\ntwo"
    with tarfile.open(tmp_path / "text-000000.tar", "w") as archive:
        for name, text in (("doc1.txt", b"first"), ("doc1.json", b"{}"), ("doc2.txt", b"second")):
            info = tarfile.TarInfo(name)
            info.size = len(text)
            archive.addfile(info, io.BytesIO(text))
    assert read_corpus(str(tmp_path / "text-000000.tar")).tobytes() == b"first\n\nsecond"
    for bad, match in (("builtin:shakespeare", "unknown built-in text"), (str(tmp_path / "none"), "neither")):
        with pytest.raises(DataError, match=f"data.path.*{match}"):
            read_corpus(bad)
    data = np.arange(100, dtype=np.uint8)
    assert split_bounds(100, 0.1, "train") == (0, 90) and split_bounds(100, 0.1, "val") == (90, 100)
    windows = TextWindows(data, 0, 90, 8, shifted=True)
    first, second = windows[(0, 11)][0], windows[(0, 12)][0]
    assert first.shape == (9,) and torch.equal(first[1:], first[:-1] + 1)  # consecutive bytes
    assert torch.equal(windows[(3, 11)][0], first + 24) and not torch.equal(first, second)  # offsets per epoch
    assert int(windows[(len(windows) - 1, 12)][0][-1]) < 90  # never reads into the held-out part


def test_unigram_baseline_is_the_cross_entropy_of_the_training_frequencies():
    corpus = np.frombuffer(b"aab" * 30 + b"ab" * 5, dtype=np.uint8)  # val = the last 10 bytes
    counts = np.ones(256)
    counts[ord("a")] += 60
    counts[ord("b")] += 30
    p = counts / counts.sum()
    expected = -(5 * np.log2(p[ord("a")]) + 5 * np.log2(p[ord("b")])) / 10
    assert math.isclose(unigram_bits_per_char(corpus, 10 / 100), expected, rel_tol=1e-12)


def test_text_model_trains_evaluates_and_samples_with_a_prompt(tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert main(["train", *TEXT, "trainer.max_steps=4", "eval.at_end=true", f"run.dir={run_dir}"]) == 0
    assert "bits_per_char" in (run_dir / "eval" / "metrics.jsonl").read_text()
    assert (run_dir / "samples" / "final.txt").is_file() and "text-samples" in (run_dir / "report.html").read_text()
    ckpt = str(run_dir / "checkpoints" / "last.ckpt")
    out = tmp_path / "text.txt"
    assert main(["sample", ckpt, "--num", "3", "--prompt", "def ", "--length", "20", "--temperature", "0.5",
                 "--out", str(out)]) == 0
    samples = out.read_text(encoding="utf-8").split("\n\n")
    assert sum(sample.startswith("def ") for sample in samples) == 3
    capsys.readouterr()
    assert main(["evaluate", ckpt]) == 0
    assert "bits_per_char" in capsys.readouterr().out
    assert main(["sample", ckpt, "--variant", "raw"]) == 2
    assert main(["sample", ckpt, "--temperature", "0"]) == 2
    assert "temperature must be > 0" in capsys.readouterr().err


def summed_nll_and_dims(module, batches) -> tuple[float, int]:
    """The total -log P in nats of the 8-bit symbols of `batches` under `module`'s model, and
    how many symbols there are: the chain rule written out with torch.distributions."""
    module.eval()
    nats, dims = 0.0, 0
    with torch.no_grad():
        for images, labels in batches:
            symbols = image_to_symbols(images)
            inputs = torch.cat([torch.full_like(symbols[:, :1], START), symbols[:, :-1]], dim=1)
            logits, _ = module.rnn(inputs, labels)
            nats -= torch.distributions.Categorical(logits=logits.double()).log_prob(symbols).sum().item()
            dims += images.numel()
    return nats, dims


def test_image_model_scores_bits_per_dim_and_sample_metrics(tmp_path):
    result = train(load_config(overrides=IMAGES + ["trainer.max_steps=3", "eval.at_end=true", "eval.num_samples=50",
                                                   "model.num_classes=10", f"run.dir={tmp_path / 'run'}"]))
    record = json.loads((result.run_dir / "eval" / "metrics.jsonl").read_text().splitlines()[-1])
    assert "fid" in record
    nats, dims = summed_nll_and_dims(result.module, heldout_batches(result.module))
    assert dims == len(heldout_batches(result.module).dataset) * 64
    assert record["bits_per_dim"] == pytest.approx(nats / (dims * math.log(2)), rel=1e-6)
    assert (result.run_dir / "checkpoints" / "best.json").is_file()  # best by fid (eval.best_metric=auto)
    assert load_module(result.checkpoint).sample(10, seed=0, labels=torch.arange(10)).shape == (10, 1, 8, 8)


def test_bad_autoregressive_settings_are_named():
    for override, key in (("model.cell=transformer", "model.cell"), ("model.temperature=0", "model.temperature"),
                          ("data.seq_len=1", "data.seq_len")):
        with pytest.raises(ConfigError, match=key):
            load_config(overrides=TEXT + [override])
    with pytest.raises(ConfigError, match="data.path"):
        load_config(overrides=["model.kind=autoregressive", "data.name=text"])


@pytest.mark.parametrize("strategy", ["ddp", "deepspeed"])
def test_two_ranks_stay_identical(strategy, tmp_path):
    if strategy == "deepspeed":
        pytest.importorskip("deepspeed")
    proc = torchrun(["tests/ddp_worker.py", str(ROOT / "configs" / "char_rnn.yaml"), str(tmp_path),
                     *[o for o in TEXT if not o.startswith(("model.kind", "data.name", "data.path"))],
                     "trainer.devices=2", f"trainer.strategy={strategy}", f"run.dir={tmp_path / 'run'}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert rank0["iterations"] == rank1["iterations"] == 3
    for name, tensor in rank0["params"].items():
        torch.testing.assert_close(tensor, rank1["params"][name], rtol=0, atol=0, msg=name)
    datamodule = DataModule(load_config(ROOT / "configs" / "char_rnn.yaml").data)
    datamodule.setup("fit")
    assert datamodule.num_classes == 0


def test_bf16_training_and_the_nan_guard(tmp_path, monkeypatch):
    result = train(load_config(overrides=TEXT + ["trainer.precision=bf16-mixed", "trainer.accelerator=cpu",
                                                 f"run.dir={tmp_path / 'bf16'}"]))
    assert result.iterations == 3 and all(torch.isfinite(p).all() for p in result.module.parameters())
    install("autoregressive model:2", monkeypatch.setattr)
    with pytest.raises(NonFiniteError, match="^non-finite loss in the autoregressive model step at iteration 2 "):
        train(load_config(overrides=TEXT + [f"run.dir={tmp_path / 'nan'}"]))
    result = train(load_config(overrides=TEXT + ["trainer.nonfinite=skip", f"run.dir={tmp_path / 'skip'}"]))
    assert result.iterations == 3 and result.module.nonfinite_guard.skips == 1
