"""Planner quotas: the integer optimum ceil(t*) (HiGHS and Eq. 3 as references), fewest remote tokens."""

import math

import numpy as np
import pytest

from micromoe_megatron.core import loads, placement
from micromoe_megatron.core.quota import QuotaPlanner
from micromoe_megatron.core.schedule import ReplicaScheduler
from micromoe_megatron.core.reference import lp_optimum, remote_floor


def drifting(gpus, experts, steps, skew, seed):
    rng = np.random.default_rng(seed)
    probabilities = loads.zipf_probabilities(experts, skew, rng)
    for _ in range(steps):
        probabilities = 0.7 * probabilities + 0.3 * loads.zipf_probabilities(experts, skew, rng)
        yield loads.multinomial_counts(probabilities, 4096, gpus, rng)


@pytest.mark.parametrize("gpus,experts,replicas", [(8, 32, 2), (16, 64, 2)])
@pytest.mark.parametrize("skew", [0.5, 1.0, 1.5])
@pytest.mark.parametrize("vectorised", [False, True], ids=["loops", "numpy"])
def test_remote_tokens_within_half_a_percent_of_the_floor_at_the_optimal_load(gpus, experts, replicas, skew,
                                                                              vectorised):
    layout = placement.symmetric(gpus, experts, replicas)
    scheduler = ReplicaScheduler(layout.holders, gpus)
    scheduler._planner.vectorised = vectorised  # both paths of the planner, on the same instances
    for tokens in drifting(gpus, experts, 6, skew, seed=11):
        plan = scheduler.plan(tokens)
        optimum = lp_optimum(layout.holders, tokens)                      # HiGHS, plain LPP 1
        assert plan.max_load == math.ceil(optimum - 1e-6)
        floor = remote_floor(layout.holders, tokens, plan.max_load)       # HiGHS min-cost LP
        assert floor <= plan.remote_tokens <= floor + 0.005 * tokens.sum()


def test_random_placements_and_replica_counts_meet_the_floor_closely():
    rng = np.random.default_rng(4)
    gaps = []
    for _ in range(40):
        gpus = int(rng.integers(3, 9))
        experts = int(rng.integers(2, 13))
        holders = [sorted(rng.choice(gpus, size=int(rng.integers(1, min(gpus, 4) + 1)), replace=False).tolist())
                   for _ in range(experts)]
        tokens = rng.integers(0, 200, size=(gpus, experts)) * (rng.random((gpus, experts)) < 0.8)
        plan = ReplicaScheduler(holders, gpus).plan(tokens)
        assert plan.max_load == math.ceil(placement.max_induced_density(holders, tokens.sum(axis=0), gpus) - 1e-9)
        floor = remote_floor(holders, tokens, plan.max_load)
        assert plan.remote_tokens >= floor
        gaps.append((plan.remote_tokens - floor) / max(tokens.sum(), 1))
    assert np.median(gaps) == 0.0 and max(gaps) <= 0.02


def test_never_more_remote_tokens_than_vanilla_ep_at_equal_balance():
    # The MicroEP layout that stacks d vanilla EP groups (expert e on GPU e // L of every group),
    # with counts that vanilla EP already balances perfectly: each source sends each vanilla GPU
    # the same number of tokens, split at random among that GPU's experts.
    gpus, experts, replicas = 8, 16, 2
    ep = gpus // replicas
    per_gpu = experts // ep
    holders = [[k * ep + e // per_gpu for k in range(replicas)] for e in range(experts)]
    owner = np.array([[(s // ep) * ep + e // per_gpu for e in range(experts)] for s in range(gpus)])
    rng = np.random.default_rng(6)
    for _ in range(20):
        tokens = rng.multinomial(300, np.full(per_gpu, 1 / per_gpu), size=(gpus, ep)).reshape(gpus, experts)
        vanilla_load = placement.vanilla_ep_load(tokens, ep)
        assert vanilla_load.min() == vanilla_load.max()
        vanilla_remote = int(tokens[owner != np.arange(gpus)[:, None]].sum())
        plan = ReplicaScheduler(holders, gpus).plan(tokens)
        assert plan.max_load == vanilla_load.max()
        assert plan.remote_tokens <= vanilla_remote


def test_the_certificate_subset_proves_the_capacity():
    layout = placement.symmetric(16, 32, 4)
    planner = QuotaPlanner(placement.pad_holders(layout.holders), 16)
    for tokens in drifting(16, 32, 10, 1.5, seed=2):
        result = planner.solve(tokens)
        assert result.capacity - 1 < result.bound <= result.capacity
        assert result.quota.sum(axis=0).max() <= result.capacity
        assert result.bound <= lp_optimum(layout.holders, tokens) + 1e-6


@pytest.mark.parametrize("vectorised", [False, True], ids=["loops", "numpy"])
def test_both_paths_reach_the_integer_optimum_on_random_replica_counts(vectorised):
    rng = np.random.default_rng(8)
    for _ in range(60):
        gpus = int(rng.integers(2, 10))
        experts = int(rng.integers(1, 14))
        holders = [sorted(rng.choice(gpus, size=int(rng.integers(1, gpus + 1)), replace=False).tolist())
                   for _ in range(experts)]
        tokens = rng.integers(0, rng.choice([3, 50, 1000]) + 1, size=(gpus, experts)) * (rng.random((gpus, experts)) < 0.7)
        planner = QuotaPlanner(placement.pad_holders(holders), gpus, vectorised=vectorised)
        result = planner.solve(tokens)
        optimum = placement.max_induced_density(holders, tokens.sum(axis=0), gpus)
        assert result.capacity == math.ceil(optimum - 1e-9)
        assert result.capacity - 1 < result.bound <= optimum + 1e-9
        quota = result.quota
        assert (quota >= 0).all() and np.array_equal(quota.sum(axis=1), tokens.sum(axis=0))
        assert quota.sum(axis=0).max(initial=0) <= result.capacity
        for e, gpus_of_e in enumerate(holders):
            assert not np.delete(quota[e], gpus_of_e).any()


def test_the_lp_hint_changes_only_the_work_never_the_plan():
    layout = placement.symmetric(16, 64, 2)
    planner = QuotaPlanner(placement.pad_holders(layout.holders), 16)
    asked = []

    def broken():
        raise RuntimeError("injected LP failure")

    for tokens in drifting(16, 64, 12, 1.5, seed=5):
        exact = lp_optimum(layout.holders, tokens)
        plain = planner.solve(tokens)
        for hint in (lambda: asked.append(exact) or exact, broken, lambda: math.nan, lambda: exact / 3):
            hinted = planner.solve(tokens, lp_optimum=hint)
            assert hinted.capacity == plain.capacity and np.array_equal(hinted.quota, plain.quota)
            assert hinted.augmentations == plain.augmentations  # the final build is the same work
    assert asked, "the sequence must need a cut, where the planner asks for the LP"
