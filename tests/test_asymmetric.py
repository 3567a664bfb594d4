"""Asymmetric placement, load forecast, re-placement decisions and slot moves (pure core)."""

from __future__ import annotations

import numpy as np
import pytest

from micromoe_megatron.core import asymmetric, loads
from micromoe_megatron.core import placement as placements
from micromoe_megatron.core.forecast import (LoadHistory, MigrationCost, ReplacementPolicy, align_slots,
                                             slot_moves)
from micromoe_megatron.core.placement import Placement, PlacementError
from micromoe_megatron.core.schedule import ReplicaScheduler


def zipf_load(num_experts, skew, seed=0, total=100_000):
    return loads.zipf_probabilities(num_experts, skew, np.random.default_rng(seed)) * total


def assert_valid(placement: Placement, num_gpus, slots, num_experts):
    """Slot rule (Placement validates it), F x L slots, every expert held 1..F times."""
    assert placement.phy2log.shape == (num_gpus, slots)
    assert placement.num_experts == num_experts
    assert placement.logcnt.sum() == num_gpus * slots
    assert placement.logcnt.min() >= 1 and placement.logcnt.max() <= num_gpus
    for e, gpus in enumerate(placement.holders):
        assert all(placement.phy2log[g, placement.expert_slot[e]] == e for g in gpus)


@pytest.mark.parametrize("num_gpus,num_experts,slots,skew", [
    (8, 32, 8, 0.0), (8, 32, 8, 1.5), (8, 32, 8, 3.0), (16, 64, 8, 1.2), (6, 12, 4, 1.0), (4, 4, 1, 2.0),
    (8, 16, 2, 0.5)])
def test_placement_invariants(num_gpus, num_experts, slots, skew):
    load = zipf_load(num_experts, skew)
    placement = asymmetric.asymmetric_placement(load, num_gpus, slots)
    assert_valid(placement, num_gpus, slots, num_experts)


def test_replica_counts_follow_load_and_packing_always_succeeds():
    rng = np.random.default_rng(1)
    for _ in range(200):
        num_gpus, slots = int(rng.integers(2, 12)), int(rng.integers(1, 6))
        num_experts = int(rng.integers(slots, num_gpus * slots + 1))
        load = rng.pareto(1.0, num_experts) * rng.integers(0, 2, num_experts)
        counts = asymmetric.replica_counts(load, num_gpus, slots)
        assert counts.sum() == num_gpus * slots and counts.min() >= 1 and counts.max() <= num_gpus
        slot, packed = asymmetric.pack_slots(counts, num_gpus, slots)
        assert packed.sum() == num_gpus * slots and packed.min() >= 1 and packed.max() <= num_gpus
        assert all(packed[slot == l].sum() == num_gpus for l in range(slots))
        table = asymmetric.initial_table(load, slot, packed, num_gpus, slots)
        assert_valid(Placement(table, num_experts), num_gpus, slots, num_experts)


def test_hot_expert_gets_replicas_in_proportion():
    load = np.array([700.0, 100, 100, 100, 100, 100, 100, 100])   # expert 0: 7 mean-GPU loads of 1.0
    counts = asymmetric.replica_counts(load, num_gpus=8, slots_per_gpu=2)
    assert counts[0] == 7 and counts.sum() == 16


@pytest.mark.parametrize("skew", [0.9, 1.5, 2.0])
def test_asymmetric_balances_the_forecast_where_symmetric_cannot(skew):
    """The LP optimum (Eq. 3) on the forecast: the symmetric placement is stuck above the mean,
    the asymmetric one reaches it (exact Eq. 3 check by subset enumeration)."""
    load = np.round(zipf_load(32, skew, seed=3))
    asym = asymmetric.asymmetric_placement(load, 8, 8)
    mean = load.sum() / 8
    exact = placements.max_induced_density(asym.holders, load, 8)
    assert exact == pytest.approx(asymmetric.placement_optimum(asym, load), rel=1e-9)
    assert exact / mean <= asymmetric.GOOD_ENOUGH
    if skew >= 1.5:
        assert placements.max_induced_density(placements.symmetric(8, 32, 2).holders, load, 8) / mean > 1.3
    plan = ReplicaScheduler(asym.holders, 8).plan(np.tile(load.astype(np.int64) // 8, (8, 1)))
    assert plan.quota.sum() == (load.astype(np.int64) // 8).sum() * 8   # no token lost


def test_placement_is_deterministic_and_independent_of_history():
    load = zipf_load(256, 1.0, seed=5)
    first = asymmetric.asymmetric_placement(load, 64, 8)
    asymmetric.asymmetric_placement(zipf_load(256, 2.0, seed=6), 64, 8)   # unrelated work in between
    second = asymmetric.asymmetric_placement(load.copy(), 64, 8)
    assert np.array_equal(first.phy2log, second.phy2log)


def test_local_search_never_worsens_the_start_and_uses_duals():
    load = zipf_load(32, 1.5, seed=2)
    start = placements.symmetric(8, 32, 2).phy2log
    before = asymmetric.TableLP(load, 8).optimum(start)
    table, ratio, used = asymmetric.improve_table(start, load, max_evaluations=400)
    assert ratio * load.sum() / 8 <= before + 1e-6 and used <= 400
    assert ratio < before / (load.sum() / 8)      # it found something better than symmetric
    Placement(table, 32)                           # the slot rule still holds


@pytest.mark.parametrize("bad,message", [
    (np.array([1.0, -1.0, 1.0, 1.0]), "finite loads >= 0"),
    (np.array([1.0, np.nan, 1.0, 1.0]), "finite loads >= 0"),
    (np.ones(40), "do not fit"),
    (np.ones((2, 2)), "vector"),
])
def test_bad_forecasts_name_the_problem(bad, message):
    with pytest.raises(PlacementError, match=message):
        asymmetric.asymmetric_placement(bad, 4, 8)


# ------------------------------------------------------------------ forecast and decisions


def test_history_window_and_forecasts():
    history = LoadHistory(3, window=2, method="mean")
    assert np.array_equal(history.forecast(), np.zeros(3))
    for load in ([1, 0, 0], [0, 2, 0], [0, 0, 4]):
        history.observe(load)
    assert np.array_equal(history.loads, [[0, 2, 0], [0, 0, 4]])            # oldest first, window 2
    assert np.allclose(history.forecast(), [0, 1, 2])
    ema = LoadHistory(1, window=3, method="ema", alpha=0.5)
    for value in (0.0, 0.0, 8.0):
        ema.observe([value])
    assert ema.forecast()[0] == pytest.approx(8.0 * 0.5 / (0.5 + 0.25 + 0.125))
    with pytest.raises(ValueError, match="forecast method"):
        LoadHistory(3, method="median")


def policy_run(steps=12, interval=1, threshold=0.0, seed=0, num_gpus=8, num_experts=32, skew=1.5, **kw):
    rng = np.random.default_rng(seed)
    probabilities = loads.zipf_probabilities(num_experts, skew, rng)
    policy = ReplacementPolicy(placements.symmetric(num_gpus, num_experts, 2), interval, threshold, **kw)
    decisions = []
    for _ in range(steps):
        policy.observe(loads.multinomial_counts(probabilities, 4096, num_gpus, rng))
        decision = policy.check()
        if decision is not None:
            decisions.append(decision)
            policy.commit(decision)
    return policy, decisions


def test_policy_re_places_at_the_interval_and_stops_once_balanced():
    policy, decisions = policy_run(steps=12, interval=3)
    assert len(decisions) == 4                       # checked at calls 3, 6, 9, 12
    assert decisions[0].replace and decisions[0].predicted_new < decisions[0].predicted_current
    assert decisions[0].predicted_current > 1.3 and decisions[0].predicted_new <= 1.01
    assert policy.replacements >= 1 and policy.placement.logcnt.max() > 2
    assert not decisions[-1].replace or len(decisions[-1].moves) < len(decisions[0].moves)


def test_interval_zero_never_checks():
    policy, decisions = policy_run(steps=5, interval=0)
    assert decisions == [] and policy.replacements == 0


def test_threshold_and_migration_cost_gate_the_re_placement():
    expensive = MigrationCost(bytes_per_slot=1e12, bandwidth_gbps=1.0)
    policy, decisions = policy_run(steps=2, interval=2, threshold=0.01, migration=expensive, ms_per_token=1e-6)
    assert not decisions[0].replace and "migration" in decisions[0].reason and policy.replacements == 0
    policy, decisions = policy_run(steps=2, interval=2, threshold=5.0, ms_per_token=1.0)
    assert not decisions[0].replace and "threshold" in decisions[0].reason
    policy, decisions = policy_run(steps=2, interval=2, threshold=0.01, ms_per_token=1.0)
    assert decisions[0].replace and decisions[0].gain_ms > decisions[0].migration_ms
    # Expert time not measured (micromoe analyze replays counts only): the threshold alone decides,
    # even against an expensive migration (a gain of 0 ms used to refuse every re-placement).
    policy, decisions = policy_run(steps=2, interval=2, threshold=0.01, migration=expensive)
    assert decisions[0].replace and policy.replacements == 1


def test_every_rank_decides_identically():
    """Rule 2: two policies fed the same counts (as every rank is) make the same decisions, even
    when one of them did unrelated planning work in between."""
    first, a = policy_run(steps=8, interval=2, seed=4)
    asymmetric.asymmetric_placement(zipf_load(64, 1.0), 16, 8)
    second, b = policy_run(steps=8, interval=2, seed=4)
    assert [d.replace for d in a] == [d.replace for d in b]
    assert np.array_equal(first.placement.phy2log, second.placement.phy2log)
    assert [d.moves for d in a] == [d.moves for d in b]


def test_record_migration_refits_the_model():
    policy, decisions = policy_run(steps=1, interval=1, migration=MigrationCost(1e9, 10.0, 0.0))
    moves = decisions[0].moves
    predicted = policy.migration.estimate_ms(moves, 8)
    # 1 GB slots at 10 GB/s: the prior's transfer time dominates, so a migration measured twice as
    # long halves the bandwidth rather than adding a fixed cost.
    policy.record_migration(2 * predicted, moves)
    assert policy.migration.estimate_ms(moves, 8) == pytest.approx(2 * predicted, rel=1e-3)
    assert policy.migration.bandwidth_gbps == pytest.approx(5.0, rel=1e-2)
    assert policy.migration.latency_ms < 0.01 * predicted
    fitted = policy.migration
    for bad in (float("nan"), 0.0, -3.0):  # degenerate measurements keep the model
        policy.record_migration(bad, moves)
    policy.record_migration(5.0, [])
    assert policy.migration == fitted and len(policy.migration_samples) == 1


# ------------------------------------------------------------------ slot moves


def test_slot_moves_round_trip_and_move_only_what_changed():
    old = placements.symmetric(8, 32, 2)
    new = align_slots(old, asymmetric.asymmetric_placement(zipf_load(32, 1.5), 8, 8))
    moves = slot_moves(old, new)
    # Replay the moves on a copy of the old table, as a migration would (sources read from the old one).
    table = old.phy2log.copy()
    for m in moves:
        assert old.phy2log[m.src_rank, m.src_slot] == m.expert        # the source really holds it
        table[m.dst_rank, m.dst_slot] = old.phy2log[m.src_rank, m.src_slot]
    assert np.array_equal(table, new.phy2log)
    assert len(moves) == int((old.phy2log != new.phy2log).sum())
    assert slot_moves(new, new) == []


def test_align_slots_renames_slots_to_keep_entries():
    old = placements.symmetric(8, 32, 2)
    shuffled = Placement(old.phy2log[:, ::-1].copy(), 32)      # same placement, slots renamed
    assert slot_moves(old, align_slots(old, shuffled)) == []
    assert len(slot_moves(old, shuffled)) > 0


def test_moves_prefer_local_copies_and_spread_sends():
    old = Placement(np.array([[0, 2], [0, 3], [1, 2], [1, 3]]), 4)
    new = Placement(np.array([[0, 2], [1, 3], [0, 2], [1, 3]]), 4)
    moves = slot_moves(old, new)
    assert [(m.dst_rank, m.dst_slot, m.expert, m.src_rank, m.src_slot) for m in moves] == [
        (1, 0, 1, 2, 0), (2, 0, 0, 0, 0)]
    cost = MigrationCost(bytes_per_slot=1e6, bandwidth_gbps=1.0, latency_ms=0.0)
    assert cost.bytes_moved(moves) == 2e6 and cost.estimate_ms(moves, 4) == pytest.approx(1.0)
    # Two new copies of expert 0 (held by GPUs 0 and 1) come from different senders.
    old = Placement(np.array([[0, 2], [0, 2], [1, 2], [1, 3]]), 4)
    new = Placement(np.array([[0, 2], [1, 2], [0, 2], [0, 3]]), 4)
    assert [(m.dst_rank, m.expert, m.src_rank) for m in slot_moves(old, new)] == [(1, 1, 2), (2, 0, 0), (3, 0, 1)]


def test_a_failing_search_keeps_the_placement_and_is_counted(monkeypatch):
    from micromoe_megatron.core import forecast

    policy, _ = policy_run(steps=1, interval=0)
    policy.interval = 1

    def broken(*args, **kwargs):
        raise RuntimeError("placement LP: time limit")

    monkeypatch.setattr(forecast, "placement_optimum", broken)
    before = policy.placement
    decision = policy.check()
    assert not decision.replace and decision.placement is before and "time limit" in decision.reason
    assert policy.failures == 1
    with pytest.raises(ValueError, match=r"load: expected \[32\]"):
        policy.history.observe(np.ones(31))


def test_stress_tier_only_breaks_ties_and_gets_a_bounded_share_of_the_search():
    """A stress no table can meet (an expert 100x heavier) never costs balance on the forecast, and
    once the forecast is balanced the search spends at most STRESS_SHARE of its budget on it."""
    forecast = np.ones(8)
    start = placements.symmetric(4, 8, 2).phy2log
    score = asymmetric.ScenarioScore(forecast, 4, stress=100.0, stress_experts=4)
    assert score.evaluate(start)[0][0] <= asymmetric.GOOD_ENOUGH < score.evaluate(start)[0][1]
    table, worst, used = asymmetric.improve_table(start, None, 100, score=score)
    assert worst <= asymmetric.GOOD_ENOUGH                       # the forecast stays balanced
    assert 1 < used <= 1 + int(asymmetric.STRESS_SHARE * 100)    # it did search, within its share
    assert score.evaluate(table)[0] <= score.evaluate(start)[0]  # and never made the key worse
