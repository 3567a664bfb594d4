"""Which resumes the start-up check lets through (pure parts; the launches are in test_pretrain.py)."""

from micromoe_megatron.training.resume_check import describe, same_expert_layout

MICRO = {"version": 1, "d": 2, "ep": 2, "num_experts": 8, "placement": "symmetric", "placement_seed": 0,
         "phy2log": [[0, 1, 2, 3], [4, 5, 6, 7], [1, 0, 3, 2], [5, 4, 7, 6]]}


def test_same_layout():
    assert same_expert_layout(None, 2, None, 2)
    assert same_expert_layout(MICRO, 4, dict(MICRO, placement_seed=9), 4)  # same table: same buckets


def test_changed_layout():
    assert not same_expert_layout(None, 2, None, 4)
    assert not same_expert_layout(None, 4, MICRO, 4)  # stock EP 4 vs MicroEP 2 x 2: same group size
    assert not same_expert_layout(MICRO, 4, None, 4)
    other = dict(MICRO, phy2log=[MICRO["phy2log"][i] for i in (0, 2, 1, 3)])
    assert not same_expert_layout(MICRO, 4, other, 4)


def test_describe_names_the_flags():
    assert describe(None, 2) == "stock expert parallelism, --expert-model-parallel-size 2"
    assert describe(MICRO, 4) == "--micro-ep 2 x --expert-model-parallel-size 2, symmetric placement (seed 0)"
