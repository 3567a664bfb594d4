"""Replica consistency under Megatron DDP, Megatron's optimizers and schedules (4 gloo ranks, fp32).

Stock EP = 2 (expert-DP 2) against MicroEP EP = 2, d = 2 (Megatron EP = 4), identical weights and
data: losses, grad norms and logical expert weights agree; replicas stay bit-identical; checkpoints
move between layouts. Rank functions are in train_cases.py.
"""

from __future__ import annotations

import numpy as np
import pytest

TRAIN = "tests.train_cases:train"
ACCUMULATE_AND_CLIP = dict(num_microbatches=2, clip_grad=0.3, overlap_grad_reduce=True)


@pytest.fixture(scope="module")
def stock(rank_pool):
    return rank_pool.run(TRAIN, micro_ep=0, steps=20)


@pytest.fixture(scope="module")
def stock_accumulate_and_clip(rank_pool):
    return rank_pool.run(TRAIN, micro_ep=0, steps=20, **ACCUMULATE_AND_CLIP)


def _relative(a, b) -> float:
    a, b = np.asarray(a), np.asarray(b)
    return float(np.max(np.abs(a - b) / np.abs(a)))


def _assert_same_training(stock_run, micro_run, replicas: int | None = 2):
    assert _relative(stock_run[0]["losses"], micro_run[0]["losses"]) < 1e-5
    assert _relative(stock_run[0]["grad_norms"], micro_run[0]["grad_norms"]) < 1e-5
    stock_experts = {k: v for rank in stock_run for k, v in rank["experts"].items()}
    copies: dict[str, list] = {}
    for rank in micro_run:
        for key, weights in rank["experts"].items():
            copies.setdefault(key, []).append(weights)
    assert set(copies) == set(stock_experts)
    for key, held in copies.items():
        if replicas is not None:
            assert len(held) == replicas, f"{key} should have d = {replicas} replicas"
        assert all(np.array_equal(held[0], other) for other in held[1:]), f"{key}: replicas differ"
        # Relative L2: Adam turns round-off in near-zero gradients into +-lr steps on single
        # elements, so an elementwise bound would measure Adam, not the replica sync.
        error = np.linalg.norm(held[0] - stock_experts[key]) / np.linalg.norm(stock_experts[key])
        assert error < 1e-5, f"{key}: relative L2 difference {error:.2e} from the stock run"


def test_training_matches_stock_ep(rank_pool, stock):
    micro = rank_pool.run(TRAIN, micro_ep=2, steps=20)
    _assert_same_training(stock, micro)
    assert stock[0]["losses"][-1] < stock[0]["losses"][0]
    # Each logical expert counted once: exactly one holder of each (layer, expert) is unmarked.
    marked = sum(len(rank["shared"]) for rank in micro)
    assert marked == 2 * 8 * 2  # layers x experts x params per expert (the non-canonical copy)


def test_gradient_accumulation_clipping_overlap(rank_pool, stock_accumulate_and_clip):
    micro = rank_pool.run(TRAIN, micro_ep=2, steps=20, **ACCUMULATE_AND_CLIP)
    assert min(stock_accumulate_and_clip[0]["grad_norms"]) > ACCUMULATE_AND_CLIP["clip_grad"]  # clipping active
    _assert_same_training(stock_accumulate_and_clip, micro)


def test_distributed_optimizer(rank_pool, stock_accumulate_and_clip):
    micro = rank_pool.run(TRAIN, micro_ep=2, steps=20, distributed_optimizer=True, check_every=5,
                          **ACCUMULATE_AND_CLIP)
    _assert_same_training(stock_accumulate_and_clip, micro)


def test_without_replica_sync_replicas_drift(rank_pool, stock):
    """Negative control: the machinery is what keeps replicas and the loss on track."""
    micro = rank_pool.run(TRAIN, micro_ep=2, steps=5, sync=False)
    assert not micro[0]["replicas_identical"]
    assert _relative(stock[0]["losses"][:5], micro[0]["losses"]) > 1e-4


def test_replica_guard_names_the_expert_and_broadcast_fixes_it(rank_pool):
    before = rank_pool.run("tests.train_cases:replicas_diverge_detected")
    assert "MicroEP replicas diverged at step 7" in before[0]
    assert "logical expert" in "".join(before) and "decoder.layers.0.mlp" in "".join(before)


@pytest.mark.parametrize("source, target", [
    (dict(micro_ep=2), dict(micro_ep=2, placement="random", placement_seed=3)),
    (dict(micro_ep=2), dict(micro_ep=0)),
    (dict(micro_ep=0), dict(micro_ep=2)),
    (dict(micro_ep=2, replace_every=1), dict(micro_ep=0)),
    (dict(micro_ep=2, replace_every=1), dict(micro_ep=2, placement="random", placement_seed=3, replace_every=1)),
], ids=["micro-to-micro-other-placement", "micro-to-vanilla", "vanilla-to-micro", "re-placed-to-vanilla",
        "re-placed-to-micro-other-placement-re-placing"])
def test_checkpoint_round_trip(rank_pool, stock, tmp_path, source, target):
    checkpoint = str(tmp_path / "ckpt")
    rank_pool.run(TRAIN, steps=3, save_dir=checkpoint, save_after=3, **source)
    resumed = rank_pool.run(TRAIN, first_step=3, steps=6, load_dir=checkpoint, **target)
    assert _relative(stock[0]["losses"][3:6], resumed[0]["losses"]) < 1e-5
    if target["micro_ep"]:
        assert resumed[0]["replicas_identical"]


@pytest.mark.parametrize("layout", [dict(micro_ep=0), dict(micro_ep=2)], ids=["stock", "micro-ep"])
def test_distributed_optimizer_default_format_resume_is_exact(rank_pool, stock, tmp_path, layout):
    """Megatron's default distributed-optimizer checkpoint format (dp_reshardable), same layout on
    both sides: every step after the resume equals the uninterrupted run, in loss and grad norm
    (the grad norm of the second step after the resume caught megatron_fixes F5)."""
    checkpoint = str(tmp_path / "ckpt")
    common = dict(distributed_optimizer=True, sharding_type="dp_reshardable", **layout)
    rank_pool.run(TRAIN, steps=3, save_dir=checkpoint, save_after=3, **common)
    resumed = rank_pool.run(TRAIN, first_step=3, steps=6, load_dir=checkpoint, **common)
    assert _relative(stock[0]["losses"][3:6], resumed[0]["losses"]) < 1e-5
    assert _relative(stock[0]["grad_norms"][3:6], resumed[0]["grad_norms"]) < 1e-5


@pytest.mark.parametrize("source, target", [
    (dict(micro_ep=0), dict(micro_ep=2)),
    (dict(micro_ep=2), dict(micro_ep=2, placement="random", placement_seed=3)),
], ids=["vanilla-to-micro", "micro-to-micro-other-placement"])
def test_fully_reshardable_distributed_optimizer_moves_between_layouts(rank_pool, stock, tmp_path, source, target):
    """The format MicroEP saves the distributed optimizer in (Megatron's fully_reshardable): optimizer
    states are keyed by logical expert, so a resume into another expert layout is exact."""
    checkpoint = str(tmp_path / "ckpt")
    common = dict(distributed_optimizer=True, sharding_type="fully_reshardable")
    rank_pool.run(TRAIN, steps=3, save_dir=checkpoint, save_after=3, **common, **source)
    resumed = rank_pool.run(TRAIN, first_step=3, steps=6, load_dir=checkpoint, **common, **target)
    assert _relative(stock[0]["losses"][3:6], resumed[0]["losses"]) < 1e-5
    assert _relative(stock[0]["grad_norms"][3:6], resumed[0]["grad_norms"]) < 1e-5


# ---------------------------------------------------------------- live re-placement (migration.py)


def test_replacement_every_iteration_matches_stock(rank_pool, stock):
    """Re-place every iteration (test policy: random tables and unequal replica counts): the model
    must not notice, so losses, grad norms and expert weights are the stock run's."""
    micro = rank_pool.run(TRAIN, micro_ep=2, steps=20, replace_every=1, check_every=1)
    _assert_same_training(stock, micro, replicas=None)
    assert len(micro[0]["migrations"]) == 2 * 20  # both MoE layers, every iteration
    decisions = [[(layer, moves, size) for layer, moves, size, _ in rank["migrations"]] for rank in micro]
    assert all(d == decisions[0] for d in decisions)  # the same moves and bytes on every rank


def test_replacement_every_iteration_bf16_within_round_off(rank_pool):
    """bf16 with the distributed optimizer, re-placing every iteration: the bf16 weights, fp32 main
    weights and Adam state migrate (bit-exactly: tests/test_migration.py), so the run equals stock
    bf16 to within bf16 round-off (MicroEP sums tokens in other groupings), and the replica guard
    finds every replica bit-identical after every step."""
    common = dict(steps=8, bf16=True, distributed_optimizer=True)
    stock = rank_pool.run(TRAIN, micro_ep=0, **common)
    micro = rank_pool.run(TRAIN, micro_ep=2, replace_every=1, check_every=1, **common)
    assert _relative(stock[0]["losses"], micro[0]["losses"]) < 2e-2
    assert _relative(stock[0]["grad_norms"], micro[0]["grad_norms"]) < 2e-2
    assert micro[0]["losses"][-1] < micro[0]["losses"][0]
    assert len(micro[0]["migrations"]) == 2 * 8 and all(rank["replicas_identical"] for rank in micro)


@pytest.mark.parametrize("micro_ep", [2, 1], ids=["d2", "d1-edp2"])
def test_replacement_every_iteration_distributed_optimizer(rank_pool, stock_accumulate_and_clip, micro_ep):
    """Same with the distributed optimizer, accumulation, clipping and overlapped grad reduce; with
    d = 1 the expert-data-parallel size is 2, so every slot's Adam state is split across two shards."""
    micro = rank_pool.run(TRAIN, micro_ep=micro_ep, steps=20, distributed_optimizer=True, replace_every=1,
                          check_every=5, **ACCUMULATE_AND_CLIP)
    _assert_same_training(stock_accumulate_and_clip, micro, replicas=None)
    assert len(micro[0]["migrations"]) == 2 * 20
