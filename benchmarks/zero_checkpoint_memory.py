"""Peak memory of each rank while a DeepSpeed ZeRO-2 checkpoint is written, 2 vs 4 processes.

    python benchmarks/zero_checkpoint_memory.py [--width 192] [--worlds 2,4] [--code DIR]

Trains a wide DCGAN (32x32 RGB) for 2 iterations under DeepSpeed ZeRO-2 on W CPU processes and
writes one checkpoint; each rank reports its resident memory just before the save and its peak
(ru_maxrss) after it. With every partition gathered onto every rank (the older code: `--code`
a checkout of it), the peak grows with the optimizer state of all ranks; with one file per rank
it should not grow with W. Prints a table. Memory, not speed: other load on the machine does not
change the numbers.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

WORKER = r"""
import json, os, resource, sys
import psutil
import dgm_scale.training as train_module
from dgm_scale.config import load_config
from lightning import Callback

class BeforeSave(Callback):
    rss = 0
    def on_train_batch_end(self, trainer, pl_module, *args):
        BeforeSave.rss = psutil.Process().memory_info().rss
build = train_module.build_callbacks
train_module.build_callbacks = lambda *a, **k: [BeforeSave()] + build(*a, **k)
out, *overrides = sys.argv[1:]
result = train_module.train(load_config(None, overrides))
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
with open(f"{out}/rank{os.environ['RANK']}.json", "w") as handle:
    json.dump({"before": BeforeSave.rss, "peak": peak}, handle)
"""


def measure(code: Path, world: int, width: int, scratch: Path) -> list[dict]:
    out = scratch / f"w{world}"
    out.mkdir(parents=True)
    overrides = ["trainer.strategy=deepspeed", f"trainer.devices={world}", "trainer.accelerator=cpu",
                 "trainer.max_steps=2", "run.checkpoint_every=2", "run.sample_every=100", "eval.every=0",
                 "eval.at_end=false", "tracking.wandb.mode=disabled", "tracking.report=false", "model.ema_decay=0",
                 "trainer.progress_bar=false", "data.resolution=32", "data.channels=3", "data.batch_size=8",
                 f"model.generator.width={width}", f"model.discriminator.width={width}", f"run.dir={out / 'run'}"]
    worker = scratch / "worker.py"
    worker.write_text(WORKER)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={world}",
                           "--master-port=29911", f"--rdzv-id=mem{world}", str(worker), str(out), *overrides],
                          cwd=code, env=dict(os.environ, PYTHONPATH=str(code), OMP_NUM_THREADS="1"),
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-2000:])
    return [json.loads((out / f"rank{rank}.json").read_text()) for rank in range(world)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=int, default=192)
    parser.add_argument("--worlds", default="2,4")
    parser.add_argument("--code", type=Path, default=ROOT, help="the checkout whose dgm_scale runs")
    args = parser.parse_args()
    print(f"code: {args.code}, DCGAN width {args.width}, 32x32 RGB, ZeRO-2")
    print("| processes | rank | RSS before the save (MiB) | peak RSS (MiB) | peak - before (MiB) |\n|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as scratch:
        for world in (int(w) for w in args.worlds.split(",")):
            for rank, r in enumerate(measure(args.code, world, args.width, Path(scratch))):
                mib = lambda v: v / 2**20  # noqa: E731
                print(f"| {world} | {rank} | {mib(r['before']):.0f} | {mib(r['peak']):.0f} | "
                      f"{mib(r['peak'] - r['before']):.0f} |")


if __name__ == "__main__":
    main()
