#!/usr/bin/env bash
# Train one of configs/*.yaml on this node with torchrun; extra arguments go to Megatron.
#   scripts/train_single_node.sh configs/gpt-32x1.3b.yaml [--no-micro-ep] [Megatron args...]
# env: PYTHON (default: .venv/bin/python if present, else python3), MASTER_PORT (default 29500)
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
config=${1:?usage: $0 CONFIG [--no-micro-ep] [Megatron args...]}; shift
py=${PYTHON:-$([ -x "$repo/.venv/bin/python" ] && echo "$repo/.venv/bin/python" || echo python3)}
mode=(); if [ "${1:-}" = "--no-micro-ep" ]; then mode=(--no-micro-ep); shift; fi
nproc=$("$py" -m micromoe_megatron.training.launch_config "$config" --field nproc_per_node)
eval "config_args=($("$py" -m micromoe_megatron.training.launch_config "$config" "${mode[@]}"))"
# Pre-flight: the rank's own argument checks, once, so a refused flag is one line, not one per rank.
MICROMOE_CHECK_ARGS=1 PYTHONWARNINGS=ignore WORLD_SIZE="$nproc" LOCAL_WORLD_SIZE="$nproc" RANK=0 LOCAL_RANK=0 \
  "$py" "$repo/scripts/pretrain_gpt.py" "${config_args[@]}" "$@" || exit $?
export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1} OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec "$py" -m torch.distributed.run --nproc-per-node "$nproc" --master-addr 127.0.0.1 \
  --master-port "${MASTER_PORT:-29500}" "$repo/scripts/pretrain_gpt.py" "${config_args[@]}" "$@"
