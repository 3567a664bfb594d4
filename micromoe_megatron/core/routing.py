"""Routes: which source GPU sends how many tokens of which expert to which holder (paper Algorithm 1).

Given a plan's integer quota (tokens of each expert per processing GPU), pair every expert's tokens
with its quota: tokens already on a holder stay there first, then same-node holders take them,
then any holder. The loop is compiled (``core.kernels.route``), fixed order: the same inputs give
the same routes on every rank.
"""

from __future__ import annotations

import numpy as np


def route_tokens(tokens: np.ndarray, quota: np.ndarray, holder_table: np.ndarray,
                 gpus_per_node: int | None = None) -> np.ndarray:
    """Turn quotas into routes: local tokens first, then same node, then remote (Algorithm 1).

    Inside a tier, each expert's remaining tokens are lined up by source GPU and its remaining
    quota by holder GPU, both ascending, and paired in that order as ranges.

    Args:
        tokens: int ``[F, E]`` tokens per (source GPU, expert).
        quota: int ``[E, F]`` tokens per (expert, processing GPU), 0 off holders; row sums equal
            column sums of ``tokens``.
        holder_table: int ``[E, D]`` holder GPUs per expert, ascending, -1 padding (``Placement.holder_table``).
        gpus_per_node: GPUs per node (nodes are contiguous rank blocks, F a multiple of it);
            None = one node.

    Returns:
        int64 ``[R, 4]`` rows ``(src, expert, dst, count)`` sorted by (src, expert, dst), counts > 0.
    """
    from . import kernels  # numba, compiled on first use (cached on disk)

    tokens = np.asarray(tokens, dtype=np.int64)
    num_gpus, num_experts = tokens.shape
    # The compiled loop indexes without bounds checks: refuse inconsistent shapes and GPU ids here.
    if (np.shape(quota) != (num_experts, num_gpus) or np.ndim(holder_table) != 2
            or len(holder_table) != num_experts or (np.size(holder_table) and np.max(holder_table) >= num_gpus)):
        raise ValueError(f"route_tokens: quota must be [E={num_experts}, F={num_gpus}] and holder_table "
                         f"[E, D] with GPU ids below F")
    routes, status = kernels.route(np.array(tokens.T, order="C"),  # a copy: consumed in place
                                   np.ascontiguousarray(quota, dtype=np.int64),
                                   np.ascontiguousarray(holder_table, dtype=np.int64), gpus_per_node or 0)
    if status == kernels.UNCOVERED:
        raise ValueError("quota does not cover the tokens: row sums of quota must equal expert loads")
    if status == kernels.LOST:
        raise ValueError("routing lost tokens: quota must be 0 off the holders")
    return routes
