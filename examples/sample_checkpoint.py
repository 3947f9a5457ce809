"""Load any dgm_scale checkpoint (any family, your own networks included) and write samples.

    python examples/sample_checkpoint.py runs/<run>/checkpoints/best.ckpt [out.png] [--class K] [--trust-code]

A checkpoint whose config names code outside dgm_scale (your own networks, module or family)
loads only with --trust-code: loading it imports and runs that code.
"""
import argparse

import torch

import dgm_scale
from dgm_scale.tracking import samples_to_image, samples_to_text

parser = argparse.ArgumentParser()
parser.add_argument("checkpoint")
parser.add_argument("out", nargs="?", default="samples.png")
parser.add_argument("--num", type=int, default=64)
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--class", dest="label", type=int, help="a class, for conditional models")
parser.add_argument("--trust-code", action="store_true", help="import the code the checkpoint names (yours)")
args = parser.parse_args()

model = dgm_scale.load_module(args.checkpoint, trust_code=args.trust_code)
labels = None if args.label is None else torch.full((args.num,), args.label)
samples = model.sample(args.num, seed=args.seed, labels=labels)
if model.modality == "text":
    with open(args.out, "w", encoding="utf-8") as handle:
        handle.write("\n\n".join(samples_to_text(samples)))
else:
    samples_to_image(samples).save(args.out)
print(f"{model.family.name} model of iteration {model.checkpoint_iteration}: "
      f"{args.num} samples -> {args.out}")
