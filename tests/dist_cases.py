"""Functions that run on every rank of the gloo pool (see dist_pool.py). Each returns plain data."""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.transformer_config import TransformerConfig

from micromoe_megatron.mcore.config import MicroEPConfig
from micromoe_megatron.mcore.layer import MicroMoELayer, use_micro_ep

HIDDEN, FFN, SEQ, BATCH = 16, 32, 8, 4


def moe_config(num_experts: int, top_k: int, ep: int, hidden: int = HIDDEN, ffn: int = FFN,
               recompute: bool = False, tp: int = 1) -> TransformerConfig:
    recompute_args = dict(recompute_granularity="selective", recompute_modules=["moe"]) if recompute else {}
    # MoE with TP > 1 needs sequence parallelism (Megatron refuses otherwise); experts stay unsharded.
    tp_args = dict(tensor_model_parallel_size=tp, sequence_parallel=True, expert_tensor_parallel_size=1) \
        if tp > 1 else {}
    return TransformerConfig(**recompute_args, **tp_args,
        num_layers=1, hidden_size=hidden, ffn_hidden_size=ffn, num_attention_heads=4,
        num_moe_experts=num_experts, moe_router_topk=top_k, moe_ffn_hidden_size=ffn,
        expert_model_parallel_size=ep, use_cpu_initialization=True,
        moe_token_dispatcher_type="alltoall", moe_grouped_gemm=False, add_bias_linear=False,
        moe_router_load_balancing_type="none", moe_aux_loss_coeff=0.0, params_dtype=torch.float32,
        moe_router_pre_softmax=top_k == 1,
        hidden_dropout=0.0, attention_dropout=0.0)


def _seeded(shape, seed: int, scale: float = 0.2) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * scale


def _set_weights(layer, logical_expert_of_slot, hot_expert: int | None) -> None:
    """Deterministic weights keyed by logical expert id, so any layout gets the same model."""
    with torch.no_grad():
        weight = _seeded(layer.router.weight.shape, 7, scale=0.5)
        if hot_expert is not None:
            weight[hot_expert] = torch.ones(weight.shape[1]) * 2.0  # aligned with the inputs' common part
        layer.router.weight.copy_(weight)
        for slot, expert in enumerate(layer.experts.local_experts):
            for i, param in enumerate(expert.parameters()):
                param.copy_(_seeded(param.shape, 1000 * logical_expert_of_slot[slot] + i))


def _inputs(rank: int, hot_expert: int | None, tokens_scale: int = 1, hidden: int = HIDDEN):
    x = _seeded((SEQ * tokens_scale, BATCH, hidden), 100 + rank, scale=1.0)
    if hot_expert is not None:
        x = x + 1.5
    upstream = _seeded((SEQ * tokens_scale, BATCH, hidden), 200 + rank, scale=1.0)
    return x.requires_grad_(True), upstream


def _forward_backward(layer, rank, hot_expert, logical_expert_of_slot, tokens_scale=1):
    received = []
    hook = layer.experts.register_forward_hook(lambda m, args, out: received.append(int(args[0].shape[0])))
    x, upstream = _inputs(rank, hot_expert, tokens_scale)
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
                      tokens_scale=1, placement="symmetric", recompute=False, tp=1):
    """Stock alltoall MoELayer (EP = ep) vs MicroMoELayer (d = replicas) on the same weights/data.
    ``tp`` > 1: attention tensor parallelism with sequence parallelism, expert TP 1."""
    spec = get_gpt_layer_local_spec(num_experts=num_experts, moe_grouped_gemm=False)
    layout = dict(tensor_model_parallel_size=tp, expert_tensor_parallel_size=1)

    parallel_state.initialize_model_parallel(expert_model_parallel_size=ep, **layout)
    stock = spec.submodules.mlp(config=moe_config(num_experts, top_k, ep, recompute=recompute, tp=tp),
                                pg_collection=None)
    local = num_experts // ep
    ep_rank = parallel_state.get_expert_model_parallel_rank()
    stock_slots = [ep_rank * local + l for l in range(local)]
    _set_weights(stock, stock_slots, hot_expert)
    reference = _forward_backward(stock, rank, hot_expert, stock_slots, tokens_scale)
    reference_sums = _summed_over_ranks(reference)
    parallel_state.destroy_model_parallel()

    micro_size = ep * replicas
    parallel_state.initialize_model_parallel(expert_model_parallel_size=micro_size, **layout)
    micro_spec = use_micro_ep(spec, MicroEPConfig(replicas=replicas, placement=placement, check_plans=True))
    layer = micro_spec.submodules.mlp(config=moe_config(num_experts, top_k, micro_size, recompute=recompute, tp=tp),
                                      pg_collection=None)
    assert isinstance(layer, MicroMoELayer)
    micro_rank = parallel_state.get_expert_model_parallel_rank()
    micro_slots = layer.placement.phy2log[micro_rank].tolist()
    _set_weights(layer, micro_slots, hot_expert)
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

    parallel_state.initialize_model_parallel(expert_model_parallel_size=world_size)
    spec = use_micro_ep(get_gpt_layer_local_spec(num_experts=num_experts, moe_grouped_gemm=False),
                        MicroEPConfig(replicas=replicas, check_plans=True))
    layer = spec.submodules.mlp(config=moe_config(num_experts, 2, world_size), pg_collection=None)
    x, _ = _inputs(rank, None)
    layer(x)  # agreeing ranks: the check passes
    if rank == 1:
        honest = layer.token_dispatcher.scheduler.plan

        def disagreeing(tokens):
            plan = honest(tokens)
            return dataclasses.replace(plan, quota=plan.quota[:, ::-1].copy())

        layer.token_dispatcher.scheduler.plan = disagreeing
    try:
        layer(_inputs(rank + world_size, None)[0])  # new counts: the cache cannot answer
    except PlanMismatchError as exc:
        return str(exc)
    return "no error"


def overhead_benchmark(rank, world_size, *, num_experts=8, top_k=2, ep=2, replicas=2, steps=20,
                       tokens_scale=64, hot_expert=None, hidden=HIDDEN, ffn=FFN):
    """Median fwd+bwd ms of the stock layer (EP = ep) and MicroMoELayer (d = replicas), same data,
    plus per-rank expert compute time (the straggler proxy). Returns this rank's timings."""
    import time

    def run(layer, slots):
        _set_weights(layer, slots, hot_expert)
        x, upstream = _inputs(rank, hot_expert, tokens_scale, hidden)
        expert_ms, layer_ms = [], []
        started = {}
        pre = layer.experts.register_forward_pre_hook(lambda m, a: started.__setitem__("t", time.perf_counter()))
        post = layer.experts.register_forward_hook(
            lambda m, a, o: expert_ms.append((time.perf_counter() - started["t"]) * 1e3))
        for _ in range(steps):
            dist.barrier()
            start = time.perf_counter()
            out, _ = layer(x)
            (out * upstream).sum().backward()
            layer_ms.append((time.perf_counter() - start) * 1e3)
            x.grad = None
        pre.remove()
        post.remove()
        return float(np.median(layer_ms[2:])), float(np.median(expert_ms[2:]))

    spec = get_gpt_layer_local_spec(num_experts=num_experts, moe_grouped_gemm=False)
    parallel_state.initialize_model_parallel(expert_model_parallel_size=ep)
    stock = spec.submodules.mlp(config=moe_config(num_experts, top_k, ep, hidden, ffn), pg_collection=None)
    ep_rank = parallel_state.get_expert_model_parallel_rank()
    stock_ms, stock_expert_ms = run(stock, [ep_rank * (num_experts // ep) + l for l in range(num_experts // ep)])
    parallel_state.destroy_model_parallel()

    parallel_state.initialize_model_parallel(expert_model_parallel_size=ep * replicas)
    layer = use_micro_ep(spec, MicroEPConfig(replicas=replicas)).submodules.mlp(
        config=moe_config(num_experts, top_k, ep * replicas, hidden, ffn), pg_collection=None)
    micro_rank = parallel_state.get_expert_model_parallel_rank()
    micro_ms, micro_expert_ms = run(layer, layer.placement.phy2log[micro_rank].tolist())
    stats = layer.micro_ep_stats
    return {"stock_ms": stock_ms, "micro_ms": micro_ms, "stock_expert_ms": stock_expert_ms,
            "micro_expert_ms": micro_expert_ms,
            "schedule_ms": stats.schedule_ms_total / max(stats.steps, 1),
            "imbalance_before": stats.imbalance_before_total / max(stats.steps, 1),
            "imbalance_after": stats.imbalance_after_total / max(stats.steps, 1)}
