"""Live migration of expert slots between two placements of one MoE layer (paper Sec. 6.4).

Given a layer's current and new ``Placement`` (any valid slot tables over the same ``F`` GPUs and
``L`` slots, replica counts may differ), every rank's slot ``j`` must end up holding the weights and
optimizer state of logical expert ``new.phy2log[rank, j]``, exactly as they were before: the model
and the optimizer are unchanged, only where they live moves.

* ``plan_migration`` (pure, in ``core/migration_plan.py``, identical on every rank): the slot moves
  packed into rounds, each rank sending at most one slot and receiving at most one per round, reads
  before writes within a round, and no slot overwritten while a later move still reads it (its old
  payload is stashed on its rank first). The rounds meet the degree bound (König) in practice.
* ``SlotState``: reads/writes one slot's full payload ``[Q, n]``, float32 (row 0 the main weights,
  then each per-element Adam state, e.g. ``exp_avg``, ``exp_avg_sq``) from Megatron's optimizers:

  - plain ``FP32Optimizer``: torch Adam state keyed by the model parameter, local.
  - ``Float16OptimizerWithFloat16Params`` (``--bf16``/``--fp16`` without the distributed
    optimizer): row 0 is the fp32 main copy (``param.main_param``), the Adam state is keyed by it.
  - ``DistributedOptimizer`` (fp32, bf16 or fp16 params): the main params are this rank's shard of
    Megatron's buffer (views of the model params in fp32, fp32 copies of a shard for 16-bit params)
    and the Adam state covers only that shard, sharded over the expert-data-parallel (EDP) group.
    Slot ``j`` of every MicroEP rank sits at the same buffer offsets (identical layouts), but shard
    boundaries fall anywhere inside a slot, so slot ``j`` and slot ``j'`` are not split alike: the
    source gathers the slot's full state over its EDP group (each rank contributes its shard piece)
    and the destination keeps its own piece of slot ``j'``. Every EDP replica of the MicroEP group
    runs the same plan at the same time, so the gathers line up.

  16-bit model params are written as the main weights cast to their dtype: Megatron keeps them
  equal to that cast (it makes the main params from them and copies main -> model after every
  step), so the moved model is bit-identical to the one before.
  Adam's ``step`` is not moved: Megatron steps every expert parameter of an optimizer together, so
  source and destination hold the same count (the round-trip test checks it). Gradients
  (``main_grad``, views of DDP's grad buffer) are not moved: they are zeroed before the next step.

Peak extra memory per rank: one payload sent plus one received per round (each one slot's weights
and Adam state), plus at most one stashed payload, and for the distributed optimizer
the EDP gather buffer (about one slot). Nothing layer-sized is ever copied.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from ..core.migration_plan import STASH, MigrationPlan, SlotMove, plan_migration
from ..core.placement import Placement

__all__ = ["STASH", "MigrationPlan", "SlotMove", "plan_migration", "SlotState", "MigrationError",
           "MigrationResult", "execute_plan", "migrate_layer"]


# ---------------------------------------------------------------- optimizer state of one slot


def _inner_optimizers(optimizer) -> list:
    return list(getattr(optimizer, "chained_optimizers", None) or [optimizer])


class MigrationError(RuntimeError):
    """The optimizer or parameters are of a kind migration does not support; names the fix."""


class SlotState:
    """Read and write the full payload ``[Q, n]`` of one layer's slots (main weights + Adam state).

    Args:
        slots: ``[L][params]`` this rank's slot parameters (``replicas.slot_parameters``).
        optimizer: Megatron's optimizer (``ChainedOptimizer``, ``FP32Optimizer``,
            ``Float16OptimizerWithFloat16Params`` or ``DistributedOptimizer``), or None to move
            weights only.
    Raises:
        MigrationError: a precision-aware or offloading optimizer, an optimizer of another kind, or
            one that does not hold the slots.
    """

    def __init__(self, slots: list[list[torch.nn.Parameter]], optimizer=None):
        from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
        from megatron.core.optimizer.optimizer import Float16OptimizerWithFloat16Params, FP32Optimizer

        self.slots = slots
        self.numel = sum(p.numel() for p in slots[0])
        if any(sum(p.numel() for p in params) != self.numel for params in slots):
            raise MigrationError("expert slots of one layer have different sizes; migration needs equal slots")
        first = slots[0][0]
        self.device = first.device
        self.optimizer, self.distributed = None, False
        for inner in _inner_optimizers(optimizer) if optimizer is not None else []:
            if isinstance(inner, DistributedOptimizer):
                if any(first in buffer.param_index_map for buffer in inner.buffers):
                    if inner.config.use_precision_aware_optimizer or inner.config.optimizer_cpu_offload:
                        raise MigrationError("expert re-placement does not support --use-precision-aware-optimizer "
                                             "or --optimizer-cpu-offload; drop them or the re-placement flags")
                    self.optimizer, self.distributed = inner, True
            elif isinstance(inner, (FP32Optimizer, Float16OptimizerWithFloat16Params)):
                groups = inner.float16_groups if isinstance(inner, Float16OptimizerWithFloat16Params) else \
                    [group["params"] for group in inner.optimizer.param_groups]
                if any(first is p for group in groups for p in group):
                    self.optimizer = inner
            elif any(first is p for group in getattr(inner, "param_groups", ()) for p in group["params"]):
                raise MigrationError(f"expert re-placement supports Megatron's Adam optimizers, not "
                                     f"{type(inner).__name__}; drop the re-placement flags")
        if optimizer is not None and self.optimizer is None:
            raise MigrationError("the optimizer does not hold this layer's expert parameters; pass the model's "
                                 "Megatron optimizer to the re-placement controller")
        # model param -> (main param, start, end): this rank's shard [start, end) of the flattened
        # model param and the fp32 tensor that holds its main values (and keys its Adam state).
        self.shard = {}
        if self.distributed:
            opt = self.optimizer
            shards = {id(m): s for mg, sg in zip(opt.model_fp32_groups + opt.model_float16_groups,
                                                 opt.shard_fp32_groups + opt.shard_fp32_from_float16_groups)
                      for m, s in zip(mg, sg)}
            for params in slots:
                for p in params:
                    if p in opt.model_param_gbuf_map:
                        r = opt._get_model_param_range_map(p)["param"]
                        self.shard[p] = (shards[id(p)], r.start, r.end)
            self.edp_group = opt.data_parallel_group
        else:
            for params in slots:
                for p in params:
                    main = getattr(p, "main_param", None) if self.optimizer is not None else None
                    self.shard[p] = (main if main is not None and p.dtype != torch.float32 else p, 0, p.numel())
        self.keys = self._state_keys()
        self.rows = 1 + len(self.keys)
        if self.distributed and dist.get_world_size(self.edp_group) > 1:
            # A rank whose shard holds none of this layer sees no state entries; the gather's shapes
            # must still agree over the EDP group.
            rows = torch.tensor([self.rows], dtype=torch.int64, device=first.device)
            dist.all_reduce(rows, op=dist.ReduceOp.MAX, group=self.edp_group)
            if self.keys and int(rows) != self.rows:
                raise MigrationError(f"optimizer state entries {self.keys} differ across the expert-data-parallel "
                                     "group; re-place only after every rank's optimizer has stepped")
            self.rows = int(rows)

    def payload_buffer(self, *shape: int) -> torch.Tensor:
        """A float32 payload buffer (model params may be 16-bit; the payload never is)."""
        return torch.empty(*shape, dtype=torch.float32, device=self.device)

    def _state_keys(self) -> tuple[str, ...]:
        """Per-element optimizer state entries of this rank's shard (``exp_avg``, ``exp_avg_sq``)."""
        if self.optimizer is None:
            return ()
        state = self.optimizer.optimizer.state
        keys: set[str] = set()
        for opt_param, start, end in self.shard.values():
            for key, value in state.get(opt_param, {}).items():
                if torch.is_tensor(value) and value.dim() > 0 and value.numel() == end - start:
                    keys.add(key)
        return tuple(sorted(keys))

    def payload_bytes(self) -> int:
        return self.rows * self.numel * 4

    def _pieces(self, params):
        """[(offset in slot, param, opt param, start, end)] of this rank's shard of ``params``."""
        offset, out = 0, []
        for p in params:
            if p in self.shard:
                opt_param, start, end = self.shard[p]
                if end > start:
                    out.append((offset, p, opt_param, start, end))
            offset += p.numel()
        return out

    def _local_piece(self, params) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        state = self.optimizer.optimizer.state if self.optimizer is not None else {}
        pieces = self._pieces(params)
        if not pieces:
            return self.payload_buffer(self.rows, 0), []
        rows = []
        for key in (None, *self.keys):
            # Row 0: the main weights (the model param itself in fp32; its fp32 main copy for 16-bit).
            parts = [(opt_param.detach() if key is None else state[opt_param][key]).reshape(-1).float()
                     for _, _, opt_param, _, _ in pieces]
            rows.append(torch.cat(parts))
        ranges = [(offset + start, offset + end) for offset, _, _, start, end in pieces]
        return torch.stack(rows), ranges

    @torch.no_grad()
    def read(self, slot: int) -> torch.Tensor:
        """This slot's full payload, float32 ``[Q, n]`` (a collective over the EDP group when sharded)."""
        params = self.slots[slot]
        piece, ranges = self._local_piece(params)
        if not self.distributed or dist.get_world_size(self.edp_group) == 1:
            if not self.distributed:
                return piece
            full = self.payload_buffer(self.rows, self.numel).zero_()
            cursor = 0
            for a, b in ranges:
                full[:, a:b] = piece[:, cursor:cursor + b - a]
                cursor += b - a
            return full
        return self._gather(piece, ranges)

    def _gather(self, piece: torch.Tensor, ranges: list[tuple[int, int]]) -> torch.Tensor:
        group, size = self.edp_group, dist.get_world_size(self.edp_group)
        device = piece.device
        # Everyone's ranges (at most one per parameter): [size, P, 2], -1 padded.
        num_params = len(self.slots[0])
        mine = torch.full((num_params, 2), -1, dtype=torch.int64, device=device)
        if ranges:
            mine[:len(ranges)] = torch.tensor(ranges, dtype=torch.int64, device=device)
        all_ranges = torch.empty(size * num_params, 2, dtype=torch.int64, device=device)
        dist.all_gather_into_tensor(all_ranges, mine, group=group)
        all_ranges = all_ranges.view(size, num_params, 2).cpu().numpy()
        lengths = [int(np.where(r[:, 0] >= 0, r[:, 1] - r[:, 0], 0).sum()) for r in all_ranges]
        width = max(max(lengths), 1)
        padded = piece.new_zeros(self.rows, width)
        padded[:, :piece.shape[1]] = piece
        gathered = piece.new_empty(size * self.rows, width)
        dist.all_gather_into_tensor(gathered, padded, group=group)
        gathered = gathered.view(size, self.rows, width)
        full = piece.new_zeros(self.rows, self.numel)
        for r in range(size):
            cursor = 0
            for a, b in all_ranges[r]:
                if a < 0:
                    continue
                full[:, a:b] = gathered[r, :, cursor:cursor + b - a]
                cursor += b - a
        return full

    @torch.no_grad()
    def write(self, slot: int, payload: torch.Tensor) -> None:
        """Make ``slot`` hold ``payload`` ``[Q, n]``: all its weights (16-bit ones as the cast of the main
        weights, as Megatron's main -> model copy makes them), this rank's shard of its main weights
        and state."""
        params = self.slots[slot]
        offset = 0
        for p in params:
            p.data.view(-1).copy_(payload[0, offset:offset + p.numel()])
            offset += p.numel()
        if self.optimizer is None:
            return
        state = self.optimizer.optimizer.state
        for offset, p, opt_param, start, end in self._pieces(params):
            if opt_param.dtype != p.dtype:  # a separate fp32 main copy (16-bit model params)
                opt_param.data.view(-1).copy_(payload[0, offset + start:offset + end])
            for row, key in enumerate(self.keys, start=1):
                state[opt_param][key].view(-1).copy_(payload[row, offset + start:offset + end])

    def copy_shared_marks(self) -> None:
        """The distributed optimizer's shard params carry their model param's ``shared`` mark."""
        for p, (opt_param, _, _) in self.shard.items():
            if opt_param is not p:
                opt_param.shared = getattr(p, "shared", False)


# ---------------------------------------------------------------- execution


@dataclass
class MigrationResult:
    """One layer's migration: moves done, payloads sent between ranks, bytes those payloads carried in
    the MicroEP group (identical on every rank: from the plan; the distributed optimizer's EDP gathers
    come on top), and this rank's wall time."""

    moves: int
    remote_moves: int
    bytes_moved: int
    ms: float


@torch.no_grad()
def execute_plan(plan: MigrationPlan, state: SlotState, rank: int, group) -> None:
    """Run ``plan``'s rounds on this rank (collective over ``group``, the MicroEP group)."""
    world = dist.get_world_size(group)
    stash: dict[int, torch.Tensor] = {}
    # A stash may be read by several moves: keep it until its last read.
    stash_reads = Counter(m.stash_of for moves in plan.rounds for m in moves
                          if m.src_rank == rank and m.src_slot == STASH)
    n = state.rows * state.numel
    for moves in plan.rounds:
        outgoing, incoming = None, None
        for m in moves:
            if m.src_rank != rank:
                continue
            if m.src_slot == STASH:
                payload = stash[m.stash_of]
                stash_reads[m.stash_of] -= 1
                if not stash_reads[m.stash_of]:
                    del stash[m.stash_of]
            else:
                payload = state.read(m.src_slot)
            if m.dst_slot == STASH:
                stash[m.stash_of] = payload
            elif m.local:
                incoming = (m.dst_slot, payload)
            else:
                outgoing = (m.dst_rank, payload)
        receiver = next((m for m in moves if m.dst_rank == rank and not m.local), None)
        remote = [m for m in moves if not m.local]
        if remote:
            send_splits = [n if outgoing is not None and outgoing[0] == g else 0 for g in range(world)]
            recv_splits = [n if receiver is not None and receiver.src_rank == g else 0 for g in range(world)]
            send = outgoing[1].reshape(-1) if outgoing is not None else state.payload_buffer(0)
            received = state.payload_buffer(sum(recv_splits))
            dist.all_to_all_single(received, send, output_split_sizes=recv_splits, input_split_sizes=send_splits,
                                   group=group)
            if receiver is not None:
                incoming = (receiver.dst_slot, received.view(state.rows, state.numel))
        if incoming is not None:
            state.write(*incoming)
    if stash:
        raise RuntimeError(f"migration plan left payloads stashed for slots {sorted(stash)}")


def migrate_layer(layer, new: Placement, optimizer=None, plan: MigrationPlan | None = None) -> MigrationResult:
    """Move ``layer``'s expert slots (a MicroMoELayer) and optimizer state to ``new``, then switch the
    layer's placement (dispatcher scheduler, tables) and its slots' ``shared`` marks.

    Call between iterations (after ``optimizer.step()``, before the next forward) on every rank of
    the model at once; every rank must pass the same ``new``. ``plan``: ``plan_migration(
    layer.placement, new)`` computed ahead (e.g. in the re-placement's background thread; it is a
    pure function of the two tables); None plans here. Raises MigrationError (see SlotState).
    """
    from .replicas import slot_parameters

    start = time.perf_counter()
    group = layer.token_dispatcher.ep_group
    rank = dist.get_rank(group)
    slots = slot_parameters(layer.experts, layer.num_local_experts)
    state = SlotState(slots, optimizer)
    if plan is None:
        plan = plan_migration(layer.placement, new)
    elif not np.array_equal(plan.changed, layer.placement.phy2log != new.phy2log):
        raise MigrationError(f"layer {layer.layer_number}: the migration plan was made for other tables")
    execute_plan(plan, state, rank, group)
    layer.set_placement(new)
    peers = new.slot_peers(rank)
    for j, params in enumerate(slots):
        for p in params:
            p.shared = not peers.is_canonical(j)
    state.copy_shared_marks()
    if slots[0][0].is_cuda:  # the all-to-alls are asynchronous: time until the moves have landed
        torch.cuda.synchronize(slots[0][0].device)
    return MigrationResult(moves=len(plan.moves), remote_moves=plan.remote_moves,
                           bytes_moved=plan.remote_moves * state.payload_bytes(),
                           ms=1e3 * (time.perf_counter() - start))
