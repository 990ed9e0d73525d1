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
    """ranks(world_size, interpret=False) -> a RankPool of that many gloo processes, shared by the session;
    with ``interpret=True`` the ranks run Triton kernels under the interpreter."""

    def get(world_size: int, interpret: bool = False) -> RankPool:
        key = (world_size, interpret)
        if key not in _pools:
            _pools[key] = RankPool(world_size, {"TRITON_INTERPRET": "1"} if interpret else None)
        return _pools[key]

    yield get
    for pool in _pools.values():
        pool.close()
