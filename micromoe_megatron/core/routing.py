"""Routes: which source GPU sends how many tokens of which expert to which holder (paper Algorithm 1).

Given a plan's integer quota (tokens of each expert per processing GPU), pair every expert's tokens
with its quota: tokens already on a holder stay there first, then same-node holders take them,
then any holder. Pure numpy, fixed order: the same inputs give the same routes on every rank.
"""

from __future__ import annotations

import numpy as np


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
    num_gpus, num_experts = tokens.shape
    supply = np.array(tokens.T, dtype=np.int64, order="C")              # [E, F], a copy
    if not np.array_equal(supply.sum(axis=1), quota.sum(axis=1)):
        raise ValueError("quota does not cover the tokens: row sums of quota must equal expert loads")
    valid = holder_table >= 0
    holder_gpu = np.where(valid, holder_table, 0)
    demand = np.where(valid, np.take_along_axis(quota, holder_gpu, axis=1), 0)  # [E, D]
    experts = np.arange(num_experts)[:, None]

    # Tier 1, local: a holder first processes the tokens that are already on it.
    # Routed tokens are kept as [holder index j, expert, source] so sums over j stay contiguous.
    local = np.where(valid, np.minimum(supply[experts, holder_gpu], demand), 0)
    routed = np.zeros((holder_table.shape[1], num_experts, num_gpus), dtype=np.int64)
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
    routes[:, 1] = expert_slot // holder_table.shape[1]
    routes[:, 2] = holder_gpu.ravel()[expert_slot]
    routes[:, 3] = by_source.ravel()[flat]
    return routes
