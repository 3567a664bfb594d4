"""Run every strategy on routing counts and project MoE-layer and step times."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from .cost import CostModel, ModelShape
from .counts import RoutingCounts
from .strategies import build_strategies

A2A_PER_LAYER = 4  # dispatch + combine, forward + backward


@dataclass
class StrategyResult:
    """One strategy over all simulated layers and micro-batches (ms are per MoE layer and
    micro-batch unless named ``step``)."""

    strategy: str
    imbalance_p50: float
    imbalance_p99: float
    compute_ms: float
    all_to_all_ms: float
    overhead_ms: float
    layer_ms: float
    layer_ms_p99: float
    step_ms: float
    gain_vs_vanilla_pct: float = 0.0
    fallbacks: int = 0
    migration_ms: float = 0.0  # adaptive re-placement: migration time per layer and micro-batch (mean)
    replacements: int = 0   # adaptive re-placements, summed over layers (max over groups)

    def to_json(self) -> dict:
        return asdict(self)


def step_ms(shape: ModelShape, cost: CostModel, moe_layer_ms: float) -> float:
    """1F1B: (micro-batches + PP - 1) slots, each ``layers / PP`` layers of dense + MoE time."""
    per_stage_layers = shape.num_layers / shape.pp
    return (shape.micro_batches_per_step + shape.pp - 1) * per_stage_layers * (cost.dense_ms(shape) + moe_layer_ms)


def simulate(counts: RoutingCounts, shape: ModelShape, cost: CostModel | None = None,
             history_fraction: float = 0.25, seed: int = 0, progress=None, replacement_interval: int | None = None,
             replacement_threshold: float = 0.0) -> list[StrategyResult]:
    """Every strategy on every layer and micro-batch of ``counts``.

    GPUs are taken in groups of ``F = micro_ep x EP`` consecutive ranks (one MicroEP group each);
    a layer waits for its slowest group. The first ``history_fraction`` of each layer's
    micro-batches is the EPLB-style strategy's load history; all strategies are evaluated on the
    rest (on all of them when there is a single micro-batch).

    The adaptive strategy also starts from that history, then checks every
    ``replacement_interval`` micro-batches (default: one training iteration,
    ``shape.micro_batches_per_step``, since live migration runs between iterations) and pays the
    migration time of ``cost.migration(shape)`` for what it moves.
    """
    cost = cost or CostModel()
    group = shape.ep * shape.micro_ep
    if counts.num_gpus % group:
        raise ValueError(f"{counts.num_gpus} GPUs in the counts are not a multiple of the MicroEP group "
                         f"{shape.micro_ep} x EP {shape.ep} = {group}")
    if counts.num_experts % shape.ep:
        raise ValueError(f"EP {shape.ep} must divide the {counts.num_experts} experts")
    interval = replacement_interval or shape.micro_batches_per_step
    adaptive = dict(interval=interval, threshold=replacement_threshold, migration=cost.migration(shape),
                    ms_per_token=cost.ms_per_assignment(shape))
    samples: dict[str, dict[str, list]] = {}
    replacements: dict[str, int] = {}
    for layer, array in sorted(counts.layers.items()):
        # At least one micro-batch of history (EPLB needs one) and at least one evaluated.
        history_len = min(max(1, int(len(array) * history_fraction)), len(array) - 1) if len(array) > 1 else 0
        history, evaluated = (array[:history_len], array[history_len:]) if history_len else (array, array)
        groups = [slice(start, start + group) for start in range(0, counts.num_gpus, group)]
        strategies = [build_strategies(group, counts.num_experts, shape.ep, shape.micro_ep, history[:, g],
                                       gpus_per_node=cost.gpus_per_node, allgather_ms=cost.allgather_ms,
                                       schedule_ms=cost.schedule_ms, seed=seed, adaptive=adaptive)
                      for g in groups]
        for tokens in evaluated:
            per_strategy = [[s.outcome(tokens[g]) for s, g in zip(column, groups)] for column in zip(*strategies)]
            # The ideal's all-to-all: the least per-GPU-average time of any real strategy.
            best_mean_a2a = min(max(float(cost.per_gpu_all_to_all_ms(o.traffic, shape).mean()) for o in outcomes)
                                for column, outcomes in zip(strategies[0], per_strategy)
                                if not getattr(column, "ideal", False))
            total = float(tokens.sum())
            for column, outcomes in zip(strategies[0], per_strategy):
                compute = max(float(cost.expert_ms(o.load, shape).max()) for o in outcomes)
                if getattr(column, "ideal", False):
                    a2a = A2A_PER_LAYER * (best_mean_a2a + cost.a2a_latency_ms)
                else:
                    a2a = A2A_PER_LAYER * max(cost.all_to_all_ms(o.traffic, shape) for o in outcomes)
                overhead = max(o.overhead_ms for o in outcomes)
                peak = max(float(o.load.max()) for o in outcomes)
                imbalance = peak / (total / counts.num_gpus) if total else 1.0
                entry = samples.setdefault(column.name, {k: [] for k in
                                           ("imbalance", "compute", "a2a", "overhead", "fallback", "migration")})
                for key, value in (("imbalance", imbalance), ("compute", compute), ("a2a", a2a),
                                   ("overhead", overhead), ("fallback", any(o.fallback for o in outcomes)),
                                   ("migration", max(o.migration_ms for o in outcomes))):
                    entry[key].append(value)
        for column in zip(*strategies):
            replacements[column[0].name] = replacements.get(column[0].name, 0) + max(
                getattr(s, "replacements", 0) for s in column)
        if progress:
            progress(f"  layer {layer}: {len(evaluated)} micro-batches x {len(strategies[0])} strategies")
    results = []
    for name, entry in samples.items():
        # Host solve times are wall-clock and spiky on a busy machine: use their median.
        overhead = float(np.median(entry["overhead"]))
        layer_times = np.array(entry["compute"]) + np.array(entry["a2a"]) + overhead + np.array(entry["migration"])
        mean_layer = float(layer_times.mean())
        results.append(StrategyResult(
            strategy=name, imbalance_p50=float(np.percentile(entry["imbalance"], 50)),
            imbalance_p99=float(np.percentile(entry["imbalance"], 99)), compute_ms=float(np.mean(entry["compute"])),
            all_to_all_ms=float(np.mean(entry["a2a"])), overhead_ms=overhead,
            layer_ms=mean_layer, layer_ms_p99=float(np.percentile(layer_times, 99)),
            step_ms=step_ms(shape, cost, mean_layer), fallbacks=int(sum(entry["fallback"])),
            replacements=replacements.get(name, 0), migration_ms=float(np.mean(entry["migration"]))))
    vanilla = next(r for r in results if r.strategy == "vanilla EP")
    for r in results:
        r.gain_vs_vanilla_pct = 100.0 * (vanilla.step_ms / r.step_ms - 1.0)
    return results


def format_results(results: list[StrategyResult]) -> str:
    header = (f"{'strategy':<34} {'max/mean p50':>12} {'p99':>6} {'compute':>8} {'a2a':>7} {'overhead':>8} "
              f"{'migration':>9} {'MoE layer':>9} {'step':>9} {'gain':>7}")
    lines = [header, f"{'':<34} {'':>12} {'':>6} {'ms':>8} {'ms':>7} {'ms':>8} {'ms':>9} {'ms':>9} {'ms':>9} {'%':>7}"]
    for r in results:
        lines.append(f"{r.strategy:<34} {r.imbalance_p50:>12.3f} {r.imbalance_p99:>6.3f} {r.compute_ms:>8.2f} "
                     f"{r.all_to_all_ms:>7.2f} {r.overhead_ms:>8.2f} {r.migration_ms:>9.2f} {r.layer_ms:>9.2f} "
                     f"{r.step_ms:>9.1f} {r.gain_vs_vanilla_pct:>+7.1f}")
    return "\n".join(lines)
