"""On one GPU (torch 2.11 on the GPU machine): the TP 1 rewrite, the lowering and Inductor, for real."""

import pytest
import torch

import backend_cases as C
from tpaware_compile import report as R
from tpaware_compile.backend import tpaware  # the GPU machine has no installed entry point: pass the function
from tpaware_compile.models import Decoder, Parallel, random_weights


@pytest.mark.gpu
@pytest.mark.parametrize("form", ["N", "L", "U"])
def test_tp1_rewrite_and_lowering(form):
    torch._dynamo.reset()
    R.clear_reports()
    cfg = C.config()
    w = random_weights(cfg, dtype=torch.float16, group_size=C.GROUP, seed=0)
    eager = Decoder(cfg, Parallel(form=form), w).cuda()
    model = Decoder(cfg, Parallel(form=form), w).cuda()
    compiled = torch.compile(model, backend=tpaware, options={"tpaware.report": True})
    for tokens, pos in [(torch.tensor([[3, 14, 15, 9, 26]]), torch.arange(5)), (torch.tensor([[5]]), torch.tensor([5]))]:
        tokens, pos = tokens.cuda(), pos.cuda()
        a, b = eager(tokens, pos).float(), compiled(tokens, pos).float()
        assert C.rel_err(a, b) < 2e-2
    rows = R.all_reports()[0].rows
    assert [r.applied for r in rows] == [True, True], R.all_reports()[0].table()
    assert all("triton" in r.kernels for r in rows), R.all_reports()[0].table()
    assert [blk.mlp.form for blk in model.blocks] == ["T", "T"]
