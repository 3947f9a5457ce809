"""The command line: thin wrappers around config loading, `train`, sampling, reports and shards."""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import List, Optional, Sequence

from dgm_scale.config import ConfigError, load_config, to_yaml
from dgm_scale.core.imports import working_directory_importable
from dgm_scale.core.trust import add_trust_option
from dgm_scale.shards_cli import add_shards_parser


CONFIG_HELP = ("a YAML config file (optional: the defaults train the default job), then key=value "
               "overrides of any config key (docs/reference/config.md)")


def _split_config_args(args: Sequence[str]) -> tuple[Optional[str], List[str]]:
    """`[CONFIG] [key=value ...]`: the first argument is a config file unless it is an override."""
    if args and "=" not in args[0]:
        return args[0], list(args[1:])
    return None, list(args)


def cmd_train(args: argparse.Namespace) -> int:
    from dgm_scale.training import quiet_lightning, train  # heavy imports only for commands that need them

    quiet_lightning()
    from dgm_scale.distributed import launch_env

    path, overrides = _split_config_args(args.config_and_overrides)
    cfg = load_config(path, [*overrides, *(["data.strict=true"] if args.strict else [])], imports=args.imports)
    result = train(cfg)
    if launch_env().global_rank > 0:
        return 0
    if result.iterations < cfg.trainer.max_steps:  # stopped by a signal (SLURM requeue) or the user
        print(f"stopped at iteration {result.iterations} of {cfg.trainer.max_steps}; the run continues with "
              f"resume=auto run.dir={result.run_dir} (a requeued SLURM job does this itself)")
        return 0
    print(f"done: {result.iterations} iterations in {result.seconds:.1f} s "
          f"({result.images_per_second:.0f} samples/s)\n"
          f"  run directory: {result.run_dir}\n"
          f"  checkpoint:    {result.checkpoint}\n"
          f"  samples:       {result.samples}\n"
          f"  metrics:       {result.run_dir / 'metrics.csv'}")
    if result.skipped:  # data that can be unreadable (image folders, shards)
        from dgm_scale.data.position import skipped_summary

        print(f"  skipped data:  {skipped_summary(result.skipped)} (data/skipped_* in metrics.csv; "
              "data.strict=true stops at the first)")
    return 0


def cmd_show_config(args: argparse.Namespace) -> int:
    path, overrides = _split_config_args(args.config_and_overrides)
    print(to_yaml(load_config(path, overrides, imports=args.imports)), end="")
    return 0


def sampling_options(args: argparse.Namespace) -> dict:
    """The family-specific sampling options given on the command line (temperature, prompt, length;
    sampler, steps, guidance)."""
    options = {"temperature": args.temperature, "prompt": args.prompt, "length": args.length,
               "sampler": args.sampler, "steps": args.steps, "guidance": args.guidance}
    return {key: value for key, value in options.items() if value is not None}


def cmd_sample(args: argparse.Namespace) -> int:
    import torch

    from dgm_scale.core.files import save_png_atomic, write_text_atomic
    from dgm_scale.core.imports import run_imports
    from dgm_scale.modules import load_module
    from dgm_scale.tracking import samples_to_image, samples_to_text

    if args.num < 1:
        raise ConfigError(f"--num must be >= 1, got {args.num}")
    run_imports(args.imports, "--import")
    module = load_module(args.checkpoint, trust_code=args.trust_code)
    if args.variant not in module.sampler_variants():
        raise ConfigError(f"--variant '{args.variant}': this model has {sorted(module.sampler_variants())}")
    labels = None
    if args.label is not None:
        if not 0 <= args.label < max(module.num_classes, 1) or module.num_classes == 0:
            raise ConfigError(f"--class {args.label}: the model has {module.num_classes} classes")
        labels = torch.full((args.num,), args.label, dtype=torch.long)
    if args.out_dir is not None:  # one file per sample, or one .npz (see dump.py); torchrun splits the work
        return _dump(args, module, labels)
    try:
        samples = module.sample(args.num, seed=args.seed, labels=labels, variant=args.variant,
                                **sampling_options(args))
    except ValueError as error:  # an option the family does not take, a bad prompt: one line
        raise ConfigError(str(error)) from None
    if module.modality == "text":
        texts = samples_to_text(samples)
        out = write_text_atomic(args.out or Path("samples.txt"), "".join(f"{text}\n\n" for text in texts))
    else:
        out = save_png_atomic(samples_to_image(samples), args.out or Path("samples.png"))
    print(f"wrote {args.num} samples to {out}")
    return 0


def _dump(args: argparse.Namespace, module, labels) -> int:
    import torch

    from dgm_scale.dump import dump_samples
    from dgm_scale.score import init_distributed_from_env

    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {args.batch_size}")
    init_distributed_from_env()
    if torch.cuda.is_available():
        module.to(torch.device("cuda", torch.cuda.current_device()))
    try:
        out = dump_samples(module, args.num, args.seed, args.out_dir, args.format, args.batch_size, labels,
                           variant=args.variant, **sampling_options(args))
    except ValueError as error:
        raise ConfigError(str(error)) from None
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        print(f"wrote {args.num} samples to {out}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    import torch

    from dgm_scale.core.imports import run_imports
    from dgm_scale.score import evaluate
    from dgm_scale.metrics.report import format_table

    run_imports(args.imports, "--import")
    settings = {key: getattr(args, key) for key in ("real", "extractor", "num_samples", "num_real", "seed",
                                                    "batch_size", "cache_dir", "inception_weights", "metrics")}
    out = args.out or Path(args.checkpoint).with_suffix(".eval.json")
    results = evaluate(args.checkpoint, out=out, device=args.device, trust_code=args.trust_code, **settings)
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        print(format_table(results))
        print(f"wrote {out}")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from dgm_scale import sweep as sweeps

    sweep = sweeps.read_sweep(args.file)
    if args.point is not None:  # one array task: train this point (resume=auto: a requeue continues it)
        cmd_train(argparse.Namespace(config_and_overrides=sweeps.point_args(sweep, args.point, args.root,
                                                                            args.overrides), imports=[], strict=False))
        return 0
    sweeps.check_points(sweep, args.overrides)
    for index, point in enumerate(sweep.points):
        print(f"{index:3d}  {sweep.run_dir(index, args.root)}  {point}")
    if args.submit:
        import shlex

        job = sweeps.submit(sweep, args.root, shlex.split(args.sbatch or ""), args.overrides)
        print(f"submitted array job {job} ({len(sweep.points)} tasks); afterwards: "
              f"dgm-scale compare {Path(args.root) / sweep.name}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from dgm_scale.tracking.compare import compare, format_rows
    from dgm_scale.tracking.report import NotARunDirectory

    try:
        rows, files = compare(args.runs, args.out or Path(args.runs[0]), args.metric)
    except NotARunDirectory as error:
        raise ConfigError(str(error)) from None
    print(format_rows(rows))
    print("wrote " + ", ".join(str(path) for path in files.values()))
    return 0


def cmd_checkpoint_to_plain(args: argparse.Namespace) -> int:
    from dgm_scale.distributed import dcp_checkpoint, zero_checkpoint

    if not args.src.is_file():
        raise ConfigError(f"checkpoint '{args.src}' does not exist")
    fsdp = zero_checkpoint.shards_of(args.src, dcp_checkpoint.DCP_SHARDS) is not None
    try:
        out = (dcp_checkpoint if fsdp else zero_checkpoint).to_plain(args.src, args.out)
    except (ValueError, FileNotFoundError) as error:
        raise ConfigError(str(error)) from None
    held = "full weights and optimizer states" if fsdp else "every ZeRO partition embedded"
    print(f"wrote {out} ({held}: it needs no {'dcp' if fsdp else 'zero'}/ folder beside it)")
    return 0


def cmd_fid(args: argparse.Namespace) -> int:
    import json

    import torch

    from dgm_scale.metrics.report import format_table
    from dgm_scale.score import fid

    results = fid(args.a, args.b, num_a=args.num_a, num_b=args.num_b, resolution=args.resolution,
                  channels=args.channels, extractor=args.extractor, metrics=args.metrics, seed=args.seed,
                  batch_size=args.batch_size, cache_dir=args.cache_dir, inception_weights=args.inception_weights,
                  device=args.device)
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        print(json.dumps(results, sort_keys=True) if args.json else format_table(results))
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


INCEPTION_HELP = "the pt_inception-2015-12-05 weights (default: eval.inception_weights, else the reference URL)"


def _add_evaluate_parsers(commands: argparse._SubParsersAction) -> None:
    """`dgm-scale evaluate CKPT ...` and `dgm-scale train-classifier SRC OUT ...`."""
    ev = commands.add_parser("evaluate", help="FID / KID / IS / precision-recall / NDB of a checkpoint's generator "
                                              "(torchrun: all processes share the work)")
    ev.add_argument("checkpoint", type=Path, help="a run's checkpoint")
    ev.add_argument("--real", metavar="SRC", help="real data: image folder, shards, .npz, builtin:NAME "
                                                  "(default: the run's training data)")
    ev.add_argument("--num-samples", type=int, metavar="N", help="generated samples (default: the run's eval.num_samples)")
    ev.add_argument("--num-real", type=int, metavar="M", help="real samples (0 = as many as N, at most all)")
    ev.add_argument("--metrics", help="comma-separated: fid,kid,is,pr,dc,ndb,probe (default: fid,kid,pr,ndb + is)")
    ev.add_argument("--extractor", help="auto | inception | inception:PATH_OR_URL | classifier:PATH | digits | identity")
    ev.add_argument("--inception-weights", metavar="PATH_OR_URL", help=INCEPTION_HELP)
    ev.add_argument("--cache-dir", help="feature statistics, weights and classifiers (default ~/.cache/dgm_scale)")
    ev.add_argument("--seed", type=int, help="the generated samples' noise and the real subset (default: eval.seed)")
    ev.add_argument("--batch-size", type=int, help="per process")
    ev.add_argument("--device", help="cpu | cuda (default: cuda when available)")
    ev.add_argument("--out", type=Path, help="JSON report (default: CKPT with suffix .eval.json)")
    _add_import_option(ev)
    add_trust_option(ev)
    ev.set_defaults(func=cmd_evaluate)
    fid_p = commands.add_parser("fid", help="FID / KID / P-R / NDB of data source B against data source A "
                                            "(folders, .npz, shards, builtin:NAME; torchrun splits the work)")
    fid_p.add_argument("a", metavar="A", help="the reference data")
    fid_p.add_argument("b", metavar="B", help="the compared data, e.g. a `sample --out-dir` dump")
    fid_p.add_argument("--metrics", help="comma-separated: fid,kid,is,pr,dc,ndb (default: fid,kid,pr,ndb + is)")
    fid_p.add_argument("--extractor", default="auto", help="auto (digits for builtin:digits, else inception), "
                                                           "inception:PATH_OR_URL, classifier:PATH, digits")
    fid_p.add_argument("--num-a", type=int, default=0, help="a seeded subset of A (default: all)")
    fid_p.add_argument("--num-b", type=int, default=0, help="a seeded subset of B (default: all)")
    fid_p.add_argument("--resolution", type=int, help="images are resized to it (default: A's first image)")
    fid_p.add_argument("--channels", type=int, choices=(1, 3), help="default: A's first image")
    fid_p.add_argument("--seed", type=int, default=0, help="of the seeded subsets (--num-a, --num-b)")
    fid_p.add_argument("--batch-size", type=int, default=250, help="per process")
    fid_p.add_argument("--cache-dir", default="~/.cache/dgm_scale", help="feature statistics, weights and classifiers")
    fid_p.add_argument("--inception-weights", metavar="PATH_OR_URL", help=INCEPTION_HELP)
    fid_p.add_argument("--device", help="cpu | cuda (default: cuda when available)")
    fid_p.add_argument("--json", action="store_true", help="one JSON object instead of the table")
    fid_p.set_defaults(func=cmd_fid)
    tc = commands.add_parser("train-classifier", help="train a domain classifier on labelled data "
                                                      "(an FID feature extractor: eval.extractor=classifier:OUT)")
    tc.add_argument("src", metavar="SRC", help="labelled data: image folder with class folders, .npz with labels, "
                                               "labelled shards, builtin:NAME")
    tc.add_argument("out", metavar="OUT", type=Path, help="the classifier file to write")
    tc.add_argument("--resolution", type=int, required=True, help="images are resized to it (the generator's)")
    tc.add_argument("--channels", type=int, choices=(1, 3), required=True, help="1 = greyscale, 3 = RGB")
    tc.add_argument("--epochs", type=int, default=15, help="passes over the training split")
    tc.add_argument("--val-fraction", type=float, default=0.1, help="held-out share, for the reported accuracy")
    tc.add_argument("--seed", type=int, default=0, help="of the split, the initialisation and the batch order")
    tc.set_defaults(func=cmd_train_classifier)


def _add_import_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE_OR_FILE",
                        help="import your code first (e.g. a file registering a model family); repeatable; "
                             "for train it is recorded in run.imports, so every rank and later `sample` "
                             "import it too")


def build_parser() -> argparse.ArgumentParser:
    from dgm_scale.export.cli import add_export_parser
    from dgm_scale.families.diffusion.phema_cli import add_ema_parser
    from dgm_scale.represent.cli import add_encode_parser, add_probe_parser
    from dgm_scale.serve import add_serve_parser

    parser = argparse.ArgumentParser(prog="dgm-scale", description="Train and sample deep generative models.")
    commands = parser.add_subparsers(dest="command", required=True)
    train_p = commands.add_parser("train", help="train a model: dgm-scale train [CONFIG.yaml] [key=value ...]")
    train_p.add_argument("config_and_overrides", nargs="*", metavar="[CONFIG] [key=value]", help=CONFIG_HELP)
    _add_import_option(train_p)
    train_p.add_argument("--strict", action="store_true", help="stop at the first unreadable image or shard, "
                         "naming it (data.strict=true), instead of skipping and counting it")
    train_p.set_defaults(func=cmd_train)
    show_p = commands.add_parser("show-config", help="print the resolved config")
    show_p.add_argument("config_and_overrides", nargs="*", metavar="[CONFIG] [key=value]", help=CONFIG_HELP)
    _add_import_option(show_p)
    show_p.set_defaults(func=cmd_show_config)
    sample_p = commands.add_parser("sample", help="generate samples from a checkpoint: an image grid or text")
    sample_p.add_argument("checkpoint", type=Path, help="a run's checkpoint (e.g. RUN/checkpoints/last.ckpt)")
    # (--num-samples too: under torchrun, its own parser mistakes `--num` for its `--numa-binding`)
    sample_p.add_argument("--num", "--num-samples", dest="num", type=int, default=64, help="samples to generate")
    sample_p.add_argument("--seed", type=int, default=0, help="the samples' noise (same seed, same samples)")
    sample_p.add_argument("--out", type=Path, help="PNG grid (images) or text file (default samples.png / .txt)")
    sample_p.add_argument("--out-dir", type=Path, help="instead of a grid: one file per sample (DIR/000000.png, "
                                                       "text: .txt) or DIR/samples.npz; torchrun splits the work")
    sample_p.add_argument("--format", default="png", choices=("png", "npz"), help="with --out-dir (default png)")
    sample_p.add_argument("--batch-size", type=int, default=256, help="with --out-dir: samples per batch")
    sample_p.add_argument("--variant", default="", help="another sampler of the model, e.g. raw (a GAN's raw "
                                                        "generator; default: the EMA generator)")
    sample_p.add_argument("--class", dest="label", type=int, metavar="K", help="class K (conditional models)")
    sample_p.add_argument("--temperature", type=float, help="autoregressive: softmax temperature (default 1)")
    sample_p.add_argument("--prompt", help="autoregressive text: the text every sample continues")
    sample_p.add_argument("--length", type=int, help="autoregressive text: characters per sample")
    sample_p.add_argument("--sampler", help="diffusion: ddpm, ddim, euler, heun or dpmpp_2m (default: sampler.name)")
    sample_p.add_argument("--steps", type=int, help="diffusion: sampling steps (default: sampler.steps)")
    sample_p.add_argument("--guidance", type=float, help="diffusion: classifier-free guidance weight (1 = none)")
    _add_import_option(sample_p)
    add_trust_option(sample_p)
    sample_p.set_defaults(func=cmd_sample)
    add_export_parser(commands)
    add_ema_parser(commands)
    add_encode_parser(commands)
    add_probe_parser(commands)
    add_serve_parser(commands)
    report_p = commands.add_parser("report", help="(re)build RUN_DIR/report.html and RUN_DIR/plots/*.png "
                                                  "from a run directory (running, finished or crashed)")
    report_p.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a run directory (config.yaml, metrics.csv)")
    report_p.set_defaults(func=cmd_report)
    sweep_p = commands.add_parser("sweep", help="a grid of override sets: list / check them, train one point "
                                                "(--point I, what each array task runs), or --submit a SLURM array")
    sweep_p.add_argument("file", type=Path, metavar="SWEEP.yaml", help="the sweep: a name, an optional base config, "
                                                                      "a grid and / or a list of override sets")
    sweep_p.add_argument("overrides", nargs="*", metavar="key=value", help="added to every point")
    sweep_p.add_argument("--root", default="runs", help="the sweep's folder goes below it (default runs)")
    sweep_p.add_argument("--point", type=int, metavar="I", help="train point I")
    sweep_p.add_argument("--submit", action="store_true", help="sbatch launch/slurm/sweep.sbatch as a job array")
    sweep_p.add_argument("--sbatch", metavar="OPTIONS", help="more sbatch options, e.g. \"--time=4:00:00 --gpus=1\"")
    sweep_p.set_defaults(func=cmd_sweep)
    compare_p = commands.add_parser("compare", help="tabulate runs (a sweep's folder, or run directories): best "
                                                    "metric, status, differing settings -> CSV, HTML, plot")
    compare_p.add_argument("runs", nargs="+", type=Path, metavar="RUN_OR_SWEEP_DIR",
                           help="run directories, or folders of them (a sweep's)")
    compare_p.add_argument("--out", type=Path, help="where compare.csv / .html / .png go (default: the first path)")
    compare_p.add_argument("--metric", default="auto", help="auto (fid, else bits/dim or bits/char) or a metric name")
    compare_p.set_defaults(func=cmd_compare)
    checkpoint_p = commands.add_parser("checkpoint", help="checkpoint tools")
    checkpoint_sub = checkpoint_p.add_subparsers(dest="checkpoint_command", required=True)
    plain = checkpoint_sub.add_parser("to-plain", help="fold a sharded checkpoint's per-rank files (DeepSpeed "
                                                       "ZeRO, FSDP) into one self-contained file")
    plain.add_argument("src", type=Path, metavar="SHARDED.ckpt", help="a checkpoint saved under deepspeed or fsdp "
                                                                      "(its zero/ or dcp/ folder beside it)")
    plain.add_argument("out", type=Path, metavar="OUT.ckpt", help="the self-contained checkpoint to write")
    plain.set_defaults(func=cmd_checkpoint_to_plain)
    add_shards_parser(commands)
    _add_evaluate_parsers(commands)
    _describe_subcommands(parser)
    return parser


def _describe_subcommands(parser: argparse.ArgumentParser) -> None:
    """Each subcommand's `help=` (its line in the parent's list) also heads its own `-h`."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {choice.dest: choice.help for choice in action._choices_actions}
            for name, sub in action.choices.items():
                sub.description = sub.description or helps.get(name)
                _describe_subcommands(sub)


def main(argv: Optional[Sequence[str]] = None) -> int:
    from dgm_scale.core.errors import CheckpointWriteError, DataError, DiskFullError, NonFiniteError

    parser = build_parser()
    # Options may sit between the config and its overrides (`train cfg.yaml --import x.py k=v`):
    # what follows an option comes back unparsed and joins the overrides.
    args, extra = parser.parse_known_args(argv)
    if extra and hasattr(args, "config_and_overrides"):
        args.config_and_overrides = list(args.config_and_overrides) + extra
    elif extra and hasattr(args, "overrides"):
        args.overrides = list(args.overrides) + extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    working_directory_importable()  # `model.generator.target: mynets:G` for mynets.py in the working directory
    logging.basicConfig(format="dgm-scale: %(message)s", level=logging.WARNING)
    logging.getLogger("dgm_scale").setLevel(logging.INFO)
    try:
        return args.func(args)
    except (ConfigError, DataError, DiskFullError, NonFiniteError, CheckpointWriteError) as exc:  # one line, no traceback
        print(f"dgm-scale: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
