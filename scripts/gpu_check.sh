#!/usr/bin/env bash
# One prepared GPU check (run inside the Docker image or any CUDA + TransformerEngine machine with
# >= 2 GPUs): the unit tests, then stock vs MicroEP on the same tiny GPT-MoE with the TE spec,
# grouped GEMM and bf16, printing per-iteration losses side by side and the median ms/iteration.
#   scripts/gpu_check.sh [ITERS]          (env: NGPU, default: all visible GPUs)
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
py=${PYTHON:-$([ -x "$repo/.venv/bin/python" ] && echo "$repo/.venv/bin/python" || echo python3)}
iters=${1:-30}
ngpu=${NGPU:-$("$py" -c 'import torch; print(torch.cuda.device_count())')}
if [ "$ngpu" -lt 2 ]; then echo "gpu_check: needs >= 2 GPUs (found $ngpu); MicroEP merges EP groups across GPUs" >&2; exit 2; fi
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | head -1
"$py" -m pytest -q "$repo/tests" -k "not pretrain" -x
ep=$((ngpu / 2))
out=$(mktemp -d)
common=(--num-layers 4 --hidden-size 1024 --num-attention-heads 16 --seq-length 2048 --max-position-embeddings 2048
  --micro-batch-size 4 --global-batch-size $((4 * ngpu)) --train-iters "$iters" --lr 1e-4 --bf16
  --num-experts $((4 * ep)) --moe-router-topk 2 --moe-token-dispatcher-type alltoall --moe-grouped-gemm
  --expert-model-parallel-size "$ep" --mock-data --tokenizer-type NullTokenizer --vocab-size 32000
  --log-interval 1 --eval-iters 0 --eval-interval 100000 --hidden-dropout 0 --attention-dropout 0
  --use-distributed-optimizer --transformer-impl transformer_engine)
run() {
  CUDA_DEVICE_MAX_CONNECTIONS=1 "$py" -m torch.distributed.run --nproc-per-node "$ngpu" --master-addr 127.0.0.1 \
    --master-port "${MASTER_PORT:-29531}" "$repo/scripts/pretrain_gpt.py" "${common[@]}" "$@"
}
run > "$out/stock.log" 2>&1
run --micro-ep 2 --micro-ep-metrics-file "$out/metrics.jsonl" > "$out/micro.log" 2>&1
"$py" - "$out" <<'PY'
import re, statistics, sys
out = sys.argv[1]
def parse(name):
    text = open(f"{out}/{name}.log").read()
    rows = re.findall(r"iteration\s+(\d+)/.*?per iteration \(ms\): ([0-9.]+).*?lm loss: ([0-9.E+-]+)", text)
    return {int(i): (float(ms), float(loss)) for i, ms, loss in rows}
stock, micro = parse("stock"), parse("micro")
print("iter  loss stock    loss MicroEP   ms stock  ms MicroEP")
for i in sorted(stock):
    print(f"{i:>4}  {stock[i][1]:.6f}   {micro.get(i, (0, float('nan')))[1]:.6f}   {stock[i][0]:8.1f}  {micro.get(i, (float('nan'),))[0]:8.1f}")
steady = [i for i in stock if i > 5 and i in micro]
print(f"median ms/iter after warm-up: stock {statistics.median(stock[i][0] for i in steady):.1f}, "
      f"MicroEP {statistics.median(micro[i][0] for i in steady):.1f}")
print(f"max |loss difference| {max(abs(stock[i][1] - micro[i][1]) for i in steady):.3e}")
PY
"$py" -m micromoe_megatron.cli report "$out/metrics.jsonl" --plot "$out/load_per_gpu.png"
if [ "$ngpu" -ge 4 ]; then  # tensor parallelism 2 (sequence parallel), expert TP 1: not runnable on CPU
  tp=(--tensor-model-parallel-size 2 --sequence-parallel --expert-tensor-parallel-size 1
      --expert-model-parallel-size $((ngpu / 4)) --train-iters 5)
  run "${tp[@]}" > "$out/stock_tp2.log" 2>&1
  run "${tp[@]}" --micro-ep 2 > "$out/micro_tp2.log" 2>&1
  echo "TP 2, iteration 1: stock $(grep -o 'lm loss: [0-9.E+-]*' "$out/stock_tp2.log" | head -1), MicroEP" \
       "$(grep -o 'lm loss: [0-9.E+-]*' "$out/micro_tp2.log" | head -1)"
fi
echo "gpu_check: logs in $out"
