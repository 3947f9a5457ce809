"""A small GAN-quality study: does augmenting what D sees (DiffAugment, ADA) or R1 help, on the
digits and on a 10% subset of them? FID (the digits extractor, 2,000 samples, the EMA generator)
at equal iterations, median and spread over seeds. Not a timed test: it trains many runs.

    python benchmarks/gan_study.py --out study/ [--steps 1000] [--seeds 0,1,2] [--workers 2]
    python benchmarks/gan_study.py --out study/ --table        # the markdown table of what ran

Each run is `dgm-scale train` with the overrides below into OUT/runs/<name>; finished runs are
kept in OUT/results.jsonl and skipped when the script runs again (it can be stopped and resumed).
With --workers 2 two runs train side by side, one thread each (FID is what is measured here, not
speed). The late-training averages of D's outputs, r_t and ADA's p are kept to explain the table.
"""
from __future__ import annotations

import argparse
import csv
import itertools
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODELS = {  # the loss / architecture axis
    "nsgan": ["loss.name=nonsaturating"],
    "hinge": ["loss.name=hinge"],
    "stylegan2": [str(ROOT / "configs" / "stylegan2.yaml"), "loss.r1_gamma=0"],  # R1 is its own axis here
}
AUGMENTATIONS = {
    "none": [],
    "diffaugment": ["aug.policy=[translation,cutout]"],
    "ada": ["aug.ada=true"],
}
REGULARISERS = {"none": ["loss.r1_gamma=0"], "r1": ["loss.r1_gamma=0.01", "loss.r1_interval=4"]}
DATASETS = {"digits": ["data.subset=1.0"], "digits10": ["data.subset=0.1"]}
LATE_KEYS = ("train/d_real", "train/d_fake", "aug/p", "aug/rt")


def points(seeds: list[int]) -> list[dict]:
    """Every (dataset, model, augmentation, regulariser, seed) of the study: seed by seed, the
    10% subset first, so that a study stopped early has whole seeds of the limited-data case."""
    return [{"dataset": d, "model": m, "aug": a, "reg": r, "seed": s}
            for s, d, m, a, r in itertools.product(seeds, reversed(DATASETS), MODELS, AUGMENTATIONS, REGULARISERS)]


def name_of(point: dict) -> str:
    return f"{point['dataset']}-{point['model']}-{point['aug']}-{point['reg']}-s{point['seed']}"


def command(point: dict, out: Path, steps: int) -> list[str]:
    model = MODELS[point["model"]]
    config, overrides = (model[0], model[1:]) if model[0].endswith(".yaml") else (None, model)
    return [sys.executable, "-m", "dgm_scale.cli", "train", *([config] if config else []), *overrides,
            *AUGMENTATIONS[point["aug"]], *REGULARISERS[point["reg"]], *DATASETS[point["dataset"]],
            f"run.seed={point['seed']}", f"trainer.max_steps={steps}", "eval.every=0", "eval.at_end=true",
            "eval.num_samples=2000", f"run.sample_every={steps}", f"run.checkpoint_every={steps}",
            "tracking.wandb.mode=disabled", "tracking.report=false", "trainer.progress_bar=false",
            f"run.dir={out / 'runs' / name_of(point)}"]


def late_averages(run_dir: Path) -> dict:
    """Means over the last 10% of the logged rows (D's outputs; ADA's p and r_t)."""
    with open(run_dir / "metrics.csv") as handle:
        rows = [row for row in csv.DictReader(handle) if row.get("train/iteration")]
    late = rows[-max(1, len(rows) // 10):]
    averages = {}
    for key in LATE_KEYS:
        values = [float(row[key]) for row in late if row.get(key) not in (None, "") and math.isfinite(float(row[key]))]
        if values:
            averages[key] = sum(values) / len(values)
    return averages


def run_one(point: dict, out: Path, steps: int, threads: int) -> dict:
    run_dir = out / "runs" / name_of(point)
    start = time.perf_counter()
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH=str(ROOT))
    log = run_dir.with_suffix(".log")
    if run_dir.exists():  # a run stopped before it was recorded: start it again from scratch
        shutil.rmtree(run_dir)
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as handle:
        code = subprocess.run(command(point, out, steps), cwd=ROOT, env=env, stdout=handle, stderr=handle).returncode
    if code != 0:
        return {**point, "error": f"exit {code}, see {log}"}
    final = json.loads((run_dir / "eval" / "metrics.jsonl").read_text().splitlines()[-1])
    return {**point, "steps": steps, "fid": final["fid"], "raw_fid": final.get("raw/fid"),
            "seconds": time.perf_counter() - start, **late_averages(run_dir)}


def done(out: Path) -> dict[str, dict]:
    path = out / "results.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
    return {name_of(r): r for r in records if "fid" in r}


def study(out: Path, steps: int, seeds: list[int], workers: int, only: str = "") -> None:
    finished = done(out)
    todo = [p for p in points(seeds) if name_of(p) not in finished and only in name_of(p)]
    print(f"{len(finished)} runs done, {len(todo)} to go")
    threads = 1 if workers > 1 else 2
    with ThreadPoolExecutor(workers) as pool, open(out / "results.jsonl", "a") as results:
        for record in pool.map(lambda p: run_one(p, out, steps, threads), todo):
            results.write(json.dumps(record) + "\n")
            results.flush()
            print(name_of(record), f"FID {record['fid']:.2f}" if "fid" in record else record["error"], flush=True)


def table(out: Path) -> str:
    """Markdown: one row per (dataset, model, regulariser), FID median / mean ± sd [min-max] per augmentation,
    and the change of the best augmentation's median against none."""
    records = list(done(out).values())
    lines = ["| data | model | R1 | none: median / mean ± sd [range] | DiffAugment | ADA | best vs none (medians) | late D(real) / D(fake) (none) | ADA p / r_t |",
             "|---|---|---|---|---|---|---|---|---|"]
    for dataset, model, reg in itertools.product(DATASETS, MODELS, REGULARISERS):
        cells, medians = [], {}
        for aug in AUGMENTATIONS:
            fids = sorted(r["fid"] for r in records if (r["dataset"], r["model"], r["reg"], r["aug"]) == (dataset, model, reg, aug))
            if fids:
                medians[aug] = statistics.median(fids)
                spread = f" ± {statistics.stdev(fids):.1f}" if len(fids) > 1 else ""
                cells.append(f"{medians[aug]:.1f} / {statistics.mean(fids):.1f}{spread} [{fids[0]:.1f}-{fids[-1]:.1f}] (n={len(fids)})")
            else:
                cells.append("-")
        if not medians:
            continue
        best = min((a for a in medians if a != "none"), key=medians.get, default=None)
        change = f"{best}: {100 * (medians[best] / medians['none'] - 1):+.0f}%" if best and "none" in medians else "-"
        base = [r for r in records if (r["dataset"], r["model"], r["reg"], r["aug"]) == (dataset, model, reg, "none")]
        ada = [r for r in records if (r["dataset"], r["model"], r["reg"], r["aug"]) == (dataset, model, reg, "ada")]
        outputs = (f"{statistics.mean(r.get('train/d_real', math.nan) for r in base):.2f} / "
                   f"{statistics.mean(r.get('train/d_fake', math.nan) for r in base):.2f}") if base else "-"
        adapt = (f"{statistics.mean(r.get('aug/p', math.nan) for r in ada):.2f} / "
                 f"{statistics.mean(r.get('aug/rt', math.nan) for r in ada):.2f}") if ada else "-"
        lines.append(f"| {dataset} | {model} | {reg} | " + " | ".join(cells) + f" | {change} | {outputs} | {adapt} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--only", default="", help="only the runs whose name contains this, e.g. digits10-nsgan")
    parser.add_argument("--table", action="store_true", help="print the table of the finished runs and exit")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.table:
        study(args.out, args.steps, [int(s) for s in args.seeds.split(",")], args.workers, args.only)
    print(table(args.out))


if __name__ == "__main__":
    main()
