"""Compiled planner kernels: the same plans as their own Python source, inputs left untouched."""

import numpy as np
import pytest

from micromoe_megatron.core import kernels, loads, placement
from micromoe_megatron.core.routing import rank_routes, route_tokens
from micromoe_megatron.core.schedule import ReplicaScheduler

KERNELS = ("place_pool", "_path_amount", "drain", "reclaim", "_fill", "_node_holders", "_route_expert", "_route_status", "route",
           "_sent_by", "rank_route", "local_tokens", "prepare", "build", "counts_ok", "quota_error")


def instances():
    """Random holders and counts (several nodes, 1..F replicas), then symmetric drifting Zipf loads."""
    rng = np.random.default_rng(21)
    for _ in range(40):
        gpus = int(rng.choice([2, 4, 6, 8]))
        experts = int(rng.integers(1, 10))
        holders = [sorted(rng.choice(gpus, size=int(rng.integers(1, gpus + 1)), replace=False).tolist())
                   for _ in range(experts)]
        tokens = rng.integers(0, rng.choice([3, 50, 1000]) + 1, size=(gpus, experts)) * (rng.random((gpus, experts)) < 0.7)
        yield holders, tokens, gpus, int(rng.choice([0, 1, 2]))
    layout = placement.symmetric(8, 32, 2)
    for skew in (0.5, 1.5):
        probabilities = loads.zipf_probabilities(32, skew, rng)
        for _ in range(3):
            probabilities = 0.7 * probabilities + 0.3 * loads.zipf_probabilities(32, skew, rng)
            yield layout.holders, loads.multinomial_counts(probabilities, 2048, 8, rng), 8, 4


def plans(python: bool, monkeypatch) -> list[bytes]:
    with monkeypatch.context() as patch:
        if python:  # every kernel as plain Python, calling each other as plain Python
            for name in KERNELS:
                patch.setattr(kernels, name, getattr(kernels, name).py_func)
        out = []
        for holders, tokens, gpus, gpus_per_node in instances():
            plan = ReplicaScheduler(holders, gpus, gpus_per_node=gpus_per_node or None).plan(tokens)
            assert not plan.fallback
            ranks = b"".join(part.tobytes() for rank in range(gpus) for part in plan.rank_routes(rank))
            out.append(plan.quota.tobytes() + plan.routes.tobytes() + ranks + bytes([plan.augmentations % 256])
                       + plan.remote_tokens.to_bytes(8, "little"))
        return out


def test_compiled_kernels_plan_byte_identically_to_their_python_source(monkeypatch):
    assert plans(False, monkeypatch) == plans(True, monkeypatch)


def test_a_ranks_routes_are_its_rows_of_all_routes_and_remote_tokens_match():
    for holders, tokens, gpus, gpus_per_node in instances():
        plan = ReplicaScheduler(holders, gpus, gpus_per_node=gpus_per_node or None).plan(tokens)
        mine = [plan.rank_routes(rank) for rank in range(gpus)]  # before ``routes`` is cached
        routes = plan.routes
        for rank, (sent, received) in enumerate(mine):
            assert np.array_equal(sent, routes[routes[:, 0] == rank])
            assert np.array_equal(received, routes[routes[:, 2] == rank])
        assert plan.remote_tokens == int(routes[routes[:, 0] != routes[:, 2], 3].sum())
        for rank in (-1, gpus, 1.0, True):  # the same refusal whether or not ``routes`` was built
            with pytest.raises(ValueError, match="rank must be an integer"):
                plan.rank_routes(rank)


def test_rank_routes_match_all_routes_on_random_quotas_and_node_sizes():
    rng = np.random.default_rng(5)
    for _ in range(150):
        gpus = int(rng.choice([4, 6, 8, 12, 16]))
        node = int(rng.choice([d for d in (1, 2, 3, 4, gpus) if gpus % d == 0]))
        experts = int(rng.integers(1, 12))
        holders = [sorted(rng.choice(gpus, size=int(rng.integers(1, min(gpus, 5) + 1)), replace=False).tolist())
                   for _ in range(experts)]
        tokens = rng.integers(0, 30, size=(gpus, experts)) * (rng.random((gpus, experts)) < 0.8)
        quota = np.zeros((experts, gpus), dtype=np.int64)
        for e, held in enumerate(holders):  # any split of the load over the holders
            cuts = np.sort(rng.integers(0, tokens[:, e].sum() + 1, size=len(held) - 1))
            quota[e, held] = np.diff(np.r_[0, cuts, tokens[:, e].sum()])
        table = placement.pad_holders(holders)
        routes = route_tokens(tokens, quota, table, node)
        for rank in range(gpus):
            sent, received = rank_routes(tokens, quota, table, rank, node)
            assert np.array_equal(sent, routes[routes[:, 0] == rank])
            assert np.array_equal(received, routes[routes[:, 2] == rank])


def test_planning_leaves_the_callers_counts_untouched():
    # A single expert makes tokens.T contiguous: the router must still copy before consuming it.
    for holders, tokens in (([(0, 1)], np.array([[20], [45]])), ([(0, 1), (1, 2), (0, 2)], np.arange(9).reshape(3, 3))):
        before = tokens.copy()
        plan = ReplicaScheduler(holders, tokens.shape[0]).plan(tokens)
        assert np.array_equal(tokens, before) and plan.routes[:, 3].sum() == before.sum()
        route_tokens(tokens, plan.quota, placement.pad_holders(holders))
        assert np.array_equal(tokens, before)


@pytest.mark.parametrize("quota,holders,message", [
    (np.array([[5, 0, 0]]), [(0, 1)], "row sums of quota"),
    (np.array([[2, 0, 1]]), [(0, 1)], "quota must be 0 off the holders"),
    (np.array([[3, 0]]), [(0, 1)], r"quota must be \[E=1, F=3\]"),
    (np.array([[3, 0, 0]]), [(0, 3)], "GPU ids below F"),
])
def test_the_router_refuses_a_quota_that_does_not_fit(quota, holders, message):
    with pytest.raises(ValueError, match=message):
        route_tokens(np.array([[1], [2], [0]]), quota, placement.pad_holders(holders))
    with pytest.raises(ValueError, match=message):  # a rank's routes check every expert, not only its own
        rank_routes(np.array([[1], [2], [0]]), quota, placement.pad_holders(holders), rank=2)
