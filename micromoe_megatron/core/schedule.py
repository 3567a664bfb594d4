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

from .loads import validate_counts
from .placement import pad_holders, validate_holders
from .routing import route_tokens

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
        self._holder_table = pad_holders(self.holders)
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
        tokens = validate_counts(tokens, self.num_gpus, self.num_experts)
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
