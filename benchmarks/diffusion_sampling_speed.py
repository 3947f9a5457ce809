"""Sampling speed of a diffusion / flow checkpoint: images/s of each sampler at NFE 10, 20 and 50,
with the denoiser eager and `torch.compile`d (issue 21).

    python benchmarks/diffusion_sampling_speed.py CKPT [--samplers ddpm,euler,heun,dpmpp_2m] [--nfe 10,20,50]
        [--batch 256] [--threads 2] [--seconds 3] [--backend inductor] [--device cpu|cuda]

Each row samples `--batch` images with `module.sample_batch` (what `dgm-scale sample`, the grids
and evaluation run) at the steps whose NFE (denoiser evaluations per sample) is the target: Heun's
steps are the most that fit, as in `diffusion_quality.py`. Compiled: the sampling network (the EMA
denoiser) replaced by `torch.compile` of it, compiled once in a warm-up that the table reports
apart; the sampler's loop stays Python. Run it alone on the machine. Not a timed test.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from diffusion_quality import SAMPLERS, nfe_of, steps_for  # noqa: E402
from sampling_speed import synchronize  # noqa: E402


def images_per_second(module, sampler: str, steps: int, batch: int, seconds: float) -> float:
    """Images/s of `sampler` in `steps` steps at batch `batch`: calls repeated for `seconds`
    (at least one), after one warm-up call."""
    device = module.device
    sample = lambda: module.sample_batch(batch, seed=0, sampler=sampler, steps=steps)  # noqa: E731
    sample()
    synchronize(device)
    calls, start = 0, time.perf_counter()
    while calls == 0 or time.perf_counter() - start < seconds:
        sample()
        calls += 1
    synchronize(device)
    return calls * batch / (time.perf_counter() - start)


def compile_sampling_network(module, backend: str) -> float:
    """Make `module` sample with a compiled copy of its sampling network; returns the seconds the
    first call (the compilation) took."""
    compiled = torch.compile(module.sampling_network(), backend=backend)
    module.sampling_network = lambda variant="": compiled
    start = time.perf_counter()
    module.sample_batch(2, seed=0)
    synchronize(module.device)
    return time.perf_counter() - start


def measure(module, samplers: list[str], nfes: list[int], batch: int, seconds: float, backend: str) -> list[dict]:
    """A row per (sampler, NFE target): steps, NFE spent, eager and compiled images/s."""
    settings = [(sampler, steps_for(module.process, sampler, nfe)) for sampler in samplers for nfe in nfes]
    rows = [{"sampler": sampler, "steps": steps, "nfe": nfe_of(module.process, sampler, steps),
             "eager": images_per_second(module, sampler, steps, batch, seconds)} for sampler, steps in settings]
    compile_s = compile_sampling_network(module, backend)
    for row in rows:
        row["compiled"] = images_per_second(module, row["sampler"], row["steps"], batch, seconds)
        row["compile_s"] = compile_s
    return rows


def main() -> None:
    from dgm_scale.modules import load_module

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint")
    parser.add_argument("--samplers", default=",".join(SAMPLERS))
    parser.add_argument("--nfe", default="10,20,50")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=3.0, help="per measurement (at least one call)")
    parser.add_argument("--backend", default="inductor", help="torch.compile's backend")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    module = load_module(args.checkpoint).eval().to(args.device)
    print(f"{args.checkpoint}: {module.cfg.loss.objective}, batch {args.batch}, {args.device}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}, compiled by {args.backend}")
    rows = measure(module, args.samplers.split(","), [int(n) for n in args.nfe.split(",")], args.batch,
                   args.seconds, args.backend)
    print(f"compilation (first call): {rows[0]['compile_s']:.1f} s")
    print("| sampler | steps | NFE | eager images/s | compiled images/s | compiled / eager |\n|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['sampler']} | {row['steps']} | {row['nfe']} | {row['eager']:,.1f} | {row['compiled']:,.1f} | "
              f"{row['compiled'] / row['eager']:.2f} |")


if __name__ == "__main__":
    main()
