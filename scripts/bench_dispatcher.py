#!/usr/bin/env python
"""Benchmark: MicroMoELayer vs Megatron's stock alltoall MoELayer on 4 gloo ranks (CPU), same data.

Prints the MoE-layer forward+backward time of both (median over steps, slowest rank), the overhead
ratio, and under forced imbalance the straggler proxy: max over ranks of per-rank expert compute
time. Usage: .venv/bin/python scripts/bench_dispatcher.py [--steps N] [--json]
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests.dist_pool import RankPool  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--tokens-scale", type=int, default=64, help="x 32 tokens per rank")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--ffn", type=int, default=512)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    pool = RankPool(world_size=4)
    rows = {}
    try:
        for name, hot in (("balanced", None), ("forced imbalance (hot expert 5)", 5)):
            print(f"running {name} ...", file=sys.stderr, flush=True)
            ranks = pool.run("tests.dist_cases:overhead_benchmark", steps=args.steps,
                             tokens_scale=args.tokens_scale, hot_expert=hot, hidden=args.hidden,
                             ffn=args.ffn)
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
    if args.json:
        print(json.dumps(rows))
        return
    print(f"4 gloo ranks on CPU, 8 experts top-2, hidden {args.hidden}, FFN {args.ffn}, "
          f"{32 * args.tokens_scale} tokens/rank; "
          "stock EP=2 (EDP 2) vs MicroEP d=2 (group of 4); medians, slowest rank")
    for name, r in rows.items():
        print(f"{name}: layer fwd+bwd stock {r['stock_layer_ms']:.2f} ms, MicroEP {r['micro_ep_layer_ms']:.2f} ms "
              f"(ratio {r['overhead_ratio']:.3f}); max expert compute stock {r['stock_max_expert_ms']:.2f} ms, "
              f"MicroEP {r['micro_ep_max_expert_ms']:.2f} ms; schedule {r['schedule_ms']:.3f} ms; "
              f"GPU max/mean {r['imbalance_before']:.3f} -> {r['imbalance_after']:.3f}")


if __name__ == "__main__":
    main()
