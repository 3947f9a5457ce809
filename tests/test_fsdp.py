"""trainer.strategy=fsdp (FSDP2, 2 CPU processes, gloo): every family trains as under our DDP,
its DCP checkpoints survive kill -9 mid-write and reshard onto another number of processes.

Tolerance: fsdp's gathered weights after 3 iterations must equal ddp's within rtol 1e-5,
atol 1e-6 (float32). fsdp reduce-scatters D's gradient once per forward pass (real, fake: see
FSDPSteps.backward_per_pass), where ddp all-reduces their sum, so the sums round in another order
(measured: within 1e-7 relative). One exception: a parameter whose exact gradient is zero (the
bias of a convolution right before a batch norm, which removes any per-channel constant) gets
rounding noise as its gradient, which Adam normalises into steps of up to lr each, of either sign:
there the bound is 2 x lr per iteration.
"""
import json
import re
import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch

from fsdp_state import full, full_optimizer_states
from helpers import TINY, TINY_RUN, adapt, assert_same_final_run, metrics_rows, torchrun, train_here
from dgm_scale.config import ConfigError, load_config
from dgm_scale.families.gan.module import GANModule
from dgm_scale.modules import build_module, load_module

TOLERANCE = {"rtol": 1e-5, "atol": 1e-6}
CASES = {  # name: (config, overrides): every family, R1 and the gradient penalty, your own networks
    "gan_r1": ("configs/nsgan.yaml", ["loss.r1_gamma=1.0"]),
    "wgan_gp": ("configs/wgan_gp.yaml", []),
    "wgan_clipped": ("configs/wgan.yaml", []),
    "vae": ("configs/vae.yaml", []),
    "autoregressive": ("configs/autoregressive.yaml", ["model.width=8", "model.embed_dim=4"]),
    "ssgan": ("configs/ssgan.yaml", []),
    "diffusion": ("configs/diffusion.yaml", ["model.denoiser.width=8", "model.denoiser.channel_mult=[1,2]",
                                             "model.denoiser.blocks=1", "sampler.steps=3", "model.ema_decay=0.9",
                                             "model.phema.snapshot_every=2"]),  # EMA and post-hoc EMA
    "user_denoiser": ("configs/edm.yaml", ["model.denoiser.target=examples/custom_nets/denoiser.py:Denoiser",
                                           "model.denoiser.kwargs.width=8", "sampler.steps=3", "model.num_classes=10",
                                           "model.label_dropout=0.2"]),  # issue 21: your denoiser by class path
    "user_networks": ("examples/custom_nets/config.yaml", ["model.generator.kwargs.width=8",
                                                          "model.discriminator.kwargs.width=8"]),
}
ZERO_GRADIENT = {"user_networks": ("generator.blocks.1.bias", "generator_ema.blocks.1.bias")}  # conv -> BatchNorm
ASYNC = ["configs/wgan_gp.yaml", [*TINY, "trainer.devices=2", "trainer.fsdp.async_save=true"], ["fsdp"]]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """Every case under ddp, then fsdp, in one torchrun launch (tests/fsdp_worker.py); and
    wgan_gp under fsdp with asynchronous checkpoints."""
    out = tmp_path_factory.mktemp("fsdp")
    tiny = {"autoregressive": TINY_RUN, "diffusion": TINY_RUN, "user_denoiser": TINY_RUN}  # (networks: in CASES)
    cases = [[name, config, adapt(config, tiny.get(name, TINY)) + ["trainer.devices=2"] + extra]
             for name, (config, extra) in CASES.items()] + [["wgan_gp_async", *ASYNC]]
    (out / "cases.json").write_text(json.dumps(cases))
    proc = torchrun(["tests/fsdp_worker.py", str(out), str(out / "cases.json")], timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.mark.parametrize("case", CASES)
def test_fsdp_trains_every_family_as_ddp_does(case, runs):
    ddp, fsdp = (torch.load(runs / f"{case}-{strategy}.pt", weights_only=True) for strategy in ("ddp", "fsdp"))
    assert ddp["iterations"] == fsdp["iterations"] == 3
    assert fsdp["sharded"] == ["DTensor"] and ddp["sharded"] == ["Parameter"]  # really sharded, and not
    assert ddp["params"].keys() == fsdp["params"].keys()
    zero_gradient_bound = 2 * load_config(CASES[case][0]).optim.g.lr * ddp["iterations"] if case in ZERO_GRADIENT else 0
    for name, tensor in ddp["params"].items():
        tolerance = {"rtol": 0, "atol": zero_gradient_bound} if name in ZERO_GRADIENT.get(case, ()) else TOLERANCE
        torch.testing.assert_close(fsdp["params"][name], tensor, **tolerance, msg=name)
    for ddp_state, fsdp_state in zip(ddp["optimizer_states"], fsdp["optimizer_states"]):
        for name, state in ddp_state.items():
            for key, value in state.items():
                torch.testing.assert_close(fsdp_state[name][key], value, **TOLERANCE, msg=f"{name}.{key}")
    # The logged values, global gradient norms included (summed over the ranks' shards), too.
    ddp_rows, fsdp_rows = metrics_rows(runs / f"{case}-ddp"), metrics_rows(runs / f"{case}-fsdp")
    assert len(ddp_rows) == len(fsdp_rows) == 3 and ddp_rows[0].keys() == fsdp_rows[0].keys()
    assert any(key.endswith("grad_norm") for key in ddp_rows[0]) or case in ("vae", "autoregressive")  # (they log none)
    for ddp_row, fsdp_row in zip(ddp_rows, fsdp_rows):
        for key, value in ddp_row.items():
            if value == "" or fsdp_row[key] == "":  # (a diffusion noise-level bucket no sample fell into)
                assert fsdp_row[key] == value, key
                continue
            torch.testing.assert_close(float(fsdp_row[key]), float(value), **TOLERANCE, equal_nan=True, msg=key)
    # The sharded checkpoint holds the trained weights: load_module folds its DCP shards.
    reloaded = load_module(runs / f"{case}-fsdp" / "checkpoints" / "last.ckpt", trust_code=True)
    for name, param in reloaded.named_parameters():
        torch.testing.assert_close(param.detach(), fsdp["params"][name], rtol=0, atol=0, msg=name)


def test_post_hoc_ema_under_fsdp_is_ddps(runs, tmp_path):
    """The diffusion family's power-function EMAs under fsdp average each rank's shards; its
    snapshots (gathered, written by rank 0) and the checkpoint's averages (gathered) equal ddp's.
    Resumed on one process, the whole averages are cut into that process's shards again and the
    next update is the power-function EMA's: lerp(average, weights, 1 - beta(iteration))."""
    from dgm_scale.modules.phema import beta

    for name in ("phema/phema_0000002.pt", "phema/phema_0000003.pt"):
        ddp, fsdp = (torch.load(runs / f"diffusion-{strategy}" / name, weights_only=True) for strategy in ("ddp", "fsdp"))
        assert ddp["profiles"][0].keys() == fsdp["profiles"][0].keys() and len(ddp["profiles"]) == 2
        torch.testing.assert_close(fsdp["profiles"], ddp["profiles"], **TOLERANCE, msg=name)
    saved = torch.load(runs / "diffusion-fsdp" / "checkpoints" / "last.ckpt", weights_only=True)["phema"]
    ddp_saved = torch.load(runs / "diffusion-ddp" / "checkpoints" / "last.ckpt", weights_only=True)["phema"]
    torch.testing.assert_close(saved["averages"], ddp_saved["averages"], **TOLERANCE)
    run = tmp_path / "run"
    shutil.copytree(runs / "diffusion-fsdp", run)
    train_here(["configs/diffusion.yaml", *TINY_RUN, *CASES["diffusion"][1], "trainer.strategy=fsdp",
                "trainer.max_steps=4", "resume=auto"], run)
    resumed = load_module(run / "checkpoints" / "last.ckpt")
    weights = [p.detach() for p in resumed.denoiser.parameters()]
    snapshot = torch.load(run / "phema" / "phema_0000004.pt", weights_only=True)["profiles"]
    for profile, exponent, averages in zip(snapshot, resumed.phema.exponents, saved["averages"], strict=True):
        expected = [torch.lerp(a, w, 1.0 - beta(exponent, 4)) for a, w in zip(averages, weights, strict=True)]
        torch.testing.assert_close(list(profile.values()), expected, rtol=1e-6, atol=1e-7)


def test_async_checkpoints_equal_synchronous_ones(runs):
    """trainer.fsdp.async_save=true: every shard folder is written in the background while
    training goes on (the worker holds each write back until the next iteration has ended), yet
    the run and each of its checkpoints equal the synchronous run's bit for bit: a write holds
    the state at its save, not a later one."""
    from dgm_scale.distributed.dcp_checkpoint import fold

    synchronous, background = (torch.load(runs / f"{run}.pt", weights_only=True) for run in ("wgan_gp-fsdp", "wgan_gp_async-fsdp"))
    assert synchronous["background_writes"] == 0 and background["background_writes"] == 2  # iterations 2 and 3
    for name, tensor in synchronous["params"].items():
        assert torch.equal(background["params"][name], tensor), name
    assert metrics_rows(runs / "wgan_gp-fsdp") == metrics_rows(runs / "wgan_gp_async-fsdp")
    for name in ("iter_0000002.ckpt", "last.ckpt"):
        a, b = (fold(torch.load(path, weights_only=True), path.parent)
                for path in (runs / run / "checkpoints" / name for run in ("wgan_gp-fsdp", "wgan_gp_async-fsdp")))
        # The file itself, written when the save finished, holds the state at the save (the loops,
        # the data position), not a later one.
        for key in ("epoch", "global_step", "loops", "nonfinite_skips"):
            assert a[key] == b[key], (name, key)
        assert a["callbacks"]["DataPosition"] == b["callbacks"]["DataPosition"], name
        assert a["state_dict"].keys() == b["state_dict"].keys()
        torch.testing.assert_close(b["state_dict"], a["state_dict"], rtol=0, atol=0, msg=name)
        for state_a, state_b in zip(a["optimizer_states"], b["optimizer_states"], strict=True):
            torch.testing.assert_close(state_b["state"], state_a["state"], rtol=0, atol=0, msg=name)
    assert load_module(runs / "wgan_gp_async-fsdp" / "checkpoints" / "iter_0000002.ckpt").checkpoint_iteration == 2


def test_a_checkpoint_of_two_processes_resumes_on_one(runs, tmp_path, monkeypatch):
    """DCP reshards: right after loading, one process holds exactly the weights and optimizer
    states the two processes had gathered when they saved; then it trains on."""
    import lightning as L

    from helpers import with_callback

    class Loaded(L.Callback):
        def on_train_start(self, trainer, pl_module) -> None:
            self.params = {name: full(p) for name, p in pl_module.named_parameters()}
            self.states = full_optimizer_states(pl_module, trainer.strategy.optimizers)

    run = tmp_path / "run"
    shutil.copytree(runs / "wgan_gp-fsdp", run)
    saved = torch.load(runs / "wgan_gp-fsdp.pt", weights_only=True)
    loaded = Loaded()
    with_callback(loaded, monkeypatch.setattr)
    train_here(["configs/wgan_gp.yaml", *TINY, "trainer.strategy=fsdp", "trainer.max_steps=4", "resume=auto"], run)
    for name, tensor in saved["params"].items():
        torch.testing.assert_close(loaded.params[name], tensor, rtol=0, atol=0, msg=name)
    assert [sorted(state) for state in loaded.states] == [sorted(state) for state in saved["optimizer_states"]]
    for loaded_state, saved_state in zip(loaded.states, saved["optimizer_states"]):
        for name, state in saved_state.items():
            for key, value in state.items():
                torch.testing.assert_close(loaded_state[name][key], value, rtol=0, atol=0, msg=f"{name}.{key}")
    assert load_module(run / "checkpoints" / "last.ckpt").checkpoint_iteration == 4


def test_sharded_checkpoints_resume_only_under_fsdp_or_folded(runs, tmp_path):
    from dgm_scale.distributed.dcp_checkpoint import to_plain
    from dgm_scale.resume import check_compatible

    sharded = runs / "vae-fsdp" / "checkpoints" / "last.ckpt"
    config = ["configs/vae.yaml", adapt("configs/vae.yaml", TINY)]
    with pytest.raises(ConfigError, match="holds FSDP shards; resume it under fsdp, or fold it"):
        check_compatible(sharded, load_config(*config))
    check_compatible(sharded, load_config(config[0], config[1] + ["trainer.strategy=fsdp"]))
    plain = to_plain(sharded, tmp_path / "plain.ckpt")
    check_compatible(plain, load_config(*config))  # a folded one resumes under ddp
    with pytest.raises(ConfigError, match="fsdp resumes only its own sharded checkpoints"):
        check_compatible(plain, load_config(config[0], config[1] + ["trainer.strategy=fsdp"]))
    states = torch.load(plain, weights_only=True)["optimizer_states"]
    saved = torch.load(runs / "vae-fsdp.pt", weights_only=True)["optimizer_states"][0]
    names = [name for group in torch.load(plain, weights_only=True)["optimizer_states"][0]["param_groups"]
             for name in group["params"]]
    assert names == list(range(len(saved)))  # torch's own numbering
    for index, (name, state) in enumerate(saved.items()):  # in the optimizer's parameter order
        torch.testing.assert_close(states[0]["state"][index]["exp_avg"], state["exp_avg"], rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("loss", [[], ["loss.r1_gamma=1.0"], ["loss.lecam_weight=0.1"]])
def test_under_fsdp_each_forward_pass_of_d_is_backpropagated_apart_to_the_same_gradient(loss, monkeypatch):
    """FSDPSteps.backward_per_pass: D's real and fake passes reach each weight in backward calls of
    their own (so FSDP reduce-scatters each pass's gradient when it is done, instead of holding
    the unsharded sum until the other pass arrives), and the gradient is the one backward's."""
    from types import SimpleNamespace
    from dgm_scale.distributed.fsdp import FSDPSteps
    from dgm_scale.distributed.interface import StepInterface

    def d_gradients(steps: StepInterface) -> tuple[list, Counter]:
        torch.manual_seed(0)
        module = build_module(load_config(overrides=[*TINY, "model.discriminator.norm=none", *loss]))
        monkeypatch.setattr("dgm_scale.modules.base.step_interface", lambda trainer: steps)
        arrivals = Counter()  # parameter name: gradient arrivals (one per backward call reaching it)
        for name, param in module.discriminator.named_parameters():
            param.register_post_accumulate_grad_hook(lambda _, name=name: arrivals.update([name]))
        real = torch.rand(8, *module.sample_shape) * 2 - 1
        module.manual_backward = lambda total, opt: module.backward(total)  # Lightning's path ends here
        module.guarded_step = lambda *args, **kwargs: torch.zeros(())
        module.discriminator_step(real, None, SimpleNamespace(zero_grad=lambda set_to_none: None), with_logs=False)
        return [p.grad.clone() for p in module.discriminator.parameters()], arrivals

    together, arrivals_together = d_gradients(StepInterface())
    apart, arrivals_apart = d_gradients(FSDPSteps())
    assert set(arrivals_together.values()) == {1}  # one backward: autograd summed the passes first
    # apart: a backward each for the real pass, the fake pass (and R1's own, where it has a
    # second-order path: not to D's last bias)
    assert set(arrivals_apart.values()) == ({2, 3} if loss == ["loss.r1_gamma=1.0"] else {2})
    for expected, got in zip(together, apart):
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-7)


HEAP_PATTERN = """
import sys, torch
from dgm_scale.distributed.fsdp import return_freed_memory
def resident_mib():
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * 4096 / 2**20
if sys.argv[1] == "return":
    assert return_freed_memory()
gathered = torch.ones(20 << 18); del gathered  # 20 MiB, freed: glibc's threshold follows it up
before = resident_mib()
gradient, small = torch.ones(16 << 18), torch.ones(256)  # 16 MiB, then a small block after it
del gradient
print(resident_mib() - before)
"""


def test_return_freed_memory_gives_a_freed_block_back_to_the_os():
    """The pattern FSDP repeats each step: a larger buffer freed, then a smaller one allocated and
    freed while later blocks live on. glibc's default keeps the smaller one's 16 MiB."""
    import subprocess
    import sys

    kept = {mode: float(subprocess.run([sys.executable, "-c", HEAP_PATTERN, mode], check=True, text=True,
                                       capture_output=True).stdout) for mode in ("default", "return")}
    assert kept["default"] >= 15 and kept["return"] <= 1, kept


def test_fsdp_settings_are_checked():
    from dgm_scale.distributed import build_strategy
    from dgm_scale.distributed.fsdp import FullyShardedStrategy

    strategy = build_strategy(load_config(overrides=["trainer.strategy=fsdp", "trainer.fsdp.param_dtype=bfloat16",
                                                     "trainer.fsdp.reshard_after_forward=false"]).trainer, seed=0)
    assert isinstance(strategy, FullyShardedStrategy) and strategy.param_dtype == "bfloat16"
    assert strategy.reshard_after_forward is False
    for override, key in (("trainer.fsdp.param_dtype=float16", "trainer.fsdp.param_dtype"),
                          ("trainer.precision=16-mixed", "trainer.precision"),
                          ("trainer.fsdp.cpu_offload=true", "trainer.fsdp.cpu_offload")):
        with pytest.raises(ConfigError, match=f"'{key}'"):
            load_config(overrides=["trainer.strategy=fsdp", "trainer.accelerator=cpu", override])
    assert build_strategy(load_config(overrides=["trainer.strategy=fsdp", "trainer.fsdp.async_save=true"]).trainer,
                          seed=0)._saves.background
    for strategy in ("ddp", "deepspeed", "auto"):  # written synchronously there: refused, not ignored
        with pytest.raises(ConfigError, match=f"'trainer.fsdp.async_save': .* only under trainer.strategy=fsdp \\(not {strategy}\\)"):
            load_config(overrides=[f"trainer.strategy={strategy}", "trainer.fsdp.async_save=true"])


KILL_ARGS = ["configs/wgan_gp.yaml", *TINY, "loss.n_critic=2", "trainer.max_steps=4", "run.checkpoint_every=1",
             "run.sample_every=100", "run.keep_checkpoints=1", "trainer.devices=2", "trainer.strategy=fsdp"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    """The run the kill tests' victims must end as (synchronous checkpoints)."""
    from test_kill_resume import finish, launch

    reference = tmp_path_factory.mktemp("uninterrupted") / "reference"
    finish(launch(KILL_ARGS, reference, nproc=2), reference)
    return reference


def assert_checkpoints_name_complete_folders(checkpoints: Path) -> set:
    """Every checkpoint file names a shard folder whose every rank finished (DCP's .metadata is
    written last); returns the named folders."""
    from dgm_scale.distributed.dcp_checkpoint import DCP_SHARDS
    from dgm_scale.distributed.zero_checkpoint import shards_of

    named = {shards_of(path, DCP_SHARDS)["dir"] for path in checkpoints.glob("*.ckpt")}
    assert named and all((checkpoints / folder / ".metadata").is_file() for folder in named)
    return named


def test_killed_while_writing_its_shards_an_fsdp_run_resumes_exactly(uninterrupted, tmp_path):
    """Rank 1 is SIGKILLed half-way through its shard file of save 5 (iter_0000003.ckpt's; save
    2k-1 / 2k are iteration k's iter_ / last.ckpt): last.ckpt stays iteration 2's, with its whole
    shard folder; the resumed run equals the uninterrupted one bit for bit, and shard folders no
    checkpoint names (the half-written one) are deleted."""
    from test_kill_resume import checkpoint_iteration, finish, launch

    victim = tmp_path / "victim"
    killed = launch(KILL_ARGS, victim, nproc=2, driver="tests/kill_in_save.py", env={"DGM_TEST_KILL_IN_SHARDS": "5"})
    assert killed.wait(timeout=180) != 0
    checkpoints = victim / "checkpoints"
    assert checkpoint_iteration(victim) == 2
    # (rank 0, whose collective failed, may have deleted the half folder on its way out)
    assert_checkpoints_name_complete_folders(checkpoints)
    finish(launch([*KILL_ARGS, "resume=auto"], victim, nproc=2), victim)
    assert_same_final_run(uninterrupted, victim, 4)
    named = assert_checkpoints_name_complete_folders(checkpoints)
    assert {f"dcp/{folder.name}" for folder in (checkpoints / "dcp").iterdir()} == named and len(named) == 2


def killed_while_writing_in_the_background(tmp_path: Path) -> tuple:
    """trainer.fsdp.async_save: rank 1's background writer of iteration 3's shard folder (iter_
    and last.ckpt of one iteration share one) writes half its file, waits until training has gone
    on to iteration 4, then the process is SIGKILLed. last.ckpt is iteration 2's (named when
    iteration 3's save finished iteration 2's), with its whole folder. Returns (run, args)."""
    from test_kill_resume import checkpoint_iteration, launch

    victim, args = tmp_path / "victim", [*KILL_ARGS, "trainer.fsdp.async_save=true"]
    killed = launch(args, victim, nproc=2, driver="tests/kill_in_save.py", env={"DGM_TEST_KILL_IN_ASYNC_SHARDS": "3"})
    assert killed.wait(timeout=180) != 0
    checkpoints = victim / "checkpoints"
    assert (checkpoints / "trained_while_writing").is_file(), Path(f"{victim}.log").read_text()[-3000:]
    # (iter_0000002.ckpt is gone: with keep_checkpoints=1, the iter_ file in flight counts as the one kept)
    assert checkpoint_iteration(victim) == 2 and [p.name for p in checkpoints.glob("*.ckpt")] == ["last.ckpt"]
    assert_checkpoints_name_complete_folders(checkpoints)
    return victim, args


def test_killed_while_writing_in_the_background_an_fsdp_run_keeps_its_previous_checkpoint(tmp_path):
    killed_while_writing_in_the_background(tmp_path)


@pytest.mark.slow  # (CI: the test above, and the resume of a committed checkpoint in the synchronous kill test)
def test_killed_while_writing_in_the_background_an_fsdp_run_resumes_exactly(uninterrupted, tmp_path):
    """The run killed above, resumed (asynchronous still), ends as the synchronous uninterrupted
    one, bit for bit; only the shard folder the checkpoints name is left."""
    from test_kill_resume import finish, launch

    victim, args = killed_while_writing_in_the_background(tmp_path)
    finish(launch([*args, "resume=auto"], victim, nproc=2), victim)
    assert_same_final_run(uninterrupted, victim, 4)
    named = assert_checkpoints_name_complete_folders(victim / "checkpoints")
    checkpoints = victim / "checkpoints"
    assert {f"dcp/{folder.name}" for folder in (checkpoints / "dcp").iterdir()} == named and len(named) == 1


def test_a_signal_stop_names_the_checkpoints_written_in_the_background(tmp_path, monkeypatch):
    """trainer.fsdp.async_save, one process, SIGUSR1 in iteration 3: the run stops there and,
    by the time it returns, hpc_ckpt_1.ckpt and last.ckpt (each saved in the background, which
    starts late here) name their complete shard folders and hold iteration 3."""
    import os
    import signal

    import threading
    import time

    import lightning as L

    from dgm_scale.distributed import dcp_checkpoint
    from dgm_scale.distributed.preemption import requeue_checkpoint
    from helpers import with_callback

    class SignalAt3(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, *args) -> None:
            if pl_module.iteration + 1 == 3:
                os.kill(os.getpid(), signal.SIGUSR1)

    def late_writer(folder):  # each background write starts late: training is ahead of it
        writer = shard_writer(folder)
        plan = writer.prepare_local_plan

        def late_plan(*args):
            if threading.current_thread() is not threading.main_thread():
                time.sleep(0.3)
            return plan(*args)

        writer.prepare_local_plan = late_plan
        return writer

    with_callback(SignalAt3(), monkeypatch.setattr)
    shard_writer = dcp_checkpoint.shard_writer
    monkeypatch.setattr(dcp_checkpoint, "shard_writer", late_writer)
    run = tmp_path / "run"
    train_here(["configs/nsgan.yaml", *TINY, "trainer.strategy=fsdp", "trainer.fsdp.async_save=true",
                "trainer.max_steps=10", "run.checkpoint_every=2"], run)
    stop = requeue_checkpoint(run)
    assert stop is not None and stop.name == "hpc_ckpt_1.ckpt"
    for path in (stop, run / "checkpoints" / "last.ckpt"):
        assert load_module(path).checkpoint_iteration == 3, path
        assert_checkpoints_name_complete_folders(path.parent)


def test_a_failed_background_write_stops_the_run_naming_its_folder(tmp_path):
    """Rank 1's background write of iteration 2's shard folder fails: at the next save both ranks
    stop with one line naming the folder and the cause; last.ckpt stays iteration 1's, whole."""
    from test_kill_resume import checkpoint_iteration, launch

    run = tmp_path / "run"
    failed = launch([*KILL_ARGS, "trainer.fsdp.async_save=true"], run, nproc=2, driver="tests/kill_in_save.py",
                    env={"DGM_TEST_FAIL_IN_SHARDS": "2"})
    assert failed.wait(timeout=180) != 0
    log = Path(f"{run}.log").read_text()
    pattern = (rf"dgm-scale: error: checkpoint shard folder '{run / 'checkpoints' / 'dcp'}/[0-9a-f]+' was not written completely "
               r"\(rank 1: OSError: injected write failure\); the checkpoints before it are kept\n")
    assert len(re.findall(pattern, log)) >= 2, log[-3000:]  # both ranks (each error is one line)
    assert checkpoint_iteration(run) == 1
    assert_checkpoints_name_complete_folders(run / "checkpoints")


def test_bf16_parameters_compute_in_bf16_and_keep_float32_weights(tmp_path):
    """trainer.fsdp.param_dtype=bfloat16 on one process: the layers compute in bf16 (batch norm,
    in G here, in float32 as its statistics), the sharded weights and the checkpoint stay float32."""
    from helpers import train_computing

    result, dtypes = train_computing("configs/nsgan.yaml", [*TINY, "trainer.strategy=fsdp", "trainer.max_steps=2",
                                                            "trainer.fsdp.param_dtype=bfloat16",
                                                            f"run.dir={tmp_path / 'run'}"])
    assert dtypes == {"bfloat16"}
    reloaded = load_module(tmp_path / "run" / "checkpoints" / "last.ckpt")
    assert {p.dtype for p in reloaded.parameters()} == {torch.float32}
    assert reloaded.checkpoint_iteration == 2 and (tmp_path / "run" / "samples" / "final.png").is_file()


class GANWithALooseParameter(GANModule):
    """A parameter outside every network: FSDP would leave its gradient unsynchronised."""

    def __init__(self, config: dict):
        super().__init__(config)
        self.loose = torch.nn.Parameter(torch.zeros(1))


def test_a_parameter_outside_the_networks_is_refused(tmp_path):
    from dgm_scale.training import train

    with pytest.raises(RuntimeError, match="parameter 'loose' is in no network the module names"):
        train(load_config(overrides=[*TINY, "trainer.strategy=fsdp", "model.module=test_fsdp:GANWithALooseParameter",
                                     f"run.dir={tmp_path / 'run'}"]))
