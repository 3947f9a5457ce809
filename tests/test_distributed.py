"""Data parallel training with 2 CPU processes (gloo): ranks agree, outputs are shared."""
import os
import subprocess

import pytest
import torch

from helpers import ROOT, TINY, adapt, free_port, torchrun
from dgm_scale.distributed import GradientAllReduceDDP, build_strategy
from dgm_scale.config import load_config
from dgm_scale.modules import build_module


def test_strategy_choice():
    assert build_strategy(load_config().trainer, seed=0) == "auto"
    assert isinstance(build_strategy(load_config(overrides=["trainer.devices=2"]).trainer, seed=0), GradientAllReduceDDP)
    assert isinstance(build_strategy(load_config(overrides=["trainer.strategy=ddp"]).trainer, seed=0), GradientAllReduceDDP)


# gan / lsgan / hinge differ from nsgan only in the (pure, unit-tested) loss: `-m slow` runs them
@pytest.mark.parametrize("variant", [*(pytest.param(v, marks=pytest.mark.slow) for v in ("gan", "lsgan", "hinge")),
                                     "nsgan", "wgan", "wgan_gp", "vae", "ssgan"])
def test_every_variant_keeps_ranks_identical(variant, tmp_path):
    proc = torchrun(["tests/ddp_worker.py", f"configs/{variant}.yaml", str(tmp_path), *adapt(f"configs/{variant}.yaml", TINY),
                     "trainer.devices=2", f"run.dir={tmp_path / 'run'}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert rank0["iterations"] == rank1["iterations"] == 3
    assert not torch.equal(rank0["noise_probe"], rank1["noise_probe"])
    assert rank0["params"].keys() == rank1["params"].keys()
    for name, tensor in rank0["params"].items():
        torch.testing.assert_close(tensor, rank1["params"][name], rtol=0, atol=0, msg=name)
    # Training moved the weights: they are not the (shared) initialisation.
    fresh = load_config(f"configs/{variant}.yaml", adapt(f"configs/{variant}.yaml", TINY))
    torch.manual_seed(0)
    assert any(not torch.equal(p, rank0["params"][n]) for n, p in build_module(fresh).named_parameters())
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["run"]


def test_torchrun_launcher_script(tmp_path):
    env = dict(os.environ, NPROC="2", MASTER_PORT=str(free_port()), OMP_NUM_THREADS="1", RUN_ID="launcher-test")
    proc = subprocess.run(["bash", "launch/torchrun.sh", "configs/nsgan.yaml", *TINY, f"run.root={tmp_path}"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = tmp_path / "nsgan-launcher-test"
    assert (run_dir / "checkpoints" / "last.ckpt").is_file() and (run_dir / "samples" / "final.png").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["nsgan-launcher-test"]  # both ranks used one run dir
    assert proc.stdout.count("done: 3 iterations") >= 1


def _average_gradients_worker(rank: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    from dgm_scale.distributed import all_reduce_gradients

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    torch.manual_seed(0)  # same model and same global batch on both ranks
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 1))
    inputs, targets = torch.randn(8, 5), torch.randn(8, 1)
    half = slice(rank * 4, rank * 4 + 4)  # each rank sees its half of the global batch
    torch.nn.functional.mse_loss(model(inputs[half]), targets[half]).backward()
    all_reduce_gradients(model.parameters(), world_size=2)
    torch.save([p.grad for p in model.parameters()], os.path.join(out_dir, f"grads{rank}.pt"))
    dist.destroy_process_group()


def test_averaged_gradients_equal_the_full_batch_gradient(tmp_path):
    torch.multiprocessing.spawn(_average_gradients_worker, args=(free_port(), str(tmp_path)), nprocs=2)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 1))
    inputs, targets = torch.randn(8, 5), torch.randn(8, 1)
    torch.nn.functional.mse_loss(model(inputs), targets).backward()
    for rank in (0, 1):
        grads = torch.load(tmp_path / f"grads{rank}.pt", weights_only=True)
        for grad, reference in zip(grads, (p.grad for p in model.parameters())):
            torch.testing.assert_close(grad, reference, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("norm", ["layer", "batch"])
def test_vae_on_two_ranks_equals_one_rank_with_the_double_batch(norm, tmp_path):
    """2 ranks x batch 8 == 1 rank x batch 16 on the same data order, after 6 iterations.

    Batch norm only with trainer.sync_batchnorm: per-rank statistics over 8 images differ from
    those over 16 by design (this test fails without it); GlobalBatchNorm's are those of the 16.
    """
    common = adapt("configs/vae.yaml", TINY + [f"model.generator.norm={norm}", f"model.discriminator.norm={norm}",
                                               "trainer.max_steps=6", "run.seed=3"])
    proc = torchrun(["tests/ddp_worker.py", "configs/vae.yaml", str(tmp_path), *common,
                     "trainer.devices=2", "data.batch_size=8", f"run.dir={tmp_path / 'ddp'}",
                     f"trainer.sync_batchnorm={norm == 'batch'}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    two_ranks = torch.load(tmp_path / "rank0.pt", weights_only=True)["params"]
    two_ranks_buffers = torch.load(tmp_path / "rank0.pt", weights_only=True)["buffers"]

    # The single-process reference reads the global batches the 2-rank run read: Lightning's
    # DistributedSampler (shuffle, seed = run.seed) hands rank r the positions r, r+2, ... of one
    # permutation; with one replica, the same permutation in order, 16 at a time.
    from torch.utils.data import DataLoader, DistributedSampler

    from dgm_scale.data import DataModule
    from dgm_scale.training import build_trainer, make_run_dir

    cfg = load_config("configs/vae.yaml", common + ["data.batch_size=16", f"run.dir={tmp_path / 'single'}"])
    import lightning as L

    L.seed_everything(cfg.run.seed, workers=True, verbose=False)
    module = build_module(cfg)
    datamodule = DataModule(cfg.data)
    datamodule.setup("fit")
    sampler = DistributedSampler(datamodule.train_set, num_replicas=1, rank=0, shuffle=True, seed=cfg.run.seed)
    loader = DataLoader(datamodule.train_set, batch_size=16, sampler=sampler, drop_last=True)
    build_trainer(cfg, module, make_run_dir(cfg)).fit(module, train_dataloaders=loader)

    assert module.iteration == 6
    for name, param in module.named_parameters():
        torch.testing.assert_close(param.detach(), two_ranks[name], rtol=1e-4, atol=1e-5, msg=name)
    for name, buffer in module.named_buffers():  # batch norm's running statistics too
        torch.testing.assert_close(buffer, two_ranks_buffers[name], rtol=1e-4, atol=1e-5, msg=name)
    # and training did move the weights away from the shared initialisation
    L.seed_everything(cfg.run.seed, verbose=False)
    assert any(not torch.allclose(p, two_ranks[n]) for n, p in build_module(cfg).named_parameters())


def test_global_batch_and_parameter_counts_are_logged(tmp_path):
    proc = torchrun(["tests/ddp_worker.py", "configs/nsgan.yaml", str(tmp_path), *TINY, "trainer.devices=2",
                     f"run.dir={tmp_path / 'run'}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    hparams = (tmp_path / "run" / "hparams.yaml").read_text()
    assert "batch/global: 16" in hparams and "batch/world_size: 2" in hparams and "batch/per_device: 8" in hparams
    assert "params/generator:" in hparams and "params/discriminator:" in hparams


@pytest.mark.parametrize("stage", [pytest.param(1, marks=pytest.mark.slow), 2])  # ZeRO-1: `-m slow`
def test_deepspeed_zero_gan_agrees_across_ranks_and_with_ddp(stage, tmp_path):
    """One DeepSpeed engine per network (G and D), WGAN-GP: ranks agree and the weights equal
    those of our DDP from the same initial weights, data and noise. Under bf16-mixed: float32
    weights and ZeRO partitions, bf16 autocast (DeepSpeed's own bf16 mode, bf16 weights, failed
    with "expected scalar type BFloat16 but found Float"), ranks identical, not the fp32 weights."""
    pytest.importorskip("deepspeed")
    runs = {}
    for name, strategy, precision in (("deepspeed", "deepspeed", "32-true"), ("ddp", "ddp", "32-true"),
                                      ("deepspeed-bf16", "deepspeed", "bf16-mixed")):
        out = tmp_path / name
        out.mkdir()
        proc = torchrun(["tests/ddp_worker.py", "configs/wgan_gp.yaml", str(out), *TINY, "trainer.devices=2",
                         f"trainer.strategy={strategy}", f"trainer.deepspeed.zero_optimization.stage={stage}",
                         f"trainer.precision={precision}", f"run.dir={out / 'run'}"])
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[name] = [torch.load(out / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    # Both networks really stepped through their own ZeRO engine (stages 1 and 2 share this class).
    assert runs["deepspeed"][0]["optimizer_types"] == runs["deepspeed-bf16"][0]["optimizer_types"] == \
        ["DeepSpeedZeroOptimizer"] * 2
    assert runs["ddp"][0]["optimizer_types"] == ["Adam"] * 2
    assert [rank["activation_dtypes"] for run in runs.values() for rank in run] == [["float32"]] * 4 + [["bfloat16"]] * 2
    # The checkpoint holds the trained weights (ZeRO-1/2 keep full weights on every rank).
    from dgm_scale.modules import load_module

    reloaded = dict(load_module(tmp_path / "deepspeed" / "run" / "checkpoints" / "last.ckpt").named_parameters())
    for name, tensor in runs["deepspeed"][0]["params"].items():
        torch.testing.assert_close(tensor, runs["deepspeed"][1]["params"][name], rtol=0, atol=0, msg=name)
        torch.testing.assert_close(tensor, runs["ddp"][0]["params"][name], rtol=1e-5, atol=1e-6, msg=name)
        torch.testing.assert_close(tensor, reloaded[name].detach(), rtol=0, atol=0, msg=name)
    bf16 = runs["deepspeed-bf16"][0]["params"]
    for name, tensor in bf16.items():
        assert tensor.dtype == torch.float32 and torch.isfinite(tensor).all(), name
        torch.testing.assert_close(tensor, runs["deepspeed-bf16"][1]["params"][name], rtol=0, atol=0, msg=name)
    assert any(not torch.equal(tensor, runs["deepspeed"][0]["params"][name]) for name, tensor in bf16.items())


def test_deepspeed_vae_uses_one_engine(tmp_path):
    pytest.importorskip("deepspeed")
    proc = torchrun(["tests/ddp_worker.py", "configs/vae.yaml", str(tmp_path), *adapt("configs/vae.yaml", TINY),
                     "trainer.devices=2",
                     "trainer.strategy=deepspeed", f"run.dir={tmp_path / 'run'}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert rank0["optimizer_types"] == ["DeepSpeedZeroOptimizer"] and rank0["iterations"] == 3
    for name, tensor in rank0["params"].items():
        torch.testing.assert_close(tensor, rank1["params"][name], rtol=0, atol=0, msg=name)


def test_zero3_is_rejected_with_the_reason():
    from dgm_scale.config import ConfigError

    with pytest.raises(ConfigError, match="trainer.deepspeed.zero_optimization.stage.*ZeRO-3"):
        load_config(overrides=["trainer.strategy=deepspeed", "trainer.deepspeed.zero_optimization.stage=3"])
