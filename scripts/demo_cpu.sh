#!/usr/bin/env bash
# The README's main command: set up the CPU environment if needed, train a tiny GPT-MoE with MicroEP
# on 4 gloo ranks (Megatron's real training loop, mock data), then print a balance summary and
# write a PNG of per-GPU load before/after.    scripts/demo_cpu.sh [OUT_DIR] [extra Megatron args]
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
out=${1:-$repo/demo_out}; shift || true
"$repo/scripts/setup_env.sh"
py="$repo/.venv/bin/python"
rm -rf "$out"; mkdir -p "$out"
echo "demo: training configs/tiny-cpu.yaml with --micro-ep 2 on 4 CPU ranks (about a minute); log: $out/train.log"
set +e
OMP_NUM_THREADS=1 PYTHONWARNINGS=ignore MASTER_PORT=${MASTER_PORT:-29517} \
  "$repo/scripts/train_single_node.sh" "$repo/configs/tiny-cpu.yaml" \
  --micro-ep-metrics-file "$out/micro_ep_metrics.jsonl" "$@" 2>&1 | tee "$out/train.log" \
  | grep --line-buffered -E "iteration +[0-9]+/|^ MicroEP|^pretrain_gpt|Error|Traceback"
status=${PIPESTATUS[0]}
set -e
if [ "$status" -ne 0 ]; then echo "demo: training failed (exit $status); see $out/train.log" >&2; exit "$status"; fi
"$py" -m micromoe_megatron.cli report "$out/micro_ep_metrics.jsonl" --plot "$out/load_per_gpu.png"
