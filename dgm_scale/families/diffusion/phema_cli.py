"""`dgm-scale ema RUN_DIR --sigma-rel S [--at ITER] [--out FILE]`: the EMA of width S built after
training from a diffusion run's power-function EMA snapshots (posthoc.py), as a checkpoint every
other command reads."""
from __future__ import annotations

import argparse
from pathlib import Path


def add_ema_parser(commands: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `dgm-scale ema` on the CLI's subcommands (no torch import here)."""
    parser = commands.add_parser("ema", help="post-hoc EMA: a checkpoint with the EMA of any width, built from a "
                                             "diffusion run's snapshots (model.phema.snapshot_every > 0)")
    parser.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="the diffusion run's directory (with phema/)")
    parser.add_argument("--sigma-rel", type=float, required=True, metavar="S",
                        help="the EMA's width: the standard deviation of its averaging profile relative to the "
                             "training time (EDM2: 0.05-0.15 typical; up to 0.2887, the uniform average)")
    parser.add_argument("--at", type=int, metavar="ITER", help="the iteration (one with a snapshot; default the newest)")
    parser.add_argument("--out", type=Path, metavar="FILE",
                        help="the checkpoint (default RUN_DIR/posthoc/ema-S-ITER.ckpt)")
    parser.set_defaults(func=cmd_ema)
    return parser


def default_out(run_dir: Path, sigma_rel: float, iteration: int) -> Path:
    return Path(run_dir) / "posthoc" / f"ema-{sigma_rel:.3f}-{iteration:07d}.ckpt"


def cmd_ema(args: argparse.Namespace) -> int:
    from dgm_scale.core.errors import ConfigError
    from dgm_scale.families.diffusion.posthoc import chosen_iteration, check_sigma_rel, write_posthoc_checkpoint

    if not (args.run_dir / "config.yaml").is_file():
        raise ConfigError(f"'{args.run_dir}' is not a run directory (no config.yaml)")
    check_sigma_rel(args.sigma_rel)
    out = args.out or default_out(args.run_dir, args.sigma_rel, chosen_iteration(args.run_dir, args.at))
    path, record = write_posthoc_checkpoint(args.run_dir, args.sigma_rel, out, args.at)
    print(f"wrote {path}: the EMA of sigma_rel {record['sigma_rel']} at iteration {record['iteration']} from "
          f"{len(record['inputs'])} snapshot profiles (their combined profile is {record['profile_error']:.1%} from the "
          f"wanted one, relative L2); the rest of the model from {record['rest_from']}")
    return 0
