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


def apply_micro_ep_layout(args, micro_ep: MicroEPConfig, world_size: int | None = None) -> None:
    """Check the combination of flags and widen Megatron's expert-parallel group to ``d x EP``.

    Runs after parsing and before Megatron's ``validate_args``; every error names the flag to change.
    The placement is built once here, so a bad ``--micro-ep-placement-file`` fails at start-up.
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
    if micro_ep.placement == "adaptive":
        _fail("--micro-ep-placement adaptive is not available in pretrain_gpt.py yet (no load-aware policy is "
              "wired in); use symmetric, or ReplacementController.step in your own training loop")
    micro_ep.validate_layout(args.num_experts, d * ep)
    try:
        make_placement(micro_ep.initial_placement, d * ep, args.num_experts, d, seed=micro_ep.placement_seed,
                       path=micro_ep.placement_file)
    except PlacementError as error:
        _fail(f"--micro-ep-placement {micro_ep.placement}: {error}")
    args.micro_ep_vanilla_ep = ep
    args.expert_model_parallel_size = d * ep
