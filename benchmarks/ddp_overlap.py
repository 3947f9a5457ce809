"""Gradient all-reduce overlapped with backward vs one flat all-reduce at the step
(`trainer.ddp.overlap`), 2 CPU processes over gloo, on a communication-heavy model: a wide MLP
WGAN-GP on the 2-D ring (large weight matrices, small batch: little compute per byte of
gradient).

    python benchmarks/ddp_overlap.py [--iterations 60] [--warmup 10] [--trials 3] [--width 1024] [key=value ...]

Each trial runs both settings back to back (order alternating between trials), each a fresh
`torchrun` of benchmarks/scaling.py's worker; the ratio is the median of the pairs' ratios.
Prints every pair and a table in ms per iteration.

`--interleaved N`: also N critic steps of the same MLP critic (forward, gradient penalty,
backward, all-reduce, Adam) in 2 spawned processes without Lightning, alternating flat and
buckets step by step, so that both see the same machine load (a shared machine drifts between
the separate runs above).
"""
from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scaling import time_ours_two_processes  # noqa: E402


def critic_steps(rank: int, port: int, width: int, depth: int, steps: int, bucket_mb: float, out: str) -> None:
    """Alternating flat / bucketed critic steps on 2 ranks; rank 0 saves each mode's step times."""
    import torch.distributed as dist

    from dgm_scale.distributed import all_reduce_gradients
    from dgm_scale.distributed.buckets import GradientBuckets

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    torch.manual_seed(0)
    layers = [torch.nn.Linear(2, width), torch.nn.LeakyReLU(0.2)]
    for _ in range(depth - 1):
        layers += [torch.nn.Linear(width, width), torch.nn.LeakyReLU(0.2)]
    critic = torch.nn.Sequential(*layers, torch.nn.Linear(width, 1))
    optimizer = torch.optim.Adam(critic.parameters(), 1e-4)
    buckets = GradientBuckets(critic.parameters(), 2, bucket_mb)
    times = {"overlap": [], "flat": []}
    for step in range(steps):
        mode = "overlap" if step % 2 == 0 else "flat"
        real, fake = torch.randn(32, 2), torch.randn(32, 2)
        dist.barrier()
        start = time.perf_counter()
        mixed = (0.5 * real + 0.5 * fake).requires_grad_(True)
        (grads,) = torch.autograd.grad(critic(mixed).sum(), mixed, create_graph=True)
        loss = critic(fake).mean() - critic(real).mean() + 10 * (grads.norm(dim=1) - 1).square().mean()
        optimizer.zero_grad(set_to_none=True)
        if mode == "overlap":
            buckets.arm()
        else:
            buckets.disarm()
        loss.backward()
        if mode == "overlap":
            buckets.finish()
        else:
            all_reduce_gradients(list(critic.parameters()), 2)
        optimizer.step()
        times[mode].append(time.perf_counter() - start)
    if rank == 0:
        torch.save(times, out)
    dist.destroy_process_group()


def interleaved(width: int, depth: int, steps: int, bucket_mb: float) -> dict:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "times.pt")
        torch.multiprocessing.spawn(critic_steps, args=(port, width, depth, steps, bucket_mb, out), nprocs=2)
        times = torch.load(out)
    warm = max(2, steps // 10)  # the first steps of each mode allocate
    return {mode: [1000 * t for t in values[warm:]] for mode, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--width", type=int, default=1024, help="hidden units of G's and D's MLPs")
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--interleaved", type=int, default=0, metavar="STEPS")
    parser.add_argument("--bucket-mb", type=float, default=2.0, help="for --interleaved")
    parser.add_argument("--skip-lightning", action="store_true")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    if args.interleaved:
        times = interleaved(args.width, args.depth, args.interleaved, args.bucket_mb)
        over, flat = (statistics.median(times[m]) for m in ("overlap", "flat"))
        print(f"interleaved critic steps (no Lightning), width {args.width}, depth {args.depth}, "
              f"bucket {args.bucket_mb} MB, {len(times['flat'])} steps each: median overlap {over:.1f} ms, "
              f"flat {flat:.1f} ms, ratio {over / flat:.3f}; quartiles overlap "
              f"{statistics.quantiles(times['overlap'], n=4)[0]:.1f}-{statistics.quantiles(times['overlap'], n=4)[2]:.1f}, "
              f"flat {statistics.quantiles(times['flat'], n=4)[0]:.1f}-{statistics.quantiles(times['flat'], n=4)[2]:.1f}")
    if args.skip_lightning:
        return
    model = [f"model.generator.width={args.width}", f"model.discriminator.width={args.width}",
             f"model.generator.depth={args.depth}", f"model.discriminator.depth={args.depth}", "data.batch_size=32",
             "trainer.log_every=50"]
    base = [f"--iterations={args.iterations}", f"--warmup={args.warmup}", "configs/ring8.yaml", *model, *args.overrides]
    pairs = []
    for trial in range(args.trials):
        order = (True, False) if trial % 2 == 0 else (False, True)
        rates = {overlap: time_ours_two_processes(base + [f"trainer.ddp.overlap={overlap}"]) for overlap in order}
        pairs.append((1000 / rates[True], 1000 / rates[False]))
    params = 2 * (args.depth - 1) * args.width ** 2  # the hidden-to-hidden weights dominate
    print(f"\nwide MLP WGAN-GP on ring8: width {args.width}, depth {args.depth} (~{params / 1e6:.1f}M parameters, "
          f"~{params * 4 / 2 ** 20:.0f} MiB of fp32 gradients per iteration), batch 32 per process, n_critic 2")
    print("pairs (overlap ms, flat ms, ratio): " + ", ".join(f"({o:.1f}, {f:.1f}, {o / f:.3f})" for o, f in pairs))
    print(f"| {'all-reduce':<34} | {'ms per iteration (median)':>26} |")
    print(f"|{'-' * 36}|{'-' * 28}|")
    print(f"| {'buckets during backward (overlap)':<34} | {statistics.median(p[0] for p in pairs):>26.1f} |")
    print(f"| {'one flat all-reduce at the step':<34} | {statistics.median(p[1] for p in pairs):>26.1f} |")
    print(f"| {'ratio overlap / flat (time)':<34} | {statistics.median(o / f for o, f in pairs):>26.3f} |")


if __name__ == "__main__":
    main()
