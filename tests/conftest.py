import pytest

from micromoe_megatron.training.rank_pool import RankPool


@pytest.fixture(scope="module")
def rank_pool():
    """Four gloo ranks, started once per test module (~12 s).

    Not once per session: every task leaves some gloo threads behind in the workers (~1% of a core
    each while idle), so a long-lived pool would slow the CPU-bound pretrain launches later on.
    """
    pool = RankPool(world_size=4)
    yield pool
    pool.close()
