"""Gradient all-reduce overlapped with backward vs one flat all-reduce at the step
(`trainer.ddp.overlap`), 2 CPU processes over gloo, on a communication-heavy model: a wide MLP
WGAN-GP on the 2-D ring (large weight matrices, small batch: little compute per byte of
gradient).

    python benchmarks/ddp_overlap.py [--iterations 60] [--warmup 10] [--trials 3] [--width 1024] [key=value ...]

Each trial runs both settings back to back (order alternating between trials), each a fresh
`torchrun` of benchmarks/scaling.py's worker; the ratio is the median of the pairs' ratios.
Prints every pair and a table in ms per iteration.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scaling import time_ours_two_processes  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--width", type=int, default=1024, help="hidden units of G's and D's MLPs")
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
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
