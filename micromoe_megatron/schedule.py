"""Per-layer, per-micro-batch token schedule: LP (HiGHS) -> integer replica quotas -> routes.

Inputs (identical on every rank after the all-gather of counts):
    tokens[s, e]  int ``[F, E]``: tokens on source GPU ``s`` routed to logical expert ``e``.
    holders[e]    the GPUs holding a replica of ``e`` (a placement's ``holders``).

Outputs (``SchedulePlan``):
    quota[e, g]   int ``[E, F]``: tokens of expert ``e`` processed on GPU ``g`` (0 off holders).
    routes        int ``[R, 4]`` rows ``(src, expert, dst, count)``, sorted, counts > 0.

The LP is the paper's LPP 1: minimise t subject to sum_g x[e, g] = load[e] over holders and
sum_e x[e, g] <= t per GPU. One persistent ``highspy.Highs`` per layer; each step changes only the
expert rows' bounds and re-solves from the previous basis (warm start).

Determinism: HiGHS runs single-threaded, and rounding and routing are fixed-order numpy, so the
same sequence of inputs gives a bit-identical sequence of plans in any process. The ranks of a
MicroEP group feed each layer's scheduler the same sequence, so their plans agree.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from dataclasses import dataclass

import highspy
import numpy as np

# t* is a ratio (integer load) / (subset size <= F), so it lies at least 1/F from any integer it is
# not equal to; this tolerance only absorbs floating-point noise of the simplex.
_OPTIMUM_TOLERANCE = 1e-6


@dataclass(frozen=True)
class SchedulePlan:
    """One layer's plan for one micro-batch. Arrays are int64; see the module docstring."""

    quota: np.ndarray
    routes: np.ndarray
    lp_optimum: float
    fallback: bool = False
    fallback_reason: str = ""
    schedule_ms: float = 0.0
    gpus_per_node: int | None = None

    @property
    def load_per_gpu(self) -> np.ndarray:
        """``[F]`` tokens each GPU processes."""
        return self.quota.sum(axis=0)

    @property
    def max_load(self) -> int:
        return int(self.load_per_gpu.max())

    @property
    def mean_load(self) -> float:
        return float(self.load_per_gpu.mean())

    @property
    def imbalance(self) -> float:
        """GPU max / mean load (1.0 is perfect balance; 1.0 for an empty batch)."""
        mean = self.mean_load
        return self.max_load / mean if mean else 1.0

    @property
    def remote_tokens(self) -> int:
        """Tokens processed on a GPU other than the one they came from."""
        src, dst, count = self.routes[:, 0], self.routes[:, 2], self.routes[:, 3]
        return int(count[src != dst].sum())

    @property
    def inter_node_tokens(self) -> int:
        """Tokens crossing a node boundary (0 when ``gpus_per_node`` is unknown)."""
        if not self.gpus_per_node:
            return 0
        src, dst, count = self.routes[:, 0], self.routes[:, 2], self.routes[:, 3]
        return int(count[src // self.gpus_per_node != dst // self.gpus_per_node].sum())

    def to_json(self) -> dict:
        return {
            "max_load": self.max_load,
            "mean_load": self.mean_load,
            "imbalance": self.imbalance,
            "lp_optimum": None if math.isnan(self.lp_optimum) else self.lp_optimum,
            "load_per_gpu": self.load_per_gpu.tolist(),
            "quota": self.quota.tolist(),
            "routes": self.routes.tolist(),
            "remote_tokens": self.remote_tokens,
            "inter_node_tokens": self.inter_node_tokens,
            "schedule_ms": self.schedule_ms,
            "fallback": self.fallback,
            "fallback_reason": self.fallback_reason,
        }


class SolverFailure(RuntimeError):
    """The LP did not give a usable answer (error, time limit, invalid solution)."""


@contextlib.contextmanager
def _quiet_stdout():
    """Silence C-level stdout: ``highspy.Highs()`` prints a banner before options can be set."""
    try:
        fd = os.dup(1)
    except OSError:  # no real stdout (e.g. captured by a harness): nothing to silence
        yield
        return
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 1)
            yield
    finally:
        os.dup2(fd, 1)
        os.close(fd)


def validate_holders(holders, num_gpus: int) -> tuple[tuple[int, ...], ...]:
    """Check per-expert holder lists; raises ``ValueError`` naming the offending field."""
    if num_gpus < 1:
        raise ValueError(f"num_gpus must be >= 1, got {num_gpus}")
    holders = tuple(tuple(int(g) for g in h) for h in holders)
    for e, gpus in enumerate(holders):
        if not gpus:
            raise ValueError(f"holders[{e}]: expert {e} has no holder")
        if any(g < 0 or g >= num_gpus for g in gpus):
            raise ValueError(f"holders[{e}]: GPU ids must lie in [0, {num_gpus}), got {list(gpus)}")
        if len(set(gpus)) != len(gpus):
            raise ValueError(f"holders[{e}]: a GPU is listed twice: {list(gpus)}")
    return holders


def validate_tokens(tokens, num_gpus: int, num_experts: int) -> np.ndarray:
    """Check token counts and return them as int64 ``[F, E]``; raises ``ValueError`` naming the field."""
    array = np.asarray(tokens)
    if array.shape != (num_gpus, num_experts):
        raise ValueError(f"tokens: expected shape [num_gpus={num_gpus}, experts={num_experts}], "
                         f"got {list(array.shape)}")
    if not np.issubdtype(array.dtype, np.integer):
        if array.dtype == object or not np.all(np.isfinite(array)) or not np.array_equal(array, np.round(array)):
            raise ValueError("tokens: counts must be finite integers")
    array = array.astype(np.int64, copy=False)
    if array.size and array.min() < 0:
        s, e = np.argwhere(array < 0)[0]
        raise ValueError(f"tokens[{s}][{e}]: counts must be >= 0, got {array[s, e]}")
    return array


class ReplicaScheduler:
    """Plans one MoE layer's micro-batches for a fixed placement (one instance per layer).

    Args:
        holders: per logical expert, the GPUs (0..F-1) holding a replica.
        num_gpus: ``F``, the MicroEP group size.
        gpus_per_node: GPUs per node, for same-node-before-remote routing; None = one node.
        time_limit_s: HiGHS time limit per solve; exceeding it yields a fallback plan.
        warm_start: reuse the previous basis (True) or solve every step from scratch.
    """

    def __init__(self, holders, num_gpus: int, gpus_per_node: int | None = None,
                 time_limit_s: float = 0.05, warm_start: bool = True) -> None:
        self.holders = validate_holders(holders, num_gpus)
        if gpus_per_node is not None and (gpus_per_node < 1 or (
                gpus_per_node < num_gpus and num_gpus % gpus_per_node)):
            raise ValueError(f"gpus_per_node must be >= 1 and divide num_gpus={num_gpus} "
                             f"(or be >= it), got {gpus_per_node}")
        self.num_gpus = num_gpus
        self.num_experts = len(self.holders)
        self.gpus_per_node = gpus_per_node
        self.warm_start = warm_start
        self.time_limit_s = time_limit_s
        self.solves = 0
        self.fallbacks = 0
        # LP column c is x[col_expert[c], col_gpu[c]], expert-major; the last column is t.
        self.col_expert = np.repeat(np.arange(self.num_experts), [len(h) for h in self.holders])
        self.col_gpu = np.array([g for h in self.holders for g in h], dtype=np.int64)
        self._holder_table = holder_table(self.holders)
        self.needs_lp = any(len(h) > 1 for h in self.holders)
        self._highs = self._build_lp() if self.needs_lp else None

    # ---------------------------------------------------------------- LP

    def _build_lp(self) -> highspy.Highs:
        """Rows 0..E-1: sum_g x[e, g] = load[e]; rows E..E+F-1: sum_e x[e, g] - t <= 0."""
        num_x, e_rows, f = len(self.col_gpu), self.num_experts, self.num_gpus
        lp = highspy.HighsLp()
        lp.num_col_ = num_x + 1
        lp.num_row_ = e_rows + f
        lp.col_cost_ = np.r_[np.zeros(num_x), 1.0]
        lp.col_lower_ = np.zeros(num_x + 1)
        lp.col_upper_ = np.full(num_x + 1, highspy.kHighsInf)
        lp.row_lower_ = np.r_[np.zeros(e_rows), np.full(f, -highspy.kHighsInf)]
        lp.row_upper_ = np.zeros(e_rows + f)
        lp.a_matrix_.format_ = highspy.MatrixFormat.kColwise
        lp.a_matrix_.start_ = np.r_[np.arange(0, 2 * num_x + 1, 2), 2 * num_x + f].astype(np.int32)
        x_rows = np.stack([self.col_expert, e_rows + self.col_gpu], axis=1).ravel()
        lp.a_matrix_.index_ = np.r_[x_rows, e_rows + np.arange(f)].astype(np.int32)
        lp.a_matrix_.value_ = np.r_[np.ones(2 * num_x), -np.ones(f)]
        with _quiet_stdout():
            highs = highspy.Highs()
        for name, value in (("output_flag", False), ("threads", 1), ("presolve", "off"),
                            ("solver", "simplex"), ("simplex_strategy", 1)):
            highs.setOptionValue(name, value)
        highs.passModel(lp)
        self._expert_rows = np.arange(e_rows, dtype=np.int32)
        return highs

    def _solve_lp(self, load: np.ndarray) -> tuple[np.ndarray, float]:
        """Return (x per LP column, t*). Raises SolverFailure if HiGHS gives no optimal solution."""
        highs = self._highs
        if not self.warm_start:
            highs.clearSolver()
        # HiGHS measures time_limit against the object's cumulative run time: move it each step.
        highs.setOptionValue("time_limit", highs.getRunTime() + self.time_limit_s)
        bounds = load.astype(np.float64)
        highs.changeRowsBounds(self.num_experts, self._expert_rows, bounds, bounds)
        run_status = highs.run()
        model_status = highs.getModelStatus()
        if run_status != highspy.HighsStatus.kOk or model_status != highspy.HighsModelStatus.kOptimal:
            highs.clearSolver()  # do not warm-start the next step from a broken state
            raise SolverFailure(f"HiGHS: run {run_status}, model {highs.modelStatusToString(model_status)}")
        values = np.asarray(highs.getSolution().col_value, dtype=np.float64)
        return values[:-1], float(values[-1])

    # ---------------------------------------------------------------- plan

    def plan(self, tokens) -> SchedulePlan:
        """Plan one micro-batch. ``tokens`` is int ``[F, E]``; never raises on solver trouble."""
        start = time.perf_counter()
        tokens = validate_tokens(tokens, self.num_gpus, self.num_experts)
        load = tokens.sum(axis=0)
        fallback_reason = ""
        if not self.needs_lp:
            quota = self._single_holder_quota(load)
            optimum = float(quota.sum(axis=0).max()) if quota.size else 0.0
        else:
            self.solves += 1
            try:
                x, optimum = self._solve_lp(load)
                quota = self._integer_quota(x, load, optimum)
            except Exception as exc:  # any solver trouble: a valid plan beats a crashed training step
                self.fallbacks += 1
                fallback_reason = str(exc) or type(exc).__name__
                quota, optimum = self._even_split_quota(load), math.nan
        routes = route_tokens(tokens, quota, self._holder_table, self.gpus_per_node)
        return SchedulePlan(quota=quota, routes=routes, lp_optimum=optimum,
                            fallback=bool(fallback_reason), fallback_reason=fallback_reason,
                            schedule_ms=(time.perf_counter() - start) * 1e3,
                            gpus_per_node=self.gpus_per_node)

    def _quota_matrix(self, per_column: np.ndarray) -> np.ndarray:
        quota = np.zeros((self.num_experts, self.num_gpus), dtype=np.int64)
        quota[self.col_expert, self.col_gpu] = per_column
        return quota

    def _single_holder_quota(self, load: np.ndarray) -> np.ndarray:
        return self._quota_matrix(load[self.col_expert])

    def _even_split_quota(self, load: np.ndarray) -> np.ndarray:
        """Fallback: each expert's tokens split evenly over its holders (first holders take the rest)."""
        counts = np.array([len(h) for h in self.holders])
        rank_in_expert = np.arange(len(self.col_gpu)) - np.repeat(np.cumsum(counts) - counts, counts)
        share, extra = load // counts, load % counts
        return self._quota_matrix(share[self.col_expert] + (rank_in_expert < extra[self.col_expert]))

    def _integer_quota(self, x: np.ndarray, load: np.ndarray, optimum: float) -> np.ndarray:
        """Round the LP solution to integers with every GPU load <= T = ceil(t*).

        Why this always succeeds: in the flow network source -> expert e (capacity load[e]) ->
        holder GPU g -> sink (capacity T), the LP solution is a fractional flow saturating every
        expert edge, because its GPU loads are <= t* <= T. So the max flow equals sum(load), and by
        the integrality theorem of max flow (integer capacities) an integral flow of that value
        exists: an integer quota with max load <= T. We round x (per-expert cumulative rounding
        keeps each expert's total exact and every entry within 1 of x), then push any excess above
        T along augmenting paths of the residual network, which exist while the flow is not a
        feasible one at capacity T (Ford-Fulkerson).
        """
        if not (np.all(np.isfinite(x)) and math.isfinite(optimum)):
            raise SolverFailure("LP solution is not finite")
        if x.min(initial=0.0) < -1e-6 or optimum < -1e-6:
            raise SolverFailure("LP solution is negative")
        capacity = math.ceil(optimum - _OPTIMUM_TOLERANCE)
        # Cumulative rounding: columns are expert-major, so the running sum at each expert boundary
        # is an integer (the loads so far) and rounding it cannot move that boundary.
        running = np.rint(np.cumsum(np.clip(x, 0.0, None))).astype(np.int64)
        per_column = np.diff(np.r_[0, running])
        quota = self._quota_matrix(per_column)
        if not np.array_equal(quota.sum(axis=1), load):
            raise SolverFailure("LP solution does not match the expert loads")
        self._repair_overload(quota, capacity)
        return quota

    def _repair_overload(self, quota: np.ndarray, capacity: int) -> None:
        """Move tokens between replicas until every GPU load <= capacity (in place, fixed order)."""
        gpu_load = quota.sum(axis=0)
        experts_on = None
        while (overloaded := np.flatnonzero(gpu_load > capacity)).size:
            source = int(overloaded[0])
            if experts_on is None:
                experts_on = [np.flatnonzero(self.col_gpu == g) for g in range(self.num_gpus)]
            # BFS over GPUs: g -> g' when some expert on g with quota > 0 also lives on g'.
            parent: dict[int, tuple[int, int]] = {source: (-1, -1)}
            frontier, target = [source], -1
            while frontier and target < 0:
                next_frontier = []
                for g in frontier:
                    for column in experts_on[g]:
                        e = int(self.col_expert[column])
                        if quota[e, g] == 0:
                            continue
                        for h in self.holders[e]:
                            if h in parent:
                                continue
                            parent[h] = (g, e)
                            if gpu_load[h] < capacity:
                                target = h
                                break
                            next_frontier.append(h)
                        if target >= 0:
                            break
                    if target >= 0:
                        break
                frontier = next_frontier
            if target < 0:
                raise SolverFailure(f"no integer plan at max load {capacity}: LP optimum is wrong")
            path, node = [], target
            while parent[node][0] >= 0:
                path.append((parent[node][0], parent[node][1], node))
                node = parent[node][0]
            amount = min(gpu_load[source] - capacity, capacity - gpu_load[target],
                         min(quota[e, g] for g, e, _ in path))
            for g, e, h in path:
                quota[e, g] -= amount
                quota[e, h] += amount
            gpu_load[source] -= amount
            gpu_load[target] += amount


# -------------------------------------------------------------------- routing


def holder_table(holders) -> np.ndarray:
    """Pad per-expert holder lists into int64 ``[E, d_max]``, holders ascending, -1 as padding."""
    width = max(len(h) for h in holders)
    table = np.full((len(holders), width), -1, dtype=np.int64)
    for e, gpus in enumerate(holders):
        table[e, :len(gpus)] = sorted(gpus)
    return table


def _sequential_fill(supply, demand, group_size, holder_group):
    """Pair supply with demand in order, as ranges, inside groups (paper Algorithm 1's inner loop).

    Args:
        supply: int ``[E, F]`` tokens per (expert, source GPU), filled in source order.
        demand: int ``[E, D]`` quota per (expert, holder), filled in holder order.
        group_size: sources form groups of this many consecutive GPUs (a node, or all F).
        holder_group: int ``[E, D]`` group of each holder (-1 for padding, never matched).

    Returns:
        int ``[D, E, F]`` tokens of expert e sent from source s to holder j. In each group,
        min(group supply, group demand) tokens are matched: the first supply units to the first
        demand units.
    """
    num_experts, num_gpus = supply.shape
    num_groups, num_holders = num_gpus // group_size, demand.shape[1]
    experts = np.arange(num_experts)
    # Each source's range [before, after) on its (expert, group)'s supply axis.
    blocks = supply.reshape(num_experts, num_groups, group_size)
    supply_after = np.cumsum(blocks, axis=2)
    group_supply = supply_after[:, :, -1]                               # [E, G]
    supply_after = supply_after.reshape(num_experts, num_gpus)
    supply_before = supply_after - supply
    # Each holder's range on its group's demand axis (D is tiny: plain loops).
    demand_before = np.zeros_like(demand)
    group_demand = np.zeros((num_experts, num_groups), dtype=demand.dtype)
    for j in range(num_holders):
        for k in range(j):
            demand_before[:, j] += np.where(holder_group[:, k] == holder_group[:, j], demand[:, k], 0)
        in_group = holder_group[:, j] >= 0
        np.add.at(group_demand, (experts[in_group], holder_group[in_group, j]), demand[in_group, j])
    matched = np.minimum(group_supply, group_demand)
    source_group = np.arange(num_gpus) // group_size
    routed = np.empty((num_holders, num_experts, num_gpus), dtype=supply.dtype)
    for j in range(num_holders):
        group = holder_group[:, j]
        limit = np.where(group >= 0, matched[experts, np.maximum(group, 0)], 0)
        end = np.minimum(demand_before[:, j] + demand[:, j], limit)[:, None]
        out = routed[j]  # overlap of the source's range with the holder's range
        np.minimum(supply_after, end, out=out)
        out -= np.maximum(supply_before, demand_before[:, j, None])
        np.maximum(out, 0, out=out)
        if num_groups > 1:
            out *= source_group[None, :] == group[:, None]
    return routed


def route_tokens(tokens: np.ndarray, quota: np.ndarray, holders: np.ndarray,
                 gpus_per_node: int | None = None) -> np.ndarray:
    """Turn quotas into routes: local tokens first, then same node, then remote (Algorithm 1).

    Inside a tier, each expert's remaining tokens are lined up by source GPU and its remaining
    quota by holder GPU, both ascending, and paired in that order as ranges.

    Args:
        tokens: int ``[F, E]`` tokens per (source GPU, expert).
        quota: int ``[E, F]`` tokens per (expert, processing GPU), 0 off holders; row sums equal
            column sums of ``tokens``.
        holders: int ``[E, D]`` from ``holder_table`` (ascending GPUs, -1 padding).
        gpus_per_node: GPUs per node (nodes are contiguous rank blocks, F a multiple of it);
            None = one node.

    Returns:
        int64 ``[R, 4]`` rows ``(src, expert, dst, count)`` sorted by (src, expert, dst), counts > 0.
    """
    num_gpus, num_experts = tokens.shape
    supply = np.array(tokens.T, dtype=np.int64, order="C")              # [E, F], a copy
    if not np.array_equal(supply.sum(axis=1), quota.sum(axis=1)):
        raise ValueError("quota does not cover the tokens: row sums of quota must equal expert loads")
    valid = holders >= 0
    holder_gpu = np.where(valid, holders, 0)
    demand = np.where(valid, np.take_along_axis(quota, holder_gpu, axis=1), 0)  # [E, D]
    experts = np.arange(num_experts)[:, None]

    # Tier 1, local: a holder first processes the tokens that are already on it.
    # Routed tokens are kept as [holder index j, expert, source] so sums over j stay contiguous.
    local = np.where(valid, np.minimum(supply[experts, holder_gpu], demand), 0)
    routed = np.zeros((holders.shape[1], num_experts, num_gpus), dtype=np.int64)
    expert_of, slot_of = np.nonzero(valid)  # real holders only: padding would repeat (e, GPU 0)
    routed[slot_of, expert_of, holder_gpu[expert_of, slot_of]] = local[expert_of, slot_of]
    supply[expert_of, holder_gpu[expert_of, slot_of]] -= local[expert_of, slot_of]
    demand = demand - local
    # Tier 2, same node (only when there are several nodes); tier 3, anywhere.
    tiers = [(num_gpus, np.where(valid, 0, -1))]
    if gpus_per_node and gpus_per_node < num_gpus:
        tiers.insert(0, (gpus_per_node, np.where(valid, holder_gpu // gpus_per_node, -1)))
    for tier, (group_size, holder_group) in enumerate(tiers):
        step = _sequential_fill(supply, demand, group_size, holder_group)
        routed += step
        if tier < len(tiers) - 1:
            supply -= step.sum(axis=0)
            demand -= step.sum(axis=2).T
    if routed.sum() != tokens.sum():
        raise ValueError("routing lost tokens: quota must be 0 off the holders")

    # [src, expert, holder] order: nonzero entries come out sorted by (src, expert, dst).
    by_source = np.ascontiguousarray(routed.transpose(2, 1, 0))
    flat = np.flatnonzero(by_source)
    routes = np.empty((flat.size, 4), dtype=np.int64)
    routes[:, 0], expert_slot = np.divmod(flat, holder_gpu.size)
    routes[:, 1] = expert_slot // holders.shape[1]
    routes[:, 2] = holder_gpu.ravel()[expert_slot]
    routes[:, 3] = by_source.ravel()[flat]
    return routes


def vanilla_ep_load(tokens: np.ndarray, ep: int) -> np.ndarray:
    """GPU loads ``[F]`` if the MicroEP group ran as ``d = F / EP`` separate vanilla EP groups.

    GPU ``g`` is position ``g % EP`` of EP group ``g // EP`` and holds experts
    ``[(g % EP) * L, (g % EP + 1) * L)``; it receives those experts' tokens from its own EP group.

    Args:
        tokens: int ``[F, E]`` tokens per (source GPU, logical expert).
        ep: the vanilla expert-parallel size (divides F and E).
    """
    num_gpus, num_experts = tokens.shape
    groups = tokens.reshape(num_gpus // ep, ep, ep, num_experts // ep)  # [group, src pos, dst pos, L]
    return groups.sum(axis=(1, 3)).reshape(num_gpus)
