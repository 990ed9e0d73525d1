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
    steps = [(torch.tensor([[3, 14, 15, 9, 26]]), torch.arange(5)), (torch.tensor([[5]]), torch.tensor([5]))]
    for tokens, pos in steps:
        tokens, pos = tokens.cuda(), pos.cuda()
        a, b = eager(tokens, pos).float(), compiled(tokens, pos).float()
        assert C.rel_err(a, b) < 2e-2
    rows = R.all_reports()[0].rows
    assert [r.applied for r in rows] == [True, True], R.all_reports()[0].table()
    assert all("triton" in r.kernels for r in rows), R.all_reports()[0].table()
    assert [blk.mlp.form for blk in model.blocks] == ["T", "T"]


def _decoder_pair(presort: bool, kernel: str = "reference"):
    cfg = C.config("llama", layers=3)
    w = random_weights(cfg, dtype=torch.float16, group_size=C.GROUP, seed=0)
    par = Parallel(form="N", presort=presort, kernel=kernel)
    return Decoder(cfg, par, w).cuda(), Decoder(cfg, par, w).cuda()


def _steps():
    return [(torch.tensor([[3, 14, 15, 9, 26]]).cuda(), torch.arange(5).cuda()),
            (torch.tensor([[5]]).cuda(), torch.tensor([5]).cuda()),
            (torch.tensor([[6]]).cuda(), torch.tensor([6]).cuda())]


@pytest.mark.gpu
@pytest.mark.parametrize("presort,fold", [(False, True), (True, True), (True, False)])
def test_fused_swiglu_lowering(presort, fold):
    """Every block's gate and up run as one fused SwiGLU kernel after the rewrite (presorted modules too); each
    block's x[P1] stays an index_select with tpaware.fold_perm on or off, since its x is the block's RMSNorm
    output (Inductor fuses the gather into the norm's kernel); the eager twin runs the Triton kernels (sorted via
    x[P1] when presorted, else per-row g_idx)."""
    torch._dynamo.reset()
    R.clear_reports()
    eager, model = _decoder_pair(presort, kernel="triton")
    compiled = torch.compile(model, backend=tpaware, options={"tpaware.keep_graph": True, "tpaware.fold_perm": fold})
    for tokens, pos in _steps():
        assert C.rel_err(eager(tokens, pos).float(), compiled(tokens, pos).float()) < 2e-2
    rep = R.all_reports()[0]
    assert all(r.applied and "one fused SwiGLU kernel" in r.kernels for r in rep.rows), rep.table()
    assert not any("x[P1] folded into the call" in r.kernels for r in rep.rows), rep.table()
    gathers = [n for n in rep.graph_module.graph.nodes
               if n.target is torch.index_select and any("gptq" in str(u.target) for u in n.users)]
    assert len(gathers) == 3, rep.graph_module.graph
    assert [blk.mlp.form for blk in model.blocks] == ["T"] * 3


@pytest.mark.gpu
def test_block_by_block_compilation():
    """Each block compiled on its own (one shared graph): every block gets its own rewrite and lowering."""
    torch._dynamo.reset()
    R.clear_reports()
    eager, model = _decoder_pair(presort=False)
    for blk in model.blocks:
        blk.compile(backend=tpaware)
    for tokens, pos in _steps():
        assert C.rel_err(eager(tokens, pos).float(), model(tokens, pos).float()) < 2e-2
    assert [blk.mlp.form for blk in model.blocks] == ["T"] * 3
    assert sum(len(r.applied) for r in R.all_reports()) == 3


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,hand_off", [(torch.float16, "inductor"), (torch.bfloat16, "inductor"),
                                            (torch.float16, "eager")])
def test_tile_weights_auto(dtype, hand_off):
    """tpaware.tile_weights left at "auto": on sm_90 the rewritten modules hold tiled words (layout.py) and every
    lowered matmul of prefill, decode and the form-T retrace reads them; elsewhere N-major. Either way the
    results are the eager twin's (which runs the reference on the same weights)."""
    from tpaware_compile.layout import is_tiled, pays_on

    torch._dynamo.reset()
    R.clear_reports()
    cfg = C.config("llama", layers=2, hidden=128, inter=256)  # whole 128-row steps and 64-column tiles
    w = random_weights(cfg, dtype=dtype, group_size=C.GROUP, seed=0)
    eager = Decoder(cfg, Parallel(form="N"), w).cuda()
    model = Decoder(cfg, Parallel(form="N"), w).cuda()
    compiled = torch.compile(model, backend=tpaware, options={"tpaware.hand_off": hand_off})
    for tokens, pos in _steps():
        assert C.rel_err(eager(tokens, pos).float(), compiled(tokens, pos).float()) < 2e-2
    tiled = pays_on(torch.device("cuda"))
    qweights = [b for name, b in model.named_buffers() if name.endswith("qweight")]
    assert len(qweights) == 6 and all(is_tiled(q) == tiled for q in qweights)
    lines = [r.kernels for rep in R.all_reports() for r in rep.rows]
    assert lines and all("triton" in k and ("tiled words" in k) == tiled for k in lines), lines
    assert [blk.mlp.form for blk in model.blocks] == ["T", "T"]
