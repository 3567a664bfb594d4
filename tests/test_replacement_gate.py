"""The launcher policy's time gate (mcore/replacement.py AdaptivePolicy) and the expert timer that feeds
it (mcore/expert_timer.py), single-process. That every rank gets the same measurements is checked on
4 gloo ranks in test_migration.py (test_ranks_that_disagree_keep_the_placement)."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from micromoe_megatron.core import loads
from micromoe_megatron.core.forecast import MigrationCost
from micromoe_megatron.core.migration_plan import plan_migration
from micromoe_megatron.core.placement import symmetric
from micromoe_megatron.mcore.expert_timer import ExpertTimer
from micromoe_megatron.mcore.replacement import (FORWARD_AND_BACKWARD, AdaptivePolicy, LayerMeasurements,
                                                 _takes_measurements)

GPUS, EXPERTS = 8, 32


def skewed_history(micro_batches=4, skew=1.5, seed=0) -> np.ndarray:
    """int64 ``[K, F, E]`` Zipf counts that a symmetric placement cannot balance."""
    rng = np.random.default_rng(seed)
    probabilities = loads.zipf_probabilities(EXPERTS, skew, rng)
    return np.stack([loads.multinomial_counts(probabilities, 4096, GPUS, rng) for _ in range(micro_batches)])


def measured(ms_per_token=1e-3, migration=MigrationCost(bytes_per_slot=1e6), per_check=10, groups=1, tokens=1000):
    return LayerMeasurements(ms_per_token, tokens, per_check, groups, migration)


def test_time_gate_refuses_below_the_measured_migration_cost_and_accepts_above():
    current, history = symmetric(GPUS, EXPERTS, 2), skewed_history()
    policy = AdaptivePolicy(threshold=1.01)
    cheap = measured(migration=MigrationCost(bytes_per_slot=1.0, latency_ms=0.0))
    accepted, new = policy.decide(history, current, cheap)
    assert accepted.replace and accepted.predicted_current > 1.3 and accepted.predicted_new < 1.05
    assert accepted.gain_ms > accepted.migration_ms and "gain" in accepted.reason
    # Gain (ms) = LP optimum drop (tokens per micro-batch) x measured forward ms/token x 3 x micro-batches.
    drop = (accepted.predicted_current - accepted.predicted_new) * history.sum(axis=(1, 2)).mean() / GPUS
    assert accepted.gain_ms == pytest.approx(drop * 1e-3 * FORWARD_AND_BACKWARD * 10, rel=0.2)
    # A measured migration (the model fitted to it) just above / just below that gain flips the
    # decision; the controller records the plan that ran.
    plan = plan_migration(current, new)

    def fitted(ms):
        return cheap.migration.fitted([cheap.migration.sample(plan, GPUS, ms)])

    for factor, replace in ((2.0, False), (0.5, True)):
        verdict, _ = policy.decide(history, current, dataclasses.replace(cheap, migration=fitted(factor * accepted.gain_ms)))
        assert verdict.replace is replace, verdict.reason
        # The gate prices the plan that would run: the measured move itself.
        assert verdict.migration_ms == pytest.approx(factor * accepted.gain_ms, rel=1e-3)
        assert ("<= migration" in verdict.reason) is not replace
    # The gain scales with the horizon: a longer interval pays for the same migration.
    longer = dataclasses.replace(cheap, migration=fitted(2 * accepted.gain_ms), micro_batches_per_check=40)
    assert policy.decide(history, current, longer)[0].replace
    # History summed over 4 MicroEP groups: each group's gain is a quarter.
    assert policy.decide(history, current, dataclasses.replace(cheap, groups=4))[0].gain_ms == pytest.approx(
        accepted.gain_ms / 4)


def test_threshold_zero_re_places_whatever_the_cost_and_the_threshold_still_gates():
    current, history = symmetric(GPUS, EXPERTS, 2), skewed_history()
    expensive = measured(migration=MigrationCost(bytes_per_slot=1e15, bandwidth_gbps=1.0))
    policy = AdaptivePolicy(threshold=0.0)
    new = policy(3, history, current, expensive)
    verdict = policy.verdict(3)
    assert new is not None and verdict.replace and verdict.migration_ms > verdict.gain_ms
    assert policy.predicted_max_mean(3) == verdict.predicted_new
    # Threshold above the predicted max/mean: kept, whatever the time says.
    high = AdaptivePolicy(threshold=5.0)
    assert high(3, history, current, measured(ms_per_token=1.0)) is None
    assert "threshold" in high.verdict(3).reason
    # No measurements (a three-argument call): the threshold alone decides, the log says so.
    gate = AdaptivePolicy(threshold=1.01)
    assert gate(3, history, current) is not None and "not measured" in gate.verdict(3).reason
    assert math.isnan(gate.verdict(3).gain_ms)
    # Timed, but too fast to pay for the migration: kept.
    assert gate(3, history, current, measured(ms_per_token=1e-12)) is None
    assert "<= migration" in gate.verdict(3).reason
    # Nothing timed since the last check (e.g. CUDA-graphed experts): the threshold alone, said so.
    assert gate(3, history, current, measured(ms_per_token=0.0, tokens=0)) is not None
    assert "not measured" in gate.verdict(3).reason


def test_policy_is_a_pure_function_of_its_inputs():
    current, history = symmetric(GPUS, EXPERTS, 2), skewed_history(seed=3)
    inputs = measured(ms_per_token=1e-4)
    first = AdaptivePolicy(1.01)(1, history, current, inputs)
    policy = AdaptivePolicy(1.01)
    policy(1, skewed_history(seed=9), current, measured(ms_per_token=5.0))  # unrelated earlier call
    second = policy(1, history, current, inputs)
    assert (first is None) == (second is None)
    assert first is None or np.array_equal(first.phy2log, second.phy2log)


def test_controller_passes_measurements_only_to_policies_that_take_them():
    assert _takes_measurements(AdaptivePolicy(0.0))
    assert not _takes_measurements(lambda layer_number, history, current: None)
    assert _takes_measurements(lambda layer_number, history, current, measured=None: None)


def test_expert_timer_counts_forwards_once_and_not_recomputes():
    experts = torch.nn.Linear(16, 16)
    timer = ExpertTimer(experts)
    x = torch.randn(12, 16, requires_grad=True)
    experts(x)
    nanoseconds, tokens = timer.collect()
    assert tokens == 12 and nanoseconds > 0
    assert timer.collect() == (0, 0)                                  # reset by collect
    # Activation recompute runs the forward again inside backward: counted once.
    out = torch.utils.checkpoint.checkpoint(experts, torch.randn(5, 16, requires_grad=True), use_reentrant=False)
    out.sum().backward()
    assert timer.collect()[1] == 5
    timer.remove()
    experts(x)
    assert timer.collect() == (0, 0)
