"""MicroEPDispatcher: Megatron's alltoall dispatcher, run in physical-slot space with a per-step plan.

Megatron's EP group is the MicroEP group (``F = d * EP`` ranks) and the ``F * L = d * E`` expert
slots are Megatron's "experts": slot ``p = g * L + l`` is slot ``l`` of rank ``g`` and holds logical
expert ``phy2log[g, l]``. Per layer and micro-batch:

    local counts [E] -> all-gather [F, E] -> (device: permute tokens by logical expert)
    -> plan on the host (planning core, identical on every rank), overlapping the permute
    -> cut each expert's block into one chunk per holder, sort chunks by destination slot
    -> the stock all-to-all / sort-chunks / experts / all-to-all, then the chunks back and the
       stock unpermute on the logical map.

Every split comes from the plan on the host, so the stock dispatcher's second all-gather and its
device-to-host copies are not needed. Each (token, expert) pair lands in exactly one slot, so
``num_out_tokens`` and the combine are the stock ones; the permuted probs come from the stock
``permute``, so the router gets its gradients. The code uses the tensors' device only (no
``torch.cuda``): CPU/gloo and GPU/NCCL alike.
"""

from __future__ import annotations

import functools
import hashlib
from collections import OrderedDict, deque
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist
from megatron.core.transformer.moe.moe_utils import permute, sort_chunks_by_idxs
from megatron.core.transformer.moe.token_dispatcher import MoEAlltoAllTokenDispatcher

from .config import LayoutError, MicroEPConfig
from ..core.loads import max_over_mean
from ..core.placement import Placement
from ..core.placement import vanilla_ep_load
from ..core.schedule import ReplicaScheduler, SchedulePlan


class PlanMismatchError(RuntimeError):
    """Ranks of one MicroEP group computed different plans (debug check ``check_plans``)."""


@dataclass
class MicroEPStats:
    """Per-layer statistics since the last ``reset()``, for logging.

    ``load_before`` is what each GPU would process under vanilla EP, ``load_after`` what it
    processes under the plan (last micro-batch); the sums and maxima accumulate over steps.
    """

    steps: int = 0
    fallbacks: int = 0
    schedule_ms_total: float = 0.0
    remote_tokens: int = 0
    tokens: int = 0
    imbalance_before_total: float = 0.0
    imbalance_after_total: float = 0.0
    load_before: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    load_after: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))

    def record(self, plan: SchedulePlan, load_before: np.ndarray, cached: bool = False) -> None:
        """Count one micro-batch; a ``cached`` plan (reused, not solved) adds no schedule time or fallback."""
        self.steps += 1
        self.fallbacks += int(plan.fallback and not cached)
        self.schedule_ms_total += 0.0 if cached else plan.schedule_ms
        self.remote_tokens += plan.remote_tokens
        self.tokens += int(load_before.sum())
        self.imbalance_before_total += max_over_mean(load_before)
        self.imbalance_after_total += plan.imbalance
        self.load_before, self.load_after = load_before, plan.load_per_gpu

    def reset(self) -> None:
        self.__init__()


def plan_digest(plan: SchedulePlan) -> int:
    """A 63-bit fingerprint of a plan's counts and quota (for the cross-rank check; the routes are
    a pure function of them and the placement)."""
    digest = hashlib.blake2b(plan.tokens.tobytes() + plan.quota.tobytes(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class MicroEPDispatcher(MoEAlltoAllTokenDispatcher):
    """Alltoall dispatcher over a MicroEP group; see the module docstring.

    Args:
        num_local_experts: ``L``, slots per rank.
        local_expert_indices: this rank's physical slot ids ``[g * L, (g + 1) * L)``.
        config: the *physical* TransformerConfig (``num_moe_experts = d * E``).
        pg_collection: process groups; ``pg_collection.ep`` is the MicroEP group.
        placement: the slot table (``F`` GPUs x ``L`` slots, ``E`` logical experts).
        micro_ep: plugin settings.
        vanilla_ep: ``EP = F / d``, for the "before" statistics.
        layer_number: for error messages and logs.
    """

    def __init__(self, num_local_experts, local_expert_indices, config, pg_collection, *,
                 placement: Placement, micro_ep: MicroEPConfig, vanilla_ep: int, layer_number=None):
        super().__init__(num_local_experts, local_expert_indices, config=config, pg_collection=pg_collection)
        if placement.num_gpus != self.ep_size or placement.slots_per_gpu != num_local_experts:
            raise ValueError(f"placement is {placement.num_gpus} GPUs x {placement.slots_per_gpu} slots, "
                             f"the MicroEP group is {self.ep_size} ranks x {num_local_experts} slots")
        self.placement = placement
        self.micro_ep = micro_ep
        self.vanilla_ep = vanilla_ep
        self.layer_number = layer_number
        self.scheduler = ReplicaScheduler(placement.holders, placement.num_gpus,
                                          gpus_per_node=micro_ep.gpus_per_node,
                                          work_limit=micro_ep.solver_work_limit)
        self.stats = MicroEPStats()
        self.plan_count = 0
        self.last_plan: SchedulePlan | None = None
        self._plans: OrderedDict[bytes, SchedulePlan] = OrderedDict()
        # Padding to a capacity or a quantization multiple changes the physical token counts after
        # the plan was made: not stock-identical, so refused (the stock dispatcher is the fix).
        for name, flag in (("moe_pad_expert_input_to_capacity", "--moe-pad-expert-input-to-capacity"),
                           ("moe_router_padding_for_quantization", "--moe-router-padding-for-quantization")):
            if getattr(config, name, False):
                raise LayoutError(f"{flag} is not supported with --micro-ep; drop it or drop --micro-ep")

        # The last micro-batches' all-gathered [F, E] counts (identical on every rank), for re-placement.
        self.counts_history: deque[np.ndarray] = deque(maxlen=micro_ep.history_window)

    def set_placement(self, placement: Placement) -> None:
        """Switch to a new slot table of the same shape (after the experts moved, migration.py):
        a new scheduler for the new holders, and no cached plans of the old one."""
        if placement.phy2log.shape != self.placement.phy2log.shape:
            raise ValueError(f"new placement is {placement.phy2log.shape}, the layer has {self.placement.phy2log.shape}")
        self.placement = placement
        self.scheduler = ReplicaScheduler(placement.holders, placement.num_gpus,
                                          gpus_per_node=self.micro_ep.gpus_per_node,
                                          work_limit=self.micro_ep.solver_work_limit)
        self._plans.clear()
        self.last_plan = None

    # ------------------------------------------------------------ plan

    def plan_for(self, tokens: np.ndarray, device: torch.device | str = "cpu") -> SchedulePlan:
        """The plan for this micro-batch's ``[F, E]`` counts; a repeat (recompute) reuses it.
        ``device``: where the ``check_plans`` all-gather runs (the group's device)."""
        if torch._C._current_graph_task_id() == -1:  # a new micro-batch, not a recompute inside backward
            self.counts_history.append(tokens)
        key = hashlib.blake2b(tokens.tobytes(), digest_size=16).digest()
        plan = self._plans.get(key)
        if plan is not None:
            self._plans.move_to_end(key)
            # A new micro-batch with the same counts is counted; a recompute inside backward is not.
            if torch._C._current_graph_task_id() == -1:
                self.stats.record(plan, vanilla_ep_load(tokens, self.vanilla_ep), cached=True)
            return plan
        plan = self.scheduler.plan(tokens)
        self.plan_count += 1
        self.stats.record(plan, vanilla_ep_load(tokens, self.vanilla_ep))
        if self.micro_ep.check_plans:
            self._check_plan_agrees(plan, device)
        self._plans[key] = plan
        if len(self._plans) > self.micro_ep.plan_cache_size:
            self._plans.popitem(last=False)
        return plan

    def _check_plan_agrees(self, plan: SchedulePlan, device) -> None:
        mine = torch.tensor([plan_digest(plan)], dtype=torch.int64, device=device)
        everyone = [torch.zeros_like(mine) for _ in range(self.ep_size)]
        dist.all_gather(everyone, mine, group=self.ep_group)
        hashes = [int(h) for h in everyone]
        if len(set(hashes)) != 1:
            raise PlanMismatchError(
                f"MicroEP plan mismatch at layer {self.layer_number}, step {self.plan_count}: plan hashes "
                f"per MicroEP rank {[f'{h:016x}' for h in hashes]}; every rank must feed the scheduler "
                "the same counts in the same order")

    # ------------------------------------------------------------ counts

    def _start_counts_gather(self, routing_map: torch.Tensor) -> PendingCounts:
        """Launch the all-gather of this rank's ``[E]`` counts and their copy to the host; do not wait."""
        local = routing_map.sum(dim=0).to(torch.int64)
        gathered = torch.empty(self.ep_size * local.numel(), dtype=torch.int64, device=local.device)
        dist.all_gather_into_tensor(gathered, local, group=self.ep_group)
        if gathered.device.type == "cpu":
            return PendingCounts(gathered.view(self.ep_size, -1))
        host = torch.empty(gathered.shape, dtype=torch.int64, pin_memory=True)
        host.copy_(gathered, non_blocking=True)
        event = torch.Event(device=gathered.device)
        event.record()
        return PendingCounts(host.view(self.ep_size, -1), event)

    # ------------------------------------------------------------ dispatch

    def dispatch_preprocess(self, hidden_states, routing_map, probs):
        """Stock ``dispatch_preprocess`` with the plan solved while the device permutes.

        Order of work: launch the counts all-gather and its host copy; launch the permutation of
        tokens and probs by *logical* expert (Megatron's ``permute``, the stock kernel on the
        logical ``[T, E]`` map: it does not need the plan); block on the counts and plan on the
        host while the device permutes (paper Sec. 5.4); then cut each expert's contiguous block
        into one chunk per holder and order the chunks by destination slot with Megatron's
        ``sort_chunks_by_idxs``. The result is, token for token, the all-to-all input the stock
        dispatcher builds for a physical routing map (the old ``to_physical`` path), without any
        ``[T, d * E]`` or ``[T, E, D]`` intermediate: extra memory is O(chunks) = O(E * D) host
        integers plus the chunk sort's output buffer, which replaces the permuted one.
        """
        self.hidden_shape = hidden_states.shape
        self.probs, self.routing_map = probs, routing_map
        assert probs.dim() == 2 and routing_map.dim() == 2 and routing_map.dtype == torch.bool
        hidden_states = hidden_states.view(-1, self.hidden_shape[-1])
        self.hidden_shape_before_permute = hidden_states.shape
        pending = self._start_counts_gather(routing_map)
        if self.config.moe_expert_capacity_factor is None:
            self.num_out_tokens = routing_map.size(0) * self.config.moe_router_topk   # dropless: static
        else:  # the router dropped tokens: the permute needs this rank's total first (no overlap)
            self.num_out_tokens = int(pending.wait()[self.ep_rank].sum())
        if self.shared_experts is not None:
            self.shared_experts.pre_forward_comm(hidden_states.view(self.hidden_shape))
        fused = self.config.moe_permute_fusion
        permuted, permuted_probs, self.reversed_local_input_permutation_mapping, _, _ = permute(
            hidden_states, routing_map, probs=probs, num_out_tokens=self.num_out_tokens, fused=fused)
        # The host solves while the device permutes.
        self.last_plan = self.plan_for(pending.wait(), device=routing_map.device)
        self.tokens_per_expert = self._set_splits(self.last_plan)
        if self.chunk_order.numel() == 0:
            return permuted, permuted_probs
        return sort_chunks_by_idxs(permuted, self.chunk_sizes, self.chunk_order, probs=permuted_probs,
                                   fused=fused)

    def _set_splits(self, plan: SchedulePlan) -> torch.Tensor:
        """Every split the stock ``preprocess`` computes, from the plan, on the host (no second
        all-gather, no device-to-host copy); returns ``tokens_per_expert`` ``[L]``.

        Sets ``input_splits [F]``, ``output_splits [F]``, ``output_splits_tp [1]`` (numpy, as the
        stock dispatcher leaves them), ``num_global_tokens_per_local_expert [F, L]``, and the chunk
        tables: ``chunk_sizes [C]`` (this rank's routes, in logical-permute order),
        ``chunk_order [C]`` (chunk ids by destination slot) and their inverses for the combine.
        """
        slots = self.num_local_experts
        mine, to_me = plan.rank_routes(self.ep_rank)  # only this rank's rows, not all F ranks'
        # Routes are sorted by (src, expert, dst) and an expert's holders ascend, so this rank's
        # rows are its logical-permute blocks, each cut in holder order: chunk i = mine[i].
        destination_slot = mine[:, 2] * slots + self.placement.expert_slot[mine[:, 1]]
        order = np.argsort(destination_slot, kind="stable")
        sizes = mine[:, 3]
        received = np.zeros((self.ep_size, slots), dtype=np.int64)          # [F src, L]
        np.add.at(received, (to_me[:, 0], self.placement.expert_slot[to_me[:, 1]]), to_me[:, 3])
        self.input_splits = np.bincount(mine[:, 2], weights=sizes, minlength=self.ep_size).astype(np.int64)
        self.output_splits = received.sum(axis=1)
        self.output_splits_tp = received.sum(keepdims=True).reshape(1)
        index_device = self.permute_idx_device
        as_tensor = functools.partial(torch.as_tensor, dtype=torch.long)
        self.chunk_sizes = as_tensor(sizes, device=index_device)
        self.chunk_order = as_tensor(order, device=index_device)
        self.restore_chunk_sizes = as_tensor(sizes[order], device=index_device)
        self.restore_chunk_order = as_tensor(np.argsort(order, kind="stable"), device=index_device)
        if slots > 1:
            self.num_global_tokens_per_local_expert = as_tensor(received, device=index_device)
        return as_tensor(received.sum(axis=0))

    def _maybe_dtoh_and_synchronize(self, point, tokens_per_expert=None):
        """Every split is already on the host (``_set_splits``): nothing to copy, nothing to wait for."""
        return tokens_per_expert

    # ------------------------------------------------------------ combine

    def combine_postprocess(self, permutated_local_input_tokens):
        """Put the chunks back in logical-permute order, then the stock unpermute (logical map)."""
        if self.restore_chunk_order.numel() > 0:
            permutated_local_input_tokens, _ = sort_chunks_by_idxs(
                permutated_local_input_tokens, self.restore_chunk_sizes, self.restore_chunk_order,
                fused=self.config.moe_permute_fusion)
        return super().combine_postprocess(permutated_local_input_tokens)


@dataclass
class PendingCounts:
    """The all-gathered ``[F, E]`` counts on their way to the host (``event``: the copy's, or None)."""

    host: torch.Tensor
    event: object | None = None

    def wait(self) -> np.ndarray:
        if self.event is not None:
            self.event.synchronize()
            self.event = None
        return self.host.numpy()
