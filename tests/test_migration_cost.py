"""The migration time model (core/migration_cost.py): features, the regularised fit, degenerate inputs,
and the re-placement time gate priced with it (issue 12). Single-process and cheap."""

from __future__ import annotations

import dataclasses
import math
import random

import numpy as np
import pytest

from micromoe_megatron.core import loads
from micromoe_megatron.core.forecast import slot_moves
from micromoe_megatron.core.migration_cost import (MAX_SAMPLES, MigrationCost, MigrationSample,
                                                   migration_features)
from micromoe_megatron.core.migration_plan import plan_migration
from micromoe_megatron.core.placement import Placement, symmetric
from micromoe_megatron.mcore.replacement import AdaptivePolicy, LayerMeasurements

SLOT = 2e5          # bytes: one slot of the small launch-test model (0.2 MB)
OBSERVED_MS = 20.8  # what one single-slot migration measured on 4 gloo CPU ranks


def synthetic(fixed_ms, round_ms, gbps, rounds=(1, 2, 4, 8, 16), slots=(SLOT, 10 * SLOT)):
    return [MigrationSample(r, r * size, fixed_ms + round_ms * r + r * size / (gbps * 1e9) * 1e3)
            for r in rounds for size in slots]


def coefficients(cost: MigrationCost) -> tuple[float, float, float]:
    return cost.latency_ms, cost.round_ms, cost.bandwidth_gbps


def old_rescaled_ms(prior: MigrationCost, measured: tuple[float, float], busiest_slots: float) -> float:
    """What the replaced ``MigrationCost.rescaled`` predicted: after a measured move of ``measured =
    (busiest slots, ms)`` only the bandwidth changed."""
    slots, ms = measured
    bandwidth = prior.bandwidth_gbps * (slots * prior.bytes_per_slot * prior.ms_per_byte) / (ms - prior.latency_ms)
    return prior.latency_ms + busiest_slots * prior.bytes_per_slot / (bandwidth * 1e9) * 1e3


def test_fit_recovers_known_coefficients():
    prior = MigrationCost(bytes_per_slot=SLOT)
    fitted = prior.fitted(synthetic(5.0, 2.5, 0.65))
    assert coefficients(fitted) == pytest.approx((5.0, 2.5, 0.65), rel=1e-2)
    # A true per-round cost of 0 stays 0 (non-negative fit), and the other terms are recovered.
    fitted = prior.fitted(synthetic(20.0, 0.0, 10.0))
    assert fitted.latency_ms == pytest.approx(20.0, rel=1e-2) and fitted.round_ms < 0.05
    assert fitted.bandwidth_gbps == pytest.approx(10.0, rel=2e-2)
    # Data below the prior (a faster machine) lowers the fixed cost down to 0, never below.
    fast = prior.fitted(synthetic(0.0, 0.01, 200.0))
    assert fast.latency_ms >= 0 and fast.latency_ms < 0.01 and fast.bandwidth_gbps > 100


def test_one_large_fixed_cost_prices_small_moves_at_it_and_big_moves_higher():
    prior = MigrationCost(bytes_per_slot=SLOT)
    one_slot = MigrationSample(1, SLOT, OBSERVED_MS)
    fitted = prior.fitted([one_slot])
    # The excess over the prior's 0.108 ms is fixed and per-round cost, not a 2600x slower link.
    assert fitted.latency_ms + fitted.round_ms == pytest.approx(OBSERVED_MS, rel=1e-3)
    assert fitted.latency_ms > 0.9 * OBSERVED_MS                 # a one-round excess: mostly fixed
    assert fitted.bandwidth_gbps > 0.75 * prior.bandwidth_gbps    # the old model: 0.01 GB/s
    single = [dataclasses.make_dataclass("M", ["src_rank", "dst_rank"])(0, 1)]
    assert fitted.estimate_ms(single, 4) == pytest.approx(OBSERVED_MS, rel=1e-3)
    # A 64 x 256 re-placement of 50 slots on 64 GPUs (symmetric, d = 2 -> swaps within slot columns).
    old, new = symmetric(64, 256, 2), swapped(symmetric(64, 256, 2), 25, seed=1)
    plan = plan_migration(old, new)
    rounds, nbytes = migration_features(plan, 64, SLOT)
    assert rounds >= 1 and nbytes >= SLOT
    big = fitted.estimate_ms(plan, 64)
    assert big > fitted.estimate_ms(single, 4)
    # ... and far below the old model's bandwidth-scaled price of the same move.
    assert big < 0.75 * old_rescaled_ms(prior, (1, OBSERVED_MS), nbytes / SLOT)
    # A move that is mostly bytes (1000 x larger slots) still costs its transfer time on top.
    heavy = dataclasses.replace(fitted, bytes_per_slot=1000 * SLOT)
    assert heavy.estimate_ms(plan, 64) > big + 0.9 * nbytes * 1000 * prior.ms_per_byte


def swapped(placement: Placement, pairs: int, seed: int) -> Placement:
    """``placement`` with ``pairs`` experts swapped between two GPUs within one slot column."""
    rng = np.random.default_rng(seed)
    table, done = placement.phy2log.copy(), 0
    while done < pairs:
        a, b = rng.integers(table.shape[0], size=2)
        slot = rng.integers(table.shape[1])
        ea, eb = table[a, slot], table[b, slot]
        if a == b or ea == eb or eb in table[a] or ea in table[b]:
            continue
        table[a, slot], table[b, slot] = eb, ea
        done += 1
    return Placement(table, placement.num_experts)


def test_fit_is_deterministic_and_order_independent():
    prior = MigrationCost(bytes_per_slot=SLOT)
    rng = np.random.default_rng(0)
    samples = [dataclasses.replace(s, ms=s.ms * float(rng.uniform(0.8, 1.25))) for s in synthetic(5.0, 2.5, 0.65)]
    fitted = prior.fitted(samples)
    shuffled = samples[:]
    random.Random(3).shuffle(shuffled)
    assert prior.fitted(shuffled) == fitted                       # bit-identical, whatever the order
    assert prior.fitted(list(reversed(samples))) == fitted
    # Refitting a fitted model pulls toward the original prior, not toward the last fit.
    assert fitted.fitted(samples) == fitted and fitted.prior == (0.1, 0.0, 25.0)
    assert fitted.fitted([]) == prior.fitted([]) and coefficients(fitted.fitted([])) == coefficients(prior)


def test_degenerate_inputs_keep_the_prior():
    prior = MigrationCost(bytes_per_slot=SLOT)
    bad = [MigrationSample(0, 0.0, 12.0),                        # no moves
           MigrationSample(1, SLOT, 0.0), MigrationSample(1, SLOT, -4.0),
           MigrationSample(1, SLOT, float("nan")), MigrationSample(1, SLOT, float("inf")),
           MigrationSample(float("nan"), SLOT, 3.0)]
    assert not any(s.usable for s in bad)
    assert coefficients(prior.fitted(bad)) == coefficients(prior)
    good = MigrationSample(2, 2 * SLOT, 30.0)
    assert prior.fitted(bad + [good]) == prior.fitted([good])
    assert prior.estimate_ms([], 4) == 0.0 and migration_features([], 4, SLOT) == (0.0, 0.0)
    assert prior.sample([], 4, 5.0).usable is False
    for field, value in (("bandwidth_gbps", 0.0), ("bandwidth_gbps", float("nan")), ("latency_ms", -1.0),
                         ("round_ms", float("inf")), ("bytes_per_slot", -1.0)):
        with pytest.raises(ValueError, match=f"MigrationCost.{field}"):
            MigrationCost(**{field: value})
    # Measurements saying transfers are free keep a finite bandwidth.
    free = prior.fitted([MigrationSample(1, SLOT, 5.0), MigrationSample(4, 100 * SLOT, 5.0)])
    assert math.isfinite(free.bandwidth_gbps) and free.bandwidth_gbps > 0


def test_features_come_from_the_plan_that_runs_or_the_greedy_moves():
    old = Placement(np.array([[0, 2], [0, 3], [1, 2], [1, 3]]), 4)
    new = Placement(np.array([[0, 2], [1, 3], [0, 2], [1, 3]]), 4)
    greedy = slot_moves(old, new)                                   # two remote copies, two senders
    plan = plan_migration(old, new)
    assert migration_features(greedy, 4, SLOT) == (1.0, SLOT)
    assert migration_features(plan, 4, SLOT) == (1.0, SLOT)        # one round, one slot per rank
    # Bigger: the plan's rounds differ from the greedy degree bound (relays save rounds, stashes
    # add some), which is why the gate prices the plan.
    old, new = symmetric(16, 64, 2), swapped(symmetric(16, 64, 2), 20, seed=2)
    plan = plan_migration(old, new)
    assert migration_features(plan, 16, SLOT)[0] == sum(any(not m.local for m in r) for r in plan.rounds) >= 1
    assert migration_features(slot_moves(old, new), 16, SLOT)[0] >= 1
    # Local copies count as both a send and a receive of their rank, at a tenth of the bytes, and
    # a migration of local copies only runs no exchange round.
    local = [dataclasses.make_dataclass("M", ["src_rank", "dst_rank"])(2, 2)] * 3
    assert migration_features(local, 4, SLOT) == (0.0, pytest.approx(0.3 * SLOT))
    assert MigrationCost(SLOT, 25.0, 0.5, 7.0).estimate_ms(local, 4) == pytest.approx(0.5 + 0.3 * SLOT * 4e-8)


def test_record_migration_keeps_the_newest_samples():
    """ReplacementPolicy.record_migration refits from the newest MAX_SAMPLES measurements."""
    from micromoe_megatron.core.forecast import ReplacementPolicy

    policy = ReplacementPolicy(symmetric(4, 8, 2), interval=1, migration=MigrationCost(bytes_per_slot=SLOT))
    single = [dataclasses.make_dataclass("M", ["src_rank", "dst_rank"])(0, 1)]
    for i in range(MAX_SAMPLES + 5):
        policy.record_migration(100.0 + i, single)
    assert len(policy.migration_samples) == MAX_SAMPLES
    assert [s.ms for s in policy.migration_samples] == [100.0 + i for i in range(5, MAX_SAMPLES + 5)]
    assert policy.migration == MigrationCost(bytes_per_slot=SLOT).fitted(policy.migration_samples)


# ------------------------------------------------------------------ the time gate (issue 12)

GPUS, EXPERTS = 8, 32


def skewed_history(seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    probabilities = loads.zipf_probabilities(EXPERTS, 1.5, rng)
    return np.stack([loads.multinomial_counts(probabilities, 4096, GPUS, rng) for _ in range(4)])


def test_gate_after_one_slow_small_migration_decides_as_an_engineer_would():
    """The observed launch: one single-slot migration took 20.8 ms against a 0.11 ms prior. The
    old model turned that into a 2600x slower link and refused every later re-placement; the
    fitted one prices a move at about the fixed cost plus its rounds, so it re-places when the
    gain clearly pays for that, and not when the gain is a few ms."""
    current, history = symmetric(GPUS, EXPERTS, 2), skewed_history()
    prior = MigrationCost(bytes_per_slot=SLOT)
    fitted = prior.fitted([MigrationSample(1, SLOT, OBSERVED_MS)])
    policy = AdaptivePolicy(threshold=1.01)

    def inputs(ms_per_token):
        return LayerMeasurements(ms_per_token, 1000, 2, 1, fitted, True)

    probe, new = policy.decide(history, current, inputs(1e-3))
    gain_per_unit = probe.gain_ms / 1e-3                     # gain (ms) per ms-per-token
    plan = plan_migration(current, new)
    rounds, nbytes = migration_features(plan, GPUS, SLOT)
    priced = fitted.estimate_ms(plan, GPUS)
    old = old_rescaled_ms(prior, (1, OBSERVED_MS), nbytes / SLOT)
    assert OBSERVED_MS <= priced < 0.75 * old, (rounds, nbytes, priced, old)
    # A gain of a few ms does not pay for a 20 ms migration: kept.
    few = policy.decide(history, current, inputs(5.0 / gain_per_unit))[0]
    assert not few.replace and "<= migration" in few.reason
    # A gain between the fitted price and the old model's price: re-placed now (the old model kept
    # the layer unbalanced forever here).
    middle = math.sqrt(priced * old)
    verdict = policy.decide(history, current, inputs(middle / gain_per_unit))[0]
    assert verdict.replace and verdict.gain_ms == pytest.approx(middle, rel=1e-6), verdict.reason
    assert verdict.migration_ms < verdict.gain_ms
    assert verdict.migration_ms == pytest.approx(priced, rel=1e-6)  # the plan that runs is priced
    # A gain above the fixed cost is priced on the plan, which the controller then reuses (only for
    # those tables); below the fixed cost nothing is planned.
    policy(7, history, current, inputs(5.0 / gain_per_unit))
    assert policy.migration_plan(7, current, new) is None
    assert fitted.latency_ms < priced
    policy(7, history, current, inputs(0.5 * (fitted.latency_ms + priced) / gain_per_unit))
    assert not policy.verdict(7).replace and policy.verdict(7).migration_ms == pytest.approx(priced, rel=1e-6)
    made = policy.migration_plan(7, current, new)
    assert made is not None and made.rounds == plan.rounds
    assert policy.migration_plan(7, new, current) is None and policy.migration_plan(8, current, new) is None
