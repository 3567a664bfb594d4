"""MicroMoELayer (a megatron-core MoELayer) and the layer-spec transform that installs it.

The router keeps ``E`` logical experts; the experts and the dispatcher run in physical-slot space
(``d * E`` slots over Megatron's EP group, which is the MicroEP group of ``F = d * EP`` ranks), so
each rank holds ``L = E / EP`` slots: exactly the memory of vanilla EP.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import math

from megatron.core import utils
from megatron.core.transformer.moe.moe_layer import MoELayer, MoESubmodules, get_default_pg_collection
from megatron.core.transformer.spec_utils import ModuleSpec

from .checkpoint import LogicalExpertMap, logical_expert_state_dict
from .config import LayoutError, MicroEPConfig
from .dispatcher import MicroEPDispatcher
from .expert_timer import ExpertTimer
from ..core.placement import make_placement


@dataclasses.dataclass
class ReplacementStats:
    """Re-placements of one layer since the last metrics report (set by the controller).

    ``predicted_max_mean``: the policy's predicted GPU max/mean for the placement in use (NaN when the
    policy gives no forecast).
    """

    count: int = 0
    ms: float = 0.0
    bytes_moved: int = 0
    predicted_max_mean: float = math.nan

    def reset(self) -> None:
        self.count, self.ms, self.bytes_moved = 0, 0.0, 0


class MicroMoELayer(MoELayer):
    """MoELayer whose tokens are balanced across expert replicas every micro-batch.

    Args: those of ``MoELayer``, plus ``micro_ep`` (the plugin settings). ``config`` is the model's
    (logical) TransformerConfig; it is not modified.
    """

    def __init__(self, config, submodules: MoESubmodules | None = None, layer_number=None,
                 pg_collection=None, is_mtp_layer: bool = False, name: str | None = None,
                 micro_ep: MicroEPConfig | None = None):
        micro_ep = micro_ep or MicroEPConfig()
        if pg_collection is None:
            pg_collection = get_default_pg_collection()
        if config.moe_token_dispatcher_type != "alltoall":
            raise LayoutError(f"--micro-ep needs --moe-token-dispatcher-type alltoall, got "
                              f"{config.moe_token_dispatcher_type!r}")
        micro_ep_size = utils.get_pg_size(pg_collection.ep)
        vanilla_ep = micro_ep.validate_layout(config.num_moe_experts, micro_ep_size,
                                              expert_tp=utils.get_pg_size(pg_collection.expt_tp))
        # Experts and dispatcher see d * E physical experts; the router keeps the logical config.
        physical = copy.copy(config)
        physical.num_moe_experts = config.num_moe_experts * micro_ep.replicas
        submodules = submodules or MoESubmodules(experts=None)
        logical_router = functools.partial(_build_router, submodules.router, config)
        super().__init__(physical, dataclasses.replace(submodules, router=logical_router), layer_number,
                         pg_collection, is_mtp_layer, name)
        self.logical_config = config
        self.micro_ep = micro_ep
        self.placement = make_placement(micro_ep.initial_placement, micro_ep_size, config.num_moe_experts,
                                        micro_ep.replicas, seed=micro_ep.placement_seed,
                                        path=micro_ep.placement_file)
        self.token_dispatcher = MicroEPDispatcher(
            self.num_local_experts, self.local_expert_indices, config=physical,
            pg_collection=pg_collection, placement=self.placement, micro_ep=micro_ep,
            vanilla_ep=vanilla_ep, layer_number=_layer_label(layer_number, is_mtp_layer))
        if self.shared_expert_overlap and self.shared_experts is not None:
            self.token_dispatcher.set_shared_experts(self.shared_experts)
        self.replacement_stats = ReplacementStats()
        # Expert forward time per token, read by the re-placement controller's time gate (a controller
        # attaches one itself where the config does not ask for re-placement; the hooks cost ~12-15 us a call
        # on a loaded 2-core CPU).
        self.expert_timer = ExpertTimer(self.experts) if micro_ep.replacement_interval else None
        # Every MicroEP group of a pipeline stage must use the same placement (they are expert-data-
        # parallel replicas of each other), so re-placement decides on counts summed over this group.
        self.expert_dp_group = getattr(pg_collection, "expt_dp", None)
        if self.expert_dp_group is None:
            from megatron.core import parallel_state
            self.expert_dp_group = parallel_state.get_expert_data_parallel_group(check_initialized=False)

    def set_placement(self, placement) -> None:
        """Use a new placement from now on (the dispatcher's scheduler and tables follow; the checkpoint
        mapping reads ``self.placement`` at save time). Only the bookkeeping: ``migration.migrate_layer``
        moves the weights and optimizer state first and then calls this."""
        self.token_dispatcher.set_placement(placement)
        self.placement = placement

    def set_layer_number(self, layer_number: int) -> None:
        """Megatron numbers MoE layers after building them; the dispatcher's errors and logs use it."""
        super().set_layer_number(layer_number)
        self.token_dispatcher.layer_number = _layer_label(layer_number, self.is_mtp_layer)

    @property
    def micro_ep_stats(self):
        return self.token_dispatcher.stats

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        """Megatron's sharded state dict with expert slots saved as logical experts (checkpoint.py)."""
        state = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        mapping = LogicalExpertMap(
            expert_axis=len(sharded_offsets), num_slots=self.num_local_experts,
            peers=self.placement.slot_peers(self.token_dispatcher.ep_rank),
            num_logical=self.logical_config.num_moe_experts, replicas=self.micro_ep.replicas)
        singleton = bool((metadata or {}).get("singleton_local_shards", False))
        return logical_expert_state_dict(state, f"{prefix}experts.", mapping, singleton)


def _layer_label(layer_number, is_mtp_layer: bool):
    """How errors and logs name a layer: Megatron numbers MTP layers 1, 2, ... like decoder layers."""
    return f"MTP {layer_number}" if is_mtp_layer and layer_number is not None else layer_number


def _build_router(router_builder, logical_config, *, config, pg_collection, **kwargs):
    """Build the router with the logical config (E outputs), whatever config MoELayer passes."""
    del config
    return router_builder(config=logical_config, pg_collection=pg_collection, **kwargs)


def _swap_mlp(mlp, micro_ep: MicroEPConfig):
    """Return ``mlp`` with MoELayer replaced by MicroMoELayer (partial or ModuleSpec form)."""
    if isinstance(mlp, functools.partial) and mlp.func is MoELayer:
        return functools.partial(MicroMoELayer, *mlp.args, **mlp.keywords, micro_ep=micro_ep)
    if isinstance(mlp, ModuleSpec) and mlp.module is MoELayer:
        return ModuleSpec(module=MicroMoELayer, submodules=mlp.submodules,
                          params={**(mlp.params or {}), "micro_ep": micro_ep})
    return mlp


def use_micro_ep(spec, micro_ep: MicroEPConfig):
    """Return a copy of a GPT layer or decoder-block spec with every MoE layer made a MicroMoELayer.

    Works for the local and TransformerEngine specs: ``get_gpt_layer_local_spec``,
    ``get_gpt_layer_with_transformer_engine_spec``, ``get_gpt_decoder_block_spec`` and their
    ``TransformerBlockSubmodules``, and for multi-token-prediction block specs
    (``get_gpt_mtp_block_spec``: ``MultiTokenPredictionBlockSubmodules``). Dense layers are left alone;
    ``None`` (no MTP block on this stage) stays ``None``.
    """
    if spec is None:
        return None
    spec = copy.copy(spec)
    layer_specs = getattr(spec, "layer_specs", None)
    if layer_specs is None and isinstance(spec, ModuleSpec) and hasattr(spec.submodules, "layer_specs"):
        spec.submodules = use_micro_ep(spec.submodules, micro_ep)
        return spec
    if layer_specs is not None:
        spec.layer_specs = [use_micro_ep(layer, micro_ep) for layer in layer_specs]
        return spec
    if isinstance(spec, ModuleSpec) and hasattr(spec.submodules, "mlp"):
        spec.submodules = copy.copy(spec.submodules)
        spec.submodules.mlp = _swap_mlp(spec.submodules.mlp, micro_ep)
    elif isinstance(spec, ModuleSpec) and hasattr(spec.submodules, "mtp_model_layer"):
        # A multi-token-prediction layer: its inner transformer layer holds the MoE layer.
        spec.submodules = copy.copy(spec.submodules)
        spec.submodules.mtp_model_layer = use_micro_ep(spec.submodules.mtp_model_layer, micro_ep)
    return spec
