"""HiGHS reference solutions for the planner tests: the LP optimum t* and the fewest remote tokens."""

from __future__ import annotations

import highspy
import numpy as np


def _solve(num_col, cost, col_lower, col_upper, rows, row_lower, row_upper):
    """Minimise cost @ x over a sparse LP given as rows of (columns, values); returns x."""
    lp = highspy.HighsLp()
    lp.num_col_, lp.num_row_ = num_col, len(rows)
    lp.col_cost_ = np.asarray(cost, dtype=np.float64)
    lp.col_lower_ = np.asarray(col_lower, dtype=np.float64)
    lp.col_upper_ = np.asarray(col_upper, dtype=np.float64)
    lp.row_lower_ = np.asarray(row_lower, dtype=np.float64)
    lp.row_upper_ = np.asarray(row_upper, dtype=np.float64)
    lp.a_matrix_.format_ = highspy.MatrixFormat.kRowwise
    start, index, value = [0], [], []
    for columns, values in rows:
        index += list(columns)
        value += list(values)
        start.append(len(index))
    lp.a_matrix_.start_ = np.asarray(start, dtype=np.int32)
    lp.a_matrix_.index_ = np.asarray(index, dtype=np.int32)
    lp.a_matrix_.value_ = np.asarray(value, dtype=np.float64)
    highs = highspy.Highs()
    highs.setOptionValue("output_flag", False)
    highs.passModel(lp)
    highs.run()
    assert highs.getModelStatus() == highspy.HighsModelStatus.kOptimal
    return np.asarray(highs.getSolution().col_value)


def lp_optimum(holders, tokens) -> float:
    """Paper LPP 1 in its plain form (x per (expert, holder) with equality rows, then t)."""
    num_gpus, num_experts = tokens.shape
    load = tokens.sum(axis=0)
    columns = [(e, g) for e in range(num_experts) for g in holders[e]]
    t = len(columns)
    rows = [([c for c, (e2, _) in enumerate(columns) if e2 == e], None) for e in range(num_experts)]
    rows = [(cols, [1.0] * len(cols)) for cols, _ in rows]
    for g in range(num_gpus):
        cols = [c for c, (_, g2) in enumerate(columns) if g2 == g]
        rows.append((cols + [t], [1.0] * len(cols) + [-1.0]))
    inf = highspy.kHighsInf
    x = _solve(t + 1, [0.0] * t + [1.0], [0.0] * (t + 1), [inf] * (t + 1), rows,
               list(load) + [-inf] * num_gpus, list(load) + [0.0] * num_gpus)
    return float(x[-1])


def remote_floor(holders, tokens, capacity: int) -> int:
    """Fewest tokens processed off their GPU among plans with every GPU load <= capacity.

    LP over quota q[e, g] and kept tokens k[e, g] <= min(q[e, g], tokens[g, e]); maximise sum k.
    The constraint matrix is a network matrix with integer data, so the optimum is integral.
    """
    num_gpus, num_experts = tokens.shape
    load = tokens.sum(axis=0)
    columns = [(e, g) for e in range(num_experts) for g in holders[e]]
    n = len(columns)  # q columns 0..n-1, k columns n..2n-1
    rows, lower, upper = [], [], []
    for e in range(num_experts):
        cols = [c for c, (e2, _) in enumerate(columns) if e2 == e]
        rows.append((cols, [1.0] * len(cols)))
        lower.append(load[e])
        upper.append(load[e])
    for g in range(num_gpus):
        cols = [c for c, (_, g2) in enumerate(columns) if g2 == g]
        rows.append((cols, [1.0] * len(cols)))
        lower.append(-highspy.kHighsInf)
        upper.append(capacity)
    for c in range(n):
        rows.append(([n + c, c], [1.0, -1.0]))
        lower.append(-highspy.kHighsInf)
        upper.append(0.0)
    held = [tokens[g, e] for e, g in columns]
    x = _solve(2 * n, [0.0] * n + [-1.0] * n, [0.0] * (2 * n), [highspy.kHighsInf] * n + held,
               rows, lower, upper)
    return int(load.sum() - round(x[n:].sum()))
