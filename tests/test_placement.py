"""Placement: validity of every construction, the paper's Cayley shapes, custom files, Eq. 3."""

import itertools
import json

import numpy as np
import pytest

from micromoe_megatron.core import placement


def neighbours(layout):
    """GPU -> set of GPUs sharing at least one expert with it."""
    out = {g: set() for g in range(layout.num_gpus)}
    for gpus in layout.holders:
        for a, b in itertools.permutations(gpus, 2):
            out[a].add(b)
    return out


@pytest.mark.parametrize("gpus,experts,replicas", [
    (8, 8, 2), (8, 16, 2), (8, 32, 2), (16, 32, 2), (16, 64, 2), (64, 256, 2), (6, 12, 2),
    (4, 8, 2), (2, 4, 2), (8, 32, 4), (12, 12, 3), (64, 256, 4), (8, 16, 1)])
@pytest.mark.parametrize("kind", ["symmetric", "random"])
def test_every_construction_is_a_valid_same_slot_placement(kind, gpus, experts, replicas):
    layout = placement.make_placement(kind, gpus, experts, replicas, seed=3)
    assert layout.phy2log.shape == (gpus, experts * replicas // gpus)
    assert (layout.logcnt == replicas).all()
    for e, gpus_of_e in enumerate(layout.holders):
        slot = layout.expert_slot[e]
        assert all(layout.phy2log[g, slot] == e for g in gpus_of_e)
    # Every slot column partitions the GPUs into holder groups.
    for slot in range(layout.slots_per_gpu):
        column = layout.phy2log[:, slot]
        assert all(set(np.flatnonzero(column == e)) == set(layout.holders[e]) for e in set(column.tolist()))


def test_symmetric_d2_reproduces_the_papers_cayley_graphs():
    cycle = placement.symmetric(8, 8, 2)                  # Z_8 with {+-1}: one 8-cycle
    seen, g, prev = [0], 0, None
    nbrs = neighbours(cycle)
    assert all(len(n) == 2 for n in nbrs.values())
    while True:
        g, prev = next(n for n in sorted(nbrs[g]) if n != prev), g
        if g == 0:
            break
        seen.append(g)
    assert len(seen) == 8
    k44 = neighbours(placement.symmetric(8, 16, 2))      # Z_8 with {+-1, +-3}: K_{4,4}
    assert all(k44[g] == {h for h in range(8) if (h - g) % 2} for g in range(8))
    complete = neighbours(placement.symmetric(8, 32, 2))  # K_8 plus one spread matching
    assert all(complete[g] == set(range(8)) - {g} for g in range(8))
    torus = neighbours(placement.symmetric(16, 32, 2))    # 4-regular, no repeated pair
    assert all(len(n) == 4 for n in torus.values())


def test_symmetric_is_deterministic_and_random_follows_its_seed():
    assert np.array_equal(placement.symmetric(16, 64, 4).phy2log, placement.symmetric(16, 64, 4).phy2log)
    a, b = placement.random(16, 64, 2, seed=1), placement.random(16, 64, 2, seed=1)
    assert np.array_equal(a.phy2log, b.phy2log)
    assert not np.array_equal(a.phy2log, placement.random(16, 64, 2, seed=2).phy2log)


def test_vanilla_matches_megatron_expert_layout():
    layout = placement.vanilla(4, 8)
    assert layout.phy2log.tolist() == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert layout.holders[5] == (2,)


def test_custom_placement_from_file_with_uneven_replica_counts(tmp_path):
    # Expert 0 on all four GPUs, experts 1 and 2 on two each, experts 3..6 once.
    table = [[0, 1, 3], [0, 1, 4], [0, 2, 5], [0, 2, 6]]
    path = tmp_path / "placement.json"
    path.write_text(json.dumps({"phy2log": table}))
    layout = placement.make_placement("custom", 4, 7, 2, path=path)
    assert layout.logcnt.tolist() == [4, 2, 2, 1, 1, 1, 1]
    assert layout.holders[2] == (2, 3)


@pytest.mark.parametrize("table,message", [
    ([[0, 1], [1, 0]], "same slot index"),
    ([[0, 0], [1, 2]], "twice"),
    ([[0, 1], [0, 3]], "no holder"),
])
def test_custom_placement_errors_name_the_problem(table, message):
    with pytest.raises(placement.PlacementError, match=message):
        placement.custom({"phy2log": table, "num_experts": 4 if message == "no holder" else 3})


@pytest.mark.parametrize("call,message", [
    (lambda: placement.symmetric(6, 12, 4), "replicas=4 must divide gpus=6"),
    (lambda: placement.symmetric(8, 6, 2), "experts=6 must be divisible by EP"),
    (lambda: placement.make_placement("cayley", 8, 8, 2), "unknown placement kind 'cayley'"),
    (lambda: placement.make_placement("custom", 8, 8, 2), "needs a placement file"),
    (lambda: placement.custom("/nonexistent/placement.json"), "cannot read placement file"),
])
def test_bad_layouts_get_clear_errors(call, message):
    with pytest.raises(placement.PlacementError, match=message):
        call()


def test_eq3_bound_on_hand_made_cases():
    # One expert on two GPUs: its load splits in half.
    assert placement.max_induced_density([(0, 1)], [10], 2) == 5.0
    # Vanilla EP: the bound is the busiest GPU.
    layout = placement.vanilla(4, 8)
    load = np.array([1, 2, 3, 4, 5, 6, 7, 100])
    assert placement.max_induced_density(layout.holders, load, 4) == 107.0
    # A hot expert on {0, 1} and an idle one on {1, 2}: the densest subset is {0, 1}.
    assert placement.max_induced_density([(0, 1), (1, 2)], [12, 0], 3) == 6.0
    with pytest.raises(ValueError, match="F=17"):
        placement.max_induced_density([(0,)], [1], 17)


@pytest.mark.parametrize("source, experts, message", [
    ({"phy2log": [[0, 1, 2, 3], [4, 5, 6, 7], [0, 1, 2, 3], [4, 5, 6]]}, 8, "equally long lists"),
    ({"phy2log": [[0, 1, 2, 3], [4, 5, 6, 7], [0, 1, 2, 3], [4, 5, 6, 9]]}, 8, r"outside \[0, 8\)"),
])
def test_bad_custom_placement_files_are_named(source, experts, message):
    with pytest.raises(placement.PlacementError, match=message):
        placement.custom(source, experts)


def test_negative_random_seed_is_refused():
    with pytest.raises(placement.PlacementError, match="seed must be an integer >= 0"):
        placement.random(4, 8, 2, seed=-1)
