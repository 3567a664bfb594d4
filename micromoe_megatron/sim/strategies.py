"""Balancing strategies: one micro-batch's ``[F, E]`` counts -> per-GPU load and traffic.

Every strategy works on one group of ``F`` GPUs with ``L`` expert slots each (the same memory for
all of them: vanilla EP's ``E / EP`` experts per GPU):

* ``VanillaEP``: ``F / EP`` independent EP groups; a token goes to its expert's only GPU in its
  own group.
* ``ReplicaLP``: replicas on a fixed placement, each micro-batch split by the LP (HiGHS, the
  planning core). With the symmetric or random placement this is MicroEP; with a placement of
  redundant copies along a ring it is the LPLB-style baseline.
* ``AdaptiveReplicaLP``: MicroEP that starts symmetric and re-places from the load forecast
  (asymmetric placement, paper Sec. 6.3-6.4), paying the migration time when it moves slots.
* ``StaticReplication``: EPLB-style: replica counts and placement chosen from a load history,
  tokens split equally among an expert's replicas.
* ``ForceBalanced``: the ideal: every GPU gets exactly the mean load, traffic spread evenly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..core import placement as placements
from ..core.forecast import MigrationCost, ReplacementPolicy
from ..core.loads import max_over_mean
from ..core.schedule import ReplicaScheduler


@dataclass
class Outcome:
    """What one strategy does with one micro-batch of one layer.

    Attributes:
        load: [F] tokens processed per GPU.
        traffic: [F, F] tokens sent from GPU s to GPU g (the diagonal stays local).
        overhead_ms: host planning time on the critical path (LP solve, counts all-gather).
        fallback: the LP fell back to an even split.
        migration_ms: re-placement migration time charged to this micro-batch (amortised).
    """

    load: np.ndarray
    traffic: np.ndarray
    overhead_ms: float = 0.0
    fallback: bool = False
    migration_ms: float = 0.0

    @property
    def imbalance(self) -> float:
        return max_over_mean(self.load)


class VanillaEP:
    name = "vanilla EP"

    def __init__(self, num_gpus: int, num_experts: int, ep: int):
        if num_gpus % ep or num_experts % ep:
            raise ValueError(f"EP {ep} must divide the {num_gpus} GPUs and {num_experts} experts")
        self.ep, self.per_gpu = ep, num_experts // ep
        gpus, experts = np.arange(num_gpus), np.arange(num_experts)
        self.home = (gpus // ep * ep)[:, None] + (experts // self.per_gpu)[None, :]   # [F, E]

    def outcome(self, tokens: np.ndarray) -> Outcome:
        num_gpus = tokens.shape[0]
        traffic = np.zeros((num_gpus, num_gpus))
        np.add.at(traffic, (np.repeat(np.arange(num_gpus), tokens.shape[1]), self.home.ravel()), tokens.ravel())
        return Outcome(traffic.sum(axis=0), traffic)


class ReplicaLP:
    """A fixed placement and the per-micro-batch LP (the planning core)."""

    def __init__(self, name: str, holders, num_gpus: int, gpus_per_node: int | None = None,
                 allgather_ms: float = 0.0, schedule_ms: float | None = None):
        self.name = name
        self.scheduler = ReplicaScheduler(holders, num_gpus, gpus_per_node=gpus_per_node)
        self.allgather_ms = allgather_ms
        self.schedule_ms = schedule_ms  # None: the measured solve time
        # Compile (or load from numba's cache) the planner's kernels now: a one-off start-up cost
        # of ~0.3 s that must not be charged to the first simulated micro-batch. One hot expert
        # makes the warm-up plan use every kernel (pool, drain, cut, routing).
        warm_up = np.ones((num_gpus, len(self.scheduler.holders)), dtype=np.int64)
        warm_up[:, 0] += 1000
        self.scheduler.plan(warm_up).rank_routes(0)

    def outcome(self, tokens: np.ndarray) -> Outcome:
        plan = self.scheduler.plan(tokens)
        num_gpus = tokens.shape[0]
        traffic = np.zeros((num_gpus, num_gpus))
        np.add.at(traffic, (plan.routes[:, 0], plan.routes[:, 2]), plan.routes[:, 3])
        solve_ms = plan.schedule_ms if self.schedule_ms is None else self.schedule_ms
        return Outcome(plan.load_per_gpu.astype(float), traffic, solve_ms + self.allgather_ms, plan.fallback)


class AdaptiveReplicaLP:
    """MicroEP with adaptive re-placement: plan each micro-batch on the current placement, then
    record its counts; every ``interval`` micro-batches the policy may re-place (causal: a
    micro-batch is planned before it is recorded). A re-placement's migration time is charged to
    the micro-batches of the next interval (amortised, ``Outcome.migration_ms``).

    Args:
        placement: the starting placement (symmetric).
        interval: micro-batches between checks (>= 1).
        threshold, window, robust_window: see ``ReplacementPolicy``.
        migration: the migration time model; ``ms_per_token``: expert compute per assignment.
    """

    name = "MicroEP (adaptive)"

    def __init__(self, placement: placements.Placement, interval: int = 1, threshold: float = 0.0,
                 migration: MigrationCost | None = None, ms_per_token: float = 0.0, gpus_per_node: int | None = None,
                 allgather_ms: float = 0.0, schedule_ms: float | None = None, window: int = 8,
                 robust_window: int = 4):
        if interval < 1:
            raise ValueError(f"replacement interval must be >= 1 micro-batch, got {interval}")
        self.policy = ReplacementPolicy(placement, interval, threshold, window=window, alpha=0.5,
                                        migration=migration, ms_per_token=ms_per_token,
                                        micro_batches_per_check=interval, robust_window=robust_window)
        self.lp_args = dict(gpus_per_node=gpus_per_node, allgather_ms=allgather_ms, schedule_ms=schedule_ms)
        self.planner = ReplicaLP(self.name, placement.holders, placement.num_gpus, **self.lp_args)
        self.migration_ms = 0.0      # total predicted migration time
        self._amortised_ms = 0.0     # charged to each micro-batch of the current interval

    def warm_up(self, history: np.ndarray) -> None:
        """Record ``[K, F, E]`` earlier counts and re-place once from them (no migration charged)."""
        for tokens in history:
            self.policy.observe(tokens)
        if len(history):
            self._switch(self.policy.decide(self.policy.history.forecast()), charge=False)

    def _switch(self, decision, charge: bool = True) -> None:
        if decision is None or not decision.replace:
            self._amortised_ms = 0.0
            return
        self.policy.commit(decision)
        self.planner = ReplicaLP(self.name, self.policy.placement.holders, self.policy.placement.num_gpus,
                                 **self.lp_args)
        if charge:
            self.migration_ms += decision.migration_ms
            self._amortised_ms = decision.migration_ms / self.policy.interval

    def outcome(self, tokens: np.ndarray) -> Outcome:
        result = self.planner.outcome(tokens)
        result.migration_ms = self._amortised_ms
        self.policy.observe(tokens)
        decision = self.policy.check()   # None between checks: keep charging the last migration
        if decision is not None:
            self._switch(decision)
        return result

    @property
    def replacements(self) -> int:
        return self.policy.replacements


def ring_redundant_holders(num_gpus: int, num_experts: int, replicas: int) -> tuple[tuple[int, ...], ...]:
    """LPLB-style redundancy: expert e lives on its home GPU and the next ``d - 1`` GPUs of a ring."""
    if num_experts % num_gpus:
        raise ValueError(f"ring redundancy needs the {num_gpus} GPUs to divide the {num_experts} experts")
    per_gpu = num_experts // num_gpus
    return tuple(tuple((e // per_gpu + k) % num_gpus for k in range(replicas)) for e in range(num_experts))


def eplb_holders(mean_load: np.ndarray, num_gpus: int, slots_per_gpu: int) -> tuple[tuple[int, ...], ...]:
    """EPLB-style static replication: fill ``F * L`` slots, hot experts get more replicas.

    Replica counts: one each, then each spare slot to the expert with the most load per replica
    (at most one replica per GPU). Placement: replicas heaviest first, each to the least-loaded
    GPU with a free slot that does not hold the expert yet.
    """
    num_experts = mean_load.size
    slots = num_gpus * slots_per_gpu
    if slots < num_experts:
        raise ValueError(f"{slots} slots cannot hold {num_experts} experts")
    load = np.maximum(mean_load.astype(float), 1e-9)
    counts = np.ones(num_experts, dtype=np.int64)
    for _ in range(slots - num_experts):
        share = np.where(counts < num_gpus, load / counts, -1.0)
        counts[int(np.argmax(share))] += 1
    replicas = sorted(((load[e] / counts[e], e) for e in range(num_experts) for _ in range(counts[e])),
                      key=lambda r: (-r[0], r[1]))
    gpu_load, free = np.zeros(num_gpus), np.full(num_gpus, slots_per_gpu)
    holders: list[list[int]] = [[] for _ in range(num_experts)]
    for weight, e in replicas:
        options = [g for g in range(num_gpus) if free[g] and g not in holders[e]]
        if not options:  # only GPUs that already hold e have room: the copy adds nothing
            continue
        g = min(options, key=lambda g: (gpu_load[g], g))
        holders[e].append(g)
        gpu_load[g] += weight
        free[g] -= 1
    return tuple(tuple(sorted(h)) for h in holders)


class StaticReplication:
    """EPLB-style: placement from the mean load of a history, equal split among replicas."""

    name = "static replication (EPLB-style)"

    def __init__(self, history: np.ndarray, slots_per_gpu: int):
        """history: [K, F, E] counts of earlier micro-batches."""
        num_gpus = history.shape[1]
        self.holders = eplb_holders(history.sum(axis=(0, 1)), num_gpus, slots_per_gpu)

    def outcome(self, tokens: np.ndarray) -> Outcome:
        num_gpus = tokens.shape[0]
        traffic = np.zeros((num_gpus, num_gpus))
        for e, gpus in enumerate(self.holders):
            traffic[:, list(gpus)] += tokens[:, e:e + 1] / len(gpus)
        return Outcome(traffic.sum(axis=0), traffic)


class ForceBalanced:
    """Every GPU at the mean load. Its all-to-all cost is set by the simulator (the least of the
    real strategies', spread evenly), so it bounds every strategy from below."""

    name = "force-balanced ideal"
    ideal = True

    def outcome(self, tokens: np.ndarray) -> Outcome:
        num_gpus = tokens.shape[0]
        sent = tokens.sum(axis=1).astype(float)
        traffic = np.repeat(sent[:, None] / num_gpus, num_gpus, axis=1)
        return Outcome(traffic.sum(axis=0), traffic)


def build_strategies(num_gpus: int, num_experts: int, ep: int, replicas: int, history: np.ndarray,
                     gpus_per_node: int | None = None, allgather_ms: float = 0.0, schedule_ms: float | None = None,
                     seed: int = 0, adaptive: dict | None = None) -> list:
    """Vanilla EP, MicroEP (symmetric, random, adaptive), EPLB-style, LPLB-style (only when F
    divides E) and the force-balanced ideal, for one group of F = d * EP GPUs.

    ``adaptive``: keyword arguments of ``AdaptiveReplicaLP`` (interval, threshold, migration,
    ms_per_token); None leaves the adaptive strategy out. It is warmed up on ``history`` like the
    EPLB-style strategy, then keeps re-placing from what it sees.
    """
    slots_per_gpu = num_experts // ep
    lp = dict(num_gpus=num_gpus, gpus_per_node=gpus_per_node, allgather_ms=allgather_ms, schedule_ms=schedule_ms)
    strategies = [
        VanillaEP(num_gpus, num_experts, ep),
        ReplicaLP("MicroEP (symmetric)", placements.symmetric(num_gpus, num_experts, replicas).holders, **lp),
        ReplicaLP("MicroEP (random)", placements.random(num_gpus, num_experts, replicas, seed=seed).holders, **lp),
        StaticReplication(history, slots_per_gpu),
    ]
    if adaptive is not None:
        strategy = AdaptiveReplicaLP(placements.symmetric(num_gpus, num_experts, replicas), **adaptive,
                                     **{k: v for k, v in lp.items() if k != "num_gpus"})
        strategy.warm_up(history)
        strategies.insert(3, strategy)
    if num_experts % num_gpus == 0:
        strategies.append(ReplicaLP("redundant ring + LP (LPLB-style)",
                                    ring_redundant_holders(num_gpus, num_experts, replicas), **lp))
    strategies.append(ForceBalanced())
    return strategies
