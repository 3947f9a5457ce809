"""FID against the post-hoc EMA's width, from diffusion runs trained with model.phema.snapshot_every > 0
(configs/edm.yaml): for each run, the EMA of every width in --sigma-rels is built from the run's
snapshots (`dgm-scale ema`), sampled and scored, beside the run's fixed (ramped) EMA and its raw
denoiser at the same iteration, with the same samples' seeds and the same real features.

    python benchmarks/phema_fid.py RUN [RUN ...] [--sigma-rels 0.02,0.04,...,0.20] [--at ITER] \\
        [--num-samples 2000] [--seeds 0,1,2] [--extractor auto] [--device cpu]

Each run gets RUN/phema/fid.json (drawn by `dgm-scale report RUN`: plots/phema_fid.png) and
RUN/posthoc/ema-*.ckpt; the markdown table printed at the end has a column per run (the mean
over the sampling seeds) and their mean, and says whether the best width beats the fixed EMA.
Not a timed test: sampling thousands of images per width takes minutes on a CPU.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dgm_scale.core.files import write_json_atomic  # noqa: E402
from dgm_scale.families.diffusion.phema_cli import default_out  # noqa: E402
from dgm_scale.families.diffusion.posthoc import (FID_TABLE, base_checkpoint, chosen_iteration,  # noqa: E402
                                                  write_posthoc_checkpoint)

DEFAULT_WIDTHS = "0.02,0.03,0.04,0.05,0.06,0.08,0.10,0.12,0.15,0.20"


def scorer(module, args, seed: int):
    """An Evaluator of FID for the run of `module` (its real data; features cached on disk)."""
    import torch

    from dgm_scale.metrics.evaluation import Evaluator, eval_settings

    cfg = module.cfg
    cfg.eval.metrics, cfg.eval.num_samples, cfg.eval.seed = ["fid"], args.num_samples, seed
    if args.extractor:
        cfg.eval.extractor = args.extractor
    return Evaluator(eval_settings(cfg), module.sample_shape, torch.device(args.device))


def fid(evaluator, module, variant: str = "") -> float:
    return float(evaluator.evaluate(module, variant)["fid"])


def score_run(run_dir: Path, widths: list[float], args) -> dict:
    """FID of each width, of the fixed EMA and of the raw denoiser, each the mean over the seeds."""
    from dgm_scale.modules import load_module

    iteration = chosen_iteration(run_dir, args.at)
    base = load_module(base_checkpoint(run_dir, iteration)).to(args.device)
    posthoc = {}
    for width in widths:
        path, _ = write_posthoc_checkpoint(run_dir, width, default_out(run_dir, width, iteration), iteration)
        posthoc[width] = load_module(path).to(args.device)
    rows = {width: [] for width in widths}
    fixed, raw = [], []
    for seed in args.seeds:
        evaluator = scorer(base, args, seed)
        fixed.append(fid(evaluator, base))
        raw.append(fid(evaluator, base, "raw") if "raw" in base.sampler_variants() else float("nan"))
        for width, module in posthoc.items():
            rows[width].append(fid(evaluator, module))
            print(f"{run_dir.name} seed {seed}: sigma_rel {width:.3f} FID {rows[width][-1]:.2f} "
                  f"(fixed EMA {fixed[-1]:.2f})", flush=True)
    model = base.cfg.model
    table = {"iteration": iteration, "num_samples": args.num_samples, "seeds": args.seeds,
             "extractor": base.cfg.eval.extractor, "rest_from": str(base_checkpoint(run_dir, iteration)),
             "rows": [{"sigma_rel": width, "fid": statistics.fmean(values), "fid_by_seed": values}
                      for width, values in rows.items()],
             "fixed_ema": statistics.fmean(fixed) if model.ema_decay > 0 else None, "fixed_by_seed": fixed,
             "fixed_label": f"decay {model.ema_decay}, ramp-up {model.ema_rampup}",
             "raw": statistics.fmean(raw)}
    write_json_atomic(run_dir / FID_TABLE, table)
    return table


def markdown(tables: dict[str, dict]) -> str:
    """sigma_rel | FID of each run | mean; then the raw denoiser, the fixed EMA and the verdict."""
    names = list(tables)
    widths = [row["sigma_rel"] for row in next(iter(tables.values()))["rows"]]

    def line(label, values):
        spread = f" ± {statistics.stdev(values):.2f}" if len(values) > 1 else ""
        return f"| {label} | " + " | ".join(f"{v:.2f}" for v in values) + f" | {statistics.fmean(values):.2f}{spread} |"
    out = ["| EMA | " + " | ".join(names) + " | mean |", "|---|" + "---|" * (len(names) + 1)]
    for index, width in enumerate(widths):
        out.append(line(f"post-hoc sigma_rel {width:.3f}", [tables[n]["rows"][index]["fid"] for n in names]))
    out.append(line("raw denoiser", [tables[n]["raw"] for n in names]))
    fixed = [tables[n]["fixed_ema"] for n in names]
    if any(value is None for value in fixed):  # model.ema_decay = 0: no fixed EMA to compare with
        return "\n".join(out)
    out.append(line(f"fixed EMA ({tables[names[0]]['fixed_label']})", fixed))
    best = min(statistics.fmean(tables[n]["rows"][i]["fid"] for n in names) for i in range(len(widths)))
    verdict = "no worse than" if best <= statistics.fmean(fixed) else "WORSE than"
    return "\n".join(out) + f"\n\nbest post-hoc width (mean FID {best:.2f}) is {verdict} the fixed EMA " \
                           f"({statistics.fmean(fixed):.2f})"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, metavar="RUN")
    parser.add_argument("--sigma-rels", default=DEFAULT_WIDTHS)
    parser.add_argument("--at", type=int, help="a snapshot iteration (default: each run's newest)")
    parser.add_argument("--num-samples", type=int, default=2000)
    parser.add_argument("--seeds", default="0", help="sampling seeds, comma-separated")
    parser.add_argument("--extractor", help="default: the run's eval.extractor (digits for the digits)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    args.seeds = [int(seed) for seed in args.seeds.split(",")]
    widths = [float(width) for width in args.sigma_rels.split(",")]
    tables = {str(run.name): score_run(run, widths, args) for run in args.runs}
    print(markdown(tables))
    return 0


if __name__ == "__main__":
    sys.exit(main())
