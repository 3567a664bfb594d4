"""The plugin's command-line flags (Megatron ``extra_args_provider``) and their translation.

``--micro-ep D`` switches MicroEP on. ``--expert-model-parallel-size`` keeps its meaning (E / EP
experts per GPU); the launcher hands Megatron an expert-parallel group of ``D x EP`` ranks, which
is the MicroEP group, so Megatron's expert-data-parallel group shrinks by ``D``. Without
``--micro-ep`` nothing changes.
"""

from __future__ import annotations

import argparse
import os

from .config import LayoutError, MicroEPConfig
from .placement import PLACEMENT_KINDS


def add_micro_ep_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Megatron ``extra_args_provider``: add the MicroEP flags."""
    defaults = MicroEPConfig()
    group = parser.add_argument_group("MicroEP", "exact per-micro-batch expert load balancing (micromoe_megatron)")
    group.add_argument("--micro-ep", type=int, default=None, metavar="D",
                       help="merge D expert-parallel groups into one MicroEP group and balance every "
                            "micro-batch across the D replicas of each expert (off when absent)")
    group.add_argument("--micro-ep-placement", choices=PLACEMENT_KINDS, default=defaults.placement,
                       help="which experts share GPUs: symmetric (well-connected graph, default), random, "
                            "or custom (--micro-ep-placement-file)")
    group.add_argument("--micro-ep-placement-seed", type=int, default=defaults.placement_seed,
                       help="seed of the random placement")
    group.add_argument("--micro-ep-placement-file", default=None,
                       help="phy2log JSON for --micro-ep-placement custom")
    group.add_argument("--micro-ep-gpus-per-node", type=int, default=None,
                       help="GPUs per node, for same-node-first routing (default: torchrun's "
                            "LOCAL_WORLD_SIZE)")
    group.add_argument("--micro-ep-solver-time-limit-ms", type=float, default=defaults.solver_time_limit_ms,
                       help="HiGHS time limit per solve; past it a fallback plan is used and counted")
    group.add_argument("--micro-ep-check-plans", action="store_true",
                       help="debug: check every plan is identical on all ranks of the MicroEP group")
    group.add_argument("--micro-ep-check-replicas-interval", type=int, default=100, metavar="N",
                       help="verify every N steps that expert replicas are bit-identical (0 = never)")
    group.add_argument("--micro-ep-metrics-file", default=None, metavar="PATH",
                       help="also append each log interval's MicroEP metrics (per layer, per-GPU loads) "
                            "to this JSON-lines file")
    return parser


def _fail(message: str):
    raise LayoutError(message)


def micro_ep_config_from_args(args) -> MicroEPConfig | None:
    """The MicroEPConfig the flags ask for, or None without ``--micro-ep``. Raises LayoutError."""
    if args.micro_ep is None:
        if args.micro_ep_placement != MicroEPConfig.placement or args.micro_ep_placement_file:
            _fail("--micro-ep-placement/--micro-ep-placement-file need --micro-ep D")
        return None
    if args.micro_ep_check_replicas_interval < 0:
        _fail(f"--micro-ep-check-replicas-interval must be >= 0, got {args.micro_ep_check_replicas_interval}")
    gpus_per_node = args.micro_ep_gpus_per_node
    if gpus_per_node is None and os.environ.get("LOCAL_WORLD_SIZE"):
        gpus_per_node = int(os.environ["LOCAL_WORLD_SIZE"])
    if gpus_per_node is not None and gpus_per_node < 1:
        _fail(f"--micro-ep-gpus-per-node must be >= 1, got {gpus_per_node}")
    return MicroEPConfig(replicas=args.micro_ep, placement=args.micro_ep_placement,
                         placement_seed=args.micro_ep_placement_seed, placement_file=args.micro_ep_placement_file,
                         gpus_per_node=gpus_per_node, solver_time_limit_ms=args.micro_ep_solver_time_limit_ms,
                         check_plans=args.micro_ep_check_plans)


def _world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def apply_micro_ep_layout(args, micro_ep: MicroEPConfig, world_size: int | None = None) -> None:
    """Check the combination of flags and widen Megatron's expert-parallel group to ``d x EP``.

    Runs after parsing and before Megatron's ``validate_args``; every error names the flag to change.
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
    args.micro_ep_vanilla_ep = ep
    args.expert_model_parallel_size = d * ep
