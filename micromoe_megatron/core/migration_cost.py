"""The migration time model: a fixed term, a per-round term and a bandwidth term, fitted to measurements.

A migration (``mcore/migration.py``, planned by ``migration_plan.plan_migration``) runs rounds; in
each, every rank sends and receives at most one slot payload in one all-to-all, and the group
waits for its slowest rank. Its time is modelled as (ms)::

    t = fixed_ms + round_ms * rounds + bytes / bandwidth

* ``rounds``: rounds that exchange a payload between ranks (one collective each: its launch and
  synchronisation cost, ~3 ms with gloo on CPU, far less with NCCL on GPUs).
* ``bytes``: the busiest rank's payload bytes sent or received (``max(sent, received)`` over the
  ranks; a local copy counts 0.1, a memory copy rather than a transfer); ranks exchange in parallel.
* ``fixed_ms``: per migration (building the slot state, the distributed optimizer's bookkeeping,
  switching the placement).

Assumptions: the three costs add up; they do not depend on which ranks talk to which (one flat
group); a rank's sends and receives overlap. On 4 gloo CPU ranks (2 cores) one round of 0.2 MB
took ~3-5 ms and of 2 MB ~6-7 ms, roughly linear in the rounds (a loop of ``all_to_all_single``
calls, min of 5), which is what the per-round and bandwidth terms express.

The coefficients start at a prior (``latency_ms`` 0.1, ``round_ms`` 0, ``bandwidth_gbps`` 25) and
are refitted (``fitted``) from every measured migration so far by a regularised non-negative
least squares on relative errors (timing noise grows with the time, and a relative error lets a
20 ms and a 2 s migration count alike)::

    minimise  sum_i ((x_i . c - t_i) / t_i)^2 + PRIOR_WEIGHT * sum_k ((c_k - p_k) / s_k)^2,  c >= 0

with ``x_i = (1, rounds_i, bytes_i)``, ``c = (fixed_ms, round_ms, ms_per_byte)``, ``p`` the prior
and scales ``s = (FIXED_SCALE_MS, ROUND_SCALE_MS, prior ms_per_byte)``. ``PRIOR_WEIGHT`` is small,
so measurements are met closely; the prior only decides what the measurements leave open. With
one measurement, its excess over the prior is split between the terms in proportion to
``(s_k x_k)^2`` (ms^2): 1 for the fixed term, ``(rounds / 4)^2`` for the per-round term and
``(prior transfer ms)^2`` for the bandwidth. So a small move measured far above the prior's
transfer time (13-21 ms for one 0.2 MB slot on gloo, against a 0.008 ms prior transfer) is blamed
mostly on the fixed cost (94% for one round), and a later
small move is priced at about that measurement, not bandwidth-scaled to a huge number; a big
move measured slow lowers the bandwidth. More measurements with different round counts and
sizes separate the terms (with one slot size, rounds and bytes grow together, so their split
leans on the prior).

Every input is agreed (the group's max time, features from the plan every rank shares) and the
fit is a pure, order-independent function of the set of samples (sorted first, then an exact
3-variable active-set solve), so every rank gets the same model (rule 2).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field, replace

import numpy as np

# Weight of the pull toward the prior, against one measurement's squared relative error: small,
# so a single measurement of t ms is met within about (t / 1 ms)^2 x 1e-9 (0.1% at 1 s); the prior
# only decides what the measurements leave open.
PRIOR_WEIGHT = 1e-9
# Scales of the fixed and per-round terms in the prior's pull (how far off the prior may be): one
# measurement's excess is split between the terms by (scale x feature)^2. One exchange round is a
# fraction of a migration's fixed overhead (gloo on CPU: ~3-5 ms per round of a 13-21 ms one-slot
# migration), so a one-round excess goes ~94% to the fixed term, and the per-round cost is learnt
# from migrations of more rounds.
FIXED_SCALE_MS = 1.0
ROUND_SCALE_MS = 0.25
# A local copy's weight in the busiest rank's bytes: a memory copy, not a transfer.
LOCAL_SHARE = 0.1
# Newest measurements a caller keeps for the fit (bounds its cost over a long run).
MAX_SAMPLES = 64
# Fitted coefficients keep this many significant digits: the decision must not hinge on the last
# bits of a LAPACK call.
_DIGITS = 10


@dataclass(frozen=True, order=True)
class MigrationSample:
    """One measured migration: its features and the group's agreed time.

    Attributes:
        rounds: rounds that exchanged payloads between ranks.
        bytes: the busiest rank's payload bytes (local copies at ``LOCAL_SHARE``).
        ms: measured time (the group's slowest rank, identical on every rank).
    """

    rounds: float
    bytes: float
    ms: float

    @property
    def usable(self) -> bool:
        """A finite positive time of a migration that moved something."""
        return (math.isfinite(self.ms) and self.ms > 0 and math.isfinite(self.rounds) and math.isfinite(self.bytes)
                and self.rounds >= 0 and self.bytes >= 0 and (self.rounds > 0 or self.bytes > 0))


def migration_features(moves, num_gpus: int, bytes_per_slot: float) -> tuple[float, float]:
    """``(rounds, bytes)`` of a migration (see the module docstring); ``(0, 0)`` without moves.

    Args:
        moves: a ``migration_plan.MigrationPlan`` (the moves that run: its rounds, stashes counted as
            local copies) or a list of slot moves with ``src_rank``/``dst_rank`` (the cheap greedy
            ``forecast.slot_moves`` of a candidate, not yet planned: its rounds are estimated as
            the degree bound ``Δ``, the most moves one rank sends or receives, which the planner
            meets in practice; ``migration_plan`` module docstring).
        num_gpus: ``F``.
        bytes_per_slot: one slot's payload (weights and optimizer state), bytes.
    """
    rounds_of = getattr(moves, "rounds", None)
    if rounds_of is not None:
        flat = [m for r in rounds_of for m in r]
        rounds = sum(any(m.src_rank != m.dst_rank for m in r) for r in rounds_of)
    else:
        flat = list(moves)
        rounds = None
    if not flat:
        return 0.0, 0.0
    received, sent = np.zeros(num_gpus), np.zeros(num_gpus)
    degree_in, degree_out = np.zeros(num_gpus), np.zeros(num_gpus)
    for m in flat:
        share = LOCAL_SHARE if m.src_rank == m.dst_rank else 1.0
        received[m.dst_rank] += share
        sent[m.src_rank] += share
        degree_in[m.dst_rank] += 1
        degree_out[m.src_rank] += 1
    if rounds is None:
        remote = any(m.src_rank != m.dst_rank for m in flat)
        rounds = int(max(degree_in.max(), degree_out.max())) if remote else 0
    return float(rounds), float(np.maximum(received, sent).max()) * bytes_per_slot


@dataclass(frozen=True)
class MigrationCost:
    """Time model of one layer's migration (see the module docstring for the formula and the fit).

    Attributes:
        bytes_per_slot: one slot's expert weights plus optimizer state (bytes).
        bandwidth_gbps: per-rank copy bandwidth, GB/s (a local copy counts ``LOCAL_SHARE``).
        latency_ms: fixed cost per migration.
        round_ms: cost per round that exchanges payloads between ranks.
        prior: ``(latency_ms, round_ms, bandwidth_gbps)`` that ``fitted`` pulls toward; None: this
            model's own coefficients (a model not fitted yet is its own prior).

    Raises:
        ValueError: a negative or non-finite coefficient, or a bandwidth not above 0.
    """

    bytes_per_slot: float = 0.0
    bandwidth_gbps: float = 25.0
    latency_ms: float = 0.1
    round_ms: float = 0.0
    prior: tuple[float, float, float] | None = field(default=None, repr=False)

    def __post_init__(self):
        for name in ("bytes_per_slot", "latency_ms", "round_ms"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"MigrationCost.{name} must be finite and >= 0, got {value}")
        if not (math.isfinite(self.bandwidth_gbps) and self.bandwidth_gbps > 0):
            raise ValueError(f"MigrationCost.bandwidth_gbps must be finite and > 0, got {self.bandwidth_gbps}")

    @property
    def ms_per_byte(self) -> float:
        return 1e3 / (self.bandwidth_gbps * 1e9)

    def bytes_moved(self, moves) -> float:
        """Bytes sent between ranks by a list of slot moves."""
        return self.bytes_per_slot * sum(m.src_rank != m.dst_rank for m in moves)

    def estimate_ms(self, moves, num_gpus: int) -> float:
        """Predicted time (ms) of ``moves`` (a ``MigrationPlan`` or a list of slot moves; see
        ``migration_features``): ``latency_ms + round_ms * rounds + bytes / bandwidth``; 0 without moves."""
        rounds, nbytes = migration_features(moves, num_gpus, self.bytes_per_slot)
        if rounds == 0 and nbytes == 0:
            return 0.0
        return self.latency_ms + self.round_ms * rounds + nbytes * self.ms_per_byte

    def sample(self, moves, num_gpus: int, measured_ms: float) -> MigrationSample:
        """The measurement of ``moves`` (prefer the executed ``MigrationPlan``) taking ``measured_ms``
        (which must be identical on every rank, e.g. the group's all-reduced max)."""
        rounds, nbytes = migration_features(moves, num_gpus, self.bytes_per_slot)
        return MigrationSample(rounds, nbytes, float(measured_ms))

    def fitted(self, samples) -> "MigrationCost":
        """The model refitted to ``samples`` (``MigrationSample``s, any order) from the prior.

        Samples that are not ``usable`` (no moves; zero, negative or NaN time) are ignored; with none
        left the prior comes back. Pure and deterministic: the same set of samples gives the same
        model whatever their order.
        """
        prior = self.prior or (self.latency_ms, self.round_ms, self.bandwidth_gbps)
        base = replace(self, latency_ms=prior[0], round_ms=prior[1], bandwidth_gbps=prior[2], prior=prior)
        rows = sorted(s for s in samples if s.usable)
        if not rows:
            return base
        p = np.array([prior[0], prior[1], base.ms_per_byte])
        scale = np.array([FIXED_SCALE_MS, ROUND_SCALE_MS, base.ms_per_byte])
        t = np.array([s.ms for s in rows])
        x = np.array([[1.0, s.rounds, s.bytes] for s in rows])
        # Unknowns u = c / scale: data rows (x . c - t) / t, prior rows sqrt(w) (u - p / scale).
        a = np.vstack([x * scale / t[:, None], math.sqrt(PRIOR_WEIGHT) * np.eye(3)])
        b = np.concatenate([np.ones(len(rows)), math.sqrt(PRIOR_WEIGHT) * p / scale])
        u = _nonnegative_least_squares(a, b)
        fixed, per_round, per_byte = (float(f"{v:.{_DIGITS}g}") for v in u * scale)
        if per_byte <= 0:  # the data say transfers are free: keep a finite bandwidth (the prior's x 1e6)
            per_byte = base.ms_per_byte * 1e-6
        return replace(base, latency_ms=fixed, round_ms=per_round, bandwidth_gbps=1e-6 / per_byte)


def _nonnegative_least_squares(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``argmin ||a u - b||`` over ``u >= 0`` for a few columns (``a`` of full column rank).

    Exact: the problem is strictly convex, so its minimiser is the unconstrained least-squares
    solution on its own support; every support is tried and the best non-negative one is kept.
    """
    n = a.shape[1]
    best, best_value = np.zeros(n), float(b @ b)
    for size in range(1, n + 1):
        for support in itertools.combinations(range(n), size):
            cols = list(support)
            solution, *_ = np.linalg.lstsq(a[:, cols], b, rcond=None)
            if np.any(solution < 0):
                continue
            u = np.zeros(n)
            u[cols] = solution
            value = float(np.sum((a @ u - b) ** 2))
            if value < best_value:
                best, best_value = u, value
    return best
