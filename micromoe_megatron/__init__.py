"""MicroEP for Megatron-LM: exact per-micro-batch MoE expert load balancing (arXiv 2511.16947).

Layers (imports flow one way, top to bottom; ``tests/test_package_layers.py`` enforces it):

    cli.py     ``micromoe``: schedule, placement, bench, analyze, simulate, report, prepare-data
    training/  the launcher (Megatron's pretrain() + --micro-ep flags), flags, metrics, run reports
    sim/       trace-driven analysis, simulator, benchmarks and plots (no torch.distributed)
    mcore/     inside megatron-core: MicroMoELayer, MicroEPDispatcher, replica sync, checkpoint
               mapping, MicroEPConfig, CPU compat shims, megatron-core fixes
    core/      pure numpy + highspy: placement, schedule (LP -> quota), routing, loads

Glossary (used the same way in every module):

    F         GPUs in one MicroEP group (``F = d * EP``); Megatron's EP group under MicroEP.
    E         logical experts of a MoE layer (``--num-experts``).
    EP        the user's ``--expert-model-parallel-size``: experts are split over EP GPUs.
    L         expert slots per GPU, ``L = E / EP`` (memory per GPU is that of vanilla EP).
    d         replicas per expert in a symmetric placement (``--micro-ep d``); ``F * L = d * E``.
    T         the integer max GPU load a plan aims at, ``ceil(t*)`` of the LP optimum t*.
    slot      ``(g, l)``: slot ``l`` of GPU ``g``, physical slot id ``p = g * L + l``.
    phy2log   ``[F, L]`` logical expert in each slot (EPLB's name); ``log2phy`` ``[E, D]`` the
              physical slot ids of each expert (-1 padding); ``logcnt`` ``[E]`` replicas per expert.
    replicas  the copies of one logical expert (``logcnt[e]`` of them); never the total slots.
    holders   ``holders[e]``: the GPUs holding a replica of ``e``, ascending (``holder_table`` is
              the same, padded to ``[E, D]`` with -1).
    quota     ``[E, F]`` tokens of expert ``e`` that GPU ``g`` processes in one micro-batch.
    routes    ``[R, 4]`` rows ``(src, expert, dst, count)``: who sends which tokens where.
    counts    ``[F, E]`` tokens on source GPU ``s`` routed to logical expert ``e`` (Megatron's
              ``tokens_per_expert`` of every rank, all-gathered).

The public API below is imported lazily, so ``import micromoe_megatron`` (and the ``micromoe``
command) loads neither torch nor megatron until a name that needs them is used.
"""

from __future__ import annotations

import importlib

_PUBLIC = {
    # planning core (numpy + highspy)
    "Placement": "core.placement", "make_placement": "core.placement", "PlacementError": "core.placement",
    "ReplicaScheduler": "core.schedule", "SchedulePlan": "core.schedule", "route_tokens": "core.routing",
    # megatron-core integration
    "MicroEPConfig": "mcore.config", "LayoutError": "mcore.config",
    "MicroMoELayer": "mcore.layer", "use_micro_ep": "mcore.layer",
    "ReplicaSync": "mcore.replicas", "check_replicas": "mcore.replicas",
    "apply_cpu_compat": "mcore.cpu_compat",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module = importlib.import_module(f".{_PUBLIC[name]}", __name__)
    value = getattr(module, "apply" if name == "apply_cpu_compat" else name)
    globals()[name] = value
    return value
