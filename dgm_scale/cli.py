"""The command line: thin wrappers around config loading, `train`, and sampling."""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import List, Optional, Sequence

from dgm_scale.config import ConfigError, load_config, to_yaml


def _split_config_args(args: Sequence[str]) -> tuple[Optional[str], List[str]]:
    """`[CONFIG] [key=value ...]`: the first argument is a config file unless it is an override."""
    if args and "=" not in args[0]:
        return args[0], list(args[1:])
    return None, list(args)


def cmd_train(args: argparse.Namespace) -> int:
    from dgm_scale.train import quiet_lightning, train  # heavy imports only for commands that need them

    quiet_lightning()
    from dgm_scale.distributed import launch_env

    path, overrides = _split_config_args(args.config_and_overrides)
    result = train(load_config(path, overrides))
    if launch_env().global_rank > 0:
        return 0
    print(f"done: {result.iterations} iterations in {result.seconds:.1f} s "
          f"({result.images_per_second:.0f} images/s)\n"
          f"  run directory: {result.run_dir}\n"
          f"  checkpoint:    {result.checkpoint}\n"
          f"  samples:       {result.samples}\n"
          f"  metrics:       {result.run_dir / 'metrics.csv'}")
    return 0


def cmd_show_config(args: argparse.Namespace) -> int:
    path, overrides = _split_config_args(args.config_and_overrides)
    print(to_yaml(load_config(path, overrides)), end="")
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    from dgm_scale.modules import load_module
    from dgm_scale.tracking import samples_to_image, save_png_atomic

    if args.num < 1:
        raise ConfigError(f"--num must be >= 1, got {args.num}")
    module = load_module(args.checkpoint)
    samples = module.sample(args.num, seed=args.seed)
    out = save_png_atomic(samples_to_image(samples), args.out)
    print(f"wrote {args.num} samples to {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dgm-scale", description="Train and sample deep generative models.")
    commands = parser.add_subparsers(dest="command", required=True)
    train_p = commands.add_parser("train", help="train a model: dgm-scale train [CONFIG.yaml] [key=value ...]")
    train_p.add_argument("config_and_overrides", nargs="*", metavar="[CONFIG] [key=value]")
    train_p.set_defaults(func=cmd_train)
    show_p = commands.add_parser("show-config", help="print the resolved config")
    show_p.add_argument("config_and_overrides", nargs="*", metavar="[CONFIG] [key=value]")
    show_p.set_defaults(func=cmd_show_config)
    sample_p = commands.add_parser("sample", help="generate a grid of samples from a checkpoint")
    sample_p.add_argument("checkpoint", type=Path)
    sample_p.add_argument("--num", type=int, default=64)
    sample_p.add_argument("--seed", type=int, default=0)
    sample_p.add_argument("--out", type=Path, default=Path("samples.png"))
    sample_p.set_defaults(func=cmd_sample)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    from dgm_scale.data import DataError

    args = build_parser().parse_args(argv)
    logging.basicConfig(format="dgm-scale: %(message)s", level=logging.WARNING)
    logging.getLogger("dgm_scale").setLevel(logging.INFO)
    try:
        return args.func(args)
    except (ConfigError, DataError) as exc:
        print(f"dgm-scale: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
