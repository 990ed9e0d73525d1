import torch, torch.distributed as dist, pytest
from ranks import RankFailure
def _sum(rank, world):
    t = torch.tensor([rank + 1.0]); dist.all_reduce(t); return t.item()
def _fail(rank, world):
    if rank == 1: raise ValueError("boom")
    dist.barrier()
@pytest.mark.parametrize("world", [1, 2, 4])
def test_allreduce(ranks, world):
    assert ranks(world).run(_sum) == [world * (world + 1) / 2] * world
def test_failure_reported(ranks):
    with pytest.raises(RankFailure, match="rank 1 of 2 failed"):
        ranks(2).run(_fail, timeout=90)
    assert ranks(2).run(_sum) == [3.0, 3.0]


def _interpreting(rank, world):
    import os

    return os.environ.get("TRITON_INTERPRET")


def test_interpreter_pool_sets_env(ranks):
    assert ranks(1, interpret=True).run(_interpreting) == ["1"]
    assert ranks(1).run(_interpreting) == [None]
