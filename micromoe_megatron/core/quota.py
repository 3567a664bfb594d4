"""Integer replica quotas at the optimal max load, keeping tokens on their own GPU (numpy + numba).

The problem (paper LPP 1, then LPP 4 made lexicographic; design brief Sec. 4): given
``tokens [F, E]`` and each expert's holders, choose ``quota [E, F]`` (row sums = expert loads,
zero off holders) that

1. minimises the max GPU load; the integer optimum is ``T = ceil(t*)`` where ``t*`` is the LP
   optimum, i.e. the max induced density of paper Eq. 3 (flow integrality);
2. among those, keeps as many tokens as possible on the GPU they already sit on. A token of
   expert ``e`` on a holder ``g`` of ``e`` stays local when ``quota[e, g]`` covers it, so the
   local tokens of a plan are ``sum min(tokens[g, e], quota[e, g])`` over holders.

Algorithm (a max flow with locality-aware augmenting paths; deterministic, no solver state):

* start from ``T = ceil(total / F)`` (the trivial bound, paper Eq. 3 with S = all GPUs);
* also try each holder set alone (the experts held by exactly those GPUs) as an Eq. 3 subset;
* keep every held token local, then place the other tokens of each expert on its holders with the
  most spare capacity (fixed tie-breaks: lowest holder, lowest expert);
* drain any GPU above ``T`` along shortest augmenting paths of the GPU graph (an edge g -> h moves
  quota of an expert held by both), preferring moves of tokens that are already remote (0-1 BFS:
  moving a local token costs 1);
* when an overloaded GPU reaches no GPU with spare capacity, the GPUs it reaches form a set ``S``
  whose induced load exceeds ``T * |S|`` (every expert with quota in ``S`` has all holders in
  ``S``): raise ``T`` to ``ceil(induced(S) / |S|)`` and rebuild (a cutting plane on Eq. 3); after
  ``LP_AFTER_CUTS`` cuts, HiGHS's t* (when given) jumps straight to ``ceil(t*)``;
* finally win back held tokens along cycles that cost no other local token (``kernels.reclaim``).

The steps run as compiled loops (``core.kernels``, numba); an optional numpy path adds Dinic-style
blocking-flow phases before the same exact augmenting-path step. Counts are exact below 2**53.

The final ``T`` is certified optimal: the plan proves ``ceil(t*) <= T`` and the last cut ``S``
(or all GPUs) proves ``t* >= density(S) > T - 1``. Everything is a pure function of
``(holder_table, tokens)``: no warm start, no wall clock, fixed iteration order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


_UNREACHABLE = np.iinfo(np.int64).max // 4
# t* = (integer load) / (subset size <= F) lies >= 1/F from any integer it is not equal to; this
# tolerance only absorbs the simplex's floating-point noise.
_OPTIMUM_TOLERANCE = 1e-6


# The cut at which the planner asks HiGHS for t*. A rebuild after a cut costs a few tens of
# microseconds compiled, a HiGHS solve about a millisecond at 64 x 256; symmetric placements on
# Zipf loads need at most 3 cuts (sim.bench drifting loads), so the LP serves the rare deep cases.
LP_AFTER_CUTS = 3


class PlanWorkLimit(RuntimeError):
    """More augmenting paths were needed than the work limit allows (a deterministic count)."""


@dataclass(frozen=True)
class QuotaResult:
    """``quota [E, F]`` int64; ``capacity`` = max load = ceil(t*); ``bound`` = density of the
    certificate set (a lower bound on t*; ``> capacity - 1`` unless the LP supplied ``capacity``);
    ``augmentations`` = phases, paths and cycles of the final build at ``capacity``; ``load [E]``
    int64 = the expert loads (column sums of the counts), which the quota rows must equal."""

    quota: np.ndarray
    capacity: int
    bound: float
    augmentations: int
    load: np.ndarray


class QuotaPlanner:
    """Precomputed placement graph; ``solve(tokens)`` gives the quota (see the module docstring).

    Args:
        holder_table: int ``[E, D]`` holder GPUs per expert, -1 padding (``Placement.holder_table``).
        num_gpus: ``F``.
        vectorised: numpy rounds and blocking-flow phases before the compiled augmenting paths
            (the planner's earlier large-graph path, kept as a second implementation the tests
            check), or the compiled loops alone (``core.kernels``, the default at every size).
            A function of the placement only, so every rank takes the same path.
    """

    def __init__(self, holder_table: np.ndarray, num_gpus: int, vectorised: bool | None = None) -> None:
        self.holder_table = np.ascontiguousarray(holder_table, dtype=np.int64)
        self.num_gpus = num_gpus
        self.num_experts = self.holder_table.shape[0]
        self.valid = self.holder_table >= 0
        # Column c = (col_expert[c], col_gpu[c]): one per (expert, holder), expert-major.
        self.col_expert, col_slot = np.nonzero(self.valid)
        self.col_gpu = self.holder_table[self.col_expert, col_slot]
        self.column_of = np.full(self.holder_table.shape, -1, dtype=np.int64)
        self.column_of[self.col_expert, col_slot] = np.arange(self.col_expert.size)
        self.safe_table = np.where(self.valid, self.holder_table, 0)
        sets, self._set_id = np.unique(self.holder_table, axis=0, return_inverse=True)
        self._set_id = self._set_id.ravel().astype(np.int64)
        self._set_size = (sets >= 0).sum(axis=1).astype(np.int64)
        # Ordered pairs of columns of one expert: the edges g -> h of the GPU graph.
        width = self.holder_table.shape[1]
        pairs = [(self.column_of[:, a], self.column_of[:, b]) for a in range(width) for b in range(width) if a != b]
        if pairs:
            src = np.concatenate([p[0] for p in pairs])
            dst = np.concatenate([p[1] for p in pairs])
            keep = (src >= 0) & (dst >= 0)
            order = np.lexsort((dst[keep], src[keep]))
            self.pair_src, self.pair_dst = src[keep][order], dst[keep][order]
        else:
            self.pair_src = self.pair_dst = np.zeros(0, dtype=np.int64)
        self.pair_from, self.pair_to = self.col_gpu[self.pair_src], self.col_gpu[self.pair_dst]
        # CSR adjacency for the compiled kernels: columns on each GPU (ascending), columns of each
        # expert (contiguous, expert-major).
        self._on_cols = np.argsort(self.col_gpu, kind="stable").astype(np.int64)
        self._on_start = np.searchsorted(self.col_gpu[self._on_cols], np.arange(num_gpus + 1)).astype(np.int64)
        self._of_start = np.searchsorted(self.col_expert, np.arange(self.num_experts + 1)).astype(np.int64)
        self.col_gpu = np.ascontiguousarray(self.col_gpu, dtype=np.int64)
        self.col_expert = np.ascontiguousarray(self.col_expert, dtype=np.int64)
        self._reached = np.zeros(num_gpus, dtype=bool)
        self.vectorised = False if vectorised is None else vectorised
        from . import kernels  # numba: imported (and compiled, or loaded from its cache) on first use
        self._kernels = kernels

    def solve(self, tokens: np.ndarray, work_limit: int | None = None, lp_optimum=None,
              lp_after_cuts: int = LP_AFTER_CUTS) -> QuotaResult:
        """Quota for int64 ``tokens [F, E]`` (already validated).

        ``lp_optimum``: optional callable returning the LP optimum t* (HiGHS). It is asked once,
        at cut number ``lp_after_cuts`` (the cheap bounds and the first cuts fell short: the step
        needs the LP), to jump to ``ceil(t*)`` instead of cut after cut. Only speed depends on
        it: a value below the cut's density, non-finite or an exception is ignored, and the
        build at ``ceil(t*)`` still proves itself (another cut if ``t*`` was too low).
        ``T = ceil(t*)`` is unique and the final build starts from scratch at ``T``, so the plan
        is the same with or without it, whenever it is asked.

        Raises:
            PlanWorkLimit: more than ``work_limit`` augmenting paths were needed.
        """
        f = self.num_gpus
        tokens = np.ascontiguousarray(tokens, dtype=np.int64)
        kernels = self._kernels
        load, held, held_gpu_load, pool_start, total, densest, densest_load = kernels.prepare(
            tokens, self.col_gpu, self.col_expert, self._set_id, self._set_size)
        total = int(total)
        capacity = -(-total // f)
        bound = total / f
        # A second cheap Eq. 3 subset per holder set: the experts sharing exactly those holders.
        # At high skew it usually finds the optimum at once and saves rebuilds after cuts.
        if densest_load > capacity * self._set_size[densest]:
            induced, size = int(densest_load), int(self._set_size[densest])
            capacity, bound = -(-induced // size), induced / size
        first, cuts = True, 0
        while True:
            # Build at this capacity from scratch: moves made for a lower capacity would only
            # cost locality at the higher one. The work limit must give the same decision on
            # every rank, whether or not its LP call succeeded: it binds the first build (live,
            # the same everywhere) and the final build at T (checked at the end, the same
            # everywhere), never the builds in between that only some ranks make.
            limit = -1 if work_limit is None or not first else work_limit
            if self.vectorised:
                status, work, quota, induced, size = self._build_numpy(held, held_gpu_load, pool_start, load,
                                                                       capacity, limit)
            else:
                status, work, quota, induced, size = kernels.build(
                    held, held_gpu_load, pool_start, load, capacity, limit, self._on_start, self._on_cols,
                    self._of_start, self.col_gpu, self.col_expert, self.holder_table)
            if status == kernels.OVER_LIMIT:
                raise PlanWorkLimit(f"planner needed more than {work_limit} augmenting paths")
            if status == kernels.DONE:
                if work_limit is not None and work > work_limit:
                    raise PlanWorkLimit(f"planner needed {work} augmenting paths, more than {work_limit}")
                return QuotaResult(quota, capacity, bound, int(work), load)
            first, cuts = False, cuts + 1
            induced, size = int(induced), int(size)
            new_capacity = -(-induced // size)
            if new_capacity <= capacity:  # cannot happen for a consistent state
                raise RuntimeError("planner invariant broken: a cut must raise the capacity")
            capacity, bound = new_capacity, max(bound, induced / size)
            if lp_optimum is not None and cuts >= lp_after_cuts:
                asked, lp_optimum = lp_optimum, None
                try:
                    optimum = float(asked())
                except Exception:  # the LP only saves work; the cuts reach the same T
                    optimum = math.nan
                if math.isfinite(optimum) and optimum >= induced / size - _OPTIMUM_TOLERANCE:
                    capacity = max(capacity, math.ceil(optimum - _OPTIMUM_TOLERANCE))

    def _build_numpy(self, held, held_gpu_load, pool_start, load, capacity, limit):
        """``kernels.build`` with numpy rounds and blocking-flow phases before the compiled
        augmenting paths (the optional vectorised path)."""
        kernels = self._kernels
        quota, gpu_load, pool = held.copy(), held_gpu_load.copy(), pool_start.copy()
        self._place_pool(quota, gpu_load, pool, capacity)
        work = 0
        if gpu_load.max(initial=0) > capacity:
            cut, work = self._push_phases(quota, held, gpu_load, load, capacity)
            if cut is None and gpu_load.max(initial=0) > capacity:
                status, paths = kernels.drain(quota, held, gpu_load, capacity, max(limit - work, 0) if limit >= 0
                                              else -1, self._on_start, self._on_cols, self._of_start,
                                              self.col_gpu, self.col_expert, self._reached)
                work += paths
                if status == kernels.OVER_LIMIT:
                    return status, work, None, 0, 0
                if status == kernels.CUT:
                    cut = self._reached.copy()
            if cut is not None:
                return (kernels.CUT, work, None) + self._cut(cut, load)
            work += kernels.reclaim(quota, held, gpu_load, capacity, self._on_start, self._on_cols,
                                    self._of_start, self.col_gpu, self.col_expert)
        return kernels.DONE, work, self._matrix(quota), 0, 0

    def _matrix(self, per_column: np.ndarray) -> np.ndarray:
        quota = np.zeros((self.num_experts, self.num_gpus), dtype=np.int64)
        quota[self.col_expert, self.col_gpu] = per_column
        return quota

    def _place_pool(self, quota, gpu_load, pool, capacity) -> None:
        """Put each expert's non-held tokens on its holders' spare capacity (in place, vectorised).

        Each round, every expert with tokens left asks its holder with the most spare capacity
        (lowest holder on ties); a GPU grants requests in expert order until it is full. What is
        left after the rounds goes to that holder anyway (the drain phase moves it on).
        """
        for _ in range(self.holder_table.shape[1] + 1):
            experts = np.flatnonzero(pool)
            if not experts.size:
                return
            spare = capacity - gpu_load
            table = np.where(self.valid[experts], spare[self.safe_table[experts]], np.iinfo(np.int64).min)
            best = table.argmax(axis=1)
            best_spare = table[np.arange(experts.size), best]
            asking = best_spare > 0
            if not asking.any():
                break
            experts, best = experts[asking], best[asking]
            gpu = self.holder_table[experts, best]
            order = np.argsort(gpu, kind="stable")                     # (gpu, expert) order
            experts, best, gpu = experts[order], best[order], gpu[order]
            granted = _fill_groups(gpu, pool[experts], spare[gpu])
            quota[self.column_of[experts, best]] += granted
            pool[experts] -= granted
            gpu_load += np.bincount(gpu, weights=granted, minlength=self.num_gpus).astype(np.int64)
        experts = np.flatnonzero(pool)
        if experts.size:
            spare = capacity - gpu_load
            table = np.where(self.valid[experts], spare[self.safe_table[experts]], np.iinfo(np.int64).min)
            best = table.argmax(axis=1)
            columns = self.column_of[experts, best]
            quota[columns] += pool[experts]
            np.add.at(gpu_load, self.col_gpu[columns], pool[experts])
            pool[experts] = 0

    def _levels(self, edges: np.ndarray, spare: np.ndarray) -> np.ndarray:
        """``[F]`` edges (of the pair list, masked by ``edges``) from each GPU to a spare one."""
        edge_from, edge_to = self.pair_from[edges], self.pair_to[edges]
        dist = np.where(spare, 0, _UNREACHABLE)
        for _ in range(self.num_gpus):
            relaxed = dist.copy()
            np.minimum.at(relaxed, edge_from, dist[edge_to] + 1)
            if np.array_equal(relaxed, dist):
                break
            dist = relaxed
        return dist

    def _cut(self, closed: np.ndarray, load: np.ndarray) -> tuple[int, int]:
        """(induced load, size) of a GPU set closed under the graph's edges (Eq. 3 numerator/denominator)."""
        inside = (closed[self.safe_table] | ~self.valid).all(axis=1)
        return int(load[inside].sum()), int(closed.sum())

    def _push_phases(self, quota, held, gpu_load, load, capacity, max_phases: int = 32):
        """Vectorised blocking-flow phases (Dinic-style levels, push-relabel-style pushes).

        Each phase labels every GPU with its distance (in edges that carry quota) to a GPU with
        spare capacity, then sweeps the levels from the top down: every overloaded GPU at level k
        pushes its excess to level k - 1 neighbours, quota that is already remote first, in
        (GPU, cost, column) order; level-0 GPUs accept at most their spare capacity. Overloaded
        GPUs that reach no spare GPU form a closed set S of Eq. 3 density > capacity: the
        caller raises the capacity to ceil(density(S)). In place; returns (cut or None, phases). Whatever
        is left after ``max_phases`` goes to ``kernels.drain``.
        """
        f = self.num_gpus
        src_all, dst_all = self.pair_src, self.pair_dst
        held_load = np.bincount(self.col_gpu, weights=held, minlength=f)
        phases = 0
        while phases < max_phases:
            over = gpu_load > capacity
            if not over.any():
                break
            phases += 1
            spare = gpu_load < capacity
            movable = quota[src_all] > 0
            # Cheap edges first: quota that is already remote, or held tokens of a GPU that holds
            # more than the capacity (it must shed them whatever we do).
            may_pay = held_load > capacity
            edges = movable & ((quota[src_all] > held[src_all]) | may_pay[self.pair_from])
            dist = self._levels(edges, spare)
            if not (over & (dist < _UNREACHABLE)).any():
                may_pay = np.ones(f, dtype=bool)
                edges = movable
                dist = self._levels(edges, spare)
                stuck = dist >= _UNREACHABLE
                if (over & stuck).any():
                    return stuck, phases
            top = int(dist[over & (dist < _UNREACHABLE)].max())
            for level in range(top, 0, -1):
                senders = (dist == level) & (gpu_load > capacity)
                if not senders.any():
                    continue
                use = edges & senders[self.pair_from] & (dist[self.pair_to] == level - 1) & (quota[src_all] > 0)
                src, dst = src_all[use], dst_all[use]
                # One destination per source column (the first), so no column is overdrawn.
                src, first = np.unique(src, return_index=True)
                dst = dst[first]
                free = np.maximum(quota[src] - held[src], 0)
                paid = np.where(may_pay[self.col_gpu[src]], quota[src] - free, 0)
                cap = np.concatenate((free, paid))
                cost = np.repeat(np.arange(2), src.size)
                src, dst = np.concatenate((src, src)), np.concatenate((dst, dst))
                keep = cap > 0
                cap, cost, src, dst = cap[keep], cost[keep], src[keep], dst[keep]
                sender = self.col_gpu[src]
                order = np.lexsort((src, cost, sender))
                cap, src, dst, sender = cap[order], src[order], dst[order], sender[order]
                amount = _fill_groups(sender, cap, gpu_load[sender] - capacity)
                if level == 1:  # receivers with spare capacity take at most that much
                    receiver = self.col_gpu[dst]
                    order = np.argsort(receiver, kind="stable")
                    amount[order] = _fill_groups(receiver[order], amount[order],
                                                 capacity - gpu_load[receiver[order]])
                np.subtract.at(quota, src, amount)
                np.add.at(quota, dst, amount)
                gpu_load -= np.bincount(sender, weights=amount, minlength=f).astype(np.int64)
                gpu_load += np.bincount(self.col_gpu[dst], weights=amount, minlength=f).astype(np.int64)
        return None, phases


def _fill_groups(group: np.ndarray, capacity: np.ndarray, budget: np.ndarray) -> np.ndarray:
    """Fill items in order until each group's budget is spent.

    Args:
        group: ``[N]`` group id per item, items of a group contiguous.
        capacity: ``[N]`` int most each item can take.
        budget: ``[N]`` int the budget of the item's group (same value within a group).

    Returns:
        ``[N]`` int amounts: ``clip(budget - (capacity of earlier items of the group), 0, capacity)``.
    """
    if not group.size:
        return capacity.copy()
    before = np.cumsum(capacity) - capacity
    first = np.empty(group.size, dtype=bool)
    first[0] = True
    np.not_equal(group[1:], group[:-1], out=first[1:])
    before -= np.maximum.accumulate(np.where(first, before, 0))
    return np.clip(budget - before, 0, capacity)
