#!/usr/bin/env bash
# A SMILE build split over processes with torchrun: each rank computes and writes its share of the output's shards
# (gloo, barriers only; rank 0 writes the index and metadata); the bytes are those of a single-process run.
#
#   NPROC=4 scripts/torchrun.sh --config configs/routing.yaml --out ./mistral-smile
#   NNODES=2 NODE_RANK=0 RDZV_ENDPOINT=node0:29500 NPROC=8 scripts/torchrun.sh --config ... --out /shared/out
#
# Arguments are `smile upscale` options. Rerun the same command with --resume after a failure: every rank keeps the
# shards its part had completed. Use --max-shard-size so that there are at least as many shards as processes.
# Environment:
#   NPROC          processes per node (default: 2)
#   NNODES         nodes (default: 1: a standalone rendezvous on this machine)
#   NODE_RANK, RDZV_ENDPOINT, RDZV_ID   multi-node rendezvous (c10d) when NNODES > 1
#   TORCHRUN       the torchrun command (default: torchrun)
#   OMP_NUM_THREADS  threads per process (default: the cores divided by NPROC)
set -euo pipefail

NPROC=${NPROC:-2}
NNODES=${NNODES:-1}
read -r -a TORCHRUN_CMD <<<"${TORCHRUN:-torchrun}"
cores=$(getconf _NPROCESSORS_ONLN 2>/dev/null || echo "$NPROC")
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$((cores / NPROC > 0 ? cores / NPROC : 1))}

if [ "$NNODES" = 1 ]; then
  rendezvous=(--standalone)
else
  : "${RDZV_ENDPOINT:?set RDZV_ENDPOINT=host:port for a multi-node run}" "${NODE_RANK:?set NODE_RANK}"
  rendezvous=(--nnodes "$NNODES" --node-rank "$NODE_RANK" --rdzv-backend c10d --rdzv-endpoint "$RDZV_ENDPOINT"
    --rdzv-id "${RDZV_ID:-smile}")
fi
exec "${TORCHRUN_CMD[@]}" "${rendezvous[@]}" --nproc-per-node "$NPROC" -m smile_cli upscale "$@"
