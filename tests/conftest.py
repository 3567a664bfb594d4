import pytest

from tests.dist_pool import RankPool


@pytest.fixture(scope="session")
def rank_pool():
    """Four gloo ranks, started once per test session."""
    pool = RankPool(world_size=4)
    yield pool
    pool.close()
