"""Test-only functions that run on every rank of the gloo pool (micromoe_megatron/training/rank_pool.py).
The layer builders and seeded data they share with the benchmark live in training/layer_cases.py."""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state

from micromoe_megatron.mcore.config import MicroEPConfig
from micromoe_megatron.mcore.layer import MicroMoELayer
from micromoe_megatron.training.layer_cases import build_micro_ep, build_stock, layer_inputs, set_weights


def _forward_backward(layer, rank, hot_expert, logical_expert_of_slot, tokens_scale=1):
    received = []
    hook = layer.experts.register_forward_hook(lambda m, args, out: received.append(int(args[0].shape[0])))
    x, upstream = layer_inputs(rank, hot_expert, tokens_scale)
    out, _ = layer(x)
    (out * upstream).sum().backward()
    hook.remove()
    expert_grads = {}
    for slot, expert in enumerate(layer.experts.local_experts):
        grad = torch.cat([p.grad.reshape(-1) for p in expert.parameters()])
        expert_grads.setdefault(int(logical_expert_of_slot[slot]), []).append(grad.numpy().copy())
    return {"out": out.detach().numpy().copy(), "dx": x.grad.numpy().copy(),
            "router": layer.router.weight.grad.numpy().copy(), "experts": expert_grads,
            "received": received[0]}


def _summed_over_ranks(result) -> dict:
    """Router and per-logical-expert gradients summed over every rank (what DDP would produce)."""
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, {"router": result["router"], "experts": result["experts"]})
    router = sum(r["router"] for r in everyone)
    experts = {}
    for r in everyone:
        for e, grads in r["experts"].items():
            for g in grads:
                experts[e] = experts.get(e, 0) + g
    return {"router": router, "experts": experts}


def stock_vs_micro_ep(rank, world_size, *, num_experts=8, top_k=2, ep=2, replicas=2, hot_expert=None,
                      tokens_scale=1, placement="symmetric", recompute=False, tp=1, **overrides):
    """Stock alltoall MoELayer (EP = ep) vs MicroMoELayer (d = replicas) on the same weights/data.
    ``tp`` > 1: attention tensor parallelism with sequence parallelism, expert TP 1; ``overrides``:
    further TransformerConfig fields for both layers."""
    config = dict(recompute=recompute, tp=tp, **overrides)
    stock, stock_slots = build_stock(num_experts, top_k, ep, **config)
    set_weights(stock, stock_slots, hot_expert)
    reference = _forward_backward(stock, rank, hot_expert, stock_slots, tokens_scale)
    reference_sums = _summed_over_ranks(reference)
    parallel_state.destroy_model_parallel()

    micro_ep = MicroEPConfig(replicas=replicas, placement=placement, check_plans=True)
    layer, micro_slots = build_micro_ep(num_experts, top_k, ep, micro_ep, **config)
    assert isinstance(layer, MicroMoELayer)
    micro_rank = parallel_state.get_expert_model_parallel_rank()
    set_weights(layer, micro_slots, hot_expert)
    result = _forward_backward(layer, rank, hot_expert, micro_slots, tokens_scale)
    sums = _summed_over_ranks(result)
    plan = layer.token_dispatcher.last_plan

    def max_diff(a, b):
        """Largest difference relative to the reference's magnitude (fp32 sums reorder)."""
        a, b = np.asarray(a), np.asarray(b)
        return float(np.abs(a - b).max() / max(np.abs(b).max(), 1.0))

    return {
        "out": max_diff(result["out"], reference["out"]),
        "dx": max_diff(result["dx"], reference["dx"]),
        "router": max_diff(sums["router"], reference_sums["router"]),
        "experts": max(max_diff(sums["experts"][e], reference_sums["experts"][e]) for e in range(num_experts)),
        "logical_experts_seen": sorted(sums["experts"]),
        "received": result["received"],
        "stock_received": reference["received"],
        "planned": int(plan.load_per_gpu[micro_rank]),
        "plan_imbalance": plan.imbalance,
        "plan_max": plan.max_load,
        "plan_lp": plan.lp_optimum,
        "micro_rank": micro_rank,
        "stats_before": layer.micro_ep_stats.load_before.tolist(),
        "plans_computed": layer.token_dispatcher.plan_count,
        "recomputing": layer.moe_layer_recompute,
    }


def plan_check_catches_disagreement(rank, world_size, *, num_experts=8, replicas=2):
    """Make rank 1's scheduler return a different plan; every rank must raise PlanMismatchError."""
    import dataclasses

    from micromoe_megatron.mcore.dispatcher import PlanMismatchError

    layer, _ = build_micro_ep(num_experts, 2, world_size // replicas, MicroEPConfig(replicas=replicas,
                                                                                    check_plans=True))
    x, _ = layer_inputs(rank, None)
    layer(x)  # agreeing ranks: the check passes
    if rank == 1:
        honest = layer.token_dispatcher.scheduler.plan

        def disagreeing(tokens):
            plan = honest(tokens)
            return dataclasses.replace(plan, quota=plan.quota[:, ::-1].copy())

        layer.token_dispatcher.scheduler.plan = disagreeing
    try:
        layer(layer_inputs(rank + world_size, None)[0])  # new counts: the cache cannot answer
    except PlanMismatchError as exc:
        return str(exc)
    return "no error"


def refused_option(rank, world_size, *, option, replicas=2):
    """Build a MicroMoELayer with TransformerConfig ``option=True``; return the error's text."""
    try:
        build_micro_ep(8, 2, world_size // replicas, MicroEPConfig(replicas=replicas),
                       moe_expert_capacity_factor=1.0, **{option: True})
    except ValueError as exc:
        return str(exc)
    return "no error"
