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


def _foreign_instances(rank, world, hand_off):
    """Two instances of a module that is not ours share Dynamo's graph: each gets a rewrite of its own on a
    private copy of its own weights, and its buffers stay as they were."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    R.clear_reports()
    x = torch.randn(1, 4, 64, generator=torch.Generator().manual_seed(5))
    out = {"err": [], "unchanged": []}
    for seed in (3, 4):
        w = C.mlp_weights()
        w = {k: v.replace(scales=v.scales * (1 + seed)) for k, v in w.items()}  # distinct weights per instance
        group = torch.distributed.group.WORLD if world > 1 else None
        module = C.ForeignMLP(TPMLP.from_full("swiglu", w, "N", rank, world, group))
        before = {n: b.clone() for n, b in module.named_buffers()}
        compiled = torch.compile(module, backend=tpaware, options={"tpaware.hand_off": hand_off})
        for _ in range(2):
            out["err"].append(C.rel_err(module(x), compiled(x)))
        out["unchanged"].append(all(torch.equal(b, dict(module.named_buffers())[n]) for n, b in before.items()))
    out["weights"] = [row.weights for rep in R.all_reports() for row in rep.applied]
    out["graphs"] = torch._dynamo.utils.counters["stats"]["unique_graphs"]  # 1: the second instance reused it
    return out


@pytest.mark.parametrize("hand_off", ["eager", "inductor"])
def test_foreign_instances_each_rewritten(ranks, hand_off):
    for r in ranks(2).run(_foreign_instances, hand_off):
        assert max(r["err"]) < 1e-5, r["err"]
        assert r["unchanged"] == [True, True] and r["weights"] == ["private copy"] * 2 and r["graphs"] == 1
