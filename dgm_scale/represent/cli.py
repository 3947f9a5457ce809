"""`dgm-scale encode` and `dgm-scale probe` (no torch import here: the CLI's parser loads fast)."""
from __future__ import annotations

import argparse
from pathlib import Path

from dgm_scale.core.trust import add_trust_option


def add_encode_parser(commands: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `dgm-scale encode CKPT --data SRC --out FILE.npz`."""
    parser = commands.add_parser("encode", help="features of real data from a trained model (a VAE's posterior, "
                                                "a GAN's discriminator features, ...) as one .npz; torchrun "
                                                "splits the work")
    parser.add_argument("checkpoint", metavar="CKPT", help="the trained model's checkpoint")
    parser.add_argument("--data", required=True, metavar="SRC", help="image folder, .npy / .npz, shards or "
                                                                     "builtin:NAME")
    parser.add_argument("--out", required=True, type=Path, metavar="FILE.npz", help="the features (and labels, "
                                                                                 "if the data has them)")
    parser.add_argument("--batch-size", type=int, default=256, help="samples per forward pass")
    parser.add_argument("--strict", action="store_true", help="stop at the first unreadable sample "
                                                              "(default: skip and count it)")
    parser.add_argument("--device", help="e.g. cpu, cuda:1 (default: this process's GPU, else the CPU)")
    add_trust_option(parser)
    parser.set_defaults(func=cmd_encode)
    return parser


def cmd_encode(args: argparse.Namespace) -> int:
    from dgm_scale.represent.encode import encode_checkpoint, skipped_line

    encoded = encode_checkpoint(args.checkpoint, args.data, args.out, args.batch_size, args.strict, args.device,
                                 trust_code=args.trust_code)
    if encoded is None:  # not rank 0
        return 0
    shapes = ", ".join(f"{name} {list(value.shape)}" for name, value in encoded.arrays().items())
    print(f"wrote {args.out}: {shapes}")
    line = skipped_line(encoded.skipped)
    if line:
        print(line)
    return 0


def add_probe_parser(commands: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `dgm-scale probe CKPT --data SRC --labels-per-class K[,K2...]`."""
    parser = commands.add_parser("probe", help="k-means accuracy / NMI and few-label linear-probe accuracy of a "
                                               "model's features vs raw pixels and PCA")
    parser.add_argument("checkpoint", metavar="CKPT", help="the trained model's checkpoint")
    parser.add_argument("--data", required=True, metavar="SRC", help="labelled images: the train split, and the "
                                                                     "test split too without --test")
    parser.add_argument("--test", metavar="SRC2", help="held-out labelled images (default: a seeded split of --data)")
    parser.add_argument("--test-fraction", type=float, default=0.3, help="without --test (default 0.3)")
    parser.add_argument("--labels-per-class", required=True, metavar="K[,K2...]",
                        help="labelled train samples per class for the linear probe")
    parser.add_argument("--seeds", type=int, default=5, help="label draws per K (default 5)")
    parser.add_argument("--seed", type=int, default=0, help="of the split, k-means and the draws")
    parser.add_argument("--json", type=Path, metavar="OUT", help="write the results as JSON")
    parser.add_argument("--batch-size", type=int, default=256, help="samples per forward pass")
    parser.add_argument("--device", help="e.g. cpu, cuda:1 (default: the GPU, else the CPU)")
    add_trust_option(parser)
    parser.set_defaults(func=cmd_probe)
    return parser


def parse_counts(text: str) -> list[int]:
    """'10,100' -> [10, 100]; ConfigError naming --labels-per-class otherwise."""
    from dgm_scale.core.errors import ConfigError

    try:
        counts = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ConfigError(f"--labels-per-class '{text}': expected integers like 10 or 10,100") from None
    if not counts or min(counts) < 1:
        raise ConfigError(f"--labels-per-class must be >= 1, got {text}")
    return counts


def cmd_probe(args: argparse.Namespace) -> int:
    from dgm_scale.core.files import write_json_atomic
    from dgm_scale.represent.encode import skipped_line
    from dgm_scale.represent.probe import format_table, probe_checkpoint

    result = probe_checkpoint(args.checkpoint, args.data, parse_counts(args.labels_per_class), test=args.test,
                              seeds=args.seeds, seed=args.seed, test_fraction=args.test_fraction,
                              batch_size=args.batch_size, device=args.device,
                              trust_code=args.trust_code)
    print(format_table(result))
    line = skipped_line([(0, item["name"], item["reason"]) for item in result["skipped"]])
    if line:
        print(line)
    if args.json is not None:
        write_json_atomic(args.json, result)
        print(f"wrote {args.json}")
    return 0
