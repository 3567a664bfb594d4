#!/usr/bin/env bash
# Train one of configs/*.yaml across nodes: run this on every node with the same MASTER_ADDR.
#   NODE_RANK=0 MASTER_ADDR=node0 scripts/train_multi_node.sh configs/gpt-8x6.7b.yaml [--no-micro-ep] [Megatron args...]
# env: NODE_RANK (required), MASTER_ADDR (required), MASTER_PORT (default 29500),
#      NNODES (default: the config's nnodes), PYTHON (default: .venv/bin/python or python3)
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
config=${1:?usage: NODE_RANK=n MASTER_ADDR=host $0 CONFIG [--no-micro-ep] [Megatron args...]}; shift
: "${NODE_RANK:?set NODE_RANK (0 .. nnodes-1) on every node}" "${MASTER_ADDR:?set MASTER_ADDR to the address of node 0}"
py=${PYTHON:-$([ -x "$repo/.venv/bin/python" ] && echo "$repo/.venv/bin/python" || echo python3)}
mode=(); if [ "${1:-}" = "--no-micro-ep" ]; then mode=(--no-micro-ep); shift; fi
nproc=$("$py" -m micromoe_megatron.training.launch_config "$config" --field nproc_per_node)
nnodes=${NNODES:-$("$py" -m micromoe_megatron.training.launch_config "$config" --field nnodes)}
eval "config_args=($("$py" -m micromoe_megatron.training.launch_config "$config" "${mode[@]}"))"
# Pre-flight: the rank's own argument checks, once, so a refused flag is one line, not one per rank.
MICROMOE_CHECK_ARGS=1 PYTHONWARNINGS=ignore WORLD_SIZE="$((nnodes * nproc))" LOCAL_WORLD_SIZE="$nproc" RANK=0 LOCAL_RANK=0 \
  "$py" "$repo/scripts/pretrain_gpt.py" "${config_args[@]}" "$@" || exit $?
export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}
exec "$py" -m torch.distributed.run --nnodes "$nnodes" --node-rank "$NODE_RANK" --nproc-per-node "$nproc" \
  --master-addr "$MASTER_ADDR" --master-port "${MASTER_PORT:-29500}" \
  "$repo/scripts/pretrain_gpt.py" "${config_args[@]}" "$@"
