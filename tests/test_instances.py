"""Dynamo shares one compiled graph between module instances of the same code and shapes (every block of a
model compiled block by block, say). The rewritten graph holds its own instance's weights in their new layout,
so each other instance gets a rewrite of its own on its first call, and never computes with another's weights."""

import pytest
import torch

import backend_cases as C
from mlp_cases import mlp_weights, rel_err
from tpaware_compile import report as R
from tpaware_compile.backend import tpaware
from tpaware_compile.compat import raise_recompile_limit
from tpaware_compile.models import Decoder, Parallel, random_weights
from tpaware_compile.nn import TPMLP, reference_mlp


@pytest.mark.parametrize("kind", ["swiglu", "gelu"])
def test_each_instance_computes_with_its_own_weights(kind):
    torch._dynamo.reset()
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(0))
    mlps = []
    for seed in (1, 2, 3):
        w = mlp_weights(kind, seed=seed)
        mlps.append(torch.compile(TPMLP.from_full(kind, w, "N", 0, 1), backend=tpaware,
                                  options={"tpaware.hand_off": "eager"}))
        for _ in range(2):  # first call rewrites and converts, second runs the form-T retrace
            assert rel_err(mlps[-1](x), reference_mlp(kind, w, x)) < 1e-5, seed
    assert [m._orig_mod.form for m in mlps] == ["T"] * 3  # each instance converted in place, none left behind


def _regional(rank, world, hand_off):
    """A decoder compiled block by block (one code, one shared graph): every block must be rewritten with its
    own weights, and compute exactly what eager does."""
    torch._dynamo.reset()
    raise_recompile_limit(64)
    R.clear_reports()
    cfg = C.config("llama", layers=3)
    w = random_weights(cfg, group_size=C.GROUP, seed=0)
    eager, model = (Decoder(cfg, Parallel(rank=rank, world=world, form="N"), w) for _ in range(2))
    for blk in model.blocks:
        blk.compile(backend=tpaware, options={"tpaware.hand_off": hand_off})
    out = {"equal": [], "err": []}
    for tokens, pos in [(torch.tensor([[3, 14, 15, 9]]), torch.arange(4)), (torch.tensor([[5]]), torch.tensor([4])),
                        (torch.tensor([[6]]), torch.tensor([5]))]:
        a, b = eager(tokens, pos), model(tokens, pos)
        out["equal"].append(torch.equal(a, b))
        out["err"].append(C.rel_err(a, b))
    out["forms"] = [blk.mlp.form for blk in model.blocks]
    out["applied"] = sum(len(r.applied) for r in R.all_reports())
    return out


@pytest.mark.parametrize("world,hand_off", [(1, "eager"), (2, "eager"), (2, "inductor")])
def test_block_by_block_compilation(ranks, world, hand_off):
    for r in ranks(world).run(_regional, hand_off):
        if hand_off == "eager":  # form N's reference op: exact (see test_backend.test_numerics)
            assert r["equal"] == [True, True, True]
        else:  # Inductor compiles the norms and attention around the MLPs: its own rounding
            assert max(r["err"]) < 1e-5, r["err"]
        assert r["forms"] == ["T", "T", "T"]
        assert r["applied"] == 3  # one rewrite per block instance
