"""Rank functions that train a tiny GPT-MoE with Megatron DDP, Megatron's optimizer and schedules,
once with stock EP and once with MicroEP, on identical weights and data (see test_replicas.py)."""

from __future__ import annotations

import warnings
import zlib

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.transformer.module import Float16Module
from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.transformer_config import TransformerConfig

from micromoe_megatron.core import placement as placement_lib
from micromoe_megatron.mcore.config import MicroEPConfig
from micromoe_megatron.mcore.layer import MicroMoELayer, use_micro_ep
from micromoe_megatron.mcore.replacement import ReplacementController
from micromoe_megatron.mcore.replicas import ReplicaSync, check_replicas, replica_layers

VOCAB, SEQ, MICRO_BATCH, NUM_EXPERTS, EP = 128, 16, 2, 8, 2


def _config(ep_size: int, bf16: bool = False) -> TransformerConfig:
    return TransformerConfig(bf16=bf16,
        num_layers=2, hidden_size=32, ffn_hidden_size=64, num_attention_heads=4, num_moe_experts=NUM_EXPERTS,
        moe_router_topk=2, moe_ffn_hidden_size=64, expert_model_parallel_size=ep_size,
        use_cpu_initialization=True, moe_token_dispatcher_type="alltoall", moe_grouped_gemm=False,
        add_bias_linear=False, moe_router_load_balancing_type="aux_loss", moe_aux_loss_coeff=1e-2,
        params_dtype=torch.bfloat16 if bf16 else torch.float32, hidden_dropout=0.0, attention_dropout=0.0,
        gradient_accumulation_fusion=False, bias_dropout_fusion=False, masked_softmax_fusion=False,
        apply_rope_fusion=False, persist_layer_norm=False)


def _seeded(shape, seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 0.1


def _logical_slots(module) -> list[int]:
    ep_rank = module.token_dispatcher.ep_rank
    if isinstance(module, MicroMoELayer):
        return [int(e) for e in module.placement.phy2log[ep_rank]]
    return [ep_rank * module.num_local_experts + j for j in range(module.num_local_experts)]


@torch.no_grad()
def _set_weights(model) -> None:
    """Deterministic weights with Megatron's init semantics: dense parameters from their name, expert
    slot j of EP rank r like Megatron's expert RNG stream of rank r (here: seed (layer, r * L + j)).

    Stock EP thus gives logical expert e the value of seed e; MicroEP's ranks r < EP hold the same
    values, and ReplicaSync.attach copies them to every holder of e, as in a real launch.
    """
    for param_name, param in model.named_parameters():
        if "experts" not in param_name:
            param.copy_(torch.ones_like(param) if "norm" in param_name
                        else _seeded(param.shape, zlib.crc32(param_name.encode())))
    for name, module in model.named_modules():
        if isinstance(module, MoELayer):
            first = module.token_dispatcher.ep_rank * module.num_local_experts
            for slot, expert in enumerate(module.experts.local_experts):
                for i, param in enumerate(expert.parameters()):
                    param.copy_(_seeded(param.shape, zlib.crc32(f"{name}/{first + slot}/{i}".encode())))


def _batches(rank: int, step: int, num_microbatches: int):
    """A learnable bigram x[i+1] = (5 x[i] + 3) mod VOCAB, different per rank, step and micro-batch."""
    for micro in range(num_microbatches):
        gen = torch.Generator().manual_seed(10_000 * rank + 100 * step + micro)
        start = torch.randint(0, VOCAB, (MICRO_BATCH, 1), generator=gen)
        seq = [start]
        for _ in range(SEQ):
            seq.append((5 * seq[-1] + 3) % VOCAB)
        seq = torch.cat(seq, dim=1)
        yield seq[:, :-1], seq[:, 1:]


def _forward_step(data_iterator, model):
    tokens, labels = next(data_iterator)
    positions = torch.arange(SEQ).unsqueeze(0).expand_as(tokens)
    mask = torch.triu(torch.ones(SEQ, SEQ, dtype=torch.bool), diagonal=1)[None, None]
    output = model(tokens, positions, mask, labels=labels)

    def loss_func(losses):
        loss = losses.float().mean()
        return loss, {"lm loss": loss.detach()}

    return output, loss_func


def _logical_expert_weights(model) -> dict:
    """{(layer name, logical expert): flat weights} for the slots this rank holds."""
    weights = {}
    for name, module in model.named_modules():
        if isinstance(module, MoELayer):
            for slot, logical in enumerate(_logical_slots(module)):
                flat = torch.cat([p.detach().reshape(-1).float()
                                  for p in module.experts.local_experts[slot].parameters()])
                weights[f"{name}/{logical}"] = flat.numpy().copy()
    return weights


def _checkpoint_state(model, optimizer, is_loading: bool, sharding_type: str | None = None) -> dict:
    """What Megatron's training checkpoint holds, minus the bookkeeping: model and optimizer.

    ``sharding_type``: the distributed optimizer's format (Megatron's ``distrib_optim_sharding_type``;
    ``dp_reshardable`` is what ``pretrain()`` writes by default)."""
    metadata = {"distrib_optim_sharding_type": sharding_type} if sharding_type else None
    model_state = model.sharded_state_dict(metadata=metadata)
    return {"model": model_state,
            "optimizer": optimizer.sharded_state_dict({"model": model_state}, is_loading=is_loading,
                                                      metadata=metadata)}


def _save(model, optimizer, directory: str, sharding_type: str | None = None) -> None:
    import os

    from megatron.core import dist_checkpointing

    os.makedirs(directory, exist_ok=True)
    dist.barrier()
    dist_checkpointing.save(_checkpoint_state(model, optimizer, False, sharding_type), directory)


def _load(model, optimizer, directory: str, sharding_type: str | None = None) -> None:
    from megatron.core import dist_checkpointing

    state = dist_checkpointing.load(_checkpoint_state(model, optimizer, True, sharding_type), directory)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])


class CyclingPolicy:
    """Test re-placement policy (NOT load-aware): a different valid placement at every call, so every
    migration path runs. Per layer it cycles through seeded random tables with relabelled experts
    and, for F = 4 x 8 experts, a hand-built one with unequal replica counts (4, 3, 2, 2, 2, 1, 1, 1)."""

    def __init__(self, num_gpus: int, num_experts: int, replicas: int):
        self.shape = (num_gpus, num_experts, replicas)
        self.calls: dict[int, int] = {}

    def __call__(self, layer_number, history, current):
        num_gpus, num_experts, replicas = self.shape
        assert history.ndim == 3 and history.shape[1:] == (num_gpus, num_experts), history.shape
        call = self.calls.get(layer_number, 0)
        self.calls[layer_number] = call + 1
        # Depends on the counts (hottest expert), so ranks deciding on different counts would disagree
        # (the controller sums them over the expert-data-parallel group and checks agreement).
        seed = 1000 * layer_number + call + 7919 * int(history.sum(axis=(0, 1)).argmax())
        while True:  # always a different placement
            if (num_gpus, num_experts) == (4, 8) and call % 3 == 2:
                table = unequal_placement(seed).phy2log
            else:  # relabel the experts too: with d = 1 random tables are all alike
                table = placement_lib.random(num_gpus, num_experts, replicas, seed=seed).phy2log
                table = np.random.default_rng(seed).permutation(num_experts)[table]
            if not np.array_equal(table, current.phy2log):
                return placement_lib.Placement(table, num_experts)
            seed += 1

    def predicted_max_mean(self, layer_number):
        return float("nan")


def unequal_placement(seed: int) -> placement_lib.Placement:
    """4 GPUs x 4 slots, 8 experts: slot 0 one expert on all GPUs, slot 1 3 + 1, slot 2 2 + 2, slot 3 2 + 1 + 1."""
    rng = np.random.default_rng(seed)
    columns = np.array([[0, 0, 0, 0], [1, 1, 1, 2], [3, 3, 4, 4], [5, 5, 6, 7]])  # [slot, GPU] -> index
    table = rng.permutation(8)[columns.T][rng.permutation(4)]
    return placement_lib.Placement(table, 8)


def _build(rank, micro_ep: int, *, overlap_grad_reduce=False, distributed_optimizer=False, check_every=0,
           placement="symmetric", placement_seed=0, clip_grad=0.0, bf16=False):
    """Model, DDP, Megatron optimizer and ReplicaSync as train() uses them (``bf16``: bf16 params in
    Megatron's Float16Module, fp32 main params in the optimizer, as ``--bf16`` runs)."""
    ep_size = EP * max(micro_ep, 1)
    parallel_state.initialize_model_parallel(expert_model_parallel_size=ep_size)
    tensor_parallel.model_parallel_cuda_manual_seed(1234)
    config = _config(ep_size, bf16)
    spec = get_gpt_layer_local_spec(num_experts=NUM_EXPERTS, moe_grouped_gemm=False)
    if micro_ep:
        spec = use_micro_ep(spec, MicroEPConfig(replicas=micro_ep, placement=placement,
                                                placement_seed=placement_seed))
    model = GPTModel(config, transformer_layer_spec=spec, vocab_size=VOCAB, max_sequence_length=SEQ)
    _set_weights(model)
    replica_sync = ReplicaSync(check_every=check_every)
    if micro_ep:
        replica_sync.attach([model])  # identical replicas from the start, also for the control
    if bf16:
        model = Float16Module(config, model)
    ddp = DistributedDataParallel(config, DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=overlap_grad_reduce,
        use_distributed_optimizer=distributed_optimizer, bucket_size=4096), model)
    optimizer = get_megatron_optimizer(OptimizerConfig(
        optimizer="adam", lr=3e-3, clip_grad=clip_grad, use_distributed_optimizer=distributed_optimizer,
        bf16=bf16, fp16=False), [ddp])
    config.finalize_model_grads_func = replica_sync if micro_ep else finalize_model_grads
    return model, ddp, optimizer, config, replica_sync


def train(rank, world_size, *, micro_ep: int, steps: int = 20, num_microbatches: int = 1, clip_grad: float = 0.0,
          overlap_grad_reduce: bool = False, distributed_optimizer: bool = False, check_every: int = 0,
          sync: bool = True, placement: str = "symmetric", placement_seed: int = 0, first_step: int = 0,
          save_dir: str | None = None, save_after: int | None = None, load_dir: str | None = None,
          replace_every: int = 0, sharding_type: str | None = None, bf16: bool = False):
    """Train steps ``first_step .. steps-1``; returns losses, grad norms and the logical expert weights
    held here. ``micro_ep`` = 0 runs stock EP = 2; d >= 1 runs MicroEP with d merged groups (Megatron
    EP = 2 d). ``sync=False`` leaves out the replica gradient sum (a negative control). ``save_dir`` /
    ``save_after``: write a distributed checkpoint after that many steps; ``load_dir``: start from one.
    ``replace_every``: re-place every this many iterations with CyclingPolicy (live migration);
    ``sharding_type``: the distributed optimizer's checkpoint format; ``bf16``: bf16 params, fp32 main
    params (``--bf16``).
    """
    ep_size = EP * max(micro_ep, 1)
    model, ddp, optimizer, config, replica_sync = _build(
        rank, micro_ep, overlap_grad_reduce=overlap_grad_reduce, distributed_optimizer=distributed_optimizer,
        check_every=check_every, placement=placement, placement_seed=placement_seed, clip_grad=clip_grad,
        bf16=bf16)
    if not sync:
        config.finalize_model_grads_func = finalize_model_grads
    if load_dir:
        _load(model, optimizer, load_dir, sharding_type)
    if overlap_grad_reduce:
        config.no_sync_func = ddp.no_sync
    forward_backward = get_forward_backward_func()
    controller = ReplacementController(CyclingPolicy(ep_size, NUM_EXPERTS, micro_ep), replace_every,
                                       replica_sync) if replace_every else None
    losses, grad_norms = [], []
    for step in range(first_step, steps):
        ddp.zero_grad_buffer()
        optimizer.zero_grad()
        per_micro = forward_backward(forward_step_func=_forward_step,
                                     data_iterator=_batches(rank, step, num_microbatches), model=[ddp],
                                     num_microbatches=num_microbatches, seq_length=SEQ,
                                     micro_batch_size=MICRO_BATCH, forward_only=False)
        ok, grad_norm, _ = optimizer.step()
        assert ok
        loss = torch.stack([m["lm loss"] for m in per_micro]).mean()
        dist.all_reduce(loss)
        losses.append(loss.item() / world_size)
        grad_norms.append(float(grad_norm))
        if controller is not None:
            controller.step([ddp], optimizer, step + 1)
        if save_dir and step + 1 == save_after:
            _save(model, optimizer, save_dir, sharding_type)
    replicas_identical = True
    if micro_ep and sync:
        check_replicas(replica_layers([model]))
    elif micro_ep:
        try:
            check_replicas(replica_layers([model]))
        except RuntimeError:
            replicas_identical = False
    return {"losses": losses, "grad_norms": grad_norms, "experts": _logical_expert_weights(model),
            "replicas_identical": replicas_identical,
            "migrations": [(layer, r.moves, r.bytes_moved, r.ms) for layer, r in controller.results] if controller
            else [],
            "shared": sorted(n for n, p in model.named_parameters() if getattr(p, "shared", False)
                             and "experts" in n)}


def replicas_diverge_detected(rank, world_size, *, micro_ep: int = 2):
    """Build a MicroEP model with per-rank random init: the guard must fail before broadcast, pass after."""
    parallel_state.initialize_model_parallel(expert_model_parallel_size=EP * micro_ep)
    tensor_parallel.model_parallel_cuda_manual_seed(1234)
    torch.manual_seed(1234 + rank)  # a different init on every rank: replicas differ
    model = GPTModel(_config(EP * micro_ep), vocab_size=VOCAB, max_sequence_length=SEQ,
                     transformer_layer_spec=use_micro_ep(
                         get_gpt_layer_local_spec(num_experts=NUM_EXPERTS, moe_grouped_gemm=False),
                         MicroEPConfig(replicas=micro_ep)))
    layers = replica_layers([model])
    with torch.no_grad():
        for params in layers[0].slots:
            for p in params:
                p.normal_()
    try:
        check_replicas(layers, step=7)
        before = "no error"
    except RuntimeError as error:
        before = str(error)
    ReplicaSync().attach([model])
    check_replicas(layers)
    return before



def _slot_snapshot(model, optimizer) -> dict:
    """{(layer, logical expert): (full weights, this rank's local Adam pieces, steps)} per held slot."""
    from micromoe_megatron.mcore.migration import SlotState
    from micromoe_megatron.mcore.replicas import slot_parameters

    snapshot = {}
    for name, module in model.named_modules():
        if isinstance(module, MicroMoELayer):
            slots = slot_parameters(module.experts, module.num_local_experts)
            state = SlotState(slots, optimizer)
            inner = state.optimizer.optimizer.state
            for j, logical in enumerate(module.placement.phy2log[state_rank(module)]):
                weights = torch.cat([p.detach().reshape(-1).float() for p in slots[j]]).numpy().copy()
                local, _ = state._local_piece(slots[j])
                steps = sorted({float(inner[state.shard[p][0]]["step"]) for p in slots[j]
                                if p in state.shard and state.shard[p][2] > state.shard[p][1]})
                snapshot[(name, int(logical))] = (weights, local.numpy().copy(), steps, state.keys)
    return snapshot


def _full_states(model, optimizer) -> dict:
    """{(layer, logical expert): [Q, n] full payload} of the held slots (gathered over EDP)."""
    from micromoe_megatron.mcore.migration import SlotState
    from micromoe_megatron.mcore.replicas import slot_parameters

    full = {}
    for name, module in model.named_modules():
        if isinstance(module, MicroMoELayer):
            state = SlotState(slot_parameters(module.experts, module.num_local_experts), optimizer)
            for j, logical in enumerate(module.placement.phy2log[state_rank(module)]):
                full[(name, int(logical))] = state.read(j).numpy().copy()
    return full


def state_rank(module) -> int:
    return module.token_dispatcher.ep_rank


def migration_round_trip(rank, world_size, *, micro_ep: int = 2, distributed_optimizer: bool = False,
                         bf16: bool = False):
    """Train 2 steps, then migrate every layer A -> B -> C -> A (C with unequal replica counts when it
    fits). Each slot's weights, Adam moments and step must follow its logical expert exactly (with
    ``bf16``: the bf16 model weights, the fp32 main weights, the moments and the step)."""
    from micromoe_megatron.mcore.migration import migrate_layer

    model, ddp, optimizer, config, replica_sync = _build(rank, micro_ep, distributed_optimizer=distributed_optimizer,
                                                         bf16=bf16)
    forward_backward = get_forward_backward_func()
    for step in range(2):
        ddp.zero_grad_buffer()
        optimizer.zero_grad()
        forward_backward(forward_step_func=_forward_step, data_iterator=_batches(rank, step, 1), model=[ddp],
                         num_microbatches=1, seq_length=SEQ, micro_batch_size=MICRO_BATCH, forward_only=False)
        assert optimizer.step()[0]
    layers = [m for m in model.modules() if isinstance(m, MicroMoELayer)]
    ep_size = EP * micro_ep
    original = {layer: layer.placement for layer in layers}
    before = _slot_snapshot(model, optimizer)
    full_before = _full_states(model, optimizer)
    # Adam moments and step 2 on every slot whose shard this rank holds (with the distributed
    # optimizer a rank may hold no shard of a layer).
    assert all((s[3] == ("exp_avg", "exp_avg_sq") and s[2] == [2.0]) or (not s[2] and s[1].shape[1] == 0)
               for s in before.values()), "expected Adam moments and step 2 on every held shard"
    results, mismatches, weights_after = [], [], []
    policy = CyclingPolicy(ep_size, NUM_EXPERTS, micro_ep)
    history = np.ones((1, ep_size, NUM_EXPERTS), dtype=np.int64)
    targets = [policy(1, history, original[layers[0]])]
    targets.append(unequal_placement(3) if (ep_size, NUM_EXPERTS) == (4, 8) else policy(1, history, targets[0]))
    for target in targets + [None]:
        for layer in layers:
            results.append(migrate_layer(layer, target or original[layer], optimizer))
        replica_sync.placement_changed()
        now = _slot_snapshot(model, optimizer)
        weights_after.append({key: v[0] for key, v in now.items()})
        mismatches += [f"{key}: Adam step {v[2]}" for key, v in now.items() if v[2] and v[2] != [2.0]]
        if target is None:  # back at the original layout: the local shards of the state match bit for bit
            mismatches += [f"{key}: Adam state differs after the round trip" for key, v in now.items()
                           if not np.array_equal(v[1], before[key][1])]
    # The full (EDP-gathered) weights and Adam state at a layout where slots hold other experts.
    for layer in layers:
        migrate_layer(layer, targets[1], optimizer)
    full_after = _full_states(model, optimizer)
    check_replicas(replica_layers([model]))
    return {"mismatches": mismatches, "weights_before": {key: v[0] for key, v in before.items()},
            "weights_after": weights_after, "full_before": full_before, "full_after": full_after,
            "shared": sorted(n for n, p in model.named_parameters() if getattr(p, "shared", False)),
            "moves": [r.moves for r in results], "bytes": [r.bytes_moved for r in results],
            "ms": [r.ms for r in results]}


def disagreeing_policy_keeps_placement(rank, world_size):
    """A policy that answers differently on rank 0 (not a pure function): the controller must keep
    every layer's placement on every rank, count the disagreement, and migrate nothing."""
    model, _, optimizer, _, sync = _build(rank, 2)
    layers = [m for m in model.modules() if isinstance(m, MicroMoELayer)]
    before = [layer.placement.phy2log.copy() for layer in layers]
    for layer in layers:  # one micro-batch of identical counts everywhere
        layer.token_dispatcher.counts_history.append(np.ones((4, NUM_EXPERTS), dtype=np.int64))

    def policy(layer_number, history, current):
        return placement_lib.random(4, NUM_EXPERTS, 2, seed=99) if dist.get_rank() == 0 else None

    controller = ReplacementController(policy, interval=1, replica_sync=sync)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        moved = controller.step([model], optimizer, iteration=1)
    unchanged = all(np.array_equal(layer.placement.phy2log, old) for layer, old in zip(layers, before))
    return {"moved": len(moved), "disagreements": controller.disagreements, "unchanged": unchanged,
            **_measurements_agree(rank, model, optimizer, sync, layers)}


def _measurements_agree(rank, model, optimizer, sync, layers) -> dict:
    """The time gate's inputs are the same on every rank although each rank measured its own: the
    expert time per token (rank-dependent timer totals here), the migration time (each rank's own
    wall time), and so the AdaptivePolicy's verdicts. Two checks with skewed identical counts:
    the first re-places (threshold 0) and measures the migration, the second uses that measurement."""
    from micromoe_megatron.mcore.replacement import AdaptivePolicy, agreed_max_ms, agreed_ms_per_token

    untimed = [agreed_ms_per_token(layer) for layer in layers]  # built without re-placement: timer attached now
    for layer in layers:
        layer.expert_timer.nanoseconds, layer.expert_timer.tokens = 1000 * (rank + 1), 10 * (rank + 1)
    ms_per_token = [agreed_ms_per_token(layer) for layer in layers]
    max_ms = agreed_max_ms(layers[0], 1.5 + rank)
    skewed = np.tile(np.array([40, 10, 4, 2, 1, 1, 1, 1], dtype=np.int64), (4, 1))
    controller = ReplacementController(AdaptivePolicy(0.0), interval=1, replica_sync=sync,
                                       micro_batches_per_iteration=3)
    checks = []
    for iteration in (1, 2):
        for layer in layers:
            layer.token_dispatcher.counts_history.append(skewed)
            layer.expert_timer.nanoseconds, layer.expert_timer.tokens = 7000 + 500 * rank, 7 + rank
        controller.step([model], optimizer, iteration)
        checks.append([(c.layer_number, c.result is not None, c.result.ms if c.result else None, c.reason,
                        c.verdict.gain_ms, c.verdict.migration_ms) for c in controller.last_check])
    costs = [controller.migration_cost(layer, optimizer) for layer in layers]
    # Background search: checked after iteration 2, applied after iteration 3, the same placement as a
    # synchronous call of the policy on the same inputs.
    hot_last = np.tile(np.array([1, 1, 1, 1, 2, 4, 10, 40], dtype=np.int64), (4, 1))
    for layer in layers:
        layer.token_dispatcher.counts_history.clear()
        layer.token_dispatcher.counts_history.append(hot_last)
    expected = [AdaptivePolicy(0.0)(layer.layer_number, np.stack(layer.token_dispatcher.counts_history),
                                    layer.placement) for layer in layers]
    background = ReplacementController(AdaptivePolicy(0.0), interval=2, replica_sync=sync, background=True)
    moved = [len(background.step([model], optimizer, iteration)) for iteration in (1, 2, 3)]
    background.close()
    return {"untimed": untimed, "ms_per_token": ms_per_token, "max_ms": max_ms, "checks": checks,
            "summary": controller.summary(),
            "costs": [(c.bytes_per_slot, c.bandwidth_gbps, measured) for c, measured in costs],
            "background_moved": moved, "background_at": (background.checked_at, background.applied_at),
            "background_matches": all(new is not None and np.array_equal(layer.placement.phy2log, new.phy2log)
                                      for layer, new in zip(layers, expected)),
            "phy2log": [layer.placement.phy2log.tolist() for layer in layers]}
