"""Stock MoELayer vs MicroMoELayer on gloo ranks, with seeded weights and inputs.

Rank functions for ``RankPool.run`` (``function(rank, world_size, **kwargs)``, plain data back),
shared by the equivalence tests (``tests/dist_cases.py``) and ``scripts/bench_dispatcher.py``.
Weights are keyed by *logical* expert id, so the stock layer (EP) and the MicroEP layer (any
placement) compute the same model.
"""

from __future__ import annotations

import time

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.transformer_config import TransformerConfig

from ..mcore.config import MicroEPConfig
from ..mcore.layer import use_micro_ep

HIDDEN, FFN, SEQ, BATCH = 16, 32, 8, 4


def moe_config(num_experts: int, top_k: int, ep: int, hidden: int = HIDDEN, ffn: int = FFN,
               recompute: bool = False, tp: int = 1, **overrides) -> TransformerConfig:
    """A one-layer fp32 MoE config (alltoall dispatcher, no aux loss, no dropout); ``overrides``
    are further TransformerConfig fields."""
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
        hidden_dropout=0.0, attention_dropout=0.0, **overrides)


def seeded(shape, seed: int, scale: float = 0.2) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * scale


def set_weights(layer, logical_expert_of_slot, hot_expert: int | None) -> None:
    """Deterministic weights keyed by logical expert id, so any layout gets the same model."""
    with torch.no_grad():
        weight = seeded(layer.router.weight.shape, 7, scale=0.5)
        if hot_expert is not None:
            weight[hot_expert] = torch.ones(weight.shape[1]) * 2.0  # aligned with the inputs' common part
        layer.router.weight.copy_(weight)
        for slot, expert in enumerate(layer.experts.local_experts):
            for i, param in enumerate(expert.parameters()):
                param.copy_(seeded(param.shape, 1000 * logical_expert_of_slot[slot] + i))


def layer_inputs(rank: int, hot_expert: int | None, tokens_scale: int = 1, hidden: int = HIDDEN):
    """This rank's input ``[SEQ * tokens_scale, BATCH, hidden]`` (requires grad) and upstream gradient."""
    x = seeded((SEQ * tokens_scale, BATCH, hidden), 100 + rank, scale=1.0)
    if hot_expert is not None:
        x = x + 1.5
    upstream = seeded((SEQ * tokens_scale, BATCH, hidden), 200 + rank, scale=1.0)
    return x.requires_grad_(True), upstream


def build_stock(num_experts: int, top_k: int, ep: int, **config_kwargs):
    """Megatron's stock MoELayer over EP = ``ep`` (initialises model parallelism); returns
    ``(layer, logical expert of each local slot)``."""
    tp = config_kwargs.get("tp", 1)
    spec = get_gpt_layer_local_spec(num_experts=num_experts, moe_grouped_gemm=False)
    parallel_state.initialize_model_parallel(expert_model_parallel_size=ep, tensor_model_parallel_size=tp,
                                             expert_tensor_parallel_size=1)
    layer = spec.submodules.mlp(config=moe_config(num_experts, top_k, ep, **config_kwargs), pg_collection=None)
    local = num_experts // ep
    first = parallel_state.get_expert_model_parallel_rank() * local
    return layer, list(range(first, first + local))


def build_micro_ep(num_experts: int, top_k: int, ep: int, micro_ep: MicroEPConfig, **config_kwargs):
    """MicroMoELayer over a MicroEP group of ``ep * replicas`` ranks (initialises model
    parallelism); returns ``(layer, logical expert of each local slot)``."""
    tp = config_kwargs.get("tp", 1)
    size = ep * micro_ep.replicas
    spec = use_micro_ep(get_gpt_layer_local_spec(num_experts=num_experts, moe_grouped_gemm=False), micro_ep)
    parallel_state.initialize_model_parallel(expert_model_parallel_size=size, tensor_model_parallel_size=tp,
                                             expert_tensor_parallel_size=1)
    layer = spec.submodules.mlp(config=moe_config(num_experts, top_k, size, **config_kwargs), pg_collection=None)
    return layer, layer.placement.phy2log[parallel_state.get_expert_model_parallel_rank()].tolist()


def overhead_benchmark(rank, world_size, *, num_experts=8, top_k=2, ep=2, replicas=2, steps=20,
                       tokens_scale=64, hot_expert=None, hidden=HIDDEN, ffn=FFN):
    """Median fwd+bwd ms of the stock layer (EP = ep) and MicroMoELayer (d = replicas), same data,
    plus per-rank expert compute time (the straggler proxy). Returns this rank's timings."""

    def run(layer, slots):
        set_weights(layer, slots, hot_expert)
        x, upstream = layer_inputs(rank, hot_expert, tokens_scale, hidden)
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
        schedule_ms = 0.0
        dispatcher = layer.token_dispatcher
        if getattr(dispatcher, "counts_history", None):
            # The same input every step reuses one cached plan: time the planner itself on this
            # step's counts (what every new micro-batch pays), its kernels loaded by then.
            counts, times = dispatcher.counts_history[-1], []
            for _ in range(20):
                start = time.perf_counter()
                dispatcher.scheduler.plan(counts).rank_routes(dispatcher.ep_rank)
                times.append((time.perf_counter() - start) * 1e3)
            schedule_ms = float(np.median(times))
        # Medians past two warm-up steps (the first plan loads the planner's compiled kernels).
        return float(np.median(layer_ms[2:])), float(np.median(expert_ms[2:])), schedule_ms

    stock, stock_slots = build_stock(num_experts, top_k, ep, hidden=hidden, ffn=ffn)
    stock_ms, stock_expert_ms, _ = run(stock, stock_slots)
    parallel_state.destroy_model_parallel()
    layer, micro_slots = build_micro_ep(num_experts, top_k, ep, MicroEPConfig(replicas=replicas),
                                        hidden=hidden, ffn=ffn)
    micro_ms, micro_expert_ms, schedule_ms = run(layer, micro_slots)
    stats = layer.micro_ep_stats
    return {"stock_ms": stock_ms, "micro_ms": micro_ms, "stock_expert_ms": stock_expert_ms,
            "micro_expert_ms": micro_expert_ms,
            "schedule_ms": schedule_ms,
            "imbalance_before": stats.imbalance_before_total / max(stats.steps, 1),
            "imbalance_after": stats.imbalance_after_total / max(stats.steps, 1)}
