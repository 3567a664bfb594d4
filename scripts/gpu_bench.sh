#!/usr/bin/env bash
# Single-GPU benchmark (a common test box: NCCL refuses two ranks on one device, so gpu_check.sh
# cannot run there). Emulates rank 0 of a MicroEP group with torch's fake process group and counts
# from a global routing draw, at paper sizes (T 8k/16k tokens, H 2048/4096, E 256, EP 8, d 2/4,
# top-8): dispatcher device work stock vs MicroEP, exposed planning time with and without overlap,
# peak extra memory, and the grouped expert GEMM against tokens (TransformerEngine if present).
# Prints the card's name with the numbers and writes a JSON that the cost model reads
# (micromoe_megatron.sim.cost.calibrate_from_gpu_bench).
#   scripts/gpu_bench.sh [OUT.json] [extra gpu_bench flags, e.g. --zipf 1.5 --repeats 20]
# Without CUDA it runs the tiny CPU smoke sizes (--cpu-smoke).
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
py=${PYTHON:-$([ -x "$repo/.venv/bin/python" ] && echo "$repo/.venv/bin/python" || echo python3)}
out=${1:-gpu_bench.json}
shift || true
if command -v nvidia-smi > /dev/null; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | head -1
fi
cd "$repo"
PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}" "$py" -m micromoe_megatron.training.gpu_bench --json "$out" "$@"
