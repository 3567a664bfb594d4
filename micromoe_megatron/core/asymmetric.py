"""Asymmetric placement from a load forecast (paper Sec. 6.3, "AR"): hot experts get more replicas.

With ``d`` equal replicas per expert, an expert carrying more than ``d`` GPUs' worth of the mean load
can never be balanced. Here the replica counts follow the forecast load, and the slot table is
chosen to minimise the LP optimum (paper Eq. 3) on that forecast:

1. ``replica_counts``: greedy by load per replica (the paper's rule): one replica each, then every
   spare slot to the expert with the most forecast load per replica (at most ``F`` replicas).
2. ``pack_slots``: every holder of an expert uses the same slot index, so each slot's experts must
   split the ``F`` GPUs exactly: a bin packing of the counts into ``L`` bins of size ``F``. Where no
   exact packing exists the counts are nudged (never below 1, never above ``F``, sum kept).
3. ``initial_table``: experts heaviest per replica first, each takes its slot's least-loaded free
   GPUs (LPT-style), giving a first ``phy2log``.
4. ``improve_table``: local search guided by the LP's duals. The GPU-load rows with a non-zero dual
   are the binding set ``B`` (the densest subset of Eq. 3). A move hands one of ``B``'s slot
   positions of an expert held inside ``B`` to a GPU outside ``B``, either by swapping the two
   GPUs' experts in that slot or by taking the position from a lighter expert (replica counts
   change by one, the slot rule holds). A move is kept when it lowers the LP optimum, or keeps it
   and shrinks ``B`` (plateau escape, a strict lexicographic descent, so the search ends).

The paper picks the table by Monte Carlo over random packings; the dual-guided search replaces it.
Everything is deterministic (fixed orders, single-threaded HiGHS), so every rank builds the same
placement from the same forecast.
"""

from __future__ import annotations

import math
import os

import highspy
import numpy as np

from .highs import new_highs
from .placement import Placement, PlacementError

# Stop searching once the worst scenario is this close to perfect balance: the last 0.1% is below
# the integer rounding and sampling noise of real micro-batches, and costs many LP solves.
GOOD_ENOUGH = 1.001
# Share of a search's scorings it may still spend on the stress tier once the primary tier is good
# enough: stress only breaks ties, and a heavy stress the replica counts cannot meet would
# otherwise use the whole budget (at 64 x 256 that doubled the search time).
STRESS_SHARE = 0.1


def _check_forecast(forecast, num_gpus: int, slots_per_gpu: int) -> np.ndarray:
    load = np.asarray(forecast, dtype=np.float64)
    if load.ndim != 1 or load.size < 1:
        raise PlacementError(f"forecast must be a non-empty [experts] vector, got shape {load.shape}")
    if not np.all(np.isfinite(load)) or load.min() < 0:
        raise PlacementError("forecast must hold finite loads >= 0")
    if num_gpus < 1 or slots_per_gpu < 1:
        raise PlacementError(f"num_gpus and slots_per_gpu must be >= 1, got {num_gpus} and {slots_per_gpu}")
    if load.size > num_gpus * slots_per_gpu:
        raise PlacementError(f"{load.size} experts do not fit in {num_gpus} GPUs x {slots_per_gpu} slots")
    if load.size < slots_per_gpu:
        raise PlacementError(f"{load.size} experts cannot fill {slots_per_gpu} slot indices "
                             "(every slot index needs at least one expert)")
    return load


def replica_counts(forecast, num_gpus: int, slots_per_gpu: int) -> np.ndarray:
    """int64 ``[E]`` replicas per expert: 1..F each, summing to ``F * L`` (greedy by load per replica).

    Ties go to the lower expert id. An all-zero forecast gives the most even counts.
    """
    load = _check_forecast(forecast, num_gpus, slots_per_gpu)
    load = load + 1e-12 * (load.sum() + 1.0)  # all-zero or zero entries: still spread evenly
    counts = np.ones(load.size, dtype=np.int64)
    for _ in range(num_gpus * slots_per_gpu - load.size):
        share = np.where(counts < num_gpus, load / counts, -1.0)
        counts[int(np.argmax(share))] += 1
    return counts


def pack_slots(counts, num_gpus: int, slots_per_gpu: int) -> tuple[np.ndarray, np.ndarray]:
    """Assign every expert a slot index so that each slot's replica counts sum to exactly ``F``.

    Experts are taken in descending count order (ties by id); each goes to the open slot with the
    least room that still fits its count (best fit), or, when none fits, to the roomiest slot with
    its count cut to that room. The invariants ``open slots <= experts left`` and ``room left >=
    experts left`` keep a completion possible (each remaining expert takes >= 1 GPU; the last
    expert of a slot closes it), so the packing always succeeds; replicas cut from one expert go to
    later ones.

    Returns:
        (slot [E], counts [E]) int64, counts adjusted where an exact packing needed it.
    """
    counts = np.asarray(counts, dtype=np.int64)
    num_experts = counts.size
    if counts.sum() != num_gpus * slots_per_gpu or counts.min() < 1 or counts.max() > num_gpus:
        raise PlacementError(f"replica counts must lie in [1, {num_gpus}] and sum to "
                             f"{num_gpus * slots_per_gpu}")
    room = np.full(slots_per_gpu, num_gpus, dtype=np.int64)
    slot = np.full(num_experts, -1, dtype=np.int64)
    packed = np.zeros(num_experts, dtype=np.int64)
    order = sorted(range(num_experts), key=lambda e: (-counts[e], e))
    for position, e in enumerate(order):
        left = num_experts - position             # experts still to place, this one included
        open_slots = np.flatnonzero(room > 0)
        want = int(min(counts[e], room.sum() - (left - 1)))
        if len(open_slots) == left:               # every remaining expert must close a slot
            target = int(min(open_slots, key=lambda s: (abs(room[s] - counts[e]), s)))
            take = int(room[target])
        else:
            fitting = [s for s in open_slots if room[s] >= want]
            if fitting:
                target = int(min(fitting, key=lambda s: (room[s], s)))
                take = want
            else:
                target = int(max(open_slots, key=lambda s: (room[s], -s)))
                take = int(room[target])
        slot[e], packed[e] = target, take
        room[target] -= take
    return slot, packed


def initial_table(forecast, slot, counts, num_gpus: int, slots_per_gpu: int) -> np.ndarray:
    """A first ``phy2log [F, L]``: heaviest load per replica first, onto the slot's least-loaded GPUs."""
    load = np.asarray(forecast, dtype=np.float64)
    table = np.full((num_gpus, slots_per_gpu), -1, dtype=np.int64)
    gpu_load = np.zeros(num_gpus)
    for e in sorted(range(load.size), key=lambda e: (-load[e] / counts[e], e)):
        free = np.flatnonzero(table[:, slot[e]] < 0)
        chosen = free[np.lexsort((free, gpu_load[free]))][:counts[e]]
        table[chosen, slot[e]] = e
        gpu_load[chosen] += load[e] / counts[e]
    return table


class TableLP:
    """Eq. 3's LP (min t: sum_g x[e, g] = load[e], sum_e x[e, g] <= t) over every (expert, GPU) pair.

    Non-holders are columns with upper bound 0, so a move of the slot table only changes column
    bounds and the next solve warm-starts from the last basis. Single-threaded and deterministic.

    Args:
        load: ``[E]`` forecast tokens per expert.
        num_gpus: ``F``.
    """

    def __init__(self, load, num_gpus: int) -> None:
        self.load = np.asarray(load, dtype=np.float64)
        self.num_experts, self.num_gpus = self.load.size, num_gpus
        e, f = self.num_experts, num_gpus
        num_x = e * f
        lp = highspy.HighsLp()
        lp.num_col_, lp.num_row_ = num_x + 1, e + f
        lp.col_cost_ = np.r_[np.zeros(num_x), 1.0]
        lp.col_lower_ = np.zeros(num_x + 1)
        lp.col_upper_ = np.r_[np.zeros(num_x), highspy.kHighsInf]
        lp.row_lower_ = np.r_[self.load, np.full(f, -highspy.kHighsInf)]
        lp.row_upper_ = np.r_[self.load, np.zeros(f)]
        lp.a_matrix_.format_ = highspy.MatrixFormat.kColwise
        lp.a_matrix_.start_ = np.r_[np.arange(0, 2 * num_x + 1, 2), 2 * num_x + f].astype(np.int32)
        experts, gpus = np.divmod(np.arange(num_x), f)
        lp.a_matrix_.index_ = np.r_[np.stack([experts, e + gpus], 1).ravel(), e + np.arange(f)].astype(np.int32)
        lp.a_matrix_.value_ = np.r_[np.ones(2 * num_x), -np.ones(f)]
        self.highs = new_highs(lp)
        self._held = np.zeros((e, f), dtype=bool)

    def set_table(self, table: np.ndarray) -> None:
        """Open the columns of the pairs ``table`` holds, close the rest (only the changed ones)."""
        held = np.zeros_like(self._held)
        held[table, np.arange(self.num_gpus)[:, None]] = True
        changed = np.flatnonzero((held != self._held).ravel()).astype(np.int32)
        if changed.size:
            upper = np.where(held.ravel()[changed], highspy.kHighsInf, 0.0)
            self.highs.changeColsBounds(changed.size, changed, np.zeros(changed.size), upper)
        self._held = held

    def solve(self) -> tuple[float, np.ndarray]:
        """(t*, binding [F] bool: GPU-load rows with a non-zero dual)."""
        self.highs.run()
        if self.highs.getModelStatus() != highspy.HighsModelStatus.kOptimal:
            self.highs.clearSolver()
            self.highs.run()
        if self.highs.getModelStatus() != highspy.HighsModelStatus.kOptimal:
            raise RuntimeError(f"placement LP: {self.highs.modelStatusToString(self.highs.getModelStatus())}")
        t = float(self.highs.getInfo().objective_function_value)
        duals = np.asarray(self.highs.getSolution().row_dual)[self.num_experts:]
        return t, np.abs(duals) > 1e-9

    def optimum(self, table: np.ndarray) -> float:
        self.set_table(table)
        return self.solve()[0]


def _moves(table: np.ndarray, binding: np.ndarray, load: np.ndarray, counts: np.ndarray, limit: int):
    """Candidate moves, most promising first: (g, h, slot, kind) with g in B, h outside B.

    kind "swap" exchanges the experts of GPUs g and h in that slot; "take" gives h's position to
    g's expert (the expert on h loses a replica, so it needs >= 2).
    """
    num_gpus, slots = table.shape
    inside = np.flatnonzero(binding)
    outside = np.flatnonzero(~binding)
    if not inside.size or not outside.size:
        return []
    per_replica = load / counts
    # An expert all of whose holders are in B contributes to B's density: move those first.
    held_in_b = np.zeros(load.size, dtype=np.int64)
    np.add.at(held_in_b, table[inside].ravel(), 1)
    trapped = held_in_b == counts
    slot_of = np.full(load.size, -1, dtype=np.int64)
    slot_of[table] = np.arange(slots)[None, :]
    experts = [int(a) for a in np.lexsort((np.arange(load.size), -load)) if trapped[a] and load[a] > 0]
    # Candidates sort by (-load[a], per_replica[b], g, l, h, take-before-swap); build them one
    # group of equally loaded experts at a time and stop once the limit is reached.
    candidates: list = []
    start = 0
    while start < len(experts) and len(candidates) < limit:
        stop = start
        while stop < len(experts) and load[experts[stop]] == load[experts[start]]:
            stop += 1
        group = []
        for a in experts[start:stop]:
            l = int(slot_of[a])
            for g in inside[table[inside, l] == a]:
                for h in outside:
                    b = table[h, l]
                    key = (per_replica[b], int(g), l, int(h))
                    if counts[b] >= 2:
                        group.append((key + (0,), (int(g), int(h), l, "take")))
                    group.append((key + (1,), (int(g), int(h), l, "swap")))
        group.sort(key=lambda c: c[0])
        candidates += group
        start = stop
    return [c[1] for c in candidates[:limit]]


def _apply(table: np.ndarray, counts: np.ndarray, move) -> tuple[np.ndarray, np.ndarray]:
    g, h, l, kind = move
    table, counts = table.copy(), counts.copy()
    a, b = table[g, l], table[h, l]
    if kind == "swap":
        table[g, l], table[h, l] = b, a
    else:
        table[h, l] = a
        counts[a] += 1
        counts[b] -= 1
    return table, counts


class ScenarioScore:
    """Scores slot tables on load scenarios at once: a table is as good as its worst scenario's LP
    optimum over that scenario's mean load.

    Two tiers. Primary: the given ``[K, E]`` rows (the forecast first, then e.g. recent
    micro-batches, for noise). Stress: copies of the first row with one of its ``stress_experts``
    heaviest experts ``(1 + stress)`` times heavier, so the table keeps slack for a hot expert that
    keeps growing (drift the forecast has not caught up with). Stress only breaks ties of the
    primary tier.

    Args:
        scenarios: ``[K, E]`` tokens per expert (rows with no load are dropped).
        num_gpus: ``F``.
        stress: relative growth of a stressed expert (0 = no stress tier).
        stress_experts: how many of the forecast's heaviest experts get a stress scenario.
    """

    def __init__(self, scenarios, num_gpus: int, stress: float = 0.0, stress_experts: int = 0) -> None:
        scenarios = np.atleast_2d(np.asarray(scenarios, dtype=np.float64))
        scenarios = scenarios[scenarios.sum(axis=1) > 0]
        if not len(scenarios):
            raise PlacementError("no load to place: every scenario is empty")
        stressed = []
        if stress > 0 and stress_experts > 0:
            forecast = scenarios[0]
            for e in sorted(range(forecast.size), key=lambda e: (-forecast[e], e))[:stress_experts]:
                row = forecast.copy()
                row[e] *= 1.0 + stress
                stressed.append(row)
        self.primary = len(scenarios)
        self.scenarios = np.vstack([scenarios, *stressed]) if stressed else scenarios
        self.num_gpus = num_gpus
        self.means = self.scenarios.sum(axis=1) / num_gpus
        self.lps = [TableLP(load, num_gpus) for load in self.scenarios]
        self.evaluations = 0

    def evaluate(self, table: np.ndarray, cutoff: float | None = None,
                 first: int = 0) -> tuple[tuple, np.ndarray, int]:
        """(key, binding [F] bool of the scenario to improve, its index); lower key is better.

        key = (worst primary ratio, worst stress ratio (0 without), mean primary ratio, binding
        GPUs of the scenario to improve); ratios rounded to 1e-9 so floating-point noise cannot
        decide. The scenario to improve is the worst primary one, or the worst stress one once the
        primary tier is good enough. With ``cutoff``, scoring stops at the first primary scenario
        above it (primary scenario ``first`` is tried first) and the key is ``(inf, ...)``: the
        table is worse than the one the cutoff came from, whatever the rest says.
        """
        self.evaluations += 1
        order = [first, *[k for k in range(len(self.lps)) if k != first]] if first < self.primary else \
            list(range(len(self.lps)))
        ratios, bindings = [0.0] * len(self.lps), [None] * len(self.lps)
        for k in order:
            self.lps[k].set_table(table)
            t, bindings[k] = self.lps[k].solve()
            ratios[k] = round(t / self.means[k], 9)
            if cutoff is not None and k < self.primary and ratios[k] > cutoff:
                return (math.inf, math.inf, math.inf, 0), bindings[k], k
        primary, stress = ratios[:self.primary], ratios[self.primary:]
        worst = int(np.argmax(primary))
        if primary[worst] <= GOOD_ENOUGH and stress:
            worst = self.primary + int(np.argmax(stress))
        key = (max(primary), max(stress, default=0.0), round(float(np.mean(primary)), 9),
               int(bindings[worst].sum()))
        return key, bindings[worst], worst


def improve_table(table, scenarios, max_evaluations: int = 2000, moves_per_round: int = 48,
                  score: ScenarioScore | None = None, good_enough: float = GOOD_ENOUGH
                  ) -> tuple[np.ndarray, float, int]:
    """Dual-guided local search on ``phy2log [F, L]`` (see the module docstring).

    Args:
        table: int ``[F, L]`` a valid slot table (each expert in one slot index).
        scenarios: ``[E]`` forecast or ``[K, E]`` load scenarios (tokens per expert).
        max_evaluations: table scorings allowed (the work bound; deterministic, not a time limit).
            Once the primary tier is good enough, at most ``STRESS_SHARE`` of them more go to the
            stress tier.
        moves_per_round: candidate moves tried per round (first improvement wins).
        good_enough: stop once the worst scenario's LP optimum / mean is at most this.

    Returns:
        (table [F, L], worst scenario's LP optimum / mean load, scorings used).
    """
    table = np.asarray(table, dtype=np.int64).copy()
    num_gpus = table.shape[0]
    score = score or ScenarioScore(scenarios, num_gpus)
    num_experts = score.scenarios.shape[1]
    counts = np.bincount(table.ravel(), minlength=num_experts).astype(np.int64)
    best, binding, worst = score.evaluate(table)
    used = 1
    limit, stress_only = max_evaluations, False
    while used < limit and max(best[0], best[1]) > good_enough:
        if best[0] <= good_enough and not stress_only:   # from here on only the stress tier improves
            stress_only, limit = True, min(limit, used + max(1, int(STRESS_SHARE * max_evaluations)))
            continue
        improved = False
        for move in _moves(table, binding, score.scenarios[worst], counts, moves_per_round):
            if used >= limit:
                break
            new_table, new_counts = _apply(table, counts, move)
            key, new_binding, new_worst = score.evaluate(new_table, cutoff=best[0], first=worst)
            used += 1
            if key < best:
                table, counts, best, binding, worst, improved = (new_table, new_counts, key, new_binding,
                                                                 new_worst, True)
                break
        if not improved:
            break
    return table, best[0], used


def asymmetric_placement(forecast, num_gpus: int, slots_per_gpu: int, scenarios=None,
                         max_evaluations: int = 2000, good_enough: float = GOOD_ENOUGH, stress: float = 0.0,
                         stress_experts: int = 0) -> Placement:
    """The placement for one layer's load forecast: replica counts by load, table by LP local search.

    Args:
        forecast: ``[E]`` forecast tokens per expert (any non-negative scale); sets the replica counts.
        num_gpus: ``F``, GPUs of the MicroEP group.
        slots_per_gpu: ``L``, expert slots per GPU (``E * d / F`` of the symmetric layout).
        scenarios: optional ``[K, E]`` further loads the table must also balance (e.g. the recent
            micro-batches), making it robust to noise and drift; the forecast is always scored.
        max_evaluations: table scorings the local search may use (deterministic work bound).
        good_enough: the local search stops at this worst-scenario max/mean (1.0: only at perfect).
        stress, stress_experts: also keep slack for a heavy expert growing (see ``ScenarioScore``).

    Returns:
        A ``Placement`` with ``F * L`` slots, every expert held 1..F times, slot rule kept.
        Deterministic given its inputs.

    Raises:
        PlacementError: the forecast, scenarios or layout sizes are invalid.
    """
    load = _check_forecast(forecast, num_gpus, slots_per_gpu)
    counts = replica_counts(load, num_gpus, slots_per_gpu)
    slot, counts = pack_slots(counts, num_gpus, slots_per_gpu)
    table = initial_table(load, slot, counts, num_gpus, slots_per_gpu)
    if load.sum() > 0:
        rows = [load] if scenarios is None else [load, *np.atleast_2d(np.asarray(scenarios, dtype=np.float64))]
        if any(row.shape != load.shape for row in rows):
            raise PlacementError(f"scenarios must be [K, {load.size}] loads per expert")
        score = ScenarioScore(np.stack(rows), num_gpus, stress, stress_experts)
        table, _, _ = improve_table(table, None, max_evaluations, score=score, good_enough=good_enough)
    return Placement(table, load.size)


def placement_optimum(placement: Placement, load) -> float:
    """LP optimum (paper Eq. 3) of ``placement`` on the ``[E]`` load, in tokens."""
    return TableLP(load, placement.num_gpus).optimum(placement.phy2log)
