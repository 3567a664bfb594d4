"""Distributed-checkpoint mapping: physical expert slots <-> logical experts.

Megatron's experts modules describe slot ``i`` of EP rank ``r`` as global expert ``r * L + i`` of
``EP * L`` (the expert axis prepended to every expert tensor). Under MicroEP that would be a
physical slot of ``d * E``; here each entry is rewritten to logical expert ``phy2log[r, i]`` of
``E``, and every holder but the canonical one is marked as a replica. The saved checkpoint is
therefore the vanilla-EP one: it loads into vanilla EP, into any MicroEP degree and placement, and
every holder of an expert loads the same tensor. Optimizer states built from the model's sharded
tensors follow the same mapping.
"""

from __future__ import annotations

import dataclasses

from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor, ShardedTensorFactory

from ..core.placement import SlotPeers


@dataclasses.dataclass(frozen=True)
class LogicalExpertMap:
    """How to rewrite one MicroEP layer's expert entries.

    Attributes:
        expert_axis: index of the prepended expert axis (the layer's own prepended axes come first).
        num_slots: L, slots per rank; entries at physical index ``rank * L + i`` get remapped.
        peers: this rank's slots (logical expert per slot, holders).
        num_logical: E.
        replicas: d.
    """

    expert_axis: int
    num_slots: int
    peers: SlotPeers
    num_logical: int
    replicas: int

    @property
    def num_physical(self) -> int:
        return self.num_logical * self.replicas

    def slot_of(self, physical: int) -> int:
        slot = physical - self.peers.rank * self.num_slots
        if not 0 <= slot < self.num_slots:
            raise ValueError(f"expert entry at physical index {physical} is not a slot of MicroEP rank "
                             f"{self.peers.rank}")
        return slot

    def replica_id(self, replica_id, slot: int):
        """Keep the main replica only on the canonical holder (and expert-DP rank 0)."""
        index = self.peers.replica_index(slot)
        if isinstance(replica_id, tuple):
            return (*replica_id[:-1], replica_id[-1] * self.replicas + index)
        return replica_id * self.replicas + index

    def remap(self, entry):
        """Rewrite one sharded entry (tensor, object or factory) from physical to logical."""
        if isinstance(entry, ShardedTensorFactory):
            build = entry.build_fn

            def logical_build(key, data, replica_id, flattened_range):
                return _map_nested(build(key, data, replica_id, flattened_range), self.remap)

            entry.build_fn = logical_build
            return entry
        if isinstance(entry, (ShardedTensor, ShardedObject)):
            axis = self.expert_axis
            if len(entry.global_shape) <= axis or entry.global_shape[axis] != self.num_physical:
                raise ValueError(f"{entry.key}: expected the expert axis {axis} of size {self.num_physical}, "
                                 f"got global shape {entry.global_shape}")
            slot = self.slot_of(entry.global_offset[axis])
            logical = self.peers.logical[slot]
            changes = dict(
                global_shape=_replace(entry.global_shape, axis, self.num_logical),
                global_offset=_replace(entry.global_offset, axis, logical),
                replica_id=self.replica_id(entry.replica_id, slot))
            if isinstance(entry, ShardedTensor):
                changes["axis_fragmentations"] = _replace(entry.axis_fragmentations, axis, self.num_logical)
            return dataclasses.replace(entry, **changes)
        return entry


def _replace(values: tuple, index: int, value: int) -> tuple:
    return (*values[:index], value, *values[index + 1:])


def _map_nested(tree, fn):
    if isinstance(tree, dict):
        return {k: _map_nested(v, fn) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_map_nested(v, fn) for v in tree]
    return fn(tree)


def logical_expert_state_dict(sharded_state_dict: dict, experts_prefix: str, mapping: LogicalExpertMap,
                              singleton_local_shards: bool = False) -> dict:
    """Rewrite every entry under ``experts_prefix`` of a layer's sharded state dict in place."""
    if singleton_local_shards:
        raise NotImplementedError("--micro-ep does not support checkpoint formats with singleton local "
                                  "expert shards yet; use --ckpt-format torch_dist")
    for key in list(sharded_state_dict):
        if key.startswith(experts_prefix):
            sharded_state_dict[key] = _map_nested(sharded_state_dict[key], mapping.remap)
    return sharded_state_dict
