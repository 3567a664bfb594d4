import pytest

from micromoe_megatron.training.rank_pool import RankPool


@pytest.fixture(scope="module")
def rank_pool():
    """Four gloo ranks, started once per test module (~12 s) and restarted every 6 tasks.

    Every task that builds a Megatron DDP model leaves gloo threads behind in the workers (~70 per
    rank; ~1% of a core each while idle): a full test_replicas.py module reached ~1100 threads per
    rank and a load average in the hundreds on 2 cores, so pools are per module and recycled.
    """
    pool = RankPool(world_size=4, max_tasks=6)
    yield pool
    pool.close()
