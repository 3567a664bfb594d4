"""Benchmarks of the planning core: scheduling time and load balance (they print numbers; no asserts).

``micromoe bench schedule`` and ``micromoe bench balance`` call these.
"""

from __future__ import annotations

import platform
import time

import numpy as np

from ..core import loads, placement
from ..core.schedule import ReplicaScheduler
from .strategies import AdaptiveReplicaLP

SCHEDULE_SHAPES = ((8, 32, 2), (16, 64, 2), (64, 256, 2), (64, 256, 4))
BALANCE_SKEWS = (0.0, 0.5, 0.9, 1.2, 1.5, 2.0)
BALANCE_TIME_LIMIT_S = 10.0


def _percentiles(values) -> tuple[float, float]:
    return float(np.percentile(values, 50)), float(np.percentile(values, 99))


def bench_schedule(steps: int = 200, skew: float = 1.0, tokens_per_gpu: int = 8192, top_k: int = 2,
                   gpus_per_node: int = 8, shapes=SCHEDULE_SHAPES, seed: int = 0, progress=None) -> dict:
    """Per-layer scheduling time (host counts in -> plan out, Python included), p50 / p99.

    Two load sequences per shape, each ``steps`` long: ``steady`` keeps the experts' popularity
    order fixed and resamples counts each step (consecutive micro-batches of one layer, where
    the warm start pays), ``reshuffled`` draws a new popularity order every step (worst case).
    """
    rows = []
    for num_gpus, num_experts, replicas in shapes:
        row = {"gpus": num_gpus, "experts": num_experts, "replicas": replicas}
        layout = placement.symmetric(num_gpus, num_experts, replicas)
        for sequence in ("steady", "reshuffled"):
            rng = np.random.default_rng(seed)
            probabilities = loads.zipf_probabilities(num_experts, skew, rng)
            scheduler = ReplicaScheduler(layout.holders, num_gpus, gpus_per_node=gpus_per_node)
            times, fallbacks = [], 0
            for _ in range(steps):
                if sequence == "reshuffled":
                    probabilities = loads.zipf_probabilities(num_experts, skew, rng)
                tokens = loads.multinomial_counts(probabilities, tokens_per_gpu * top_k, num_gpus, rng)
                start = time.perf_counter()
                plan = scheduler.plan(tokens)
                times.append((time.perf_counter() - start) * 1e3)
                fallbacks += plan.fallback
            p50, p99 = _percentiles(times)
            row[f"{sequence}_p50_ms"], row[f"{sequence}_p99_ms"] = p50, p99
            row[f"{sequence}_fallbacks"] = fallbacks
        rows.append(row)
        if progress:
            progress(f"  {num_gpus} GPUs x {num_experts} experts x {replicas} replicas: "
                     f"steady p50 {row['steady_p50_ms']:.3f} ms")
    return {"benchmark": "schedule", "steps": steps, "zipf_s": skew, "tokens_per_gpu": tokens_per_gpu,
            "top_k": top_k, "gpus_per_node": gpus_per_node, "machine": _machine(), "rows": rows}


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
    The LP time limit is ``BALANCE_TIME_LIMIT_S``: this measures balance, so a busy host must not
    turn solves into fallback plans; fallbacks are still counted per row.
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
        schedulers = {name: ReplicaScheduler(p.holders, num_gpus, time_limit_s=BALANCE_TIME_LIMIT_S)
                      for name, p in layouts.items()}
        adaptive = AdaptiveReplicaLP(layouts["symmetric"], replacement_interval, time_limit_s=BALANCE_TIME_LIMIT_S)
        fallbacks = 0
        ratios = {name: [] for name in [*layouts, "adaptive", "bound"]}
        start = time.perf_counter()
        for step, probabilities in enumerate(popularity):
            if exact_topk:
                tokens = loads.sample_topk_counts(probabilities, tokens_per_gpu, top_k, num_gpus, rng)
            else:
                tokens = loads.multinomial_counts(probabilities, tokens_per_gpu * top_k, num_gpus, rng)
            outcome = adaptive.outcome(tokens)
            if step < warm_up:
                continue
            ratios["adaptive"].append(outcome.imbalance)
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
    lines = [f"Scheduling time per layer (ms), {result['steps']} steps, Zipf s={result['zipf_s']}, "
             f"{result['tokens_per_gpu']} tokens/GPU, top-{result['top_k']}, "
             f"{result['gpus_per_node']} GPUs/node; {result['machine']}",
             f"{'GPUs':>5} {'experts':>8} {'d':>3} | {'steady p50':>10} {'p99':>8} | "
             f"{'reshuffled p50':>14} {'p99':>8} | fallbacks"]
    for r in result["rows"]:
        lines.append(f"{r['gpus']:>5} {r['experts']:>8} {r['replicas']:>3} | {r['steady_p50_ms']:>10.3f} "
                     f"{r['steady_p99_ms']:>8.3f} | {r['reshuffled_p50_ms']:>14.3f} {r['reshuffled_p99_ms']:>8.3f}"
                     f" | {r['steady_fallbacks'] + r['reshuffled_fallbacks']}")
    lines.append("steady: fixed expert popularity, counts resampled each step (warm start pays); "
                 "reshuffled: new popularity order every step.")
    return "\n".join(lines)


def format_balance(result: dict) -> str:
    lines = [f"GPU max/mean load (p50 / p99 over {result['steps']} micro-batches): {result['gpus']} GPUs, "
             f"{result['experts']} experts, d={result['replicas']}, top-{result['top_k']}, "
             f"{result['tokens_per_gpu']} tokens/GPU ({result['sampling']}); drifting popularity "
             f"(drift {result['drift']}/step), adaptive re-placement check every "
             f"{result['replacement_interval']} micro-batches",
             f"{'zipf s':>6} | {'vanilla EP':>15} | {'MicroEP symmetric':>17} | {'MicroEP random':>15} | "
             f"{'MicroEP adaptive':>16} | {'Eq.3 bound (sym)':>16} | re-placements (slots moved)"]
    for r in result["rows"]:
        cells = [f"{r.get(k + '_p50', float('nan')):.3f} / {r.get(k + '_p99', float('nan')):.3f}"
                 for k in ("vanilla", "symmetric", "random", "adaptive", "bound")]
        lines.append(f"{r['zipf_s']:>6} | {cells[0]:>15} | {cells[1]:>17} | {cells[2]:>15} | {cells[3]:>16} | "
                     f"{cells[4]:>16} | {r['replacements']} ({r['slots_moved']})"
                     + (f"; {r['fallbacks']} LP fallbacks" if r.get("fallbacks") else ""))
    return "\n".join(lines)
