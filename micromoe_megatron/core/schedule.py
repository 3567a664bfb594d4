"""Per-layer, per-micro-batch token schedule: counts -> integer replica quotas -> routes.

Inputs (identical on every rank after the all-gather of counts):
    tokens[s, e]  int ``[F, E]``: tokens on source GPU ``s`` routed to logical expert ``e``.
    holders[e]    the GPUs holding a replica of ``e`` (a placement's ``holders``).

Outputs (``SchedulePlan``):
    quota[e, g]   int ``[E, F]``: tokens of expert ``e`` processed on GPU ``g`` (0 off holders).
    routes        int ``[R, 4]`` rows ``(src, expert, dst, count)``, sorted, counts > 0: a pure
                  function of (counts, quota, holders), built on demand (``plan.routes``), or only a
                  rank's own rows (``plan.rank_routes(rank)``, what the dispatcher needs).

A plan is a pure function of (placement, counts): ``core.quota`` finds the integer optimum of the
paper's LPP 1, ``T = ceil(t*)``, with a certificate (a plan at ``T`` and a GPU subset of Eq. 3
density ``> T - 1``), and among plans at ``T`` keeps the most tokens on their own GPU (LPP 4 made
lexicographic); ``core.routing`` then pairs tokens with quotas local first, then same node. No
warm start, time limit or solver history can change which plan comes out, so a restarted rank or
one that fell back once agrees with the others at every other step.

HiGHS: with ``solve_lp=True`` the scheduler also solves LPP 1 with HiGHS every step (a reduced
model: one column per replica but the last, no per-expert equality rows; see ``_build_lp``) to
report the fractional optimum t* and to cross-check the certificate (``ceil(t*)`` must equal the
plan's ``T``; otherwise the step falls back). Warm starts only change how fast HiGHS finds t*,
which is unique. Tests use HiGHS as the reference for ``T`` and for the fewest remote tokens.
"""

from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass

import highspy
import numpy as np

from .highs import new_highs
from .loads import validate_counts
from .placement import pad_holders, validate_holders
from .quota import PlanWorkLimit, QuotaPlanner
from .routing import route_tokens

# t* is a ratio (integer load) / (subset size <= F), so it lies at least 1/F from any integer it is
# not equal to; this tolerance only absorbs floating-point noise of the simplex.
_OPTIMUM_TOLERANCE = 1e-6

# Default deterministic work limit: augmenting paths per plan before the fallback plan is used.
DEFAULT_WORK_LIMIT = 100_000


@dataclass(frozen=True)
class SchedulePlan:
    """One layer's plan for one micro-batch. Arrays are int64; see the module docstring.

    ``lp_optimum`` is HiGHS's LP optimum t* when the LP was solved (``lp_solved``), otherwise the
    certified lower bound on t*: the Eq. 3 density of the certificate GPU subset, whose ceiling is
    also ceil(t*) (NaN for a fallback plan). Either way ``max_load == ceil(lp_optimum)`` for a
    plan that is not a fallback. ``tokens [F, E]`` are the counts it was made from (its own copy)
    and ``holder_table [E, D]`` the placement's holders: with ``quota`` they fix the routes.
    """

    quota: np.ndarray
    tokens: np.ndarray
    holder_table: np.ndarray
    lp_optimum: float
    fallback: bool = False
    fallback_reason: str = ""
    schedule_ms: float = 0.0
    gpus_per_node: int | None = None
    lp_solved: bool = False
    augmentations: int = 0

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

    @functools.cached_property
    def routes(self) -> np.ndarray:
        """int64 ``[R, 4]`` rows ``(src, expert, dst, count)`` of every rank (``core.routing``)."""
        return route_tokens(self.tokens, self.quota, self.holder_table, self.gpus_per_node)

    def rank_routes(self, rank: int) -> tuple[np.ndarray, np.ndarray]:
        """``(sent [S, 4], received [R, 4])``: the rows of ``routes`` with ``src == rank`` and with
        ``dst == rank``, in order, computed without the other ranks' rows (``kernels.rank_route``;
        ``core.routing.rank_routes`` is the same with input checks, for arrays from elsewhere)."""
        if not (isinstance(rank, (int, np.integer)) and not isinstance(rank, bool) and 0 <= rank < len(self.tokens)):
            raise ValueError(f"rank must be an integer in [0, F={len(self.tokens)}), got {rank!r}")
        if "routes" in self.__dict__:
            routes = self.routes
            return routes[routes[:, 0] == rank], routes[routes[:, 2] == rank]
        from . import kernels

        # The plan's own arrays are int64, contiguous and consistent (checked when it was made):
        # the kernel directly, without ``core.routing``'s input checks (this runs every micro-batch).
        sent, received, status = kernels.rank_route(self.tokens, self.quota, self.holder_table,
                                                    self.gpus_per_node or 0, rank)
        if status:
            raise ValueError(f"plan routes: inconsistent quota (status {status})")
        return sent, received

    @functools.cached_property
    def remote_tokens(self) -> int:
        """Tokens processed on a GPU other than the one they came from (routing keeps every token
        it can local first, so this is the total minus ``sum min(tokens[g, e], quota[e, g])``)."""
        from . import kernels

        return int(self.tokens.sum()) - int(kernels.local_tokens(self.tokens, self.quota))

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
            "lp_solved": self.lp_solved,
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
    """The planner or the LP did not give a usable answer (error, work limit, inconsistency)."""


class ReplicaScheduler:
    """Plans one MoE layer's micro-batches for a fixed placement (one instance per layer).

    Args:
        holders: per logical expert, the GPUs (0..F-1) holding a replica.
        num_gpus: ``F``, the MicroEP group size.
        gpus_per_node: GPUs per node, for same-node-before-remote routing; None = one node.
        work_limit: augmenting paths allowed per plan (a count, identical on every rank); past
            it the step uses the fallback plan. None = unlimited.
        solve_lp: also solve the LP with HiGHS every step (reports t*, cross-checks the plan).
        warm_start: HiGHS reuses the previous basis (speed only; t* is unique).
    """

    def __init__(self, holders, num_gpus: int, gpus_per_node: int | None = None,
                 work_limit: int | None = DEFAULT_WORK_LIMIT, solve_lp: bool = False,
                 warm_start: bool = True) -> None:
        self.holders = validate_holders(holders, num_gpus)
        if gpus_per_node is not None and (gpus_per_node < 1 or (
                gpus_per_node < num_gpus and num_gpus % gpus_per_node)):
            raise ValueError(f"gpus_per_node must be >= 1 and divide num_gpus={num_gpus} "
                             f"(or be >= it), got {gpus_per_node}")
        if work_limit is not None and not 0 <= work_limit < 2**62:  # the compiled loops count in int64
            raise ValueError(f"work_limit must be in [0, 2**62) or None, got {work_limit}")
        self.num_gpus = num_gpus
        self.num_experts = len(self.holders)
        self.gpus_per_node = gpus_per_node
        self.work_limit = work_limit
        self.solve_lp = solve_lp
        self.warm_start = warm_start
        self.solves = 0
        self.fallbacks = 0
        self._holder_table = np.ascontiguousarray(pad_holders(self.holders), dtype=np.int64)
        self._quota_shape = (self.num_experts, num_gpus)
        self._planner = QuotaPlanner(self._holder_table, num_gpus)
        self._kernels = self._planner._kernels  # numba, imported with the first planner
        self.needs_lp = any(len(h) > 1 for h in self.holders)
        self._highs = None

    # ---------------------------------------------------------------- plan

    def plan(self, tokens) -> SchedulePlan:
        """Plan one micro-batch. ``tokens`` is int ``[F, E]``; never raises on planner trouble."""
        start = time.perf_counter()
        if not (isinstance(tokens, np.ndarray) and tokens.dtype == np.int64
                and tokens.shape == (self.num_gpus, self.num_experts) and self._kernels.counts_ok(tokens)):
            tokens = validate_counts(tokens, self.num_gpus, self.num_experts)  # slow path, names the error
        tokens = np.ascontiguousarray(tokens)
        fallback_reason, lp_solved, augmentations = "", False, 0
        if not self.needs_lp:
            quota = self._even_split_quota(tokens.sum(axis=0))  # one holder each: the only plan
            optimum = float(quota.sum(axis=0).max()) if quota.size else 0.0
        else:
            self.solves += 1
            try:
                optimum = self._solve_lp(tokens.sum(axis=0)) if self.solve_lp else None
                asked = []

                def lp_optimum():  # asked by the planner only after LP_AFTER_CUTS cuts (the step needs it)
                    asked.append(optimum if optimum is not None else self._solve_lp(tokens.sum(axis=0)))
                    return asked[-1]

                result = self._planner.solve(tokens, self.work_limit, lp_optimum)
                quota, augmentations = result.quota, result.augmentations
                self._check_quota(quota, result.load, result.capacity)
                if self.solve_lp and math.ceil(optimum - _OPTIMUM_TOLERANCE) != result.capacity:
                    raise SolverFailure(f"HiGHS optimum {optimum} disagrees with the certified "
                                        f"integer optimum {result.capacity}")
                if optimum is None and asked:
                    optimum = asked[-1]
                # Report t* when HiGHS gave one consistent with T, else the planner's bound.
                lp_solved = optimum is not None and math.ceil(optimum - _OPTIMUM_TOLERANCE) == result.capacity
                if not lp_solved:
                    optimum = result.bound
            except Exception as exc:  # any trouble: a valid plan beats a crashed training step
                self.fallbacks += 1
                fallback_reason = str(exc) or type(exc).__name__
                quota, optimum, lp_solved = self._even_split_quota(tokens.sum(axis=0)), math.nan, False
        # Routes are built on demand from (tokens, quota): a copy, so the caller may reuse its buffer.
        return SchedulePlan(quota=quota, tokens=tokens.copy(), holder_table=self._holder_table, lp_optimum=optimum,
                            fallback=bool(fallback_reason), fallback_reason=fallback_reason,
                            schedule_ms=(time.perf_counter() - start) * 1e3,
                            gpus_per_node=self.gpus_per_node, lp_solved=lp_solved,
                            augmentations=augmentations)

    def _check_quota(self, quota: np.ndarray, load: np.ndarray, capacity: int) -> None:
        """Cheap guard on the planner's output (a bug must become a counted fallback, not a hang)."""
        quota = np.ascontiguousarray(quota, dtype=np.int64)
        error = self._kernels.quota_error(quota, load, capacity) if quota.shape == self._quota_shape else 1
        if error == 1:
            raise SolverFailure("planner quota does not match the expert loads")
        if error == 2:
            raise SolverFailure("planner quota exceeds its certified max load")

    def _even_split_quota(self, load: np.ndarray) -> np.ndarray:
        """Fallback: each expert's tokens split evenly over its holders (first holders take the rest)."""
        planner = self._planner
        counts = planner.valid.sum(axis=1)
        rank_in_expert = np.arange(planner.col_expert.size) - np.repeat(np.cumsum(counts) - counts, counts)
        share, extra = load // counts, load % counts
        quota = np.zeros((self.num_experts, self.num_gpus), dtype=np.int64)
        quota[planner.col_expert, planner.col_gpu] = (share[planner.col_expert]
                                                      + (rank_in_expert < extra[planner.col_expert]))
        return quota

    # ---------------------------------------------------------------- HiGHS (reference / report)

    def _build_lp(self) -> highspy.Highs:
        """LPP 1 without per-expert equality rows: the last holder of each expert takes the rest.

        Columns: ``x[e, j]`` for every holder ``j`` of ``e`` but the last, then ``t``. Row ``g``
        (one per GPU): ``sum x on g - sum over experts whose last holder is g of their x - t
        <= -(load of experts whose last holder is g)``. The last holder's share ``load[e] - sum_j
        x[e, j]`` must be >= 0: a column bound for d = 2, one row per expert for d >= 3.
        """
        table, f = self._holder_table, self.num_gpus
        width = (table >= 0).sum(axis=1)
        self._last_holder = table[np.arange(self.num_experts), width - 1]
        col_expert = np.repeat(np.arange(self.num_experts), width - 1)
        col_gpu = np.concatenate([table[e, :w - 1] for e, w in enumerate(width)])
        self._lp_col_expert = col_expert
        self._wide_experts = np.flatnonzero(width > 2)
        wide_row = np.full(self.num_experts, -1)
        wide_row[self._wide_experts] = f + np.arange(self._wide_experts.size)
        n = col_expert.size
        index, value, start = [], [], [0]
        for c in range(n):
            e = int(col_expert[c])
            rows = [int(col_gpu[c]), int(self._last_holder[e])]
            vals = [1.0, -1.0]
            if wide_row[e] >= 0:
                rows.append(int(wide_row[e]))
                vals.append(1.0)
            index += rows
            value += vals
            start.append(len(index))
        index += list(range(f))
        value += [-1.0] * f
        start.append(len(index))
        lp = highspy.HighsLp()
        lp.num_col_ = n + 1
        lp.num_row_ = f + self._wide_experts.size
        lp.col_cost_ = np.r_[np.zeros(n), 1.0]
        lp.col_lower_ = np.zeros(n + 1)
        lp.col_upper_ = np.full(n + 1, highspy.kHighsInf)
        lp.row_lower_ = np.full(lp.num_row_, -highspy.kHighsInf)
        lp.row_upper_ = np.zeros(lp.num_row_)
        lp.a_matrix_.format_ = highspy.MatrixFormat.kColwise
        lp.a_matrix_.start_ = np.asarray(start, dtype=np.int32)
        lp.a_matrix_.index_ = np.asarray(index, dtype=np.int32)
        lp.a_matrix_.value_ = np.asarray(value, dtype=np.float64)
        return new_highs(lp)

    def _solve_lp(self, load: np.ndarray) -> float:
        """HiGHS's LP optimum t* for expert loads ``[E]``. Raises SolverFailure without an optimum."""
        if self._highs is None:
            self._highs = self._build_lp()
        highs = self._highs
        if not self.warm_start:
            highs.clearSolver()
        f, n = self.num_gpus, self._lp_col_expert.size
        bounds = load.astype(np.float64)
        rest = -np.bincount(self._last_holder, weights=bounds, minlength=f)
        upper = np.r_[rest, bounds[self._wide_experts]]
        highs.changeRowsBounds(upper.size, np.arange(upper.size, dtype=np.int32),
                               np.full(upper.size, -highspy.kHighsInf), upper)
        # x[e, j] <= load[e]: the whole non-negativity of the last share for d = 2, implied for d >= 3.
        highs.changeColsBounds(n, np.arange(n, dtype=np.int32), np.zeros(n), bounds[self._lp_col_expert])
        run_status = highs.run()
        model_status = highs.getModelStatus()
        if run_status != highspy.HighsStatus.kOk or model_status != highspy.HighsModelStatus.kOptimal:
            highs.clearSolver()
            raise SolverFailure(f"HiGHS: run {run_status}, model {highs.modelStatusToString(model_status)}")
        optimum = float(highs.getSolution().col_value[-1])
        if not math.isfinite(optimum):
            raise SolverFailure("HiGHS optimum is not finite")
        return optimum
