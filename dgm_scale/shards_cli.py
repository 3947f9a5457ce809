"""`dgm-scale shards build` and `dgm-scale shards inspect` (no torch import here: the CLI's parser
loads fast; the commands import dgm_scale.data.shards when they run)."""
from __future__ import annotations

import argparse
import os
from pathlib import Path


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
        workers=args.workers if args.workers is not None else default_workers(),
        overwrite=args.overwrite,
        progress=not args.quiet,
    )
    print(build_shards(args.src, args.out, options).summary())
    return 0


def default_workers() -> int:
    """--workers when not given: this machine's cores, at most 8."""
    return min(8, os.cpu_count() or 1)


def cmd_shards_inspect(args: argparse.Namespace) -> int:
    from dgm_scale.data.shards import inspect_shards

    report = inspect_shards(args.out, verify=not args.no_verify)
    print(report.text())
    return 0 if report.ok else 1


def add_shards_parser(commands: argparse._SubParsersAction) -> None:
    """`dgm-scale shards build SRC OUT [options]` and `dgm-scale shards inspect OUT`."""
    shards_p = commands.add_parser("shards", help="build / inspect tar shards of an image dataset")
    sub = shards_p.add_subparsers(dest="shards_command", required=True)
    build = sub.add_parser("build", help="SRC (image folder, .npy/.npz, builtin:NAME, shards) -> OUT/*.tar + manifest.json")
    build.add_argument("src", metavar="SRC", help="image folder, .npy / .npz, builtin:NAME, or shards (re-shard)")
    build.add_argument("out", metavar="OUT", type=Path, help="output folder of the shards and manifest.json")
    build.add_argument("--name", help="shard file prefix (default: the source's stem)")
    build.add_argument("--samples-per-shard", type=int, metavar="N", help="default 10000 unless --bytes-per-shard")
    build.add_argument("--bytes-per-shard", metavar="SIZE", help="e.g. 64MB, 1GiB")
    build.add_argument("--resolution", type=int, metavar="R", help="resize shorter side + centre crop to R x R")
    build.add_argument("--channels", type=int, choices=(1, 3),
                       help="1 = greyscale, 3 = RGB (default: the source's; image files: RGB)")
    build.add_argument("--encoding", choices=("png", "jpg", "webp", "npy"), help="default png (re-shard: keep)")
    build.add_argument("--quality", type=int, default=95, help="jpg / webp quality (default 95)")
    build.add_argument("--workers", type=int, metavar="K",
                       help="encoding processes (default: the CPU cores, at most 8; output identical for any K)")
    build.add_argument("--overwrite", action="store_true", help="replace a shard set already in OUT")
    build.add_argument("--quiet", action="store_true", help="no progress bar")
    build.set_defaults(func=cmd_shards_build)
    inspect = sub.add_parser("inspect", help="summarise OUT and verify every shard against its manifest")
    inspect.add_argument("out", metavar="OUT", type=Path, help="a folder written by `shards build`")
    inspect.add_argument("--no-verify", action="store_true", help="summary only, read no shard")
    inspect.set_defaults(func=cmd_shards_inspect)
