"""Benchmarks of the planning core: scheduling time and load balance (they print numbers; no asserts).

``micromoe bench schedule`` and ``micromoe bench balance`` call these.
"""

from __future__ import annotations

import platform
import time

import numpy as np

from ..core import loads, placement, reference
from ..core.schedule import ReplicaScheduler
from .strategies import AdaptiveReplicaLP

SCHEDULE_SHAPES = ((8, 32, 2), (16, 64, 2), (64, 256, 2), (64, 256, 4), (128, 256, 2))
SCHEDULE_SKEWS = (0.5, 1.0, 1.5)
BALANCE_SKEWS = (0.0, 0.5, 0.9, 1.2, 1.5, 2.0)


def _percentiles(values) -> tuple[float, float]:
    return float(np.percentile(values, 50)), float(np.percentile(values, 99))


def drifting_counts(num_gpus: int, num_experts: int, skew: float, steps: int, assignments_per_gpu: int,
                    rng: np.random.Generator, drift: float = 0.3):
    """``steps`` int ``[F, E]`` count matrices whose Zipf popularity drifts: each step mixes the
    previous popularity (weight ``1 - drift``) with a fresh Zipf(``skew``) draw."""
    probabilities = loads.zipf_probabilities(num_experts, skew, rng)
    for _ in range(steps):
        probabilities = (1 - drift) * probabilities + drift * loads.zipf_probabilities(num_experts, skew, rng)
        yield loads.multinomial_counts(probabilities, assignments_per_gpu, num_gpus, rng)


def _vanilla_remote(tokens: np.ndarray, replicas: int) -> int:
    """Tokens that leave their GPU under vanilla EP (``d`` groups of ``F / d``, contiguous experts)."""
    num_gpus, num_experts = tokens.shape
    ep = num_gpus // replicas
    owner = (np.arange(num_gpus)[:, None] // ep) * ep + np.arange(num_experts)[None, :] // (num_experts // ep)
    return int(tokens[owner != np.arange(num_gpus)[:, None]].sum())


def bench_schedule(steps: int = 200, skews=SCHEDULE_SKEWS, shapes=SCHEDULE_SHAPES, tokens_per_gpu: int = 8192,
                   top_k: int = 2, gpus_per_node: int = 8, floor_every: int = 20, seed: int = 0,
                   progress=None) -> dict:
    """Per-layer planning time (host counts in -> plan out, Python included), p50 / p99, and traffic.

    "Plan out" is what one rank's dispatcher needs: the quota and that rank's routes
    (``plan.rank_routes``; the rank cycles over the steps), not every rank's routes.

    For every shape and Zipf skew, one scheduler plans ``steps`` micro-batches of a drifting load
    sequence. Times are CPU time of this process (``time.process_time``: a shared, busy host
    inflates wall-clock times but not these), after one warm-up plan; ``first_plan_s`` is the CPU
    time of the very first plan of the run (numba compiles the planner's kernels there, or loads
    them from its on-disk cache). ``lp_p50_ms`` times HiGHS on every step's loads (reduced LPP 1,
    warm start); the planner itself asks HiGHS only after several cuts. Remote fractions are
    means over the steps; the floor (HiGHS min-cost LP at the plan's max load,
    ``core.reference``) and vanilla EP are evaluated every ``floor_every`` steps, and
    ``remote_fraction_sampled`` is the plan's mean over those same steps.
    """
    rows = []
    first_plan_s = None
    for num_gpus, num_experts, replicas in shapes:
        layout = placement.symmetric(num_gpus, num_experts, replicas)
        for skew in skews:
            rng = np.random.default_rng(seed)
            scheduler = ReplicaScheduler(layout.holders, num_gpus, gpus_per_node=gpus_per_node)
            highs = ReplicaScheduler(layout.holders, num_gpus, gpus_per_node=gpus_per_node, solve_lp=True)
            times, lp_times, remote, fallbacks = [], [], [], 0
            sampled, floors, vanilla = [], [], []
            counts = list(drifting_counts(num_gpus, num_experts, skew, steps, tokens_per_gpu * top_k, rng))
            start = time.process_time()
            scheduler.plan(counts[0])  # warm-up (compiles the kernels on the run's first plan)
            if first_plan_s is None:
                first_plan_s = time.process_time() - start
            for step, tokens in enumerate(counts):
                start = time.process_time()
                plan = scheduler.plan(tokens)
                plan.rank_routes(step % num_gpus)  # what each rank's dispatcher builds from the plan
                times.append((time.process_time() - start) * 1e3)
                start = time.process_time()
                highs._solve_lp(tokens.sum(axis=0))
                lp_times.append((time.process_time() - start) * 1e3)
                fallbacks += plan.fallback
                total = tokens.sum()
                remote.append(plan.remote_tokens / total)
                if step % floor_every == 0:
                    sampled.append(remote[-1])
                    floors.append(reference.remote_floor(layout.holders, tokens, plan.max_load) / total)
                    vanilla.append(_vanilla_remote(tokens, replicas) / total)
            p50, p99 = _percentiles(times)
            row = {"gpus": num_gpus, "experts": num_experts, "replicas": replicas, "zipf_s": skew,
                   "p50_ms": p50, "p99_ms": p99, "lp_p50_ms": _percentiles(lp_times)[0],
                   "remote_fraction": float(np.mean(remote)),
                   "remote_fraction_sampled": float(np.mean(sampled)),
                   "remote_floor_fraction": float(np.mean(floors)),
                   "vanilla_remote_fraction": float(np.mean(vanilla)), "fallbacks": fallbacks}
            rows.append(row)
            if progress:
                progress(f"  {num_gpus} x {num_experts} d={replicas} s={skew}: p50 {p50:.3f} ms, p99 {p99:.3f} ms")
    return {"benchmark": "schedule", "steps": steps, "tokens_per_gpu": tokens_per_gpu, "top_k": top_k,
            "gpus_per_node": gpus_per_node, "floor_every": floor_every, "clock": "process_time",
            "first_plan_s": first_plan_s, "machine": _machine(), "rows": rows}


def drifting_popularity(num_experts: int, skew: float, steps: int, drift: float, rng: np.random.Generator,
                        temperature: float = 0.25) -> np.ndarray:
    """``[steps, E]`` routing probabilities whose popularity drifts smoothly at a fixed Zipf skew.

    Each expert has a latent score; every step mixes the previous scores with a fresh normal draw
    (``z <- sqrt(1 - drift) z + sqrt(drift) N(0, 1)``, stationary), and the probabilities are
    Zipf(skew) over the experts' soft ranks (``rank_e = 1/2 + sum_e' sigmoid((z_e' - z_e) / T)``), so
    the skew stays that of Zipf(skew) while the hot experts change gradually. Mixing the
    probabilities themselves would flatten them towards uniform within a few dozen steps.
    ``drift = 1``: independent draws every step (nothing to forecast).
    """
    if not 0.0 < drift <= 1.0:
        raise ValueError(f"drift must lie in (0, 1], got {drift}")
    scores = rng.standard_normal(num_experts)
    out = np.empty((steps, num_experts))
    for step in range(steps):
        scores = np.sqrt(1.0 - drift) * scores + np.sqrt(drift) * rng.standard_normal(num_experts)
        rank = 0.5 + (1.0 / (1.0 + np.exp((scores[None, :] - scores[:, None]) / temperature))).sum(axis=1)
        weights = rank ** -float(skew)
        out[step] = weights / weights.sum()
    return out


ADAPTIVE_TARGET = 1.02  # GPU max/mean the adaptive placement aims to stay under (design Sec. 6)


def bench_balance(steps: int = 50, skews=BALANCE_SKEWS, num_gpus: int = 8, num_experts: int = 32,
                  replicas: int = 2, top_k: int = 2, tokens_per_gpu: int = 8192, seed: int = 0,
                  drift: float = 0.005, warm_up: int = 4, replacement_interval: int = 1,
                  progress=None) -> dict:
    """GPU max/mean load per micro-batch: vanilla EP vs MicroEP (symmetric, random, adaptive), with Eq. 3.

    The popularity drifts (``drifting_popularity``), so a forecast means something; each step
    routes ``tokens_per_gpu`` tokens per GPU with top-k (exact top-k sampling up to 16 GPUs,
    multinomial token-expert pairs above, where exact sampling is too slow). ``adaptive`` starts
    symmetric and re-places every ``replacement_interval`` steps from the steps already seen
    (causal); the first ``warm_up`` steps are left out of every column's percentiles. ``bound`` is
    the exact Eq. 3 optimum of the symmetric placement over the mean (<= 16 GPUs only).
    ``replica_bound``: the adaptive placement's floor from its replica counts alone, the busiest
    expert's tokens per replica over the mean GPU load (no slot table does better); rows also count
    the adaptive micro-batches above ``ADAPTIVE_TARGET`` and how many of them were the first on a
    new placement.
    Plans are deterministic (no wall-clock limit), so a busy host cannot turn solves into fallback
    plans; fallbacks (the planner's work limit) are still counted per row.
    """
    layouts = {
        "vanilla": placement.vanilla(num_gpus, num_experts),
        "symmetric": placement.symmetric(num_gpus, num_experts, replicas),
        "random": placement.random(num_gpus, num_experts, replicas, seed=seed),
    }
    exact_bound = exact_topk = num_gpus <= 16
    rows = []
    for skew in skews:
        rng = np.random.default_rng(seed)
        popularity = drifting_popularity(num_experts, skew, steps + warm_up, drift, rng)
        schedulers = {name: ReplicaScheduler(p.holders, num_gpus)
                      for name, p in layouts.items()}
        adaptive = AdaptiveReplicaLP(layouts["symmetric"], replacement_interval)
        fallbacks = 0
        ratios = {name: [] for name in [*layouts, "adaptive", "bound", "replica_bound"]}
        outliers = after_replacement = 0
        previous = adaptive.policy.placement
        start = time.perf_counter()
        for step, probabilities in enumerate(popularity):
            if exact_topk:
                tokens = loads.sample_topk_counts(probabilities, tokens_per_gpu, top_k, num_gpus, rng)
            else:
                tokens = loads.multinomial_counts(probabilities, tokens_per_gpu * top_k, num_gpus, rng)
            current = adaptive.policy.placement  # what this micro-batch is planned on
            fresh, previous = current is not previous, current
            outcome = adaptive.outcome(tokens)
            if step < warm_up:
                continue
            ratios["adaptive"].append(outcome.imbalance)
            # No table with these replica counts beats the busiest expert's tokens per replica.
            ratios["replica_bound"].append(loads.replica_floor(tokens.sum(axis=0), current.logcnt, num_gpus))
            if outcome.imbalance > ADAPTIVE_TARGET:
                outliers += 1
                after_replacement += fresh
            fallbacks += outcome.fallback
            for name, scheduler in schedulers.items():
                plan = scheduler.plan(tokens)
                ratios[name].append(plan.imbalance)
                fallbacks += plan.fallback
            if exact_bound:
                mean = tokens.sum() / num_gpus
                ratios["bound"].append(placement.max_induced_density(
                    layouts["symmetric"].holders, tokens.sum(axis=0), num_gpus) / mean)
        row = {"zipf_s": skew, "replacements": adaptive.replacements, "fallbacks": fallbacks,
               "adaptive_outliers": outliers, "outliers_after_replacement": after_replacement,
               "slots_moved": adaptive.policy.slots_moved, "seconds": time.perf_counter() - start}
        for name, values in ratios.items():
            if values:
                row[f"{name}_p50"], row[f"{name}_p99"] = _percentiles(values)
        rows.append(row)
        if progress:
            progress(f"  s={skew}: vanilla p50 {row['vanilla_p50']:.3f}, symmetric p50 {row['symmetric_p50']:.3f}, "
                     f"adaptive p99 {row['adaptive_p99']:.3f}")
    return {"benchmark": "balance", "steps": steps, "gpus": num_gpus, "experts": num_experts,
            "replicas": replicas, "top_k": top_k, "tokens_per_gpu": tokens_per_gpu, "drift": drift,
            "warm_up": warm_up, "replacement_interval": replacement_interval,
            "sampling": "exact top-k" if exact_topk else "multinomial pairs",
            "machine": _machine(), "rows": rows}


def _machine() -> str:
    return f"{platform.processor() or platform.machine()}, Python {platform.python_version()}"


def format_schedule(result: dict) -> str:
    lines = [f"Planning CPU time per layer (ms, counts in -> quota and one rank's routes out), {result['steps']} drifting steps, "
             f"{result['tokens_per_gpu']} tokens/GPU, top-{result['top_k']}, {result['gpus_per_node']} GPUs/node; "
             f"{result['machine']}",
             f"{'GPUs':>5} {'experts':>7} {'d':>2} {'s':>4} | {'p50':>7} {'p99':>7} | {'HiGHS p50':>9} | "
             f"{'remote':>7} {'sampled':>7} {'floor':>7} {'vanilla':>7} | fallbacks"]
    for r in result["rows"]:
        lines.append(f"{r['gpus']:>5} {r['experts']:>7} {r['replicas']:>2} {r['zipf_s']:>4} | {r['p50_ms']:>7.3f} "
                     f"{r['p99_ms']:>7.3f} | {r['lp_p50_ms']:>9.3f} | {r['remote_fraction']:>7.2%} "
                     f"{r['remote_fraction_sampled']:>7.2%} {r['remote_floor_fraction']:>7.2%} "
                     f"{r['vanilla_remote_fraction']:>7.2%} | {r['fallbacks']}")
    lines.append(f"First plan of the run (kernel compile or cache load): {result['first_plan_s']:.2f} s CPU. "
                 "HiGHS p50: the LP alone on every step's loads (the plan asks it only after several cuts). "
                 "remote: tokens leaving "
                 f"their GPU; sampled / floor / vanilla: every {result['floor_every']}th step, the plan, the "
                 "fewest possible at the same max load (HiGHS), vanilla EP.")
    return "\n".join(lines)


def format_balance(result: dict) -> str:
    lines = [f"GPU max/mean load (p50 / p99 over {result['steps']} micro-batches): {result['gpus']} GPUs, "
             f"{result['experts']} experts, d={result['replicas']}, top-{result['top_k']}, "
             f"{result['tokens_per_gpu']} tokens/GPU ({result['sampling']}); drifting popularity "
             f"(drift {result['drift']}/step), adaptive re-placement check every "
             f"{result['replacement_interval']} micro-batches",
             f"{'zipf s':>6} | {'vanilla EP':>15} | {'MicroEP symmetric':>17} | {'MicroEP random':>15} | "
             f"{'MicroEP adaptive':>16} | {'its replica bound':>17} | {'Eq.3 bound (sym)':>16} | "
             f"re-placements (slots moved) | adaptive > {ADAPTIVE_TARGET} (first on a new placement)"]
    for r in result["rows"]:
        cells = [f"{r.get(k + '_p50', float('nan')):.3f} / {r.get(k + '_p99', float('nan')):.3f}"
                 for k in ("vanilla", "symmetric", "random", "adaptive", "replica_bound", "bound")]
        lines.append(f"{r['zipf_s']:>6} | {cells[0]:>15} | {cells[1]:>17} | {cells[2]:>15} | {cells[3]:>16} | "
                     f"{cells[4]:>17} | {cells[5]:>16} | {str(r['replacements']) + ' (' + str(r['slots_moved']) + ')':>27}"
                     f" | {r['adaptive_outliers']} ({r['outliers_after_replacement']})"
                     + (f"; {r['fallbacks']} LP fallbacks" if r.get("fallbacks") else ""))
    return "\n".join(lines)
