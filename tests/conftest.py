import os

import pytest

from ranks import RankPool

_pools = {}


def pytest_configure(config):
    config.addinivalue_line("markers", "interpreter: Triton kernel tests that run on CPU under TRITON_INTERPRET=1")
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped elsewhere)")


def pytest_collection_modifyitems(config, items):
    import torch

    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def ranks():
    """ranks(world_size) -> a RankPool of that many gloo processes, shared by the whole session."""

    def get(world_size: int) -> RankPool:
        if world_size not in _pools:
            _pools[world_size] = RankPool(world_size)
        return _pools[world_size]

    yield get
    for pool in _pools.values():
        pool.close()
