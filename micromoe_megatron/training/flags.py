"""The plugin's command-line flags (Megatron ``extra_args_provider``), generated from MicroEPConfig.

``--micro-ep D`` switches MicroEP on. ``--expert-model-parallel-size`` keeps its meaning (E / EP
experts per GPU); the launcher hands Megatron an expert-parallel group of ``D x EP`` ranks, which
is the MicroEP group, so Megatron's expert-data-parallel group shrinks by ``D``. Without
``--micro-ep`` nothing changes.

Every flag is a field of ``MicroEPConfig`` (its ``metadata`` holds the flag and help), so the two
cannot drift apart; every check runs here, before Megatron builds anything, on every rank.
"""

from __future__ import annotations

import argparse
import os

from ..core.placement import PlacementError, make_placement
from ..mcore.config import MICRO_EP_FIELDS, LayoutError, MicroEPConfig


def _dest(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")


def _flag_fields():
    return [f for f in MICRO_EP_FIELDS.values() if "flag" in f.metadata]


def add_micro_ep_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Megatron ``extra_args_provider``: add one flag per MicroEPConfig field."""
    group = parser.add_argument_group("MicroEP", "exact per-micro-batch expert load balancing (micromoe_megatron)")
    for f in _flag_fields():
        meta = f.metadata
        options = {k: meta[k] for k in ("metavar", "choices") if k in meta}
        if f.type in (bool, "bool"):
            group.add_argument(meta["flag"], action="store_true", help=meta["help"])
            continue
        kind = {"int": int, "float": float}.get(str(f.type).split(" ")[0], str)
        # --micro-ep itself defaults to None: absent means MicroEP off.
        default = None if f.name == "replicas" else f.default
        group.add_argument(meta["flag"], type=kind, default=default, help=meta["help"], **options)
    return parser


def _fail(message: str):
    raise LayoutError(message)


def micro_ep_config_from_args(args) -> MicroEPConfig | None:
    """The MicroEPConfig the flags ask for, or None without ``--micro-ep``. Raises LayoutError."""
    values = {f.name: getattr(args, _dest(f.metadata["flag"]), f.default) for f in _flag_fields()}
    if values["replicas"] is None:
        changed = [f.metadata["flag"] for f in _flag_fields()
                   if f.name != "replicas" and values[f.name] != f.default]
        if changed:
            _fail(f"{changed[0]} needs --micro-ep D (MicroEP is off without it)")
        return None
    if values["gpus_per_node"] is None and os.environ.get("LOCAL_WORLD_SIZE"):
        values["gpus_per_node"] = int(os.environ["LOCAL_WORLD_SIZE"])
    return MicroEPConfig(**values)


def _world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


# Version of the layout record (``args.micro_ep_layout``) that Megatron saves with the checkpoint args.
LAYOUT_VERSION = 1


def layout_record(micro_ep: MicroEPConfig, vanilla_ep: int, num_experts: int, phy2log) -> dict:
    """MicroEP's layout as saved in every checkpoint (inside Megatron's saved ``args``).

    A resume compares it with its own (training/resume_check.py): what changed is then known.
    ``phy2log``: [F, L] logical expert per GPU and slot.
    """
    return {"version": LAYOUT_VERSION, "d": micro_ep.replicas, "ep": vanilla_ep, "num_experts": num_experts,
            "placement": micro_ep.placement, "placement_seed": micro_ep.placement_seed,
            "phy2log": [[int(e) for e in row] for row in phy2log]}


def _refuse_inexact_options(args) -> list[str]:
    """Megatron options that would make a MicroEP run differ from stock: refused. Returns warnings."""
    if getattr(args, "moe_expert_capacity_factor", None) is not None \
            and getattr(args, "moe_pad_expert_input_to_capacity", False):
        _fail("--moe-pad-expert-input-to-capacity is not supported with --micro-ep: it pads every physical "
              "expert slot to capacity, which changes the computation; drop it (--moe-expert-capacity-factor "
              "without padding drops the same tokens as stock)")
    if (args.save or args.load) and args.ckpt_format != "torch_dist":
        _fail(f"--ckpt-format {args.ckpt_format} is not supported with --micro-ep: only torch_dist (the "
              "default) maps expert replicas to logical experts; use --ckpt-format torch_dist")
    if getattr(args, "non_persistent_ckpt_type", None) == "local":
        _fail("--non-persistent-ckpt-type local is not supported with --micro-ep: local checkpoints store "
              "physical expert slots; use --non-persistent-ckpt-type global")
    if getattr(args, "micro_ep_replacement_interval", 0):
        for flag, name in (("--use-precision-aware-optimizer", "use_precision_aware_optimizer"),
                           ("--optimizer-cpu-offload", "optimizer_cpu_offload")):
            if getattr(args, name, False):
                _fail(f"{flag} is not supported with --micro-ep-replacement-interval yet: live migration moves "
                      "the fp32 main parameters and Adam state that Megatron's optimizer keeps itself; drop one "
                      "of them")
    warnings = []
    if getattr(args, "moe_router_num_groups", None) and getattr(args, "moe_router_group_topk", None):
        warnings.append(
            f"--moe-router-num-groups {args.moe_router_num_groups} with --micro-ep: the router still picks each "
            f"token's experts from at most {args.moe_router_group_topk} groups (the model is unchanged), but "
            "MicroEP may run a token on a replica of its expert on a GPU or node outside those groups, so the "
            "bound on all-to-all destinations per token no longer holds")
    return warnings


def apply_micro_ep_layout(args, micro_ep: MicroEPConfig, world_size: int | None = None) -> list[str]:
    """Check the combination of flags and widen Megatron's expert-parallel group to ``d x EP``.

    Runs after parsing and before Megatron's ``validate_args``; every error names the flag to change.
    The placement is built once here, so a bad ``--micro-ep-placement-file`` fails at start-up.
    With the distributed optimizer, checkpoints are saved in Megatron's fully reshardable format
    (``--dist-ckpt-optim-fully-reshardable``): the default ``dp_reshardable`` one stores the
    optimizer state in gradient-bucket order, which depends on the expert layout, so it could not be
    loaded into stock EP or another placement. Sets ``args.micro_ep_layout`` (layout_record).

    Returns: lines for the user (what was changed or what to know), to print once.
    """
    d = micro_ep.replicas
    ep = args.expert_model_parallel_size
    if not args.num_experts:
        _fail("--micro-ep needs an MoE model: set --num-experts")
    if args.moe_token_dispatcher_type != "alltoall":
        _fail(f"--micro-ep needs --moe-token-dispatcher-type alltoall (got {args.moe_token_dispatcher_type})")
    etp = args.expert_tensor_parallel_size
    if etp not in (None, 1):
        _fail(f"--micro-ep needs --expert-tensor-parallel-size 1 (got {etp}); tensor parallelism for "
              "attention (--tensor-model-parallel-size) is fine")
    if args.num_experts % ep:
        _fail(f"--num-experts {args.num_experts} must be divisible by --expert-model-parallel-size {ep}")
    for flag, name in (("--log-params-norm", "log_params_norm"), ("--use-torch-fsdp2", "use_torch_fsdp2"),
                       ("--use-megatron-fsdp", "use_megatron_fsdp"),
                       ("--overlap-moe-expert-parallel-comm", "overlap_moe_expert_parallel_comm"),
                       ("--moe-single-grouped-weight", "moe_single_grouped_weight")):
        if getattr(args, name, False):
            _fail(f"{flag} is not supported with --micro-ep yet; drop one of them")
    world_size = world_size or _world_size()
    per_stage = world_size // (args.pipeline_model_parallel_size or 1)
    if per_stage % (d * ep):
        _fail(f"--micro-ep {d} x --expert-model-parallel-size {ep} = {d * ep} must divide the {per_stage} "
              f"ranks of a pipeline stage (world {world_size} / pipeline {args.pipeline_model_parallel_size}); "
              "lower --micro-ep or add data-parallel ranks")
    micro_ep.validate_layout(args.num_experts, d * ep)
    try:
        placement = make_placement(micro_ep.initial_placement, d * ep, args.num_experts, d, seed=micro_ep.placement_seed,
                                   path=micro_ep.placement_file)
    except (PlacementError, ValueError, TypeError) as error:
        source = f" (--micro-ep-placement-file {micro_ep.placement_file})" if micro_ep.placement_file else ""
        _fail(f"--micro-ep-placement {micro_ep.placement}{source}: {error}".replace("\n", " "))
    notes = _refuse_inexact_options(args)
    if args.use_distributed_optimizer and not args.dist_ckpt_optim_fully_reshardable:
        args.dist_ckpt_optim_fully_reshardable = True
        if args.save:
            notes.append("MicroEP saves the distributed optimizer in Megatron's fully reshardable format "
                         "(--dist-ckpt-optim-fully-reshardable), so the checkpoint loads into stock EP and any "
                         "MicroEP layout")
    args.micro_ep_vanilla_ep = ep
    args.micro_ep_layout = layout_record(micro_ep, ep, args.num_experts, placement.phy2log)
    args.expert_model_parallel_size = d * ep
    return notes
