"""Schedule: integer optimum = ceil(Eq. 3), HiGHS agrees, routes, plans a pure function of the counts, fallbacks."""

import dataclasses
import hashlib
import math
import subprocess
import sys

import numpy as np
import pytest

from micromoe_megatron.core import loads, placement
from micromoe_megatron.core.placement import pad_holders
from micromoe_megatron.core.routing import route_tokens
from micromoe_megatron.core.schedule import ReplicaScheduler


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
        gpus_per_node = rng.choice([None, 1, 2]) if num_gpus % 2 == 0 else None
        bound = placement.max_induced_density(holders, tokens.sum(axis=0), num_gpus)
        plain = ReplicaScheduler(holders, num_gpus, gpus_per_node=gpus_per_node).plan(tokens)
        with_lp = ReplicaScheduler(holders, num_gpus, gpus_per_node=gpus_per_node, solve_lp=True).plan(tokens)
        for plan in (plain, with_lp):
            check_plan(plan, holders, tokens)
            assert not plan.fallback
            assert plan.max_load == math.ceil(bound - 1e-9)         # the integer optimum, exactly
        assert with_lp.lp_optimum == pytest.approx(bound, rel=1e-7, abs=1e-7)
        assert with_lp.lp_solved == any(len(h) > 1 for h in holders)  # one holder each: nothing to solve
        # Without solve_lp HiGHS runs only when a cut shows the cheap bounds are too low; else the
        # reported value is the planner's certified lower bound.
        assert plain.lp_optimum == pytest.approx(bound, rel=1e-7) if plain.lp_solved else plain.lp_optimum <= bound + 1e-9
        assert np.array_equal(plain.quota, with_lp.quota)            # HiGHS never changes the plan


@pytest.mark.parametrize("gpus,experts,replicas", [(8, 32, 2), (16, 64, 2), (16, 32, 4)])
def test_symmetric_placements_on_zipf_loads(gpus, experts, replicas):
    rng = np.random.default_rng(1)
    layout = placement.symmetric(gpus, experts, replicas)
    scheduler = ReplicaScheduler(layout.holders, gpus, gpus_per_node=4, solve_lp=True)
    for skew in (0.5, 1.0, 1.5):
        weights = rng.permutation(np.arange(1, experts + 1) ** -skew)
        for _ in range(6):
            tokens = rng.multinomial(4096, weights / weights.sum(), size=gpus)
            plan = scheduler.plan(tokens)
            check_plan(plan, layout.holders, tokens)
            optimum = placement.max_induced_density(layout.holders, tokens.sum(axis=0), gpus)
            assert plan.lp_optimum == pytest.approx(optimum, rel=1e-9)
            assert plan.max_load == math.ceil(optimum - 1e-9)


def test_fractional_optimum_rounds_up_to_its_ceiling():
    # Three GPUs in a triangle, odd loads: the LP optimum is fractional (7/3).
    holders = [(0, 1), (1, 2), (0, 2)]
    tokens = np.array([[3, 0, 2], [0, 2, 0], [0, 0, 0]])
    plan = ReplicaScheduler(holders, 3, solve_lp=True).plan(tokens)
    check_plan(plan, holders, tokens)
    assert plan.lp_optimum == pytest.approx(7 / 3)
    assert plan.max_load == 3


def test_a_dense_subset_raises_the_capacity_by_a_cut():
    # GPUs 0 and 1 share a hot expert; GPU 2 idles: T = ceil(total / F) = 4 is impossible, the
    # cut {0, 1} gives 10 / 2 = 5, which is the optimum.
    holders = [(0, 1), (2,)]
    tokens = np.array([[6, 0], [4, 0], [0, 2]])
    plan = ReplicaScheduler(holders, 3).plan(tokens)
    check_plan(plan, holders, tokens)
    assert plan.max_load == 5 and plan.lp_optimum == pytest.approx(5.0)
    assert plan.remote_tokens == 1                          # only GPU 0's sixth token moves


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
    warm = ReplicaScheduler(layout.holders, 16, solve_lp=True)
    for tokens in zipf_sequence(16, 64, 30):
        hot = warm.plan(tokens)
        cold = ReplicaScheduler(layout.holders, 16, solve_lp=True, warm_start=False).plan(tokens)
        assert hot.lp_optimum == pytest.approx(cold.lp_optimum, rel=1e-9)
        assert plan_bytes(hot) == plan_bytes(cold)
        check_plan(hot, layout.holders, tokens)


def plan_bytes(plan) -> bytes:
    return plan.quota.tobytes() + plan.routes.tobytes()


def drifting_sequence(gpus, experts, steps, skew, seed=0):
    """Counts whose expert popularity drifts: each step mixes the last one with a fresh draw."""
    rng = np.random.default_rng(seed)
    probabilities = loads.zipf_probabilities(experts, skew, rng)
    sequence = []
    for _ in range(steps):
        probabilities = 0.7 * probabilities + 0.3 * loads.zipf_probabilities(experts, skew, rng)
        sequence.append(loads.multinomial_counts(probabilities, 2048, gpus, rng))
    return sequence


@pytest.mark.parametrize("gpus,experts,replicas,vectorised", [
    (8, 32, 2, False), (16, 64, 2, False), (16, 32, 4, False), (16, 64, 2, True), (16, 32, 4, True)])
def test_a_long_running_scheduler_and_a_fresh_one_give_byte_identical_plans(gpus, experts, replicas, vectorised):
    layout = placement.symmetric(gpus, experts, replicas)

    def scheduler(solve_lp):
        made = ReplicaScheduler(layout.holders, gpus, gpus_per_node=4, solve_lp=solve_lp)
        made._planner.vectorised = vectorised
        return made

    for skew in (0.5, 1.5):
        sequence = drifting_sequence(gpus, experts, 25, skew, seed=3)
        for solve_lp in (False, True):
            veteran = scheduler(solve_lp)
            for tokens in sequence[:20]:
                veteran.plan(tokens)
            for tokens in sequence[20:]:
                assert plan_bytes(veteran.plan(tokens)) == plan_bytes(scheduler(solve_lp).plan(tokens))


def test_a_scheduler_forced_to_fail_once_agrees_with_the_others_at_every_other_step(monkeypatch):
    layout = placement.symmetric(8, 32, 2)
    sequence = drifting_sequence(8, 32, 30, 1.0, seed=5)
    steady = ReplicaScheduler(layout.holders, 8, solve_lp=True)
    faulty = ReplicaScheduler(layout.holders, 8, solve_lp=True)
    honest = faulty._solve_lp
    for step, tokens in enumerate(sequence):
        monkeypatch.setattr(faulty, "_solve_lp", (lambda load: 1 / 0) if step == 10 else honest)
        mine, theirs = faulty.plan(tokens), steady.plan(tokens)
        assert mine.fallback == (step == 10)
        if step != 10:
            assert plan_bytes(mine) == plan_bytes(theirs)
    assert faulty.fallbacks == 1 and steady.fallbacks == 0


def test_the_work_limit_is_a_count_so_every_rank_falls_back_at_the_same_steps():
    layout = placement.symmetric(16, 64, 2)
    sequence = drifting_sequence(16, 64, 20, 1.5, seed=2)
    unlimited = ReplicaScheduler(layout.holders, 16, work_limit=None)
    work = sorted(unlimited.plan(tokens).augmentations for tokens in sequence)
    limit = work[len(work) // 2]  # the median: some plans need more, some less
    decisions = []
    for history in (0, 7):  # one scheduler has planned other batches before
        scheduler = ReplicaScheduler(layout.holders, 16, work_limit=limit)
        for tokens in sequence[:history]:
            scheduler.plan(tokens)
        plans = [scheduler.plan(tokens) for tokens in sequence[history:]]
        decisions.append([(p.fallback, plan_bytes(p)) for p in plans])
        for tokens, plan in zip(sequence[history:], plans):
            check_plan(plan, layout.holders, tokens)
    assert decisions[0][7:] == decisions[1]
    assert any(fallback for fallback, _ in decisions[0]), "the limit must bite on this sequence"
    assert not all(fallback for fallback, _ in decisions[0])


def test_a_slow_host_plans_exactly_like_a_fast_one(monkeypatch):
    # A rank that is descheduled for seconds mid-plan: the clock jumps, the plan must not change.
    import micromoe_megatron.core.schedule as schedule_module

    layout = placement.symmetric(16, 64, 2)
    sequence = drifting_sequence(16, 64, 8, 1.5, seed=9)
    fast = [plan_bytes(ReplicaScheduler(layout.holders, 16, solve_lp=True).plan(t)) for t in sequence]
    clock = iter(range(0, 10**9, 7))
    monkeypatch.setattr(schedule_module.time, "perf_counter", lambda: float(next(clock)))
    slow_scheduler = ReplicaScheduler(layout.holders, 16, solve_lp=True)
    slow = [slow_scheduler.plan(t) for t in sequence]
    assert [plan_bytes(p) for p in slow] == fast
    assert all(p.schedule_ms >= 7000 and not p.fallback for p in slow)


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


@pytest.mark.parametrize("fault", ["planner_raises", "negative", "wrong_sums", "over_capacity",
                                   "lp_raises", "lp_nan", "lp_low_optimum"])
def test_faults_fall_back_to_a_valid_counted_plan(monkeypatch, fault):
    layout = placement.symmetric(8, 16, 2)
    scheduler = ReplicaScheduler(layout.holders, 8, solve_lp=True)
    tokens = zipf_sequence(8, 16, 1)[0]
    planner_solve, lp_solve = scheduler._planner.solve, scheduler._solve_lp

    def broken_planner(tokens, work_limit):
        result = planner_solve(tokens, work_limit)
        if fault == "planner_raises":
            raise RuntimeError("injected")
        quota = result.quota.copy()
        if fault == "negative":
            quota[0, np.flatnonzero(quota[0])[0]] = -1
        elif fault == "wrong_sums":
            quota //= 2
        elif fault == "over_capacity":
            return dataclasses.replace(result, capacity=result.capacity - 1)
        else:
            return result
        return dataclasses.replace(result, quota=quota)

    def broken_lp(load):
        optimum = lp_solve(load)
        if fault == "lp_raises":
            raise RuntimeError("injected error inside the solver library")
        if fault == "lp_nan":
            return math.nan
        return optimum / 4 if fault == "lp_low_optimum" else optimum

    monkeypatch.setattr(scheduler._planner, "solve", broken_planner)
    monkeypatch.setattr(scheduler, "_solve_lp", broken_lp)
    plan = scheduler.plan(tokens)
    assert plan.fallback and plan.fallback_reason
    assert scheduler.fallbacks == 1
    check_plan(plan, layout.holders, tokens)
    assert plan.to_json()["lp_optimum"] is None  # no trusted optimum: JSON null, not NaN


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
