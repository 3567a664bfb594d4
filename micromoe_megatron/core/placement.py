"""Expert placement inside one MicroEP group: which logical expert sits in which slot of which GPU.

A placement is a slot table ``phy2log`` of shape ``[F, L]``: ``F`` GPUs of the MicroEP group, ``L``
expert slots per GPU (``L = E / EP``, the same memory as vanilla EP). Every holder of a logical
expert uses the *same slot index* (paper App. B.3): per slot, the GPUs are partitioned into holder
groups. This keeps replica parameters at the same offsets in every holder's gradient buffer and makes
Megatron DDP enter its collectives in the same order everywhere.

Names follow DeepSeek EPLB / vLLM: ``phy2log`` (physical slot -> logical expert), ``logcnt``
(replicas per logical expert). ``holders[e]`` lists the GPUs that hold expert ``e``, ascending.

Everything here is pure numpy and deterministic: every rank builds the identical placement.
"""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

PLACEMENT_KINDS = ("symmetric", "random", "custom")


class PlacementError(ValueError):
    """A placement request or file is invalid; the message names the offending value."""


@dataclass(frozen=True)
class SlotPeers:
    """One rank's view of a placement: who else holds the experts in its slots.

    Attributes:
        rank: this rank's index in the MicroEP group.
        logical: ``[L]`` logical expert held in each slot (``phy2log[rank]``).
        slot_holders: per slot, the ascending MicroEP ranks holding that slot's expert (this rank
            included); the first one is the expert's canonical holder.
    """

    rank: int
    logical: tuple[int, ...]
    slot_holders: tuple[tuple[int, ...], ...]

    def is_canonical(self, slot: int) -> bool:
        return self.slot_holders[slot][0] == self.rank

    def replica_index(self, slot: int) -> int:
        """0 for the canonical holder, 1.. for the others (by MicroEP rank)."""
        return self.slot_holders[slot].index(self.rank)


@dataclass(frozen=True)
class Placement:
    """A validated slot table and the layout maps derived from it (the one source of them).

    Attributes:
        phy2log: int64 ``[F, L]``; ``phy2log[g, l]`` is the logical expert in slot ``l`` of GPU ``g``
            (physical slot id ``p = g * L + l``).
        num_experts: ``E``, the number of logical experts; every expert has at least one holder.

    Derived (read-only):
        log2phy: int64 ``[E, D]`` physical slot ids of each expert's replicas, ascending, -1 padding
            (``D`` = the largest replica count).
        logcnt: int64 ``[E]`` replicas per expert.
        expert_slot: int64 ``[E]`` the slot index every holder of ``e`` uses.
        holder_table: int64 ``[E, D]`` the GPUs holding each expert, ascending, -1 padding
            (``log2phy // L``).
        holders: per expert, the tuple of GPUs holding it (``holder_table`` without padding).
        replica_index: int64 ``[E, F]`` position of GPU ``g`` among ``e``'s holders, -1 if none.
    """

    phy2log: np.ndarray
    num_experts: int
    log2phy: np.ndarray = field(init=False, repr=False)
    logcnt: np.ndarray = field(init=False, repr=False)
    expert_slot: np.ndarray = field(init=False, repr=False)
    holder_table: np.ndarray = field(init=False, repr=False)
    holders: tuple[tuple[int, ...], ...] = field(init=False, repr=False)
    replica_index: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        table = np.asarray(self.phy2log)
        if table.ndim != 2 or table.shape[0] < 1 or table.shape[1] < 1:
            raise PlacementError(f"phy2log must be a non-empty [gpus, slots] table, got shape {table.shape}")
        if not np.issubdtype(table.dtype, np.integer):
            raise PlacementError("phy2log must hold integer expert ids")
        table = table.astype(np.int64)
        if table.min() < 0 or table.max() >= self.num_experts:
            raise PlacementError(f"phy2log holds expert ids outside [0, {self.num_experts})")
        holders: list[list[int]] = [[] for _ in range(self.num_experts)]
        expert_slot = np.full(self.num_experts, -1, dtype=np.int64)
        for g, l in itertools.product(range(table.shape[0]), range(table.shape[1])):
            e = int(table[g, l])
            if g in holders[e]:
                raise PlacementError(f"GPU {g} holds expert {e} twice")
            if expert_slot[e] not in (-1, l):
                raise PlacementError(
                    f"expert {e} sits in slot {expert_slot[e]} on one GPU and slot {l} on GPU {g}: "
                    "all holders of an expert must use the same slot index")
            expert_slot[e] = l
            holders[e].append(g)
        missing = [e for e in range(self.num_experts) if not holders[e]]
        if missing:
            raise PlacementError(f"experts {missing[:8]} have no holder")
        num_gpus, slots = table.shape
        logcnt = np.array([len(h) for h in holders], dtype=np.int64)
        holder_table = pad_holders(holders)
        replica_index = np.full((self.num_experts, num_gpus), -1, dtype=np.int64)
        rows, columns = np.nonzero(holder_table >= 0)
        replica_index[rows, holder_table[rows, columns]] = columns
        log2phy = np.where(holder_table >= 0, holder_table * slots + expert_slot[:, None], -1)
        derived = dict(phy2log=table, log2phy=log2phy, logcnt=logcnt, expert_slot=expert_slot,
                       holder_table=holder_table, replica_index=replica_index)
        for name, value in derived.items():
            value.setflags(write=False)
            object.__setattr__(self, name, value)
        object.__setattr__(self, "holders", tuple(tuple(h) for h in holders))

    @property
    def num_gpus(self) -> int:
        return int(self.phy2log.shape[0])

    @property
    def slots_per_gpu(self) -> int:
        return int(self.phy2log.shape[1])

    def slot_peers(self, rank: int) -> SlotPeers:
        """The holders of each of ``rank``'s slots (replica sync and checkpoint mapping use this)."""
        logical = tuple(int(e) for e in self.phy2log[rank])
        return SlotPeers(rank, logical, tuple(self.holders[e] for e in logical))

    def to_json(self) -> dict:
        return {"num_gpus": self.num_gpus, "num_experts": self.num_experts,
                "phy2log": self.phy2log.tolist(), "holders": [list(h) for h in self.holders]}


def _check_layout(num_gpus: int, num_experts: int, replicas: int) -> int:
    """Validate (F, E, d) and return the slots per GPU ``L = E * d / F``."""
    if num_gpus < 1:
        raise PlacementError(f"gpus must be >= 1, got {num_gpus}")
    if num_experts < 1:
        raise PlacementError(f"experts must be >= 1, got {num_experts}")
    if replicas < 1:
        raise PlacementError(f"replicas must be >= 1, got {replicas}")
    if num_gpus % replicas:
        raise PlacementError(f"replicas={replicas} must divide gpus={num_gpus} (F = replicas * EP)")
    if (num_experts * replicas) % num_gpus:
        raise PlacementError(
            f"experts={num_experts} must be divisible by EP = gpus/replicas = {num_gpus // replicas}")
    return num_experts * replicas // num_gpus


def vanilla(num_gpus: int, num_experts: int) -> Placement:
    """Megatron's EP layout: expert ``e`` on GPU ``e // L`` (one replica, the d = 1 case)."""
    slots = _check_layout(num_gpus, num_experts, 1)
    return Placement(np.arange(num_experts, dtype=np.int64).reshape(num_gpus, slots), num_experts)


def _round_robin_matchings(num_gpus: int) -> list[list[tuple[int, int]]]:
    """The circle-method 1-factorisation of the complete graph K_F (F even): F - 1 perfect matchings."""
    f = num_gpus
    matchings = []
    for r in range(f - 1):
        pairs = [(r, f - 1)]
        pairs += [((r + i) % (f - 1), (r - i) % (f - 1)) for i in range(1, f // 2)]
        matchings.append(pairs)
    return matchings


def _circulant_matchings(num_gpus: int, step: int) -> list[list[tuple[int, int]]]:
    """The edges {a, a + step} of Z_F split into two perfect matchings (needs F / gcd(F, step) even)."""
    f = num_gpus
    first, second = [], []
    for start in range(math.gcd(f, step)):
        cycle = [(start + i * step) % f for i in range(f // math.gcd(f, step))]
        for i, a in enumerate(cycle):
            (first if i % 2 == 0 else second).append((a, cycle[(i + 1) % len(cycle)]))
    return [first, second]


def _spread_steps(num_gpus: int, count: int) -> list[int] | None:
    """``count`` distinct circulant steps spread like a torus: step_j ~ F ** (j / count).

    Z_F with steps {1, F**(1/m), F**(2/m), ...} is an m-dimensional (twisted) torus, the Cayley
    graphs the paper recommends: Z_8 with {±1} is the cycle, {±1, ±3} is K_{4,4}, Z_16 with
    {±1, ±4} the 4x4 torus. A step is usable when it splits into two perfect matchings.
    """
    f = num_gpus
    usable = [k for k in range(1, (f + 1) // 2) if (f // math.gcd(f, k)) % 2 == 0 and 2 * k != f]
    if len(usable) < count:
        return None
    steps: list[int] = []
    for j in range(count):
        target = f ** (j / count)
        best = min((k for k in usable if k not in steps), key=lambda k: (abs(k - target), k))
        steps.append(best)
    return steps


def _symmetric_pairs(num_gpus: int, slots: int) -> list[list[tuple[int, int]]]:
    """``slots`` perfect matchings of F GPUs whose union is a well-connected L-regular multigraph.

    L = q (F - 1) + r: q copies of the complete graph K_F (the densest spread possible), then an
    r-regular circulant "torus" for the rest, plus the antipodal matching when r is odd (paper
    §6.2: "several complete graphs, then spread out the remaining edges").
    """
    f = num_gpus
    complete_copies, rest = divmod(slots, f - 1)
    matchings = _round_robin_matchings(f) * complete_copies
    steps = _spread_steps(f, rest // 2)
    if steps is None:  # few usable steps (e.g. F = 6): take matchings of K_F instead
        matchings += _round_robin_matchings(f)[:rest]
        return matchings
    for step in steps:
        matchings += _circulant_matchings(f, step)
    if rest % 2:
        matchings.append([(a, a + f // 2) for a in range(f // 2)])
    return matchings


def _spread_partitions(num_gpus: int, slots: int, replicas: int, candidates: int = 32):
    """Per slot, a partition of the F GPUs into groups of ``replicas`` that spreads co-holding.

    Greedy over slots: among a fixed, seeded set of candidate partitions (the first one groups one
    GPU of each merged EP group with an affine shift), keep the one that adds the least to the sum of
    squared pair co-holding counts. Deterministic: every rank gets the same result.
    """
    ep = num_gpus // replicas
    rng = np.random.default_rng(0x5EED)
    co_held = np.zeros((num_gpus, num_gpus), dtype=np.int64)
    chosen = []
    for l in range(slots):
        options = [np.array([[i * ep + (c + l * i) % ep for i in range(replicas)] for c in range(ep)])]
        options += [rng.permutation(num_gpus).reshape(ep, replicas) for _ in range(candidates - 1)]

        def added_cost(groups: np.ndarray) -> int:
            return sum(int(co_held[np.ix_(g, g)].sum()) for g in groups)

        best = min(range(len(options)), key=lambda i: (added_cost(options[i]), i))
        for g in options[best]:
            co_held[np.ix_(g, g)] += 1
        chosen.append([tuple(int(x) for x in g) for g in options[best]])
    return chosen


def _groups_to_table(num_gpus: int, groups_per_slot: list[list[tuple[int, ...]]]) -> np.ndarray:
    """Number the holder groups slot-major (expert id = running index) and fill ``phy2log``."""
    table = np.full((num_gpus, len(groups_per_slot)), -1, dtype=np.int64)
    expert = 0
    for slot, groups in enumerate(groups_per_slot):
        for group in sorted(tuple(sorted(g)) for g in groups):
            table[list(group), slot] = expert
            expert += 1
    return table


def symmetric(num_gpus: int, num_experts: int, replicas: int) -> Placement:
    """The load-oblivious placement: every expert has ``replicas`` holders spread evenly.

    d = 1 is vanilla EP. d = 2 is a regular graph (experts = edges) coloured so every slot is a
    perfect matching (see ``_symmetric_pairs``). d > 2 is a hypergraph built slot by slot so that
    GPUs share experts as evenly as possible (see ``_spread_partitions``).
    """
    slots = _check_layout(num_gpus, num_experts, replicas)
    if replicas == 1:
        return vanilla(num_gpus, num_experts)
    if replicas == 2:
        groups = _symmetric_pairs(num_gpus, slots)
    else:
        groups = _spread_partitions(num_gpus, slots, replicas)
    return Placement(_groups_to_table(num_gpus, groups), num_experts)


def random(num_gpus: int, num_experts: int, replicas: int, seed: int = 0) -> Placement:
    """A seeded random placement: per slot, a random partition of the GPUs into groups of ``replicas``."""
    slots = _check_layout(num_gpus, num_experts, replicas)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise PlacementError(f"seed must be an integer >= 0, got {seed!r}")
    rng = np.random.default_rng(seed)
    groups = [[tuple(p) for p in rng.permutation(num_gpus).reshape(-1, replicas)] for _ in range(slots)]
    return Placement(_groups_to_table(num_gpus, groups), num_experts)


def custom(source: str | Path | dict, num_experts: int | None = None) -> Placement:
    """A placement from a JSON file (or dict) with ``phy2log`` (``[F][L]`` expert ids).

    Any replica count per expert is allowed, as long as all holders of an expert share a slot index.
    ``num_experts``: the expected E (ids outside ``[0, E)`` are named as such); default: the file's
    ``num_experts``, else the largest id + 1. Raises PlacementError.
    """
    if not isinstance(source, dict):
        try:
            source = json.loads(Path(source).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise PlacementError(f"cannot read placement file {source}: {exc}") from exc
    if "phy2log" not in source:
        raise PlacementError("custom placement needs a 'phy2log' field: [[expert per slot] per GPU]")
    rows = source["phy2log"]
    if not isinstance(rows, list) or not all(isinstance(row, list) for row in rows) \
            or len({len(row) for row in rows}) > 1:
        raise PlacementError("phy2log must be a [gpus][slots] table: a list of equally long lists of expert ids")
    table = np.asarray(rows)
    if num_experts is None:
        num_experts = int(source.get("num_experts", table.max() + 1 if table.size else 0))
    return Placement(table, num_experts)


def make_placement(kind: str, num_gpus: int, num_experts: int, replicas: int, seed: int = 0,
                   path: str | Path | None = None) -> Placement:
    """Build a placement by name: ``symmetric``, ``random`` (seeded) or ``custom`` (from ``path``)."""
    if kind == "symmetric":
        return symmetric(num_gpus, num_experts, replicas)
    if kind == "random":
        return random(num_gpus, num_experts, replicas, seed)
    if kind == "custom":
        if path is None:
            raise PlacementError("placement kind 'custom' needs a placement file (phy2log JSON)")
        placement = custom(path, num_experts)
        if (placement.num_gpus, placement.num_experts) != (num_gpus, num_experts):
            raise PlacementError(
                f"placement file has {placement.num_gpus} GPUs x {placement.num_experts} experts, "
                f"expected {num_gpus} x {num_experts}")
        return placement
    raise PlacementError(f"unknown placement kind {kind!r}; choose one of {', '.join(PLACEMENT_KINDS)}")


def max_induced_density(holders, load, num_gpus: int) -> float:
    """Exact paper Eq. 3: max over GPU subsets S of (load of experts held only inside S) / |S|.

    This equals the LP optimum (the smallest possible maximum GPU load with fractional splits).
    Exhaustive over the 2^F - 1 subsets, so only for F <= 16.

    Args:
        holders: per expert, the GPUs holding it.
        load: ``[E]`` tokens per expert.
        num_gpus: ``F``.
    """
    if num_gpus > 16:
        raise ValueError(f"exact Eq. 3 enumerates 2^F subsets; F={num_gpus} > 16 is too large")
    load = np.asarray(load, dtype=np.float64)
    subsets = np.arange(1, 1 << num_gpus, dtype=np.int64)
    inside = np.zeros(subsets.shape, dtype=np.float64)
    for e, gpus in enumerate(holders):
        if load[e]:
            mask = sum(1 << int(g) for g in gpus)
            inside += np.where((subsets & mask) == mask, load[e], 0.0)
    sizes = np.zeros(subsets.shape, dtype=np.float64)
    for g in range(num_gpus):
        sizes += (subsets >> g) & 1
    return float((inside / sizes).max())


def validate_holders(holders, num_gpus: int) -> tuple[tuple[int, ...], ...]:
    """Check per-expert holder lists; raises ``ValueError`` naming the offending field."""
    if num_gpus < 1:
        raise ValueError(f"num_gpus must be >= 1, got {num_gpus}")
    holders = tuple(tuple(int(g) for g in h) for h in holders)
    if not holders:
        raise ValueError("holders: no experts; give one holder list per expert")
    for e, gpus in enumerate(holders):
        if not gpus:
            raise ValueError(f"holders[{e}]: expert {e} has no holder")
        if any(g < 0 or g >= num_gpus for g in gpus):
            raise ValueError(f"holders[{e}]: GPU ids must lie in [0, {num_gpus}), got {list(gpus)}")
        if len(set(gpus)) != len(gpus):
            raise ValueError(f"holders[{e}]: a GPU is listed twice: {list(gpus)}")
    return holders


def pad_holders(holders) -> np.ndarray:
    """Pad per-expert holder lists into int64 ``[E, d_max]``, holders ascending, -1 as padding."""
    width = max(len(h) for h in holders)
    table = np.full((len(holders), width), -1, dtype=np.int64)
    for e, gpus in enumerate(holders):
        table[e, :len(gpus)] = sorted(gpus)
    return table


def vanilla_ep_load(tokens: np.ndarray, ep: int) -> np.ndarray:
    """GPU loads ``[F]`` if the MicroEP group ran as ``d = F / EP`` separate vanilla EP groups.

    GPU ``g`` is position ``g % EP`` of EP group ``g // EP`` and holds experts
    ``[(g % EP) * L, (g % EP + 1) * L)``; it receives those experts' tokens from its own EP group.

    Args:
        tokens: int ``[F, E]`` tokens per (source GPU, logical expert).
        ep: the vanilla expert-parallel size (divides F and E).
    """
    num_gpus, num_experts = tokens.shape
    groups = tokens.reshape(num_gpus // ep, ep, ep, num_experts // ep)  # [group, src pos, dst pos, L]
    return groups.sum(axis=(1, 3)).reshape(num_gpus)
