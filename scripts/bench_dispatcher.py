#!/usr/bin/env python
"""Benchmark: MicroMoELayer vs Megatron's stock alltoall MoELayer on 4 gloo ranks (CPU), same data.

Prints the MoE-layer forward+backward time of both (median over steps, slowest rank), the overhead
ratio, and under forced imbalance the straggler proxy: max over ranks of per-rank expert compute
time. Then the dispatcher's peak extra memory over stock at paper sizes (T = 8k-16k tokens per
rank, E = 256, d = 2-4, top-8), measured on the CPU with a live-tensor accounting of
``dispatch_preprocess`` and of the whole forward pass (training/gpu_bench.py ``LiveBytes``; one rank
of the group emulated with the fake process group). The hidden size there is small
(``--memory-hidden``): the index and routing-map terms do not depend on it; the activation
buffers scale with it (the chunk sort holds a second copy of the routed tokens while it runs).
Usage: PYTHONPATH=. python scripts/bench_dispatcher.py [--steps N] [--json] [--skip-layer] [--skip-memory]
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from micromoe_megatron.training.rank_pool import RankPool  # noqa: E402

MEMORY_SIZES = [(8192, 256, 2), (16384, 256, 2), (16384, 256, 4)]   # (T, E, d); EP 8, top-8


def layer_rows(args) -> dict:
    pool = RankPool(world_size=4)
    rows = {}
    try:
        for name, hot in (("balanced", None), ("forced imbalance (hot expert 5)", 5)):
            print(f"running {name} ...", file=sys.stderr, flush=True)
            ranks = pool.run("micromoe_megatron.training.layer_cases:overhead_benchmark", steps=args.steps,
                             tokens_scale=args.tokens_scale, hot_expert=hot, hidden=args.hidden, ffn=args.ffn)
            rows[name] = {
                "stock_layer_ms": max(r["stock_ms"] for r in ranks),
                "micro_ep_layer_ms": max(r["micro_ms"] for r in ranks),
                "stock_max_expert_ms": max(r["stock_expert_ms"] for r in ranks),
                "micro_ep_max_expert_ms": max(r["micro_expert_ms"] for r in ranks),
                "schedule_ms": max(r["schedule_ms"] for r in ranks),
                "imbalance_before": ranks[0]["imbalance_before"],
                "imbalance_after": ranks[0]["imbalance_after"],
            }
            rows[name]["overhead_ratio"] = rows[name]["micro_ep_layer_ms"] / rows[name]["stock_layer_ms"]
    finally:
        pool.close()
    return rows


def memory_rows(hidden: int) -> list:
    import torch

    from micromoe_megatron.mcore import cpu_compat
    from micromoe_megatron.training import gpu_bench

    cpu_compat.apply()
    rows = []
    for tokens, experts, replicas in MEMORY_SIZES:
        print(f"memory T={tokens} E={experts} d={replicas} ...", file=sys.stderr, flush=True)
        case = gpu_bench.Case(tokens, hidden, experts, ep=8, replicas=replicas, top_k=8)
        extra = gpu_bench.dispatch_extra_bytes(case, torch.device("cpu"), torch.float32)
        rows.append({"tokens": tokens, "experts": experts, "replicas": replicas, "top_k": 8, "hidden": hidden,
                     "extra_bytes_preprocess": extra["preprocess"], "extra_bytes_forward": extra["forward"]})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--tokens-scale", type=int, default=64, help="x 32 tokens per rank")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--ffn", type=int, default=512)
    parser.add_argument("--memory-hidden", type=int, default=8, help="hidden size of the memory accounting")
    parser.add_argument("--skip-layer", action="store_true")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    rows = {} if args.skip_layer else layer_rows(args)
    memory = [] if args.skip_memory else memory_rows(args.memory_hidden)
    if args.json:
        print(json.dumps({"layer": rows, "memory": memory}))
        return
    if rows:
        print(f"4 gloo ranks on CPU, 8 experts top-2, hidden {args.hidden}, FFN {args.ffn}, "
              f"{32 * args.tokens_scale} tokens/rank; "
              "stock EP=2 (EDP 2) vs MicroEP d=2 (group of 4); medians, slowest rank")
    for name, r in rows.items():
        print(f"{name}: layer fwd+bwd stock {r['stock_layer_ms']:.2f} ms, MicroEP {r['micro_ep_layer_ms']:.2f} ms "
              f"(ratio {r['overhead_ratio']:.3f}); max expert compute stock {r['stock_max_expert_ms']:.2f} ms, "
              f"MicroEP {r['micro_ep_max_expert_ms']:.2f} ms; schedule {r['schedule_ms']:.3f} ms; "
              f"GPU max/mean {r['imbalance_before']:.3f} -> {r['imbalance_after']:.3f}")
    if memory:
        print(f"peak extra bytes over stock, one rank (CPU live-tensor accounting, fp32, hidden "
              f"{args.memory_hidden}, EP 8, top-8): inside dispatch_preprocess / over the forward pass")
    for r in memory:
        print(f"  T={r['tokens']:>5} E={r['experts']} d={r['replicas']}: {r['extra_bytes_preprocess'] / 2**20:8.2f} MiB"
              f" / {r['extra_bytes_forward'] / 2**20:8.2f} MiB")


if __name__ == "__main__":
    main()
