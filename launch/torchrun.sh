#!/usr/bin/env bash
# Launch `dgm-scale train` with torchrun: one process per device, on one node or several.
#
#   launch/torchrun.sh [CONFIG.yaml] [key=value ...]
#
# Environment (defaults in brackets):
#   NPROC        processes per node [number of CUDA devices, or 1 without CUDA]
#   NNODES       nodes [1]
#   NODE_RANK    this node's rank, 0..NNODES-1 [0]
#   MASTER_ADDR  address of node 0 [127.0.0.1]
#   MASTER_PORT  a free TCP port on node 0 [29500]
#   RUN_ID       names the run directory runs/<name>-<RUN_ID>; must be the same on every node
#                [dgm-<date>-<time>, fine for one node; set it (or run.dir=...) for several]
set -euo pipefail
NPROC=${NPROC:-$(python -c "import torch; print(max(torch.cuda.device_count(), 1))")}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
RUN_ID=${RUN_ID:-dgm-$(date +%Y%m%d-%H%M%S)}

exec torchrun \
  --nnodes="$NNODES" --nproc-per-node="$NPROC" --node-rank="$NODE_RANK" \
  --master-addr="$MASTER_ADDR" --master-port="$MASTER_PORT" --rdzv-id="$RUN_ID" \
  -m dgm_scale.cli train "$@" trainer.devices="$NPROC" trainer.num_nodes="$NNODES"
