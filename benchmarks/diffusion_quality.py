"""Issue 21's diffusion quality tables on the digits (16x16), scored as the GAN job is (the digits
classifier's FID, 2,000 samples against the 1,797 digits):

    python benchmarks/diffusion_quality.py --out DIR train --configs eps,edm,flow --seeds 0,1,2
    python benchmarks/diffusion_quality.py --out DIR fid [--samplers ddpm,euler,heun,dpmpp_2m] [--nfe 10,20,50]
    python benchmarks/diffusion_quality.py --out DIR guidance [--weights 0,1,2,4] [--config edm]
    python benchmarks/diffusion_quality.py --out DIR likelihood
    python benchmarks/diffusion_quality.py --out DIR table

`train` runs `dgm-scale train CONFIG run.seed=S` (its 3,000 iterations; no evaluation during
training) into DIR/runs/<config>-s<seed> and records its wall and CPU seconds; `guidance` trains
the class-conditional variant (model.num_classes=10, model.label_dropout, `--dropout`) first if it
is missing. `fid` scores every trained run's EMA denoiser with each sampler at each NFE (denoiser
evaluations per sample: Heun's steps are chosen so that its NFE is the largest not above the
target; its NFE is 2 steps - 1 on EDM's grid, fewer where its first steps are Euler's). `ddim`
is not a row: at its default eta 0 it is the same code as `euler`. `guidance` scores samples asked
for class i % 10 at each guidance weight: FID, and how often the digits classifier says that
class. Every finished cell is kept in DIR/*.jsonl and skipped when run again (stop and resume at
will); `table` prints the markdown tables of what is there. Not a timed test.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CONFIGS = {"eps": "configs/diffusion.yaml", "edm": "configs/edm.yaml", "flow": "configs/flow.yaml"}
SAMPLERS = ("ddpm", "euler", "heun", "dpmpp_2m")
CONDITIONAL = ["model.num_classes=10"]  # + model.label_dropout=<--dropout>
NUM_CLASSES = 10


def run_name(config: str, seed: int, conditional: bool = False) -> str:
    return f"{config}{'-cond' if conditional else ''}-s{seed}"


def read_records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def append_record(path: Path, record: dict) -> None:
    with open(path, "a") as handle:
        handle.write(json.dumps(record) + "\n")


# ----------------------------------------------------------------------------- training
def train_command(config: str, seed: int, run_dir: Path, extra: list[str]) -> list[str]:
    return [sys.executable, "-m", "dgm_scale.cli", "train", str(ROOT / CONFIGS[config]), f"run.seed={seed}",
            "eval.every=0", "eval.at_end=false", "run.sample_every=1000", "run.checkpoint_every=3000",
            "tracking.wandb.mode=disabled", "tracking.report=false", "trainer.progress_bar=false",
            *extra, f"run.dir={run_dir}"]


def children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def train_run(out: Path, config: str, seed: int, extra: list[str], conditional: bool = False) -> dict:
    """Train one run (unless DIR/train.jsonl has it) and return its record: wall and CPU seconds
    of the whole `dgm-scale train` process (start-up included)."""
    name = run_name(config, seed, conditional)
    known = {r["name"]: r for r in read_records(out / "train.jsonl")}
    if name in known:
        return known[name]
    run_dir = out / "runs" / name
    if run_dir.exists():  # stopped before it was recorded: a new run (not a resume: the timing would lie)
        import shutil
        shutil.rmtree(run_dir)
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    cpu, start = children_cpu_seconds(), time.perf_counter()
    with open(run_dir.with_suffix(".log"), "w") as log:
        code = subprocess.run(train_command(config, seed, run_dir, extra), cwd=ROOT, env=env,
                              stdout=log, stderr=log).returncode
    if code != 0:
        raise SystemExit(f"training {name} failed (exit {code}): see {run_dir.with_suffix('.log')}")
    record = {"name": name, "config": config, "seed": seed, "conditional": conditional, "overrides": extra,
              "wall_s": time.perf_counter() - start, "cpu_s": children_cpu_seconds() - cpu,
              "threads": os.environ.get("OMP_NUM_THREADS", ""), "checkpoint": str(run_dir / "checkpoints" / "last.ckpt")}
    append_record(out / "train.jsonl", record)
    print(f"trained {name}: {record['wall_s']:.0f} s wall, {record['cpu_s']:.0f} s CPU", flush=True)
    return record


# ----------------------------------------------------------------------------- scoring
def heun_nfe(process, steps: int) -> int:
    """Denoiser evaluations of `samplers.heun` (no churn) in `steps` steps: one per step, and a
    second (the correction) except into the clean data and from sigma / alpha > HEUN_RATIO_MAX."""
    from dgm_scale.families.diffusion.samplers import HEUN_RATIO_MAX, levels

    grid = levels(process, steps)
    return sum(1 + int(following.sigma != 0 and current.ratio <= HEUN_RATIO_MAX)
               for current, following in zip(grid[:-1], grid[1:]))


def steps_for(process, sampler: str, nfe: int) -> int:
    """The most steps whose NFE is at most `nfe` (a first-order or multistep sampler: `nfe`)."""
    if sampler != "heun":
        return nfe
    return max(steps for steps in range(1, nfe + 1) if heun_nfe(process, steps) <= nfe)


def nfe_of(process, sampler: str, steps: int) -> int:
    return heun_nfe(process, steps) if sampler == "heun" else steps


def load(checkpoint: str):
    from dgm_scale.modules import load_module

    return load_module(checkpoint).eval()


def evaluator_for(module, num_samples: int):
    """The run's evaluation scorer (eval.extractor auto: the digits classifier; eval.seed 0)."""
    import torch

    from dgm_scale.metrics.evaluation import Evaluator, eval_settings

    cfg = module.cfg
    cfg.eval.metrics, cfg.eval.num_samples = ["fid"], num_samples
    return Evaluator(eval_settings(cfg), module.sample_shape, torch.device("cpu"))


def score(module, evaluator, sampler: str, steps: int, guidance: float = 1.0) -> dict:
    """FID of the EMA denoiser's samples by `sampler` in `steps` steps, and (class-conditional
    models) the share of samples asked for class i % K that the digits classifier calls that class."""
    import torch

    from dgm_scale.metrics.evaluation import extract_all, generated_batches
    from dgm_scale.metrics.registry import compute_metrics
    from dgm_scale.modules.sampling import class_labels

    sampling = module.cfg.sampler
    sampling.name, sampling.steps, sampling.guidance = sampler, steps, guidance
    module.sampler_settings()  # a bad combination fails here, naming the key
    settings = evaluator.settings
    start = time.perf_counter()
    fake = extract_all(evaluator.extractor, generated_batches(module, settings.num_samples, settings.seed,
                                                              settings.batch_size), module.sample_shape,
                       torch.device("cpu"))
    result = compute_metrics(["fid"], evaluator.real_features().double(), fake.features.double())
    result["seconds"] = time.perf_counter() - start
    if module.num_classes:
        asked = class_labels(settings.num_samples, 0, module.num_classes)
        result["accuracy"] = float((fake.logits.argmax(1) == asked).float().mean())
    return result


def fid_table(out: Path, samplers: list[str], nfes: list[int], num_samples: int, only: str) -> None:
    done = {(r["name"], r["sampler"], r["nfe_target"]) for r in read_records(out / "fid.jsonl")}
    for run in read_records(out / "train.jsonl"):
        if run["conditional"] or only not in run["name"]:
            continue
        module, evaluator = None, None
        for sampler in samplers:
            for target in nfes:
                if (run["name"], sampler, target) in done:
                    continue
                if module is None:
                    module = load(run["checkpoint"])
                    evaluator = evaluator_for(module, num_samples)
                steps = steps_for(module.process, sampler, target)
                result = score(module, evaluator, sampler, steps)
                record = {"name": run["name"], "config": run["config"], "seed": run["seed"], "sampler": sampler,
                          "nfe_target": target, "steps": steps, "nfe": nfe_of(module.process, sampler, steps),
                          "num_samples": num_samples, **result}
                append_record(out / "fid.jsonl", record)
                print(f"{run['name']} {sampler} {steps} steps (NFE {record['nfe']}): FID {result['fid']:.2f} "
                      f"({result['seconds']:.0f} s)", flush=True)


def guidance_table(out: Path, config: str, seed: int, dropout: float, weights: list[float], num_samples: int,
                   extra: list[str]) -> None:
    run = train_run(out, config, seed, [*CONDITIONAL, f"model.label_dropout={dropout}", *extra], conditional=True)
    done = {(r["name"], r["guidance"]) for r in read_records(out / "guidance.jsonl")}
    module, evaluator = None, None
    for weight in weights:
        if (run["name"], weight) in done:
            continue
        if module is None:
            module = load(run["checkpoint"])
            evaluator = evaluator_for(module, num_samples)
        sampling = module.cfg.sampler
        result = score(module, evaluator, sampling.name, sampling.steps, weight)
        record = {"name": run["name"], "config": config, "seed": seed, "label_dropout": dropout, "guidance": weight,
                  "sampler": sampling.name, "steps": sampling.steps, "num_samples": num_samples, **result}
        append_record(out / "guidance.jsonl", record)
        print(f"{run['name']} guidance {weight}: FID {result['fid']:.2f}, accuracy {result['accuracy']:.3f} "
              f"({result['seconds']:.0f} s)", flush=True)


def likelihood_table(out: Path, only: str) -> None:
    """Held-out bits/dim of each unconditional run by its config's likelihood.* (the evaluation's)."""
    from dgm_scale.families.diffusion import likelihood_label
    from dgm_scale.metrics.evaluation import heldout_likelihood
    from dgm_scale.score import heldout_batches

    done = {r["name"] for r in read_records(out / "likelihood.jsonl")}
    for run in read_records(out / "train.jsonl"):
        if run["conditional"] or run["name"] in done or only not in run["name"]:
            continue
        module = load(run["checkpoint"])
        start = time.perf_counter()
        bits = heldout_likelihood(module, heldout_batches(module))["bits_per_dim"]
        cfg = module.cfg
        label = likelihood_label(lambda key, default=None: _setting(cfg, key, default))
        record = {"name": run["name"], "config": run["config"], "seed": run["seed"], "bits_per_dim": bits,
                  "method": label, "seconds": time.perf_counter() - start}
        append_record(out / "likelihood.jsonl", record)
        print(f"{run['name']}: {bits:.3f} bits/dim ({label}; {record['seconds']:.0f} s)", flush=True)


def _setting(cfg, key: str, default=None):
    value = cfg
    for part in key.split("."):
        value = getattr(value, part, None)
        if value is None:
            return default
    return value


# ----------------------------------------------------------------------------- tables
def cell(values: list[float]) -> str:
    if not values:
        return "-"
    spread = f" ± {statistics.stdev(values):.2f}" if len(values) > 1 else ""
    return f"{statistics.fmean(values):.2f}{spread} (n={len(values)})"


def quality_markdown(records: list[dict], nfes: list[int]) -> str:
    """One row per (objective, sampler): FID mean ± sd over seeds at each NFE target (the NFE
    actually spent in brackets where it differs); then the best setting at <= max NFE."""
    lines = ["| objective | sampler | " + " | ".join(f"NFE {n}" for n in nfes) + " |",
             "|---|---|" + "---|" * len(nfes)]
    means = {}
    for config in CONFIGS:
        for sampler in SAMPLERS:
            cells = []
            for target in nfes:
                rows = [r for r in records if (r["config"], r["sampler"], r["nfe_target"]) == (config, sampler, target)]
                spent = sorted({r["nfe"] for r in rows})
                note = f" [NFE {spent[0]}, {rows[0]['steps']} steps]" if spent and spent != [target] else ""
                cells.append(cell([r["fid"] for r in rows]) + note)
                if rows:
                    means[(config, sampler, target)] = (statistics.fmean(r["fid"] for r in rows), len(rows))
            if any(c != "-" for c in cells):
                lines.append(f"| {config} | {'euler (= ddim, eta 0)' if sampler == 'euler' else sampler} | "
                             + " | ".join(cells) + " |")
    if means:
        (config, sampler, target), (fid, count) = min(means.items(), key=lambda item: item[1][0])
        lines.append(f"\nbest at <= {max(nfes)} NFE: {config} {sampler} at NFE {target}: mean FID {fid:.2f} "
                     f"over {count} seed(s)")
    return "\n".join(lines)


def guidance_markdown(records: list[dict]) -> str:
    lines = ["| guidance w | FID | classifier accuracy on the asked class |", "|---|---|---|"]
    for record in sorted(records, key=lambda r: r["guidance"]):
        lines.append(f"| {record['guidance']:g} | {record['fid']:.2f} | {record['accuracy']:.3f} |")
    return "\n".join(lines)


def train_markdown(records: list[dict]) -> str:
    lines = ["| run | wall s | CPU s |", "|---|---|---|"]
    lines += [f"| {r['name']} | {r['wall_s']:.0f} | {r['cpu_s']:.0f} |" for r in records]
    return "\n".join(lines)


def likelihood_markdown(records: list[dict]) -> str:
    lines = ["| run | held-out bits/dim | what it is |", "|---|---|---|"]
    lines += [f"| {r['name']} | {r['bits_per_dim']:.3f} | {r['method']} |" for r in records]
    return "\n".join(lines)


def tables(out: Path, nfes: list[int]) -> str:
    parts = [("training", train_markdown, "train.jsonl"), ("FID against NFE", None, "fid.jsonl"),
             ("guidance", guidance_markdown, "guidance.jsonl"), ("likelihood", likelihood_markdown, "likelihood.jsonl")]
    text = []
    for title, render, file in parts:
        records = read_records(out / file)
        if records:
            body = quality_markdown(records, nfes) if render is None else render(records)
            text.append(f"### {title}\n\n{body}")
    return "\n\n".join(text)


def numbers(text: str, kind=int) -> list:
    return [kind(part) for part in text.split(",") if part.strip()]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--num-samples", type=int, default=2000)
    parser.add_argument("--nfe", default="10,20,50")
    parser.add_argument("--only", default="", help="only the runs whose name contains this")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="an extra override for the runs trained (repeatable; e.g. tiny runs in the test)")
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train")
    train.add_argument("--configs", default="eps,edm,flow")
    train.add_argument("--seeds", default="0,1,2")
    fid = commands.add_parser("fid")
    fid.add_argument("--samplers", default=",".join(SAMPLERS))
    guidance = commands.add_parser("guidance")
    guidance.add_argument("--config", default="edm", choices=sorted(CONFIGS))
    guidance.add_argument("--seed", type=int, default=0)
    guidance.add_argument("--dropout", type=float, default=0.1)
    guidance.add_argument("--weights", default="0,1,2,4")
    commands.add_parser("likelihood")
    commands.add_parser("table")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    nfes = numbers(args.nfe)
    if args.command == "train":
        for seed in numbers(args.seeds):
            for config in args.configs.split(","):
                train_run(args.out, config, seed, list(args.set))
    elif args.command == "fid":
        unknown = sorted(set(args.samplers.split(",")) - set(SAMPLERS))
        if unknown:
            raise SystemExit(f"--samplers: unknown {unknown}; this benchmark scores {list(SAMPLERS)}")
        fid_table(args.out, args.samplers.split(","), nfes, args.num_samples, args.only)
    elif args.command == "guidance":
        guidance_table(args.out, args.config, args.seed, args.dropout, numbers(args.weights, float),
                       args.num_samples, list(args.set))
    elif args.command == "likelihood":
        likelihood_table(args.out, args.only)
    print(tables(args.out, nfes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
