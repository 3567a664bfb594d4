"""MicroEPConfig: the plugin's settings, validated against the parallel layout up front."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .placement import PLACEMENT_KINDS


class LayoutError(ValueError):
    """A MicroEP setting does not fit the parallel layout; the message names the flag and the fix."""


@dataclass(frozen=True)
class MicroEPConfig:
    """MicroEP settings.

    Attributes:
        replicas: ``d``, the number of expert-parallel groups merged into one MicroEP group
            (``--micro-ep``). 1 behaves exactly like vanilla EP.
        placement: ``symmetric``, ``random`` or ``custom`` (``--micro-ep-placement``).
        placement_seed: seed of the random placement.
        placement_file: phy2log JSON for the custom placement.
        gpus_per_node: for same-node-first routing; None = every GPU of the group on one node.
        solver_time_limit_ms: HiGHS time limit per solve; past it, a fallback plan is used.
        check_plans: debug: all-gather a hash of every plan and fail loudly if ranks disagree.
        plan_cache_size: plans kept per layer so a recomputed forward reuses the exact plan.
    """

    replicas: int = 1
    placement: str = "symmetric"
    placement_seed: int = 0
    placement_file: str | None = None
    gpus_per_node: int | None = None
    solver_time_limit_ms: float = 50.0
    check_plans: bool = False
    plan_cache_size: int = 64

    def __post_init__(self) -> None:
        if self.replicas < 1:
            raise LayoutError(f"--micro-ep must be >= 1, got {self.replicas}")
        if self.placement not in PLACEMENT_KINDS:
            raise LayoutError(f"--micro-ep-placement {self.placement!r} is unknown; choose one of "
                              f"{', '.join(PLACEMENT_KINDS)}")
        if self.placement == "custom" and not (self.placement_file and Path(self.placement_file).is_file()):
            raise LayoutError("--micro-ep-placement custom needs --micro-ep-placement-file pointing to a "
                              f"phy2log JSON file (got {self.placement_file!r})")
        if self.solver_time_limit_ms <= 0:
            raise LayoutError(f"--micro-ep-solver-time-limit-ms must be > 0, got {self.solver_time_limit_ms}")
        if self.plan_cache_size < 1:
            raise LayoutError(f"plan_cache_size must be >= 1, got {self.plan_cache_size}")

    def validate_layout(self, num_experts: int, micro_ep_size: int, world_expert_dp: int | None = None,
                        expert_tp: int = 1) -> int:
        """Check the layout and return the vanilla EP size ``F / d``.

        Args:
            num_experts: E, logical experts (``--num-experts``).
            micro_ep_size: F, Megatron's expert-parallel group size, which MicroEP uses as its group.
            world_expert_dp: the expert-data-parallel size without MicroEP (``d * EDP``), if known.
            expert_tp: expert tensor-parallel size.
        """
        d = self.replicas
        if expert_tp != 1:
            raise LayoutError(f"--expert-tensor-parallel-size {expert_tp} is not supported with --micro-ep; "
                              "use 1")
        if micro_ep_size % d:
            raise LayoutError(f"--micro-ep {d} must divide the MicroEP group size {micro_ep_size} "
                              "(= micro-ep x expert-model-parallel-size)")
        ep = micro_ep_size // d
        if num_experts % ep:
            raise LayoutError(f"--num-experts {num_experts} must be divisible by the expert-parallel size {ep}")
        if world_expert_dp is not None and world_expert_dp % d:
            raise LayoutError(f"--micro-ep {d} must divide the expert data-parallel size {world_expert_dp}; "
                              "choose a divisor or raise data parallelism")
        return ep
