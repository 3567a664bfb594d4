#!/usr/bin/env python
"""Benchmark: rounds of a live migration (core/migration_plan.py) against their lower bounds.

For each shape (F GPUs x E experts, d replicas) it migrates between placements a re-placement
produces: the symmetric start to the asymmetric placement of a Zipf(s) forecast (slots aligned to
the old table, as ``ReplacementPolicy`` does, and not aligned), and one random placement to another.
Columns: slot moves; ``recv``: the most changed slots on one rank (no plan has fewer rounds);
``Δ``: the most moves one rank sends or receives when every copy reads the old placement (the
edge-colouring bound, König); rounds of the plan without relays and of the default plan (relays
through slots already written, kept when shorter); stashed payloads; planning time (ms, one CPU
core, both plans, CPU time of this process). Pure numpy + HiGHS, no torch.
Usage: PYTHONPATH=. python scripts/bench_migration_rounds.py [--shapes 8x32x2 64x256x2 ...] [--skews 0.9 1.2]
"""

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from micromoe_megatron.core import placement as placements  # noqa: E402
from micromoe_megatron.core.asymmetric import asymmetric_placement  # noqa: E402
from micromoe_megatron.core.forecast import align_slots  # noqa: E402
from micromoe_megatron.core.migration_plan import plan_migration  # noqa: E402


def cases(num_gpus: int, num_experts: int, replicas: int, skews, seed: int = 0):
    slots = num_experts * replicas // num_gpus
    start = placements.symmetric(num_gpus, num_experts, replicas)
    rng = np.random.default_rng(seed)
    for skew in skews:
        forecast = 1e4 * (np.arange(1, num_experts + 1) ** -float(skew))[rng.permutation(num_experts)]
        fresh = asymmetric_placement(forecast, num_gpus, slots, max_evaluations=100)
        yield f"symmetric -> asymmetric s={skew}, aligned", start, align_slots(start, fresh)
        yield f"symmetric -> asymmetric s={skew}, not aligned", start, fresh
    yield "random -> random", placements.random(num_gpus, num_experts, replicas, seed=seed + 1), \
        placements.random(num_gpus, num_experts, replicas, seed=seed + 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=["8x32x2", "64x256x2", "64x256x4"],
                        help="FxExd shapes (GPUs x experts x replicas)")
    parser.add_argument("--skews", nargs="+", type=float, default=[0.9, 1.2])
    args = parser.parse_args()
    print(f"{'shape':>10} {'migration':<40} {'moves':>5} {'recv':>4} {'Δ':>3} | {'rounds':>6} {'relayed':>7} "
          f"{'stashes':>7} {'plan ms':>7}")
    for shape in args.shapes:
        num_gpus, num_experts, replicas = map(int, shape.split("x"))
        for name, old, new in cases(num_gpus, num_experts, replicas, args.skews):
            plain = plan_migration(old, new, relay=False)
            start = time.process_time()
            plan = plan_migration(old, new)
            ms = 1e3 * (time.process_time() - start)
            print(f"{shape:>10} {name:<40} {len(plan.moves):>5} {plan.receive_bound:>4} {plain.bound:>3} | "
                  f"{len(plain.rounds):>6} {len(plan.rounds):>7} {plan.stashes:>7} {ms:>7.0f}", flush=True)


if __name__ == "__main__":
    main()
