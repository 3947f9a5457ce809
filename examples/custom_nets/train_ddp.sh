#!/usr/bin/env bash
# Train your own G and D (nets.py) with 2 data-parallel processes through the torchrun launcher,
# then sample the checkpoint (--trust-code: its config names our own nets.py, code outside
# dgm_scale). Run from the repository root; extra key=value overrides pass on:
#   bash examples/custom_nets/train_ddp.sh trainer.max_steps=200
set -euo pipefail
RUN_DIR=${RUN_DIR:-runs/custom-nets-ddp}
NPROC=2 RUN_ID=custom-nets launch/torchrun.sh examples/custom_nets/config.yaml run.dir="$RUN_DIR" "$@"
dgm-scale sample "$RUN_DIR/checkpoints/last.ckpt" --trust-code --num 64 --seed 0 --out "$RUN_DIR/custom-samples.png"
