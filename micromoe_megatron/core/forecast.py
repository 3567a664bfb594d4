"""Adaptive re-placement: per-layer load history, forecast, the re-place decision, and slot moves.

Fed the all-gathered ``[F, E]`` counts of every micro-batch (identical on every rank), a
``ReplacementPolicy`` keeps a window of per-expert loads, forecasts the next ones (EMA or moving
average over the window), scores the current placement on the forecast (LP optimum, paper Eq. 3)
against a fresh asymmetric placement (``asymmetric.py``) and re-places when the predicted gain
pays for the migration (paper Sec. 6.4). ``slot_moves`` lists what a live migration must copy.

Everything is a pure function of (placement, observed counts, measured migration costs that the
caller has made group-wide), so every rank decides identically.
"""

from __future__ import annotations

from dataclasses import dataclass

import highspy
import numpy as np

from .asymmetric import GOOD_ENOUGH, ScenarioScore, asymmetric_placement, improve_table, placement_optimum
from .highs import new_highs
from .loads import validate_counts
from .migration_cost import MAX_SAMPLES, MigrationCost, MigrationSample
from .placement import Placement, PlacementError

FORECAST_METHODS = ("ema", "mean")


class LoadHistory:
    """The last ``window`` micro-batches' per-expert loads of one layer, and a forecast from them.

    Args:
        num_experts: ``E``.
        window: micro-batches kept (>= 1).
        method: ``ema`` (weights ``alpha * (1 - alpha)^age``, normalised) or ``mean``.
        alpha: EMA weight of the newest micro-batch, in (0, 1].
    """

    def __init__(self, num_experts: int, window: int = 16, method: str = "ema", alpha: float = 0.3) -> None:
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        if method not in FORECAST_METHODS:
            raise ValueError(f"forecast method {method!r}: choose one of {', '.join(FORECAST_METHODS)}")
        if not 0.0 < alpha <= 1.0:
            raise ValueError(f"alpha must lie in (0, 1], got {alpha}")
        self.num_experts, self.window, self.method, self.alpha = num_experts, window, method, alpha
        self._loads = np.zeros((window, num_experts), dtype=np.float64)
        self.seen = 0   # micro-batches observed in total

    def observe(self, load) -> None:
        """Record one micro-batch's ``[E]`` tokens per expert."""
        load = np.asarray(load, dtype=np.float64)
        if load.shape != (self.num_experts,) or not np.all(np.isfinite(load)) or load.min() < 0:
            raise ValueError(f"load: expected [{self.num_experts}] finite tokens >= 0 per expert, "
                             f"got shape {list(load.shape)}")
        self._loads[self.seen % self.window] = load
        self.seen += 1

    @property
    def loads(self) -> np.ndarray:
        """``[K, E]`` the kept loads, oldest first (``K = min(seen, window)``)."""
        kept = min(self.seen, self.window)
        order = (np.arange(self.seen - kept, self.seen)) % self.window
        return self._loads[order].copy()

    def forecast(self) -> np.ndarray:
        """``[E]`` forecast tokens per expert for the next micro-batch (zeros before any data)."""
        loads = self.loads
        if not len(loads):
            return np.zeros(self.num_experts)
        if self.method == "mean":
            return loads.mean(axis=0)
        weights = self.alpha * (1.0 - self.alpha) ** np.arange(len(loads) - 1, -1, -1, dtype=np.float64)
        return weights @ loads / weights.sum()


@dataclass(frozen=True)
class SlotMove:
    """One slot to fill in a migration: ``(dst_rank, dst_slot)`` receives ``expert``'s weights and
    optimizer state from ``(src_rank, src_slot)`` of the old placement (``src_rank == dst_rank``: a
    local copy)."""

    dst_rank: int
    dst_slot: int
    expert: int
    src_rank: int
    src_slot: int


def align_slots(old: Placement, new: Placement) -> Placement:
    """``new`` with its slot indices permuted to keep as many (GPU, slot) entries as ``old`` has.

    Permuting whole slot columns keeps the slot rule and the LP optimum; it only renames slots.
    Solved as an assignment LP (HiGHS; its vertex solutions are integral).
    """
    if old.phy2log.shape != new.phy2log.shape or old.num_experts != new.num_experts:
        raise PlacementError("align_slots: the placements have different shapes")
    slots = old.slots_per_gpu
    # same[j, l]: GPUs whose new slot j holds what their old slot l holds.
    same = (new.phy2log[:, :, None] == old.phy2log[:, None, :]).sum(axis=0).astype(np.float64)
    lp = highspy.HighsLp()
    lp.num_col_, lp.num_row_ = slots * slots, 2 * slots
    lp.col_cost_ = -same.ravel()
    lp.col_lower_, lp.col_upper_ = np.zeros(slots * slots), np.ones(slots * slots)
    lp.row_lower_ = lp.row_upper_ = np.ones(2 * slots)
    j, l = np.divmod(np.arange(slots * slots), slots)
    lp.a_matrix_.format_ = highspy.MatrixFormat.kColwise
    lp.a_matrix_.start_ = np.arange(0, 2 * slots * slots + 1, 2).astype(np.int32)
    lp.a_matrix_.index_ = np.stack([j, slots + l], 1).ravel().astype(np.int32)
    lp.a_matrix_.value_ = np.ones(2 * slots * slots)
    highs = new_highs(lp)
    highs.run()
    x = np.asarray(highs.getSolution().col_value).reshape(slots, slots)
    target = np.argmax(x, axis=1)  # new slot j goes to old slot index target[j]
    if sorted(target.tolist()) != list(range(slots)):
        return new  # not integral (cannot happen for an assignment LP): keep the names
    table = np.empty_like(new.phy2log)
    table[:, target] = new.phy2log
    return Placement(table, new.num_experts)


def slot_moves(old: Placement, new: Placement) -> list[SlotMove]:
    """The copies that turn ``old`` into ``new``: one per (rank, slot) whose expert changes.

    The source of expert ``e`` is the destination rank itself when it held ``e`` (local copy),
    else the old holder that has sent the fewest slots so far (ties: lowest rank), spreading the
    sends. Sorted by (dst_rank, dst_slot). Unchanged slots move nothing.
    """
    if old.phy2log.shape != new.phy2log.shape or old.num_experts != new.num_experts:
        raise PlacementError("slot_moves: the placements have different shapes")
    sent = np.zeros(old.num_gpus, dtype=np.int64)
    moves = []
    for g, l in zip(*np.nonzero(new.phy2log != old.phy2log)):
        e = int(new.phy2log[g, l])
        sources = old.holders[e]
        src = int(g) if g in sources else min(sources, key=lambda s: (sent[s], s))
        if src != g:
            sent[src] += 1
        moves.append(SlotMove(int(g), int(l), e, src, int(old.expert_slot[e])))
    return moves


@dataclass(frozen=True)
class ReplacementDecision:
    """What a check concluded (all loads in tokens per micro-batch; ratios are max/mean).

    Attributes:
        replace: re-place now.
        placement: the placement to use from now on (the current one when ``replace`` is False).
        moves: the slot copies the re-placement needs (empty when not re-placing).
        predicted_current / predicted_new: LP optimum over the mean GPU load, on the forecast.
        gain_ms: predicted expert-compute time saved over the next interval.
        migration_ms: predicted migration time.
        reason: why (for logs).
    """

    replace: bool
    placement: Placement
    moves: tuple[SlotMove, ...]
    predicted_current: float
    predicted_new: float
    gain_ms: float
    migration_ms: float
    reason: str


class ReplacementPolicy:
    """One layer's adaptive re-placement: observe counts, check every ``interval`` steps.

    Args:
        placement: the starting placement (e.g. symmetric).
        interval: check every this many calls of ``check`` (0 = never re-place).
        threshold: re-place when the predicted max/mean gain exceeds it and the predicted gain in
            time exceeds the migration time; 0 = re-place at every check (when anything changes).
        window, method, alpha: the ``LoadHistory``.
        migration: the ``MigrationCost`` model (its prior); ``record_migration`` refits it from every
            measured migration so far (the newest ``MAX_SAMPLES``).
        ms_per_token: expert compute time per token-expert assignment on the slowest GPU; 0 (not
            measured, e.g. ``micromoe analyze`` replaying a trace) skips the time gate, and the
            threshold alone decides.
        micro_batches_per_check: micro-batches between two checks (the gain's horizon).
        robust_window: the newest this-many observed micro-batches are scored with the forecast,
            so the new table also balances the recent ones (noise, flip-flopping experts); 0 = the
            forecast alone.
        stress, stress_experts: the new table also keeps slack for any of the forecast's
            ``stress_experts`` heaviest experts growing to ``1 + stress`` times its load (see
            ``ScenarioScore``; a tie-break after the forecast and recent micro-batches). 2.0 (a
            heavy expert tripling): on real-text routing traces, where a second hot expert swaps
            in within a few micro-batches, it removed most misses that the 0.2 used before left
            (``micromoe analyze --bounds`` shows them as the forecast's, not the placement's).
        max_evaluations: table scorings of the fresh placement search (deterministic work bound).
        warm_evaluations: table scorings of the in-place search from the current table (cheap in
            moves, but far from a skewed optimum it needs many small steps, so it gets less).
    """

    def __init__(self, placement: Placement, interval: int, threshold: float = 0.0, window: int = 16,
                 method: str = "ema", alpha: float = 0.3, migration: MigrationCost | None = None,
                 ms_per_token: float = 0.0, micro_batches_per_check: int = 1,
                 robust_window: int = 4, stress: float = 2.0, stress_experts: int = 4,
                 max_evaluations: int = 2000, warm_evaluations: int = 200) -> None:
        if interval < 0:
            raise ValueError(f"interval must be >= 0 (0 = off), got {interval}")
        if threshold < 0:
            raise ValueError(f"threshold must be >= 0, got {threshold}")
        self.placement = placement
        self.interval, self.threshold = interval, threshold
        self.history = LoadHistory(placement.num_experts, window, method, alpha)
        self.migration = migration or MigrationCost()
        self.migration_samples: list[MigrationSample] = []
        self.ms_per_token = ms_per_token
        self.micro_batches_per_check = micro_batches_per_check
        self.max_evaluations, self.warm_evaluations = max_evaluations, warm_evaluations
        self.robust_window = robust_window
        self.stress, self.stress_experts = stress, stress_experts
        self.checks = 0
        self.failures = 0
        self.replacements = 0
        self.slots_moved = 0

    def observe(self, tokens) -> None:
        """Record one micro-batch's int ``[F, E]`` all-gathered counts."""
        tokens = validate_counts(tokens, self.placement.num_gpus, self.placement.num_experts)
        self.history.observe(tokens.sum(axis=0))

    def check(self) -> ReplacementDecision | None:
        """Call once per iteration; every ``interval``-th call returns a decision, else None.

        Does not switch placements: call ``commit`` after the migration is done.
        """
        if self.interval == 0:
            return None
        self.checks += 1
        if self.checks % self.interval or not self.history.seen:
            return None
        forecast = self.history.forecast()
        try:
            return self.decide(forecast)
        except Exception as exc:  # a failed search keeps the current placement; counted, same on every rank
            self.failures += 1
            ratio = float("nan")
            return ReplacementDecision(False, self.placement, (), ratio, ratio, 0.0, 0.0,
                                       f"placement search failed, keeping the placement: {exc}")

    def decide(self, forecast) -> ReplacementDecision:
        """Compare the current placement with the best found for ``forecast`` ``[E]``."""
        forecast = np.asarray(forecast, dtype=np.float64)
        current = self.placement
        num_gpus, slots = current.num_gpus, current.slots_per_gpu
        mean = float(np.sum(forecast)) / num_gpus
        if mean <= 0:
            return ReplacementDecision(False, current, (), 1.0, 1.0, 0.0, 0.0, "no load observed")
        history = self.history.loads[-self.robust_window:] if self.robust_window else np.zeros((0, forecast.size))
        score = ScenarioScore(np.vstack([forecast, history]), num_gpus, self.stress, self.stress_experts)
        now = placement_optimum(current, forecast)
        # Candidates: the current table improved in place (few moves) and, unless that already
        # balances every scenario, a fresh asymmetric placement; the best score wins, then fewer moves.
        candidates = [current]
        if max(score.evaluate(current.phy2log)[0][:2]) > GOOD_ENOUGH:
            warm_table, _, _ = improve_table(current.phy2log, None, self.warm_evaluations, score=score)
            candidates.append(Placement(warm_table, current.num_experts))
            if max(score.evaluate(warm_table)[0][:2]) > GOOD_ENOUGH:
                fresh = asymmetric_placement(forecast, num_gpus, slots, history, self.max_evaluations,
                                             stress=self.stress, stress_experts=self.stress_experts)
                candidates.append(align_slots(current, fresh))
        ranked = sorted((score.evaluate(p.phy2log)[0][:3], len(slot_moves(current, p)), i)
                        for i, p in enumerate(candidates))
        new = candidates[ranked[0][2]]
        new_t = placement_optimum(new, forecast)
        moves = tuple(slot_moves(current, new))
        gain_ms = (now - new_t) * self.ms_per_token * self.micro_batches_per_check
        migration_ms = self.migration.estimate_ms(moves, num_gpus)
        ratio_now, ratio_new = now / mean, new_t / mean
        if not moves:
            replace, reason = False, "the best placement found is the current one"
        elif self.threshold == 0:
            replace, reason = True, "threshold 0: re-place at every check"
        elif ratio_now - ratio_new <= self.threshold:
            replace, reason = False, f"predicted gain {ratio_now - ratio_new:.4f} <= threshold {self.threshold}"
        elif self.ms_per_token > 0 and gain_ms <= migration_ms:
            replace, reason = False, f"predicted gain {gain_ms:.3f} ms <= migration {migration_ms:.3f} ms"
        else:
            replace, reason = True, f"predicted max/mean {ratio_now:.4f} -> {ratio_new:.4f}"
        return ReplacementDecision(replace, new if replace else current, moves if replace else (),
                                   ratio_now, ratio_new, gain_ms, migration_ms, reason)

    def commit(self, decision: ReplacementDecision) -> Placement:
        """Switch to the decision's placement (after the migration); returns it."""
        if decision.replace:
            self.placement = decision.placement
            self.replacements += 1
            self.slots_moved += len(decision.moves)
        return self.placement

    def record_migration(self, measured_ms: float, moves) -> None:
        """Refit the migration model with one more measured migration (``migration_cost``).

        ``moves``: what ran, a ``MigrationPlan`` (preferred) or the slot moves. ``measured_ms`` must
        be the same on every rank (e.g. the group's all-reduced max), or the ranks would decide
        differently. A degenerate measurement (no moves; zero, negative or NaN ms) changes nothing.
        """
        sample = self.migration.sample(moves, self.placement.num_gpus, measured_ms)
        if sample.usable:
            self.migration_samples = (self.migration_samples + [sample])[-MAX_SAMPLES:]
            self.migration = self.migration.fitted(self.migration_samples)
