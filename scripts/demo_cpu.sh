#!/usr/bin/env bash
# The README's main command, offline on any machine: prepare real text (by default the Python standard
# library's own sources of the interpreter that runs the demo) into a Megatron indexed dataset with a
# BPE tokenizer trained on it, train a tiny GPT-MoE on it with MicroEP on 4 gloo ranks (Megatron's
# real training loop), then analyse the run's own routing: vanilla EP vs MicroEP, per layer.
#   scripts/demo_cpu.sh [--corpus FILE_OR_DIR]... [--tokenizer tokenizer.json|DIR] [OUT_DIR] [Megatron args]
# env: PYTHON to use an existing environment instead of setting up .venv
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
corpus=(); tokenizer=()
while [ $# -gt 0 ]; do
  case "$1" in
    --corpus) corpus+=("${2:?--corpus needs a file or directory}"); shift 2 ;;
    --tokenizer) tokenizer=(--tokenizer "${2:?--tokenizer needs a tokenizer.json or directory}"); shift 2 ;;
    *) break ;;
  esac
done
out=${1:-$repo/demo_out}; shift || true
config=$repo/configs/tiny-cpu.yaml
if [ -n "${PYTHON:-}" ]; then py=$PYTHON  # an environment you already have (it needs requirements-cpu.txt)
else "$repo/scripts/setup_env.sh"; py="$repo/.venv/bin/python"; fi
export HF_HUB_OFFLINE=1 PYTHONWARNINGS=ignore  # nothing is downloaded: the tokenizer is a local directory
rm -rf "$out"; mkdir -p "$out"

if [ ${#corpus[@]} -eq 0 ]; then
  stdlib=$("$py" -c 'import sysconfig; print(sysconfig.get_paths()["stdlib"])')
  corpus=("$stdlib"/*.py)  # its top-level modules: ~160 files, ~4.5 MB of Python written by others
  echo "demo: corpus: the Python standard library's top-level modules $stdlib/*.py ($("$py" --version))"
else
  echo "demo: corpus: ${corpus[*]}"
fi
"$py" -m micromoe_megatron.cli prepare-data "${corpus[@]}" "${tokenizer[@]}" --vocab-size 2048 \
  --output-prefix "$out/data/corpus" 2>&1 | grep -v "No CUDA runtime is found"
data_args=$("$py" -c 'import json, shlex, sys; print(shlex.join(json.load(open(sys.argv[1]))["megatron_args"]))' \
  "$out/data/corpus.prepare.json")
eval "data_args=($data_args)"

echo "demo: training configs/tiny-cpu.yaml with --micro-ep 2 on 4 CPU ranks (a few minutes); log: $out/train.log"
set +e
OMP_NUM_THREADS=1 MASTER_PORT=${MASTER_PORT:-29517} PYTHON="$py" \
  "$repo/scripts/train_single_node.sh" "$config" "${data_args[@]}" \
  --moe-routing-trace-path "$out/routing_trace" --micro-ep-metrics-file "$out/micro_ep_metrics.jsonl" "$@" 2>&1 \
  | tee "$out/train.log" | grep --line-buffered -E "iteration +[0-9]+/|^ MicroEP|^pretrain_gpt|Error|Traceback"
status=${PIPESTATUS[0]}
set -e
if [ "$status" -ne 0 ]; then echo "demo: training failed (exit $status); see $out/train.log" >&2; exit "$status"; fi
"$py" -m micromoe_megatron.cli report "$out/micro_ep_metrics.jsonl" --plot "$out/load_per_gpu.png"

# The run's own routing (Megatron's --moe-routing-trace-path), replayed through vanilla EP and MicroEP.
read -r experts ep d < <("$py" -c 'import sys, yaml; c = yaml.safe_load(open(sys.argv[1]))
print(c["megatron"]["num-experts"], c["megatron"]["expert-model-parallel-size"], c["micro_ep"]["micro-ep"])' "$config")
echo "demo: routing analysis of this run (vanilla EP $ep vs MicroEP d = $d, $experts experts per layer):"
"$py" -m micromoe_megatron.cli analyze "$out/routing_trace" --experts "$experts" --ep "$ep" --micro-ep "$d" \
  --plot-dir "$out"
echo "demo: the same routing with adaptive re-placement (replayed causally: re-placed every 4 micro-batches from the loads seen so far):"
"$py" -m micromoe_megatron.cli analyze "$out/routing_trace" --experts "$experts" --ep "$ep" --micro-ep "$d" \
  --placement adaptive --replacement-interval 4
