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

    tokens, quota, holder_table = _checked(tokens, quota, holder_table)
    routes, status = kernels.route(tokens, quota, holder_table, gpus_per_node or 0)
    _raise_for(status)
    return routes


def rank_routes(tokens: np.ndarray, quota: np.ndarray, holder_table: np.ndarray, rank: int,
                gpus_per_node: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The routes one rank needs, without the others': what it sends and what it receives.

    Same arguments as ``route_tokens``, plus ``rank`` (0..F-1). Builds only the experts with
    tokens on ``rank`` or a replica there (the pairing of an expert's tokens is computed whole,
    its other rows are dropped), so it is several times cheaper than ``route_tokens`` at 64 GPUs.

    Returns:
        ``(sent [S, 4], received [R, 4])`` int64 route rows ``(src, expert, dst, count)``: exactly
        the rows of ``route_tokens`` with ``src == rank`` and with ``dst == rank``, in its order
        (sorted by (src, expert, dst)).
    """
    from . import kernels

    tokens, quota, holder_table = _checked(tokens, quota, holder_table)
    if not 0 <= rank < tokens.shape[0]:
        raise ValueError(f"rank_routes: rank must be in [0, F={tokens.shape[0]}), got {rank}")
    sent, received, status = kernels.rank_route(tokens, quota, holder_table, gpus_per_node or 0, rank)
    _raise_for(status)
    return sent, received


def _checked(tokens, quota, holder_table):
    """int64 C-contiguous inputs; the compiled loops index without bounds checks, so refuse
    inconsistent shapes and GPU ids here."""
    tokens = np.ascontiguousarray(tokens, dtype=np.int64)
    num_gpus, num_experts = tokens.shape
    if (np.shape(quota) != (num_experts, num_gpus) or np.ndim(holder_table) != 2
            or len(holder_table) != num_experts or (np.size(holder_table) and np.max(holder_table) >= num_gpus)):
        raise ValueError(f"routing: quota must be [E={num_experts}, F={num_gpus}] and holder_table "
                         f"[E, D] with GPU ids below F")
    return tokens, np.ascontiguousarray(quota, dtype=np.int64), np.ascontiguousarray(holder_table, dtype=np.int64)


def _raise_for(status: int) -> None:
    from . import kernels

    if status == kernels.UNCOVERED:
        raise ValueError("quota does not cover the tokens: row sums of quota must equal expert loads")
    if status == kernels.LOST:
        raise ValueError("routing lost tokens: quota must be 0 off the holders")
