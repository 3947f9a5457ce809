"""The command line: thin wrappers around config loading, `train`, sampling, reports and shards."""
from __future__ import annotations

import argparse
import logging
import os
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
    cfg = load_config(path, overrides)
    result = train(cfg)
    if launch_env().global_rank > 0:
        return 0
    if result.iterations < cfg.trainer.max_steps:  # stopped by a signal (SLURM requeue) or the user
        print(f"stopped at iteration {result.iterations} of {cfg.trainer.max_steps}; the run continues with "
              f"resume=auto run.dir={result.run_dir} (a requeued SLURM job does this itself)")
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


def _init_distributed_from_env() -> None:
    """Join torchrun's process group (WORLD_SIZE > 1) so that `evaluate` splits its work."""
    import torch
    import torch.distributed as dist

    from dgm_scale.distributed import launch_env

    if launch_env().world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")


def cmd_evaluate(args: argparse.Namespace) -> int:
    import torch

    from dgm_scale.metrics.evaluation import Evaluator, eval_settings
    from dgm_scale.metrics.report import format_table, write_report
    from dgm_scale.modules import load_module

    _init_distributed_from_env()
    module = load_module(args.checkpoint)
    cfg = module.cfg
    overrides = {"real": args.real, "extractor": args.extractor, "num_samples": args.num_samples,
                 "num_real": args.num_real, "seed": args.seed, "batch_size": args.batch_size,
                 "cache_dir": args.cache_dir, "inception_weights": args.inception_weights}
    for key, value in overrides.items():
        if value is not None:
            setattr(cfg.eval, key, value)
    if args.metrics:
        cfg.eval.metrics = [name.strip() for name in args.metrics.split(",") if name.strip()]
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and torch.distributed.is_initialized():
        device = torch.device("cuda", torch.cuda.current_device())
    settings = eval_settings(cfg)
    try:
        evaluator = Evaluator(settings, module.sample_shape, device)
    except ValueError as error:  # a bad extractor spec / weights file / option: one line, named
        raise ConfigError(str(error)) from None
    results = evaluator.evaluate(module.to(device))
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        out = args.out or Path(args.checkpoint).with_suffix(".eval.json")
        write_report(out, results, settings, args.checkpoint, module.checkpoint_iteration, evaluator.extractor.key())
        print(format_table(results))
        print(f"wrote {out}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from dgm_scale.tracking.report import NotARunDirectory, build_report

    try:
        path = build_report(args.run_dir)
    except NotARunDirectory as error:
        raise ConfigError(str(error)) from None
    print(f"wrote {path} (plots in {path.parent / 'plots'})")
    return 0


def cmd_train_classifier(args: argparse.Namespace) -> int:
    from dgm_scale.metrics.classifier import fit_classifier_on_source

    summary = fit_classifier_on_source(args.src, args.out, args.resolution, args.channels, args.epochs,
                                       args.val_fraction, args.seed)
    print(summary)
    return 0


def cmd_shards_build(args: argparse.Namespace) -> int:
    from dgm_scale.data.shards import BuildOptions, build_shards, parse_size

    options = BuildOptions(
        name=args.name,
        samples_per_shard=args.samples_per_shard,
        bytes_per_shard=parse_size(args.bytes_per_shard) if args.bytes_per_shard else None,
        encoding=args.encoding,
        channels=args.channels,
        resolution=args.resolution,
        quality=args.quality,
        workers=args.workers,
        overwrite=args.overwrite,
        progress=not args.quiet,
    )
    print(build_shards(args.src, args.out, options).summary())
    return 0


def cmd_shards_inspect(args: argparse.Namespace) -> int:
    from dgm_scale.data.shards import inspect_shards

    report = inspect_shards(args.out, verify=not args.no_verify)
    print(report.text())
    return 0 if report.ok else 1


def _add_shards_parser(commands: argparse._SubParsersAction) -> None:
    """`dgm-scale shards build SRC OUT [options]` and `dgm-scale shards inspect OUT`."""
    shards_p = commands.add_parser("shards", help="build / inspect tar shards of an image dataset")
    sub = shards_p.add_subparsers(dest="shards_command", required=True)
    build = sub.add_parser("build", help="SRC (image folder, .npy/.npz, builtin:NAME, shards) -> OUT/*.tar + manifest.json")
    build.add_argument("src", metavar="SRC")
    build.add_argument("out", metavar="OUT", type=Path)
    build.add_argument("--name", help="shard file prefix (default: the source's stem)")
    build.add_argument("--samples-per-shard", type=int, metavar="N", help="default 10000 unless --bytes-per-shard")
    build.add_argument("--bytes-per-shard", metavar="SIZE", help="e.g. 64MB, 1GiB")
    build.add_argument("--resolution", type=int, metavar="R", help="resize shorter side + centre crop to R x R")
    build.add_argument("--channels", type=int, choices=(1, 3))
    build.add_argument("--encoding", choices=("png", "jpg", "webp", "npy"), help="default png (re-shard: keep)")
    build.add_argument("--quality", type=int, default=95, help="jpg / webp quality (default 95)")
    build.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), metavar="K",
                       help="encoding processes (output identical for any K)")
    build.add_argument("--overwrite", action="store_true", help="replace a shard set already in OUT")
    build.add_argument("--quiet", action="store_true", help="no progress bar")
    build.set_defaults(func=cmd_shards_build)
    inspect = sub.add_parser("inspect", help="summarise OUT and verify every shard against its manifest")
    inspect.add_argument("out", metavar="OUT", type=Path)
    inspect.add_argument("--no-verify", action="store_true", help="summary only, read no shard")
    inspect.set_defaults(func=cmd_shards_inspect)


def _add_evaluate_parsers(commands: argparse._SubParsersAction) -> None:
    """`dgm-scale evaluate CKPT ...` and `dgm-scale train-classifier SRC OUT ...`."""
    ev = commands.add_parser("evaluate", help="FID / KID / IS / precision-recall / NDB of a checkpoint's generator "
                                              "(torchrun: all processes share the work)")
    ev.add_argument("checkpoint", type=Path)
    ev.add_argument("--real", metavar="SRC", help="real data: image folder, shards, .npz, builtin:NAME "
                                                  "(default: the run's training data)")
    ev.add_argument("--num-samples", type=int, metavar="N", help="generated samples (default: the run's eval.num_samples)")
    ev.add_argument("--num-real", type=int, metavar="M", help="real samples (0 = as many as N, at most all)")
    ev.add_argument("--metrics", help="comma-separated: fid,kid,is,pr,dc,ndb (default: fid,kid,pr,ndb + is)")
    ev.add_argument("--extractor", help="auto | inception | inception:PATH_OR_URL | classifier:PATH | digits | identity")
    ev.add_argument("--inception-weights", metavar="PATH_OR_URL")
    ev.add_argument("--cache-dir", help="feature statistics, weights and classifiers (default ~/.cache/dgm_scale)")
    ev.add_argument("--seed", type=int)
    ev.add_argument("--batch-size", type=int, help="per process")
    ev.add_argument("--device", help="cpu | cuda (default: cuda when available)")
    ev.add_argument("--out", type=Path, help="JSON report (default: CKPT with suffix .eval.json)")
    ev.set_defaults(func=cmd_evaluate)
    tc = commands.add_parser("train-classifier", help="train a domain classifier on labelled data "
                                                      "(an FID feature extractor: eval.extractor=classifier:OUT)")
    tc.add_argument("src", metavar="SRC", help="labelled data: image folder with class folders, .npz with labels, "
                                               "labelled shards, builtin:NAME")
    tc.add_argument("out", metavar="OUT", type=Path)
    tc.add_argument("--resolution", type=int, required=True)
    tc.add_argument("--channels", type=int, choices=(1, 3), required=True)
    tc.add_argument("--epochs", type=int, default=15)
    tc.add_argument("--val-fraction", type=float, default=0.1)
    tc.add_argument("--seed", type=int, default=0)
    tc.set_defaults(func=cmd_train_classifier)


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
    report_p = commands.add_parser("report", help="(re)build RUN_DIR/report.html and RUN_DIR/plots/*.png "
                                                  "from a run directory (running, finished or crashed)")
    report_p.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    report_p.set_defaults(func=cmd_report)
    _add_shards_parser(commands)
    _add_evaluate_parsers(commands)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    from dgm_scale.data import DataError
    from dgm_scale.modules.guards import NonFiniteError

    args = build_parser().parse_args(argv)
    logging.basicConfig(format="dgm-scale: %(message)s", level=logging.WARNING)
    logging.getLogger("dgm_scale").setLevel(logging.INFO)
    try:
        return args.func(args)
    except (ConfigError, DataError, NonFiniteError) as exc:  # one line, no traceback
        print(f"dgm-scale: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
