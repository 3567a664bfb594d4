"""Schedule: LP optimum = Eq. 3, integer plans within ceil(LP), routes, determinism, fallbacks."""

import hashlib
import math
import subprocess
import sys

import numpy as np
import pytest

from micromoe_megatron.core import placement
from micromoe_megatron.core.placement import pad_holders
from micromoe_megatron.core.routing import route_tokens
from micromoe_megatron.core.schedule import ReplicaScheduler, SolverFailure


def random_instance(rng, max_gpus=8):
    """Random holders (1..F replicas per expert) and skewed token counts."""
    num_gpus = int(rng.integers(2, max_gpus + 1))
    num_experts = int(rng.integers(1, 12))
    holders = [sorted(rng.choice(num_gpus, size=int(rng.integers(1, num_gpus + 1)), replace=False).tolist())
               for _ in range(num_experts)]
    scale = rng.choice([0, 3, 50, 1000])
    tokens = rng.integers(0, scale + 1, size=(num_gpus, num_experts)) * (rng.random((num_gpus, num_experts)) < 0.7)
    return holders, tokens, num_gpus


def check_plan(plan, holders, tokens):
    """Every invariant a plan must satisfy."""
    num_gpus, num_experts = tokens.shape
    load = tokens.sum(axis=0)
    assert plan.quota.shape == (num_experts, num_gpus)
    assert (plan.quota >= 0).all()
    assert np.array_equal(plan.quota.sum(axis=1), load), "quotas must sum to each expert's load"
    for e in range(num_experts):
        off_holders = np.setdiff1d(np.arange(num_gpus), holders[e])
        assert not plan.quota[e, off_holders].any(), "quota only on holders"
    routes = plan.routes
    assert (routes[:, 3] > 0).all()
    sent = np.zeros_like(tokens)
    np.add.at(sent, (routes[:, 0], routes[:, 1]), routes[:, 3])
    assert np.array_equal(sent, tokens), "routes carry exactly the tokens"
    received = np.zeros_like(plan.quota)
    np.add.at(received, (routes[:, 1], routes[:, 2]), routes[:, 3])
    assert np.array_equal(received, plan.quota), "routes deliver exactly the quotas"
    keys = [tuple(r[:3]) for r in routes.tolist()]
    assert keys == sorted(set(keys)), "routes sorted by (src, expert, dst), no duplicates"


def test_random_instances_meet_every_invariant_and_the_eq3_bound():
    rng = np.random.default_rng(0)
    for _ in range(150):
        holders, tokens, num_gpus = random_instance(rng)
        plan = ReplicaScheduler(holders, num_gpus, gpus_per_node=rng.choice([None, 1, 2])
                                if num_gpus % 2 == 0 else None).plan(tokens)
        check_plan(plan, holders, tokens)
        assert not plan.fallback
        bound = placement.max_induced_density(holders, tokens.sum(axis=0), num_gpus)
        assert plan.lp_optimum == pytest.approx(bound, rel=1e-7, abs=1e-7)
        assert plan.max_load <= math.ceil(bound - 1e-9)


@pytest.mark.parametrize("gpus,experts,replicas", [(8, 32, 2), (16, 64, 2), (16, 32, 4)])
def test_symmetric_placements_on_zipf_loads(gpus, experts, replicas):
    rng = np.random.default_rng(1)
    layout = placement.symmetric(gpus, experts, replicas)
    scheduler = ReplicaScheduler(layout.holders, gpus, gpus_per_node=4)
    weights = rng.permutation(np.arange(1, experts + 1) ** -0.8)
    for _ in range(20):
        tokens = rng.multinomial(4096, weights / weights.sum(), size=gpus)
        plan = scheduler.plan(tokens)
        check_plan(plan, layout.holders, tokens)
        assert plan.max_load <= math.ceil(plan.lp_optimum - 1e-9)
        assert plan.lp_optimum == pytest.approx(
            placement.max_induced_density(layout.holders, tokens.sum(axis=0), gpus), rel=1e-9)


def test_rounding_needs_the_repair_and_still_meets_ceil():
    # Three GPUs in a triangle, odd loads: the LP optimum is fractional (t* = 7/3 * ...).
    holders = [(0, 1), (1, 2), (0, 2)]
    tokens = np.array([[3, 0, 2], [0, 2, 0], [0, 0, 0]])
    plan = ReplicaScheduler(holders, 3).plan(tokens)
    check_plan(plan, holders, tokens)
    assert plan.lp_optimum == pytest.approx(7 / 3)
    assert plan.max_load == 3


def test_repair_moves_excess_along_an_augmenting_path():
    scheduler = ReplicaScheduler([(0, 1), (1, 2)], 3)
    quota = np.array([[0, 4, 0], [0, 2, 0]])      # GPU 1 holds everything: 6 > capacity 2
    scheduler._repair_overload(quota, capacity=2)
    assert quota.sum(axis=0).max() <= 2 and np.array_equal(quota.sum(axis=1), [4, 2])
    with pytest.raises(SolverFailure):
        scheduler._repair_overload(np.array([[0, 4, 0], [0, 2, 0]]), capacity=1)


def test_locality_first_then_same_node_then_remote():
    # Expert 0 on GPUs 0 and 3; nodes {0, 1} and {2, 3}.
    tokens = np.array([[4], [3], [5], [2]])
    quota = np.array([[6, 0, 0, 8]])
    routes = route_tokens(tokens, quota, pad_holders([(0, 3)]), gpus_per_node=2)
    flows = {(s, d): c for s, _, d, c in routes.tolist()}
    assert flows[(0, 0)] == 4 and flows[(3, 3)] == 2          # local first
    assert flows[(1, 0)] == 2 and flows[(2, 3)] == 5          # then same node
    assert flows[(1, 3)] == 1                                 # the rest remote
    assert sum(flows.values()) == 14


def test_single_holder_placements_skip_the_lp_and_match_vanilla_ep():
    layout = placement.vanilla(4, 8)
    scheduler = ReplicaScheduler(layout.holders, 4)
    tokens = np.arange(32).reshape(4, 8)
    plan = scheduler.plan(tokens)
    check_plan(plan, layout.holders, tokens)
    assert scheduler.solves == 0
    assert plan.load_per_gpu.tolist() == [tokens[:, 2 * g:2 * g + 2].sum() for g in range(4)]


def test_empty_batch():
    layout = placement.symmetric(4, 4, 2)
    plan = ReplicaScheduler(layout.holders, 4).plan(np.zeros((4, 4), dtype=int))
    assert plan.max_load == 0 and plan.imbalance == 1.0 and len(plan.routes) == 0


def zipf_sequence(gpus, experts, steps, seed=0):
    rng = np.random.default_rng(seed)
    weights = rng.permutation(np.arange(1, experts + 1) ** -1.0)
    return [rng.multinomial(2048, weights / weights.sum(), size=gpus) for _ in range(steps)]


def test_warm_resolves_match_cold_solves():
    layout = placement.symmetric(16, 64, 2)
    warm = ReplicaScheduler(layout.holders, 16)
    for tokens in zipf_sequence(16, 64, 30):
        hot, cold = warm.plan(tokens), ReplicaScheduler(layout.holders, 16, warm_start=False).plan(tokens)
        assert hot.lp_optimum == pytest.approx(cold.lp_optimum, rel=1e-9)
        assert hot.max_load == cold.max_load
        check_plan(hot, layout.holders, tokens)


PLAN_HASH_SCRIPT = """
import hashlib, sys
sys.path.insert(0, {root!r})
from tests.test_schedule import plan_sequence_digest
print(plan_sequence_digest())
"""


def plan_sequence_digest() -> str:
    layout = placement.symmetric(16, 64, 2)
    scheduler = ReplicaScheduler(layout.holders, 16, gpus_per_node=8)
    digest = hashlib.sha256()
    for tokens in zipf_sequence(16, 64, 25, seed=7):
        plan = scheduler.plan(tokens)
        digest.update(plan.quota.tobytes())
        digest.update(plan.routes.tobytes())
    return digest.hexdigest()


def test_two_processes_produce_byte_identical_plans():
    import pathlib
    root = str(pathlib.Path(__file__).resolve().parents[1])
    other = subprocess.run([sys.executable, "-c", PLAN_HASH_SCRIPT.format(root=root)],
                           capture_output=True, text=True, check=True)
    assert other.stdout.strip() == plan_sequence_digest()


@pytest.mark.parametrize("fault", ["raise", "highspy_error", "nan", "negative", "wrong_sums", "low_optimum"])
def test_solver_faults_fall_back_to_a_valid_counted_plan(monkeypatch, fault):
    layout = placement.symmetric(8, 16, 2)
    scheduler = ReplicaScheduler(layout.holders, 8)
    tokens = zipf_sequence(8, 16, 1)[0]
    honest = scheduler._solve_lp

    def broken(load):
        x, t = honest(load)
        if fault == "raise":
            raise SolverFailure("injected")
        if fault == "highspy_error":
            raise RuntimeError("injected error inside the solver library")
        if fault == "nan":
            return np.full_like(x, np.nan), t
        if fault == "negative":
            return x - 5.0, t
        if fault == "wrong_sums":
            return x * 0.5, t
        return x, t / 4  # claims an optimum below what is achievable

    monkeypatch.setattr(scheduler, "_solve_lp", broken)
    plan = scheduler.plan(tokens)
    assert plan.fallback and plan.fallback_reason
    assert scheduler.fallbacks == 1
    check_plan(plan, layout.holders, tokens)
    assert plan.to_json()["lp_optimum"] is None  # no trusted optimum: JSON null, not NaN


def test_time_limit_gives_a_fallback_and_the_next_step_recovers():
    layout = placement.symmetric(16, 64, 2)
    scheduler = ReplicaScheduler(layout.holders, 16, time_limit_s=0.0)
    tokens = zipf_sequence(16, 64, 1)[0]
    plan = scheduler.plan(tokens)
    assert plan.fallback and "time limit" in plan.fallback_reason.lower()
    check_plan(plan, layout.holders, tokens)
    scheduler.time_limit_s = 1.0
    assert not scheduler.plan(tokens).fallback


@pytest.mark.parametrize("holders,tokens,message", [
    ([(0,), ()], [[1, 1]], r"holders\[1\]: expert 1 has no holder"),
    ([(0,), (4,)], [[1, 1]], r"holders\[1\]: GPU ids must lie in \[0, 1\)"),
    ([(0, 0)], [[1]], "listed twice"),
    ([(0,)], [[1, 2]], "tokens: expected shape"),
    ([(0,)], [[-1]], r"tokens\[0\]\[0\]: counts must be >= 0"),
    ([(0,)], [[1.5]], "tokens: counts must be whole numbers"),
    ([(0,), (0,)], [[2**62, 2**62]], "total must fit in int64"),
])
def test_bad_instances_name_the_field(holders, tokens, message):
    with pytest.raises(ValueError, match=message):
        ReplicaScheduler(holders, 1).plan(np.array(tokens))
