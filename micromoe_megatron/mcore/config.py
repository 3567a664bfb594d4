"""MicroEPConfig: every plugin setting, with its flag, doc, default and check in one place.

Each field carries its command-line flag in ``metadata`` (``flag``, ``help``, optionally
``metavar`` and ``choices``); ``training/flags.py`` generates the ``--micro-ep*`` flags from these
fields, so flags and settings cannot drift apart. ``__post_init__`` checks every field and names
the flag in its error.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from ..core.placement import PLACEMENT_KINDS
from ..core.schedule import DEFAULT_WORK_LIMIT

# Placement kinds accepted by --micro-ep-placement: the core's static ones, plus adaptive (start
# symmetric, then re-place every --micro-ep-replacement-interval iterations; mcore/replacement.py).
PLACEMENT_CHOICES = (*PLACEMENT_KINDS, "adaptive")


class LayoutError(ValueError):
    """A MicroEP setting does not fit the parallel layout; the message names the flag and the fix."""


def _setting(default, flag: str, help: str, **argparse_options):
    """A config field with its command-line flag (``flag``) and argparse options in ``metadata``."""
    return field(default=default, metadata=dict(flag=flag, help=help, **argparse_options))


@dataclass(frozen=True)
class MicroEPConfig:
    """MicroEP settings (one field per ``--micro-ep*`` flag; see each field's ``help``)."""

    replicas: int = _setting(1, "--micro-ep", metavar="D", help=(
        "merge D expert-parallel groups into one MicroEP group and balance every micro-batch across the D "
        "replicas of each expert (off when absent; 1 behaves exactly like vanilla EP)"))
    placement: str = _setting("symmetric", "--micro-ep-placement", choices=PLACEMENT_CHOICES, help=(
        "which experts share GPUs: symmetric (well-connected graph, default), random, custom "
        "(--micro-ep-placement-file), or adaptive (start symmetric, re-place from the recorded loads every "
        "--micro-ep-replacement-interval iterations)"))
    placement_seed: int = _setting(0, "--micro-ep-placement-seed", help="seed of the random placement")
    placement_file: str | None = _setting(None, "--micro-ep-placement-file", metavar="PATH",
                                          help="phy2log JSON for --micro-ep-placement custom")
    gpus_per_node: int | None = _setting(None, "--micro-ep-gpus-per-node", metavar="N", help=(
        "GPUs per node, for same-node-first routing (default: torchrun's LOCAL_WORLD_SIZE)"))
    solver_work_limit: int = _setting(DEFAULT_WORK_LIMIT, "--micro-ep-solver-work-limit", metavar="N", help=(
        "planner steps (augmenting paths) per plan; past it the fallback plan is used and counted. "
        "A count, not a time: every rank decides the same"))
    check_plans: bool = _setting(False, "--micro-ep-check-plans", help=(
        "debug: check every plan is identical on all ranks of the MicroEP group"))
    check_replicas_interval: int = _setting(100, "--micro-ep-check-replicas-interval", metavar="N", help=(
        "verify every N steps that expert replicas are bit-identical (0 = never)"))
    metrics_file: str | None = _setting(None, "--micro-ep-metrics-file", metavar="PATH", help=(
        "also append each log interval's MicroEP metrics (per layer, per-GPU loads) to this JSON-lines file"))
    replacement_interval: int = _setting(0, "--micro-ep-replacement-interval", metavar="N", help=(
        "with --micro-ep-placement adaptive: consider re-placing the experts every N iterations, between "
        "the optimizer step and the next forward (0 = never, the default)"))
    replacement_threshold: float = _setting(1.05, "--micro-ep-replacement-threshold", metavar="X", help=(
        "re-place only when the current placement's predicted GPU max/mean exceeds X and the predicted gain "
        "in expert time until the next check exceeds the (measured) migration time (0 = always re-place at "
        "the interval)"))
    replacement_background: bool = _setting(False, "--micro-ep-replacement-background", help=(
        "with --micro-ep-placement adaptive: search the new placement in a background thread during the "
        "next iteration and re-place after it (same decision, one iteration later)"))
    history_window: int = field(default=16, metadata=dict(help=(
        "micro-batches of all-gathered counts kept per layer for the re-placement policy (no flag)")))
    plan_cache_size: int = field(default=64, metadata=dict(help=(
        "plans kept per layer so a recomputed forward reuses the exact plan (no flag)")))

    def __post_init__(self) -> None:
        def at_least(name: str, minimum):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < minimum:
                raise LayoutError(f"{flag_of(name)} must be >= {minimum}, got {value!r}")

        at_least("replicas", 1)
        at_least("placement_seed", 0)
        at_least("check_replicas_interval", 0)
        at_least("plan_cache_size", 1)
        at_least("replacement_interval", 0)
        at_least("replacement_threshold", 0)
        at_least("history_window", 1)
        if self.gpus_per_node is not None:
            at_least("gpus_per_node", 1)
        if self.placement not in PLACEMENT_CHOICES:
            raise LayoutError(f"--micro-ep-placement {self.placement!r} is unknown; choose one of "
                              f"{', '.join(PLACEMENT_CHOICES)}")
        if self.placement == "adaptive" and not self.replacement_interval:
            raise LayoutError("--micro-ep-placement adaptive needs --micro-ep-replacement-interval N > 0 "
                              "(how often to re-place)")
        if self.replacement_background and not self.replacement_interval:
            raise LayoutError("--micro-ep-replacement-background needs --micro-ep-placement adaptive and "
                              "--micro-ep-replacement-interval N > 0")
        if self.replacement_interval and self.placement != "adaptive":
            raise LayoutError(f"--micro-ep-replacement-interval {self.replacement_interval} needs "
                              "--micro-ep-placement adaptive")
        if self.placement == "custom" and not (self.placement_file and Path(self.placement_file).is_file()):
            raise LayoutError("--micro-ep-placement custom needs --micro-ep-placement-file pointing to a "
                              f"phy2log JSON file (got {self.placement_file!r})")
        if self.placement != "custom" and self.placement_file:
            raise LayoutError("--micro-ep-placement-file is only read with --micro-ep-placement custom")
        if not 0 < self.solver_work_limit < 2**62:
            raise LayoutError(f"--micro-ep-solver-work-limit must be in [1, 2**62), got {self.solver_work_limit}")

    @property
    def initial_placement(self) -> str:
        """The placement kind the layers are built with (adaptive starts symmetric)."""
        return "symmetric" if self.placement == "adaptive" else self.placement

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
        if self.gpus_per_node is not None and self.gpus_per_node < micro_ep_size \
                and micro_ep_size % self.gpus_per_node:
            raise LayoutError(f"--micro-ep-gpus-per-node {self.gpus_per_node} must divide the MicroEP group "
                              f"size {micro_ep_size} (or be >= it): nodes are contiguous blocks of ranks")
        return ep


def flag_of(name: str) -> str:
    """The command-line flag of a MicroEPConfig field (the field name for settings without one)."""
    return MICRO_EP_FIELDS[name].metadata.get("flag", name)


MICRO_EP_FIELDS = {f.name: f for f in dataclasses.fields(MicroEPConfig)}
