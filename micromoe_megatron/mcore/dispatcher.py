"""MicroEPDispatcher: Megatron's alltoall dispatcher, run in physical-slot space with a per-step plan.

Megatron's EP group is the MicroEP group (``F = d * EP`` ranks) and the ``F * L = d * E`` expert
slots are Megatron's "experts": slot ``p = g * L + l`` is slot ``l`` of rank ``g`` and holds logical
expert ``phy2log[g, l]``. Per layer and micro-batch:

    local counts [E] -> all-gather [F, E] -> plan (planning core, identical on every rank)
    -> logical routing map / probs [T, E] turned into physical ones [T, F * L]
    -> the stock permute / all-to-all / sort-chunks / experts / combine, unchanged.

The all-to-all splits come from the plan (``preprocess``), so the stock dispatcher's own
all-gather of physical counts is not needed.

Each (token, expert) pair lands in exactly one slot, so ``num_out_tokens`` and the combine are the
stock ones. The physical probs are a gather of the logical ones, so the router gets its gradients.
The code uses the tensors' device only (no ``torch.cuda``): CPU/gloo and GPU/NCCL alike.
"""

from __future__ import annotations

import functools
import hashlib
from collections import OrderedDict, deque
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist
from megatron.core.transformer.moe.token_dispatcher import MoEAlltoAllTokenDispatcher

from .config import MicroEPConfig
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
    """A 63-bit fingerprint of a plan's quota and routes (for the cross-rank check)."""
    digest = hashlib.blake2b(plan.quota.tobytes() + plan.routes.tobytes(), digest_size=8).digest()
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
                                          time_limit_s=micro_ep.solver_time_limit_ms / 1e3)
        self.stats = MicroEPStats()
        self.plan_count = 0
        self.last_plan: SchedulePlan | None = None
        self._plans: OrderedDict[bytes, SchedulePlan] = OrderedDict()
        self._device_tables: dict[torch.device, tuple[torch.Tensor, ...]] = {}
        # The last micro-batches' all-gathered [F, E] counts (identical on every rank), for re-placement.
        self.counts_history: deque[np.ndarray] = deque(maxlen=micro_ep.history_window)

    def set_placement(self, placement: Placement) -> None:
        """Switch to a new slot table of the same shape (after the experts moved, migration.py):
        new scheduler (its LP matrix changes), no cached plans or device tables of the old one."""
        if placement.phy2log.shape != self.placement.phy2log.shape:
            raise ValueError(f"new placement is {placement.phy2log.shape}, the layer has {self.placement.phy2log.shape}")
        self.placement = placement
        self.scheduler = ReplicaScheduler(placement.holders, placement.num_gpus,
                                          gpus_per_node=self.micro_ep.gpus_per_node,
                                          time_limit_s=self.micro_ep.solver_time_limit_ms / 1e3)
        self._plans.clear()
        self._device_tables.clear()
        self.last_plan = None

    # ------------------------------------------------------------ plan

    def plan_for(self, tokens: np.ndarray) -> SchedulePlan:
        """The plan for this micro-batch's ``[F, E]`` counts; a repeat (recompute) reuses it."""
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
            self._check_plan_agrees(plan)
        self._plans[key] = plan
        if len(self._plans) > self.micro_ep.plan_cache_size:
            self._plans.popitem(last=False)
        return plan

    def _check_plan_agrees(self, plan: SchedulePlan) -> None:
        mine = torch.tensor([plan_digest(plan)], dtype=torch.int64)
        everyone = [torch.zeros_like(mine) for _ in range(self.ep_size)]
        dist.all_gather(everyone, mine, group=self.ep_group)
        hashes = [int(h) for h in everyone]
        if len(set(hashes)) != 1:
            raise PlanMismatchError(
                f"MicroEP plan mismatch at layer {self.layer_number}, step {self.plan_count}: plan hashes "
                f"per MicroEP rank {[f'{h:016x}' for h in hashes]}; every rank must feed the scheduler "
                "the same counts in the same order")

    def _gather_counts(self, routing_map: torch.Tensor) -> np.ndarray:
        local = routing_map.sum(dim=0).to(torch.int64)
        gathered = torch.empty(self.ep_size * local.numel(), dtype=torch.int64, device=local.device)
        dist.all_gather_into_tensor(gathered, local, group=self.ep_group)
        return gathered.view(self.ep_size, -1).cpu().numpy()

    def _tables(self, device: torch.device):
        if device not in self._device_tables:
            layout = self.placement
            self._device_tables[device] = (
                torch.tensor(layout.holder_table, device=device),  # copies: Placement's arrays are read-only
                torch.tensor(layout.expert_slot, device=device),
                torch.tensor(layout.phy2log.ravel(), device=device),
            )
        return self._device_tables[device]

    # ------------------------------------------------------------ logical -> physical

    def to_physical(self, routing_map: torch.Tensor, probs: torch.Tensor, plan: SchedulePlan):
        """Logical ``[T, E]`` routing map and probs -> physical ``[T, F * L]`` ones under ``plan``.

        This rank's tokens of expert e go, in token order, first to e's first holder (as many as
        the plan sends there), then to the next, and so on.
        """
        holders, expert_slot, log_of_phys = self._tables(routing_map.device)
        num_experts, num_holders = self.placement.holder_table.shape
        me = self.ep_rank
        routes = plan.routes
        mine = routes[np.searchsorted(routes[:, 0], me, "left"):np.searchsorted(routes[:, 0], me, "right")]
        split = np.zeros((num_experts, num_holders), dtype=np.int64)  # this rank's tokens per holder
        split[mine[:, 1], self.placement.replica_index[mine[:, 1], mine[:, 2]]] = mine[:, 3]
        boundaries = torch.as_tensor(np.cumsum(split, axis=1), device=routing_map.device)  # [E, D]

        order_in_expert = torch.cumsum(routing_map.to(torch.int64), dim=0) - 1              # [T, E]
        replica = (order_in_expert.unsqueeze(-1) >= boundaries.unsqueeze(0)).sum(-1)
        replica = replica.clamp_(max=num_holders - 1)
        destination = holders[torch.arange(num_experts, device=routing_map.device), replica]  # [T, E]
        physical_id = destination * self.num_local_experts + expert_slot                     # [T, E]
        slots = torch.arange(log_of_phys.numel(), device=routing_map.device)
        physical_map = routing_map[:, log_of_phys] & (physical_id[:, log_of_phys] == slots)
        physical_probs = probs[:, log_of_phys] * physical_map
        return physical_map, physical_probs

    def dispatch_preprocess(self, hidden_states, routing_map, probs):
        plan = self.plan_for(self._gather_counts(routing_map))
        self.last_plan = plan
        physical_map, physical_probs = self.to_physical(routing_map, probs, plan)
        return super().dispatch_preprocess(hidden_states, physical_map, physical_probs)

    # ------------------------------------------------------------ communication metadata

    def _plan_uses_static_splits(self) -> bool:
        """The plan fixes every split in the dropless, unpadded case our layer runs in."""
        config = self.config
        return (self.last_plan is not None and self.ep_size > 1 and self.tp_size == 1 and not self.drop_and_pad
                and config.moe_expert_capacity_factor is None and not config.moe_router_padding_for_quantization)

    def physical_counts(self, plan: SchedulePlan) -> np.ndarray:
        """int64 ``[F, F * L]``: tokens each rank sends to each physical slot under ``plan``."""
        routes = plan.routes
        slot = routes[:, 2] * self.num_local_experts + self.placement.expert_slot[routes[:, 1]]
        counts = np.zeros((self.ep_size, self.ep_size * self.num_local_experts), dtype=np.int64)
        np.add.at(counts, (routes[:, 0], slot), routes[:, 3])
        return counts

    def preprocess(self, routing_map: torch.Tensor) -> torch.Tensor:
        """Megatron's preprocess without its second all-gather: every rank already knows from the
        plan how many tokens each rank sends to each slot, so the splits come from there. Same
        outputs as the stock method (expert TP 1, dropless); anything else takes the stock path."""
        if not self._plan_uses_static_splits():
            return super().preprocess(routing_map)
        device, slots = routing_map.device, self.num_local_experts
        counts = self.physical_counts(self.last_plan)                             # [F, F * L]
        received = counts[:, self.ep_rank * slots:(self.ep_rank + 1) * slots]     # [F src, L]
        as_tensor = functools.partial(torch.as_tensor, dtype=torch.long, device=device)
        self.num_out_tokens = routing_map.size(0) * self.config.moe_router_topk
        self.input_splits = as_tensor(counts[self.ep_rank].reshape(self.ep_size, slots).sum(axis=1))
        self.output_splits = as_tensor(received.sum(axis=1))
        self.output_splits_tp = as_tensor(received.sum(keepdims=True).reshape(1))
        self._maybe_update_cuda_sync_point("before_ep_alltoall")
        if slots > 1:
            self.num_global_tokens_per_local_expert = as_tensor(received)
            if not self.config.moe_permute_fusion:
                self._maybe_update_cuda_sync_point("before_permutation_2")
        return as_tensor(received.sum(axis=0))
