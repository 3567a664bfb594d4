"""Synthetic routing counts for benchmarks and tests (pure numpy, seeded).

The paper's load model (Fig. 8): the probability that a token goes to the i-th most popular expert is
proportional to i^(-s) (Zipf skew s; s = 0 is uniform). Which expert is the i-th most popular is a
random permutation.
"""

from __future__ import annotations

import numpy as np


def max_over_mean(load) -> float:
    """GPU max / mean load of ``[F]`` per-GPU loads: 1.0 is perfect balance (and an empty batch)."""
    load = np.asarray(load, dtype=np.float64)
    mean = load.mean() if load.size else 0.0
    return float(load.max() / mean) if mean else 1.0


def replica_floor(expert_load, logcnt, num_gpus: int) -> float:
    """Lowest GPU max/mean any slot table with these replica counts can reach on one micro-batch.

    Some GPU holds a replica of the busiest expert per replica and gets at least its tokens per
    replica, ``max_e load[e] / logcnt[e]``, over the mean ``sum(load) / F`` (and never below 1). ``expert_load`` ``[E]``
    tokens per expert, ``logcnt`` ``[E]`` replicas per expert (>= 1). 1.0 for an empty micro-batch.
    """
    load = np.asarray(expert_load, dtype=np.float64)
    total = load.sum()
    return max(1.0, float(np.max(load / np.asarray(logcnt)) * num_gpus / total)) if total else 1.0


def zipf_probabilities(num_experts: int, skew: float, rng: np.random.Generator) -> np.ndarray:
    """``[E]`` routing probabilities: Zipf(skew) over a random popularity order."""
    weights = np.arange(1, num_experts + 1, dtype=np.float64) ** -float(skew)
    weights = rng.permutation(weights)
    return weights / weights.sum()


def sample_topk_counts(probabilities: np.ndarray, tokens_per_gpu: int, top_k: int, num_gpus: int,
                       rng: np.random.Generator) -> np.ndarray:
    """int64 ``[F, E]`` expert counts when each token picks ``top_k`` distinct experts.

    Sampling without replacement by probability (Gumbel top-k), as a router's top-k does for
    tokens whose scores follow ``probabilities``.
    """
    num_experts = probabilities.size
    if top_k > num_experts:
        raise ValueError(f"top_k={top_k} exceeds the number of experts {num_experts}")
    counts = np.zeros((num_gpus, num_experts), dtype=np.int64)
    log_p = np.log(np.maximum(probabilities, 1e-300))
    for g in range(num_gpus):
        keys = log_p + rng.gumbel(size=(tokens_per_gpu, num_experts))
        chosen = np.argpartition(-keys, top_k - 1, axis=1)[:, :top_k]
        counts[g] = np.bincount(chosen.ravel(), minlength=num_experts)
    return counts


def multinomial_counts(probabilities: np.ndarray, assignments_per_gpu: int, num_gpus: int,
                       rng: np.random.Generator) -> np.ndarray:
    """int64 ``[F, E]``: each GPU's ``assignments_per_gpu`` token-expert pairs drawn independently.

    Cheaper than ``sample_topk_counts`` (no distinct-expert constraint); used where many steps
    are needed, e.g. scheduler timing.
    """
    return rng.multinomial(assignments_per_gpu, probabilities, size=num_gpus).astype(np.int64)


def validate_counts(tokens, num_gpus: int, num_experts: int) -> np.ndarray:
    """Check routing counts and return them as int64 ``[F, E]`` (the one check every reader uses).

    Counts must be integers (floats only when integral), non-negative, and their total must fit in
    int64. Raises ``ValueError`` naming the field.
    """
    array = np.asarray(tokens)
    if array.shape != (num_gpus, num_experts):
        raise ValueError(f"tokens: expected shape [num_gpus={num_gpus}, experts={num_experts}], "
                         f"got {list(array.shape)}")
    if array.dtype == object:  # e.g. JSON integers beyond int64
        raise ValueError("tokens: counts must be integers below 2**63")
    if not np.issubdtype(array.dtype, np.integer):
        if not np.all(np.isfinite(array)) or not np.array_equal(array, np.round(array)):
            raise ValueError("tokens: counts must be whole numbers (got a fractional or non-finite count)")
    if array.size and array.min() < 0:
        s, e = np.argwhere(array < 0)[0]
        raise ValueError(f"tokens[{s}][{e}]: counts must be >= 0, got {array[s, e]}")
    # A float total is exact enough to clear the common case; near the limit, sum exactly.
    if array.size and float(array.sum(dtype=np.float64)) >= 2.0**62 and (
            array.max() >= 2**63 or sum(int(v) for v in array.ravel().tolist()) >= 2**63):
        raise ValueError("tokens: counts and their total must fit in int64 (< 2**63)")
    return array.astype(np.int64, copy=False)
