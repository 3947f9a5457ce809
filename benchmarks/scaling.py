"""Our GAN training step vs a hand-written PyTorch loop of the same model, batch and data;
then ours on 1 vs 2 CPU processes (data parallel, same per-process batch), DDP vs DeepSpeed ZeRO-2.

    python benchmarks/scaling.py [--iterations 300] [--warmup 30] [--trials 5] [--no-distributed] \
        [--compile] [--tiny] [CONFIG] [key=value ...]

Both sides build the same generator/discriminator (dgm_scale.nets), the same optimizers, the same
loss functions and read the same DataLoader; ours runs through the Lightning Trainer with the
GANModule (logging every `trainer.log_every` iterations, our callbacks), the reference is a bare
loop. Time is measured after `--warmup` iterations, over the same number of iterations, in one
process; the two sides alternate, `--trials` pairs, and the ratio reported is the median of the
pairs' ratios (CPU speed drifts by several % within minutes on shared machines; a pair measured
back to back sees the same machine). Prints a table with the ratio ours / reference (target >= 0.97),
and the same ratio of this process's CPU time per iteration (the host's work, which other processes
on a shared machine disturb far less than the wall clock).

`--tiny`: networks of width 2 on 8x8 images, batch 2, so that the compute is close to nothing and
what remains is the per-iteration host overhead; it reports ours minus the reference in ms per
iteration (target < 0.3 ms), every pair, and implies --no-distributed.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from typing import NamedTuple

import lightning as L
import torch

from dgm_scale.config import load_config
from dgm_scale.data import DataModule
from dgm_scale.losses import build_adversarial_loss, gradient_penalty
from dgm_scale.modules import build_module
from dgm_scale.modules.optim import build_optimizer
from dgm_scale.training import build_trainer, make_run_dir, quiet_lightning


class Timing(NamedTuple):
    iterations_per_second: float  # wall clock
    cpu_ms: float  # this process's CPU time per iteration (the host's work; less hit by other processes)


def clocks() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def timing(iterations: int, start: tuple[float, float]) -> Timing:
    wall, cpu = clocks()
    return Timing(iterations / (wall - start[0]), 1e3 * (cpu - start[1]) / iterations)


class SteadyStateTimer(L.Callback):
    def __init__(self, warmup: int, steps_per_iteration: int = 0):
        self.warmup, self.start, self.result = warmup, (0.0, 0.0), None
        self.steps_per_iteration = steps_per_iteration  # 0: the module counts its iterations

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        per = self.steps_per_iteration
        iteration = trainer.global_step // per if per else pl_module.iteration
        if iteration == self.warmup:
            self.start = clocks()
        elif iteration > self.warmup:
            self.result = timing(iteration - self.warmup, self.start)


def time_ours(cfg, warmup: int) -> Timing:
    module = build_module(cfg)
    datamodule = DataModule(cfg.data, batch_size=cfg.data.batch_size * module.batches_per_iteration)
    trainer = build_trainer(cfg, module, make_run_dir(cfg))
    timer = SteadyStateTimer(warmup)
    trainer.callbacks.append(timer)
    trainer.fit(module, datamodule=datamodule)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return timer.result


def time_ours_two_processes(argv: list[str]) -> float:
    """Run this script's `--ours-only` mode under torchrun with 2 processes of 1 thread each."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", f"--master-port={port}",
                   "--rdzv-id=bench", __file__, "--ours-only", out, *argv, "trainer.devices=2",
                   f"run.dir={os.path.join(tmp, 'run')}"]
        subprocess.run(command, check=True, env=dict(os.environ, OMP_NUM_THREADS="1"),
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        with open(out) as handle:
            return json.load(handle)["iterations_per_second"]


def time_reference(cfg, iterations: int, warmup: int) -> Timing:
    """The loop a user would write by hand: same nets, optimizers, losses and loader."""
    module = build_module(cfg)  # only to get identically built networks
    generator, discriminator = module.generator, module.discriminator
    opt_g = build_optimizer(generator.parameters(), cfg.optim.g)
    opt_d = build_optimizer(discriminator.parameters(), cfg.optim.d)
    losses = build_adversarial_loss(cfg.loss)
    n_critic, latent_dim = cfg.loss.n_critic, cfg.model.latent_dim
    datamodule = DataModule(cfg.data, batch_size=cfg.data.batch_size * n_critic)
    datamodule.setup("fit")
    done, start = 0, (0.0, 0.0)
    while done < iterations:
        for real_images, _ in datamodule.train_dataloader():
            for real in real_images.chunk(n_critic):
                with torch.no_grad():
                    fake = generator(torch.randn(real.shape[0], latent_dim))
                d_loss = losses.d_loss(discriminator(real).squeeze(1), discriminator(fake).squeeze(1))
                if cfg.loss.gp_weight > 0:
                    d_loss = d_loss + cfg.loss.gp_weight * gradient_penalty(discriminator, real, fake)
                opt_d.zero_grad(set_to_none=True)
                d_loss.backward()
                opt_d.step()
            fake = generator(torch.randn(real.shape[0], latent_dim))
            discriminator.requires_grad_(False)
            g_loss = losses.g_loss(discriminator(fake).squeeze(1))
            discriminator.requires_grad_(True)
            opt_g.zero_grad(set_to_none=True)
            g_loss.backward()
            opt_g.step()
            done += 1
            if done == warmup:
                start = clocks()
            if done == iterations:
                break
    return timing(iterations - warmup, start)


#: `--tiny`: the default job's networks shrunk until their compute is close to nothing
TINY = ["data.resolution=8", "data.batch_size=2", "model.generator.width=2", "model.discriminator.width=2",
        "model.latent_dim=2"]


def report_overhead(trials: list[tuple[Timing, Timing, Timing]]) -> None:
    """Per trial (ours, the reference, the reference's body in a bare LightningModule): ms per
    iteration, wall clock and this process's CPU time; ours and Lightning's overhead over the
    reference."""
    table = []
    for name, ms in (("wall", lambda t: 1e3 / t.iterations_per_second), ("CPU", lambda t: t.cpu_ms)):
        values = [(ms(ours), ms(reference), ms(bare)) for ours, reference, bare in trials]
        print(f"trials, {name} ms/it (ours, reference, bare Lightning; ours - reference): "
              + ", ".join(f"({o:.3f}, {r:.3f}, {b:.3f}; {o - r:+.3f})" for o, r, b in values))
        extra = [o - r for o, r, _ in values]
        table.append((name, *(statistics.median(v[i] for v in values) for i in range(3)),
                      statistics.median(extra), min(extra), max(extra),
                      statistics.median(b - r for _, r, b in values)))
    print(f"| {'tiny networks, ms/iteration':<27} | {'ours':>7} | {'reference':>9} | {'bare Lightning':>14} | "
          f"{'ours - reference':>16} | {'min - max':>15} | {'bare Lightning - reference':>26} |")
    print(f"|{'-' * 29}|{'-' * 9}|{'-' * 11}|{'-' * 16}|{'-' * 18}|{'-' * 17}|{'-' * 28}|")
    for name, ours, reference, bare, median, low, high, lightning in table:
        print(f"| {name + ' time (median)':<27} | {ours:>7.3f} | {reference:>9.3f} | {bare:>14.3f} | {median:>16.3f} | "
              f"{f'{low:.3f} - {high:.3f}':>15} | {lightning:>26.3f} |")


class BareLightningGAN(L.LightningModule):
    """The hand-written loop's body as a LightningModule (manual optimisation, no logging, no
    callbacks): what Lightning's loop, hooks and optimizer wrappers alone add to it."""

    def __init__(self, cfg):
        super().__init__()
        module = build_module(cfg)  # only to get identically built networks
        self.generator, self.discriminator = module.generator, module.discriminator
        self.cfg, self.losses, self.automatic_optimization = cfg, build_adversarial_loss(cfg.loss), False

    def configure_optimizers(self):
        return [build_optimizer(self.generator.parameters(), self.cfg.optim.g),
                build_optimizer(self.discriminator.parameters(), self.cfg.optim.d)]

    def training_step(self, batch, batch_idx: int) -> None:
        opt_g, opt_d = self.optimizers()
        latent_dim, discriminator = self.cfg.model.latent_dim, self.discriminator
        for real in batch[0].chunk(self.cfg.loss.n_critic):
            with torch.no_grad():
                fake = self.generator(torch.randn(real.shape[0], latent_dim))
            d_loss = self.losses.d_loss(discriminator(real).squeeze(1), discriminator(fake).squeeze(1))
            if self.cfg.loss.gp_weight > 0:
                d_loss = d_loss + self.cfg.loss.gp_weight * gradient_penalty(discriminator, real, fake)
            opt_d.zero_grad(set_to_none=True)
            self.manual_backward(d_loss)
            opt_d.step()
        fake = self.generator(torch.randn(real.shape[0], latent_dim))
        discriminator.requires_grad_(False)
        g_loss = self.losses.g_loss(discriminator(fake).squeeze(1))
        discriminator.requires_grad_(True)
        opt_g.zero_grad(set_to_none=True)
        self.manual_backward(g_loss)
        opt_g.step()


def time_bare_lightning(cfg, warmup: int) -> Timing:
    module = BareLightningGAN(cfg)
    datamodule = DataModule(cfg.data, batch_size=cfg.data.batch_size * cfg.loss.n_critic)
    timer = SteadyStateTimer(warmup, steps_per_iteration=cfg.loss.n_critic + 1)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=cfg.trainer.max_steps * (cfg.loss.n_critic + 1),
                        max_epochs=-1, logger=False, callbacks=[timer], enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        use_distributed_sampler=False, default_root_dir=cfg.run.root)
    trainer.fit(module, datamodule=datamodule)
    return timer.result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=30)
    parser.add_argument("--trials", type=int, default=5, help="alternating pairs ours / reference")
    parser.add_argument("--no-distributed", action="store_true", help="only ours vs the hand-written loop")
    parser.add_argument("--compile", action="store_true", help="also ours with trainer.compile=true vs eager "
                        "(compilation happens in the warm-up, which should be long enough to hold it)")
    parser.add_argument("--tiny", action="store_true", help="tiny networks: report the host overhead in ms/iteration")
    parser.add_argument("--ours-only", metavar="JSON", help=argparse.SUPPRESS)  # worker mode, see above
    parser.add_argument("config_and_overrides", nargs="*")
    args = parser.parse_args()
    forwarded = [f"--iterations={args.iterations}", f"--warmup={args.warmup}", *args.config_and_overrides]
    path = args.config_and_overrides[0] if args.config_and_overrides and "=" not in args.config_and_overrides[0] else None
    overrides = args.config_and_overrides[1:] if path else args.config_and_overrides
    # EMA off, no sample grids / periodic checkpoints / evaluations, no W&B (its service process
    # competes for the CPUs): the reference has none of them. metrics.csv logging stays.
    overrides = ["model.ema_decay=0", "trainer.progress_bar=false", "trainer.accelerator=cpu",
                 "tracking.wandb.mode=disabled", "eval.every=0", "eval.at_end=false",
                 f"trainer.max_steps={args.iterations}", f"run.sample_every={10 ** 9}",
                 f"run.checkpoint_every={10 ** 9}", "run.root=/tmp/dgm_scale_bench", *(TINY if args.tiny else []),
                 *overrides]
    cfg = load_config(path, overrides)
    quiet_lightning()
    if args.ours_only:
        rate = time_ours(cfg, args.warmup).iterations_per_second
        if int(os.environ.get("RANK", "0")) == 0:
            with open(args.ours_only, "w") as handle:
                json.dump({"iterations_per_second": rate}, handle)
        return
    rows, timings = [], []
    for trial in range(args.trials):  # alternate, so that machine noise hits both sides alike
        L.seed_everything(trial, verbose=False)
        reference = time_reference(cfg, args.iterations, args.warmup)
        L.seed_everything(trial, verbose=False)
        ours = time_ours(cfg, args.warmup)
        timings.append((ours, reference, time_bare_lightning(cfg, args.warmup) if args.tiny else None))
        rows.append((ours.iterations_per_second, reference.iterations_per_second))
    if args.tiny:
        report_overhead(timings)
        return
    ratio = statistics.median(o / r for o, r in rows)
    ours, reference = statistics.median(r[0] for r in rows), statistics.median(r[1] for r in rows)
    batch = cfg.data.batch_size * cfg.loss.n_critic
    print(f"\nconfig: {path or 'default'} ({cfg.loss.name}, {cfg.model.generator.arch} {cfg.data.resolution}px, "
          f"batch {cfg.data.batch_size}, n_critic {cfg.loss.n_critic}), torch threads {torch.get_num_threads()}")
    print("pairs (ours, reference, ratio): " + ", ".join(f"({o:.2f}, {r:.2f}, {o / r:.3f})" for o, r in rows))
    print(f"| {'loop':<28} | {'iterations/s (median)':>24} |")
    print(f"|{'-' * 30}|{'-' * 26}|")
    print(f"| {'dgm_scale (Lightning)':<28} | {ours:>24.2f} |")
    print(f"| {'hand-written PyTorch loop':<28} | {reference:>24.2f} |")
    print(f"| {'ratio ours / reference':<28} | {ratio:>24.3f} |")
    # This process's CPU time per iteration: what a shared machine's other processes disturb least.
    cpu = [(ours.cpu_ms, reference.cpu_ms) for ours, reference, _ in timings]
    print("pairs, CPU ms/it (ours, reference, ratio reference / ours): "
          + ", ".join(f"({o:.2f}, {r:.2f}, {r / o:.3f})" for o, r in cpu))
    print(f"| {'CPU-time ratio (median)':<28} | {statistics.median(r / o for o, r in cpu):>24.3f} |")
    if args.compile:
        compiled = [time_ours(load_config(path, overrides + ["trainer.compile=true"]),
                              args.warmup).iterations_per_second
                    for _ in range(max(1, args.trials // 2))]
        print(f"| {'dgm_scale, trainer.compile':<28} | {statistics.median(compiled):>24.2f} |")
        print(f"| {'ratio compiled / eager':<28} | {statistics.median(compiled) / ours:>24.3f} |")
        from torch._dynamo.utils import counters  # 0 when dynamo was disabled (TORCHDYNAMO_DISABLE=1)

        print(f"| {'dynamo graphs compiled':<28} | {counters['stats']['unique_graphs']:>24d} |")
    if args.no_distributed:
        return
    two_processes = max(time_ours_two_processes(forwarded) for _ in range(2))
    two_deepspeed = max(time_ours_two_processes(forwarded + ["trainer.strategy=deepspeed"]) for _ in range(2))
    print(f"\n| {'dgm_scale, data parallel':<28} | {'iterations/s':>12} | {'real images/s':>13} |")
    print(f"|{'-' * 30}|{'-' * 14}|{'-' * 15}|")
    print(f"| {'1 process x 2 threads':<28} | {ours:>12.2f} | {ours * batch:>13.0f} |")
    print(f"| {'2 processes x 1 thread':<28} | {two_processes:>12.2f} | {two_processes * batch * 2:>13.0f} |")
    print(f"| {'ratio 2 / 1 (images/s)':<28} | {'':>12} | {two_processes * 2 / ours:>13.3f} |")
    print(f"| {'2 processes, DeepSpeed Z2':<28} | {two_deepspeed:>12.2f} | {two_deepspeed * batch * 2:>13.0f} |")
    print(f"| {'ratio DeepSpeed / DDP':<28} | {'':>12} | {two_deepspeed / two_processes:>13.3f} |")


if __name__ == "__main__":
    main()
