"""Replica consistency: the ``d`` copies of a logical expert inside a MicroEP group act as one.

Every holder of logical expert ``e`` keeps it in the same slot index ``j`` (placement rule), so
slot ``j`` of every holder has the same parameter shapes and the same offsets in Megatron's expert
grad buffer, also on the distributed optimizer's reduce-scattered shards (holders of one MicroEP
group share their expert-data-parallel rank). Three operations:

* ``broadcast_replicas``: after construction, every holder of logical expert ``e`` takes the
  weights vanilla EP would have initialised ``e`` with, so replicas start identical and a MicroEP
  run starts exactly where a stock run does.
* ``sum_replica_grads``: after Megatron's expert-DP reduction, each holder's gradient becomes the
  sum over all holders, added in ascending holder rank so every holder gets identical bits.
* ``check_replicas``: every holder compares its weights with the others' and fails loudly.

Each is one ``all_to_all_single`` per MoE layer over the MicroEP (= Megatron EP) group; for the
gradient sum, rank ``f`` sends slot ``j`` to every other holder of ``phy2log[f, j]`` and receives
theirs, ``(d - 1)`` copies of its expert tensors, the least any exact scheme moves. Canonical
holders (lowest MicroEP rank among an expert's holders) count in grad norm and clipping; the
others carry Megatron's ``shared = True`` mark, which its optimizers already skip when counting.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from ..core.placement import Placement, SlotPeers
from .layer import MicroMoELayer


class ReplicaMismatchError(RuntimeError):
    """Replicas of a logical expert are no longer identical (checked by ``check_replicas``)."""


def slot_parameters(experts: torch.nn.Module, num_slots: int) -> list[list[torch.nn.Parameter]]:
    """The parameters of each local expert slot, in a fixed order: [L][params].

    Supports Megatron's ``SequentialMLP`` (``local_experts[j]``) and per-expert grouped weights
    (``TEGroupedMLP``: ``linear_fc1.weight{j}``, ...).
    """
    local_experts = getattr(experts, "local_experts", None)
    if local_experts is not None:
        return [list(expert.parameters()) for expert in local_experts]
    per_slot: list[list[torch.nn.Parameter]] = [[] for _ in range(num_slots)]
    for name, param in experts.named_parameters():
        match = re.search(r"(\d+)$", name)
        if match is None or int(match.group(1)) >= num_slots:
            raise NotImplementedError(
                f"MicroEP cannot tell which expert slot parameter {name!r} of {type(experts).__name__} "
                "belongs to; use per-expert weights (no --moe-single-grouped-weight)")
        per_slot[int(match.group(1))].append(param)
    return per_slot


def _exchange(tensors_per_slot: list[torch.Tensor], peers: SlotPeers, group) -> list[dict[int, torch.Tensor]]:
    """Give every holder of each slot the other holders' tensor for it.

    Args:
        tensors_per_slot: [L] flat tensors, same size on every holder of a slot.
    Returns:
        [L] dicts MicroEP rank -> that holder's tensor (this rank's own included).
    """
    world = dist.get_world_size(group)
    send_order = [[j for j in range(len(peers.logical)) if g in peers.slot_holders[j] and g != peers.rank]
                  for g in range(world)]
    sizes = [[tensors_per_slot[j].numel() for j in slots] for slots in send_order]
    splits = [sum(s) for s in sizes]
    reference = tensors_per_slot[0]
    send = torch.cat([tensors_per_slot[j] for slots in send_order for j in slots]) if sum(splits) else \
        reference.new_empty(0)
    received = reference.new_empty(sum(splits))
    # Holders share slot indices, so what g sends this rank has the same sizes as what it gets from us.
    dist.all_to_all_single(received, send, output_split_sizes=splits, input_split_sizes=splits, group=group)
    result = [{peers.rank: tensors_per_slot[j]} for j in range(len(peers.logical))]
    pieces = iter(received.split([n for per_rank in sizes for n in per_rank]))
    for g, slots in enumerate(send_order):
        for j in slots:
            result[j][g] = next(pieces)
    return result


def _flat(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def _unflatten_into(flat: torch.Tensor, tensors: list[torch.Tensor]) -> None:
    offset = 0
    for t in tensors:
        t.copy_(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()


@dataclass
class ReplicaLayer:
    """One MoE layer's slots and the group over which its replicas talk."""

    name: str
    peers: SlotPeers
    slots: list[list[torch.nn.Parameter]]
    group: object
    placement: Placement

    @property
    def replicated(self) -> bool:
        return any(len(h) > 1 for h in self.peers.slot_holders)


def replica_layers(model_chunks) -> list[ReplicaLayer]:
    """Every MicroMoELayer in the model chunks (DDP/Float16Module wrappers are fine)."""
    chunks = model_chunks if isinstance(model_chunks, (list, tuple)) else [model_chunks]
    layers = []
    for chunk in chunks:
        for name, module in chunk.named_modules():
            if isinstance(module, MicroMoELayer):
                group = module.token_dispatcher.ep_group
                peers = module.placement.slot_peers(dist.get_rank(group))
                layers.append(ReplicaLayer(name, peers, slot_parameters(module.experts, module.num_local_experts),
                                           group, module.placement))
    return layers


def mark_replicas_shared(layers: list[ReplicaLayer]) -> None:
    """Non-canonical replicas get ``shared = True``: grad norm, clipping and zero counts see each
    logical expert once (Megatron's optimizers copy the mark to their main params)."""
    for layer in layers:
        for j, params in enumerate(layer.slots):
            for p in params:
                p.shared = not layer.peers.is_canonical(j)


def _fetch(tensors_per_slot: list[torch.Tensor], phy2log: np.ndarray, source_of, rank: int,
           group) -> list[torch.Tensor]:
    """Every rank's slot j receives slot ``source_of(e)[1]`` of rank ``source_of(e)[0]``, e = phy2log[rank, j].

    Args:
        tensors_per_slot: [L] flat tensors of this rank (all slots the same size).
        phy2log: [F, L] placement (identical on every rank).
        source_of: logical expert -> (MicroEP rank, slot) to copy from.
    Returns:
        [L] tensors for this rank's slots.
    """
    num_gpus, num_slots = phy2log.shape
    wants = [[source_of(int(phy2log[g, j])) for j in range(num_slots)] for g in range(num_gpus)]
    send = [[slot for src, slot in wants[g] if src == rank] for g in range(num_gpus)]
    size = tensors_per_slot[0].numel()
    send_splits = [len(slots) * size for slots in send]
    recv_splits = [sum(src == r for src, _ in wants[rank]) * size for r in range(num_gpus)]
    reference = tensors_per_slot[0]
    payload = torch.cat([tensors_per_slot[slot] for slots in send for slot in slots]) if sum(send_splits) \
        else reference.new_empty(0)
    received = reference.new_empty(sum(recv_splits))
    dist.all_to_all_single(received, payload, output_split_sizes=recv_splits, input_split_sizes=send_splits,
                           group=group)
    by_rank = [list(chunk.split(size)) if chunk.numel() else [] for chunk in received.split(recv_splits)]
    return [by_rank[src].pop(0) for src, _ in wants[rank]]


def vanilla_source(num_slots: int):
    """Where vanilla EP initialises logical expert e: slot ``e % L`` of EP rank ``e // L``.

    MicroEP rank ``e // L`` (< EP) has the same expert RNG stream as vanilla EP rank ``e // L``
    (Megatron seeds it by EP rank), and with ``--use-cpu-initialization`` every rank draws the same
    per-slot values, so copying from there starts MicroEP from exactly vanilla EP's weights.
    """
    return lambda expert: (expert // num_slots, expert % num_slots)


@torch.no_grad()
def broadcast_replicas(layers: list[ReplicaLayer]) -> None:
    """Give every slot the weights vanilla EP would have initialised its logical expert with.

    All holders receive the same tensor, so replicas start identical (the requirement); starting
    from vanilla EP's values also makes a MicroEP run reproduce a stock run from step 1.
    """
    for layer in layers:
        slots = [_flat([p.data for p in params]) for params in layer.slots]
        fetched = _fetch(slots, layer.placement.phy2log, vanilla_source(len(layer.slots)), layer.peers.rank, layer.group)
        for params, values in zip(layer.slots, fetched):
            _unflatten_into(values, [p.data for p in params])


def collective_device(parameters) -> torch.device:
    """Where a rank's small world-wide collectives live: with its parameters, or on the current CUDA
    device for a rank without MoE layers (a pipeline stage of dense layers; NCCL needs CUDA)."""
    for param in parameters:
        return param.device
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def _grad_of(param: torch.nn.Parameter) -> torch.Tensor | None:
    """Megatron DDP accumulates into ``main_grad``; plain autograd into ``grad``."""
    grad = getattr(param, "main_grad", None)
    return grad if grad is not None else param.grad


@torch.no_grad()
def sum_replica_grads(layers: list[ReplicaLayer]) -> None:
    """Each holder's expert gradient becomes the sum over its holders, in ascending holder rank.

    Run after Megatron's expert-data-parallel reduction (reduce-scatter or all-reduce): holders
    share buffer offsets, so the sum is right on the distributed optimizer's shards too.
    """
    for layer in layers:
        if not layer.replicated:
            continue
        grads = [[_grad_of(p) for p in params] for params in layer.slots]
        if any(g is None for slot in grads for g in slot):
            raise RuntimeError(f"{layer.name}: an expert parameter has no gradient at replica sync; "
                               "call it after backward (it is installed as finalize_model_grads_func)")
        copies = _exchange([_flat(slot) for slot in grads], layer.peers, layer.group)
        for j, slot in enumerate(grads):
            holders = layer.peers.slot_holders[j]
            if len(holders) == 1:
                continue
            total = copies[j][holders[0]].clone()
            for g in holders[1:]:
                total += copies[j][g]
            _unflatten_into(total, slot)


@torch.no_grad()
def check_replicas(layers: list[ReplicaLayer], step: int | None = None) -> None:
    """Raise ReplicaMismatchError naming layer and logical expert if replicas differ (any rank)."""
    bad = []
    for layer in layers:
        if not layer.replicated:
            continue
        copies = _exchange([_flat([p.data for p in params]) for params in layer.slots], layer.peers, layer.group)
        for j, by_rank in enumerate(copies):
            mine = by_rank[layer.peers.rank]
            for g, theirs in by_rank.items():
                if g != layer.peers.rank and not torch.equal(mine, theirs):
                    diff = (mine - theirs).abs().max().item()
                    bad.append(f"{layer.name}: logical expert {layer.peers.logical[j]} (slot {j}) differs "
                               f"between MicroEP ranks {layer.peers.rank} and {g} (max abs diff {diff:.3g})")
    flag = torch.tensor([float(bool(bad))], device=collective_device(layers[0].slots[0] if layers else ()))
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if flag.item():
        where = f" at step {step}" if step is not None else ""
        detail = "; ".join(bad) if bad else "another rank found differing replicas (see its error)"
        raise ReplicaMismatchError(f"MicroEP replicas diverged{where}: {detail}")


class ReplicaSync:
    """Megatron's ``finalize_model_grads_func`` plus the replica gradient sum and a periodic guard.

    Install on the model's TransformerConfig (``config.finalize_model_grads_func = ReplicaSync()``);
    Megatron's training loop keeps a pre-set hook, and every pipeline schedule calls it once per
    step after the last backward, so gradient accumulation and ``overlap_grad_reduce`` are covered.

    Args:
        check_every: verify replicas are bit-identical every this many steps (0 = never).
        finalize: the finalize function to run first (Megatron's ``finalize_model_grads``).
        after_step: callables ``f(model_chunks)`` run at the end of every step's hook (e.g. metrics).
    """

    def __init__(self, check_every: int = 0, finalize=None, after_step=()):
        if finalize is None:
            from megatron.core.distributed import finalize_model_grads as finalize
        self.check_every = check_every
        self.finalize = finalize
        self.after_step = list(after_step)
        self.steps = 0
        self._layers: list[ReplicaLayer] | None = None

    def attach(self, model_chunks) -> list:
        """Prepare freshly built model chunks: mark replicas, make them identical. Returns the chunks
        (so it can serve as a Megatron ``pre_wrap_hooks`` entry)."""
        self._layers = replica_layers(model_chunks)
        mark_replicas_shared(self._layers)
        broadcast_replicas(self._layers)
        return model_chunks

    def placement_changed(self) -> None:
        """Forget the cached layers (peers, slot holders): a re-placement moved the experts."""
        self._layers = None

    def layers(self, model_chunks) -> list[ReplicaLayer]:
        if self._layers is None:
            self._layers = replica_layers(model_chunks)
        return self._layers

    def __call__(self, model, num_tokens=None, pg_collection=None, force_all_reduce=False):
        self.finalize(model, num_tokens, pg_collection=pg_collection, force_all_reduce=force_all_reduce)
        layers = self.layers(model)
        sum_replica_grads(layers)
        self.steps += 1
        if self.check_every and self.steps % self.check_every == 0:
            check_replicas(layers, step=self.steps)
        for callback in self.after_step:
            callback(model)
