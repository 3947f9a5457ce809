"""NaN/Inf guards: stop or skip a step with a non-finite loss/gradient, never checkpoint NaN weights."""
import csv
from pathlib import Path

import lightning as L
import pytest
import torch

from helpers import TINY, adapt, torchrun, with_callback
from dgm_scale.config import ConfigError, load_config
from dgm_scale.distributed.dcp_checkpoint import fold, is_sharded
from dgm_scale.distributed.zero_checkpoint import ZERO_SHARDS, read_shard
from dgm_scale.modules import load_module
from dgm_scale.modules.guards import NonFiniteError, all_finite
from dgm_scale.training import train
from nan_injection import install

COMMON = TINY + ["trainer.max_steps=6", "run.checkpoint_every=2"]


def csv_column(run_dir: Path, key: str) -> list[str]:
    with open(run_dir / "metrics.csv") as handle:
        return [row[key] for row in csv.DictReader(handle) if row.get("train/iteration")]


def adam_steps(checkpoint: Path, rank: int = 0) -> list[int]:
    """Adam's own step counter per optimizer: the steps that were really applied (under DeepSpeed
    ZeRO, read from `rank`'s partition files, which also count no step DeepSpeed itself dropped)."""
    loaded = torch.load(checkpoint, weights_only=True)
    if is_sharded(loaded):  # FSDP: rank 0's, which every rank's equals (test_nan_on_one_rank...)
        loaded = fold(loaded, checkpoint.parent)
    states = loaded["optimizer_states"]
    if ZERO_SHARDS in states[0]:
        states = [read_shard(checkpoint.parent, state[ZERO_SHARDS]["dir"], rank, index)["base_optimizer_state"]
                  for index, state in enumerate(states)]
    return [int(next(iter(state["state"].values()))["step"]) for state in states]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_all_finite_finds_any_bad_element_and_changes_nothing(dtype, bad):
    generator = torch.Generator().manual_seed(0)
    for size in (1, 33, 100_003):
        for position in (0, size // 2, size - 1):
            tensors = [torch.randn(5, 7, generator=generator).to(dtype).t(),  # non-contiguous
                       torch.randn(size, generator=generator).to(dtype), torch.tensor(2.0)]
            before = [t.clone() for t in tensors]
            assert all_finite(tensors)
            assert all(torch.equal(t, b) for t, b in zip(tensors, before))  # the check wrote 1.0 * x
            tensors[1][position] = bad
            assert not all_finite(tensors)
    loss = torch.tensor([1.0, 2.0], requires_grad=True).sum()  # in a graph: checked apart
    assert all_finite([loss]) and not all_finite([loss * bad]) and all_finite([]) and all_finite([torch.arange(3)])


@pytest.mark.parametrize("key, value, message", [
    ("trainer.nonfinite", "ignore", "trainer.nonfinite.*not one of stop, skip"),
    ("trainer.max_nonfinite_skips", "-1", "trainer.max_nonfinite_skips.*>= 0"),
    ("run.keep_checkpoints", "-2", "run.keep_checkpoints.*>= 0"),
])
def test_config_keys_are_validated(key, value, message):
    with pytest.raises(ConfigError, match=message):
        load_config(overrides=[f"{key}={value}"])


class SnapshotLast(L.Callback):
    """Keeps the bytes of last.ckpt as they are at the end of iteration `at`."""

    def __init__(self, checkpoints: Path, at: int, corrupt: bool = False):
        self.checkpoints, self.at, self.corrupt, self.bytes = checkpoints, at, corrupt, None

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        if pl_module.iteration == self.at:
            self.bytes = (self.checkpoints / "last.ckpt").read_bytes()
            if self.corrupt:  # NaN weights that no loss or gradient check could see coming
                with torch.no_grad():
                    next(pl_module.generator_ema.parameters()).fill_(float("nan"))


@pytest.mark.parametrize("variant, network", [("nsgan", "generator"), ("wgan_gp", "discriminator"),
                                              ("vae", "encoder-decoder")])
def test_stop_names_iteration_and_network_and_keeps_last_checkpoint(variant, network, tmp_path, monkeypatch):
    install(f"{network}:4", monkeypatch.setattr)
    snapshot = SnapshotLast(tmp_path / "checkpoints", at=3)
    with_callback(snapshot, monkeypatch.setattr)
    with pytest.raises(NonFiniteError, match=f"^non-finite loss in the {network} step at iteration 4 "
                                             r"\(trainer.nonfinite=stop\)$"):
        train(load_config(f"configs/{variant}.yaml", adapt(f"configs/{variant}.yaml", COMMON + [f"run.dir={tmp_path}"])))
    assert (tmp_path / "checkpoints" / "last.ckpt").read_bytes() == snapshot.bytes  # iteration 2's, untouched
    assert load_module(tmp_path / "checkpoints" / "last.ckpt").checkpoint_iteration == 2


def test_skip_leaves_steps_out_counts_them_and_keeps_weights_finite(tmp_path, monkeypatch):
    install("generator:3", monkeypatch.setattr)
    install("discriminator:5", monkeypatch.setattr)
    result = train(load_config("configs/wgan_gp.yaml", COMMON + ["trainer.nonfinite=skip", f"run.dir={tmp_path}"]))
    assert result.iterations == 6  # skipped steps still count as iterations
    # iteration 5: all 5 critic steps see the NaN loss, so 1 + 5 skips
    assert csv_column(tmp_path, "train/nonfinite_skips") == ["0.0", "0.0", "1.0", "1.0", "6.0", "6.0"]
    assert csv_column(tmp_path, "train/g_loss")[2] == "nan"
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert all(torch.isfinite(t).all() for t in load_module(last).state_dict().values() if t.is_floating_point())
    # Adam counts applied steps: G missed iteration 3's; D (n_critic 5) all of iteration 5's.
    assert adam_steps(last) == [5, 6 * 5 - 5]
    assert torch.load(last, weights_only=True)["nonfinite_skips"] == 6


def test_skip_stops_past_the_limit(tmp_path, monkeypatch):
    install("generator:2", monkeypatch.setattr)
    install("generator:3", monkeypatch.setattr)
    with pytest.raises(NonFiniteError, match="generator step at iteration 3: 2 non-finite steps, more than "
                                             "trainer.max_nonfinite_skips=1"):
        train(load_config("configs/nsgan.yaml", COMMON + ["trainer.nonfinite=skip", "trainer.max_nonfinite_skips=1",
                                                          f"run.dir={tmp_path}"]))


def test_nan_weights_are_never_checkpointed(tmp_path, monkeypatch):
    """EMA weights turned NaN after iteration 3: writing iteration 4's checkpoint is refused, and
    last.ckpt stays iteration 2's, byte for byte."""
    snapshot = SnapshotLast(tmp_path / "checkpoints", at=3, corrupt=True)
    with_callback(snapshot, monkeypatch.setattr)
    with pytest.raises(NonFiniteError, match="refusing to write checkpoint 'iter_0000004.ckpt' at iteration 4: "
                                             "'generator_ema.*' is not finite"):
        train(load_config("configs/nsgan.yaml", COMMON + [f"run.dir={tmp_path}"]))
    assert (tmp_path / "checkpoints" / "last.ckpt").read_bytes() == snapshot.bytes
    assert not (tmp_path / "checkpoints" / "iter_0000004.ckpt").exists()


def train_two_ranks_with_nan(nan_spec: str, strategy: str, policy: str, tmp_path, monkeypatch):
    """torchrun 2 processes of the tiny nsgan with a NaN injected (tests/nan_injection.py spec)."""
    if strategy == "deepspeed":
        pytest.importorskip("deepspeed")
    monkeypatch.setenv("DGM_TEST_NAN", nan_spec)
    return torchrun(["tests/ddp_worker.py", "configs/nsgan.yaml", str(tmp_path), *COMMON, "trainer.devices=2",
                     f"trainer.strategy={strategy}", f"trainer.nonfinite={policy}", f"run.dir={tmp_path / 'run'}"],
                    timeout=150)


def assert_ranks_identical_and_finite(out_dir: Path) -> None:
    rank0, rank1 = (torch.load(out_dir / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    for name, tensor in rank0["params"].items():
        torch.testing.assert_close(tensor, rank1["params"][name], rtol=0, atol=0, msg=name)
        assert tensor.isfinite().all(), name


@pytest.mark.parametrize("policy, strategy", [("skip", "ddp"), ("stop", "ddp"), ("skip", "fsdp"), ("stop", "fsdp"),
                                              pytest.param("skip", "deepspeed", marks=pytest.mark.slow)])
def test_nan_on_one_rank_gives_the_same_decision_on_both(policy, strategy, tmp_path, monkeypatch):
    """2 processes, a NaN generator loss on rank 1 only: both ranks skip the step (and stay
    identical), or both stop with the error - no hang in the next collective. Under DeepSpeed
    ZeRO-2 the skipped step's reduced gradient must not leak into the next step either. Under
    fsdp each rank holds its own shard of the weights and of Adam's state: every rank's Adam
    must have left the step out (a rank that applied it would hold NaN or other weights)."""
    proc = train_two_ranks_with_nan("generator:2:1", strategy, policy, tmp_path, monkeypatch)
    if policy == "stop":
        assert proc.returncode != 0
        # Rank 0's own loss is finite; under fsdp, the reduce-scatter hands it a NaN gradient shard.
        seen_by_rank_0 = "gradient" if strategy == "fsdp" else "loss or gradient on another rank"
        assert proc.stderr.count(f"NonFiniteError: non-finite {seen_by_rank_0} in the generator step "
                                 "at iteration 2") >= 1, proc.stderr[-3000:]
        assert proc.stderr.count("NonFiniteError: non-finite loss in the generator step at iteration 2") >= 1
        return
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_ranks_identical_and_finite(tmp_path)
    assert csv_column(tmp_path / "run", "train/nonfinite_skips") == ["0.0"] + ["1.0"] * 5
    for rank in (0, 1):  # G missed iteration 2's step, and only that one
        assert adam_steps(tmp_path / "run" / "checkpoints" / "last.ckpt", rank) == [5, 6]
    if strategy == "fsdp":  # each rank's own Adam, too
        assert [torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)["local_steps"] for rank in (0, 1)] == [[5, 6]] * 2


@pytest.mark.parametrize("policy, strategy", [("stop", "ddp"), ("stop", "deepspeed"), ("skip", "deepspeed")])
def test_nan_gradient_with_a_finite_loss_is_caught(policy, strategy, tmp_path, monkeypatch):
    """A NaN in one gradient on rank 1, the loss finite: the guard sees it in the gradients (under
    DeepSpeed ZeRO-2, in the engine's gradient partitions, not `.grad`) and stops naming it, or
    skips that one step (the NaN partition is dropped, not applied in the next step: a leak would
    be a second skip or NaN weights). [skip-deepspeed] is the only CI run of `nonfinite=skip`
    under DeepSpeed, hence not slow."""
    proc = train_two_ranks_with_nan("generator-gradient:2:1", strategy, policy, tmp_path, monkeypatch)
    if policy == "stop":
        assert proc.returncode != 0
        assert "NonFiniteError: non-finite gradient in the generator step at iteration 2" in proc.stderr, \
            proc.stderr[-3000:]
        return
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert csv_column(tmp_path / "run", "train/nonfinite_skips") == ["0.0"] + ["1.0"] * 5
    assert_ranks_identical_and_finite(tmp_path)
    # A NaN partition leaking into a later step would be dropped there by DeepSpeed's own
    # overflow check, silently: Adam's step counts show it.
    for rank in (0, 1):
        assert adam_steps(tmp_path / "run" / "checkpoints" / "last.ckpt", rank) == [5, 6]
