"""`dgm-scale export CKPT --out FILE --format torchscript|onnx|exported [--precision ...]`."""
from __future__ import annotations

import argparse

from dgm_scale.core.trust import add_trust_option
from dgm_scale.export import FORMATS, PRECISIONS


def add_export_parser(commands: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `dgm-scale export` on the CLI's subcommands (no torch import here)."""
    parser = commands.add_parser("export", help="the (EMA) generator / decoder / autoregressive sampler as a "
                                                "file that runs without dgm_scale (TorchScript, ONNX, torch.export)")
    parser.add_argument("checkpoint", metavar="CKPT", help="the checkpoint to export (a run's checkpoints/*.ckpt)")
    parser.add_argument("--out", help="the file (default: CKPT-PRECISION.pt / .onnx / .pt2); FILE.json "
                                      "beside it holds the inputs, shapes, value range and training config")
    parser.add_argument("--format", default="torchscript", choices=FORMATS,
                        help="torchscript (.pt), onnx (.onnx: needs the export extra) or exported (torch.export .pt2)")
    parser.add_argument("--precision", default="fp32", choices=PRECISIONS,
                        help="fp16/bf16: computed in that type, float32 in and out; int8: post-training "
                             "static quantization calibrated on the network's activations (torchscript only)")
    parser.add_argument("--dynamic-batch", action="store_true", help="any batch size (default: exactly --batch-size)")
    parser.add_argument("--batch-size", type=int, default=1, help="the traced batch size (default 1)")
    parser.add_argument("--variant", default="", help="another sampler of the model, e.g. raw (a GAN's raw generator)")
    parser.add_argument("--calibration-batches", type=int, default=8, help="int8: batches of 256 inputs observed")
    add_trust_option(parser)
    parser.set_defaults(func=cmd_export)
    return parser


def cmd_export(args: argparse.Namespace) -> int:
    from dgm_scale.core.errors import ConfigError
    from dgm_scale.export.build import export_checkpoint

    if args.calibration_batches < 1:
        raise ConfigError(f"--calibration-batches must be >= 1, got {args.calibration_batches}")
    path, meta = export_checkpoint(args.checkpoint, args.out, args.format, precision=args.precision,
                                   dynamic_batch=args.dynamic_batch, batch_size=args.batch_size,
                                   variant=args.variant, calibration_batches=args.calibration_batches,
                                   trust_code=args.trust_code)
    inputs = ", ".join(f"{spec['name']} {spec['shape']}" for spec in meta["inputs"])
    print(f"wrote {path} ({meta['format']}, {meta['precision']}): {inputs} -> samples {meta['output']['shape']} "
          f"in [-1, 1]; max |file - network| {meta['check']['max_abs_diff_file_vs_network']:.1e}")
    return 0
