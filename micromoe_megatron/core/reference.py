"""HiGHS reference solutions the fast planner is checked against (tests, benchmarks; not per step).

``lp_optimum``: paper LPP 1 in its plain form, the fractional optimum t* (= Eq. 3).
``remote_floor``: the fewest tokens processed off their GPU among plans with max load <= a capacity.
"""

from __future__ import annotations

import highspy
import numpy as np

from .highs import new_highs
from .placement import pad_holders


def _columns(holders):
    """(expert, gpu) per (expert, holder) column, expert-major."""
    table = pad_holders(holders)
    expert, slot = np.nonzero(table >= 0)
    return expert, table[expert, slot]


def _solve(cost, col_upper, rows, cols, row_lower, row_upper) -> np.ndarray:
    """Minimise ``cost @ x`` s.t. ``row_lower <= A x <= row_upper``, ``0 <= x <= col_upper``, A
    given by its nonzero (row, column) pairs, all +1 except where ``cols`` is negative (-1)."""
    num_col, num_row = len(cost), len(row_lower)
    values = np.where(cols < 0, -1.0, 1.0)
    cols = np.abs(cols) - (cols < 0)  # -c-1 encodes column c with value -1
    order = np.lexsort((rows, cols))
    lp = highspy.HighsLp()
    lp.num_col_, lp.num_row_ = num_col, num_row
    lp.col_cost_ = np.asarray(cost, dtype=np.float64)
    lp.col_lower_ = np.zeros(num_col)
    lp.col_upper_ = np.asarray(col_upper, dtype=np.float64)
    lp.row_lower_ = np.asarray(row_lower, dtype=np.float64)
    lp.row_upper_ = np.asarray(row_upper, dtype=np.float64)
    lp.a_matrix_.format_ = highspy.MatrixFormat.kColwise
    lp.a_matrix_.start_ = np.searchsorted(cols[order], np.arange(num_col + 1)).astype(np.int32)
    lp.a_matrix_.index_ = rows[order].astype(np.int32)
    lp.a_matrix_.value_ = values[order]
    highs = new_highs(lp, (("output_flag", False), ("threads", 1)))
    highs.run()
    if highs.getModelStatus() != highspy.HighsModelStatus.kOptimal:
        raise RuntimeError(f"reference LP: {highs.modelStatusToString(highs.getModelStatus())}")
    return np.asarray(highs.getSolution().col_value)


def lp_optimum(holders, tokens: np.ndarray) -> float:
    """t* of LPP 1: min t s.t. sum_g x[e, g] = load[e], sum_e x[e, g] <= t, x >= 0. ``tokens [F, E]``."""
    num_gpus, num_experts = tokens.shape
    load = tokens.sum(axis=0).astype(np.float64)
    expert, gpu = _columns(holders)
    n = expert.size
    x = np.arange(n)
    rows = np.concatenate((expert, num_experts + gpu, num_experts + np.arange(num_gpus)))
    cols = np.concatenate((x, x, np.full(num_gpus, -n - 1)))  # t is column n, value -1
    inf = highspy.kHighsInf
    solution = _solve(np.r_[np.zeros(n), 1.0], np.full(n + 1, inf), rows, cols,
                      np.r_[load, np.full(num_gpus, -inf)], np.r_[load, np.zeros(num_gpus)])
    return float(solution[-1])


def remote_floor(holders, tokens: np.ndarray, capacity: int) -> int:
    """Fewest tokens processed off their GPU among integer plans with every GPU load <= capacity.

    LP over quota q[e, g] and kept tokens k[e, g] <= min(q[e, g], tokens[g, e]); maximise sum k.
    A network matrix with integer data: the LP optimum is integral.
    """
    num_gpus, num_experts = tokens.shape
    load = tokens.sum(axis=0).astype(np.float64)
    expert, gpu = _columns(holders)
    n = expert.size
    x = np.arange(n)
    link = num_experts + num_gpus + x  # row k - q <= 0 per column
    rows = np.concatenate((expert, num_experts + gpu, link, link))
    cols = np.concatenate((x, x, n + x, -x - 1))
    inf = highspy.kHighsInf
    solution = _solve(np.r_[np.zeros(n), -np.ones(n)], np.r_[np.full(n, inf), tokens[gpu, expert]],
                      rows, cols, np.r_[load, np.full(num_gpus + n, -inf)],
                      np.r_[load, np.full(num_gpus, float(capacity)), np.zeros(n)])
    return int(round(load.sum() - solution[n:].sum()))
