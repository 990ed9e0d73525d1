"""The lowering pass after the rewrite, with the Triton kernels running under the interpreter (CPU ranks)."""

import pytest
import torch

from mlp_cases import mlp_weights, rel_err
from tpaware_compile.nn import TPMLP, reference_mlp


def _compiled_mlp(rank, world, kind, kernel, fuse=True, fold=True, presort=False, tile=False):
    from tpaware_compile import report
    from tpaware_compile.backend import tpaware

    torch._dynamo.reset()
    report.clear_reports()
    hidden, inter = (128, 256) if tile else (64, 128)  # tiling needs K a multiple of 128 and N of 64
    weights = mlp_weights(kind, hidden=hidden, inter=inter, group_size=32, seed=3)
    mlp = TPMLP.from_full(kind, weights, "N", rank, world, kernel=kernel, presort=presort)
    x = torch.randn(2, hidden, generator=torch.Generator().manual_seed(9)).half()
    opts = {"tpaware.hand_off": "eager", "tpaware.keep_graph": True, "tpaware.fuse_swiglu": fuse,
            "tpaware.fold_perm": fold, "tpaware.tile_weights": tile}
    compiled = torch.compile(mlp, backend=tpaware, options=opts)
    first, second = compiled(x), compiled(x)  # the second call runs the retrace of the converted module
    ref = reference_mlp(kind, weights, x)
    graphs = [r.graph_module.graph for r in report.all_reports()]
    targets = [sorted(str(n.target) for n in g.nodes
                      if n.op == "call_function" and str(n.target).startswith("tpaware.")) for g in graphs]
    gathers = [[n.op for n in g.nodes if n.target is torch.index_select] for g in graphs]
    perms = [[_perm_source(n) for n in g.nodes if str(n.target).startswith("tpaware.")] for g in graphs]
    return dict(errs=(rel_err(first, ref), rel_err(second, ref), rel_err(mlp(x), ref)), targets=targets,
                gathers=gathers, perms=perms, kernels=report.all_reports()[0].rows[0].kernels)


def _perm_source(n):
    """Where a Triton op's perm comes from: None (no perm), or the op of its node (get_attr: the rewrite's P1;
    placeholder: a presorted module's own in_perm)."""
    slot = {"tpaware.gptq_mm_fast.default": 7, "tpaware.gptq_swiglu_fast.default": 10}.get(str(n.target))
    perm = n.args[slot] if slot is not None and len(n.args) > slot else None
    return None if perm is None else perm.op


@pytest.mark.interpreter
@pytest.mark.parametrize("kind,kernel,fuse", [("swiglu", "reference", True), ("swiglu", "triton", False),
                                              ("gelu", "triton", True)])
def test_rewrite_then_lowering_runs_triton(ranks, kind, kernel, fuse):
    for r in ranks(2, interpret=True).run(_compiled_mlp, kind, kernel, fuse):
        errs, targets, kernels = r["errs"], r["targets"], r["kernels"]
        assert max(errs) < 1e-2, errs  # first call, the retrace's, eager after compile
        assert kernels.endswith("down: triton, sorted groups (gptq_mm_fast)"), kernels
        assert ("one fused SwiGLU kernel" in kernels) == (kind == "swiglu" and fuse), kernels
        # every graph (the rewritten one and the retrace of the converted module): all quantized matmuls on the
        # sorted-group kernels, down by the rewrite and the first layer(s) by their folded act-order x[P1];
        # SwiGLU's gate and up in one fused call unless fusion is off
        if kind == "gelu":
            want = ["tpaware.gptq_mm_fast.default"] * 2
        elif fuse:
            want = ["tpaware.gptq_mm_fast.default", "tpaware.gptq_swiglu_fast.default"]
        else:
            want = ["tpaware.gptq_mm_fast.default"] * 3
        assert len(targets) == 2
        for t in targets:
            assert t == want, t


@pytest.mark.interpreter
@pytest.mark.parametrize("kind,kernel", [("swiglu", "reference"), ("gelu", "triton")])
def test_lowering_on_tiled_weights(ranks, kind, kernel):
    """tpaware.tile_weights at TP 2: the Triton kernels read the rewrite's tiled constants, then the converted
    modules' tiled buffers (the retrace), and the modules themselves after compile (kernel="triton": the Triton
    op on tiled words; "reference": the reference untiles)."""
    for r in ranks(2, interpret=True).run(_compiled_mlp, kind, kernel, True, True, False, True):
        assert max(r["errs"]) < 1e-2, r["errs"]
        assert r["kernels"].endswith("down: triton, sorted groups (gptq_mm_fast), tiled words"), r["kernels"]
        assert "tiled words" in r["kernels"].split("; down: ")[0]
        fast = "tpaware.gptq_swiglu_fast.default" if kind == "swiglu" else "tpaware.gptq_mm_fast.default"
        assert r["targets"] == [sorted(["tpaware.gptq_mm_fast.default", fast])] * 2, r["targets"]


def _traced_swiglu(shared_gate: bool, other_x: bool):
    """An fx graph of silu(x @ Wg) * (x2 @ Wu) on the fast op, with each node's output recorded as its 'val'."""
    from tpaware_compile.kernels import op  # noqa: F401  registers tpaware::gptq_mm_fast

    def f(x, x2, gq, gz, gs, uq, uz, us):
        fast = torch.ops.tpaware.gptq_mm_fast
        gate = fast(x, gq, gz, gs, 32, 0, 0)
        up = fast(x2 if other_x else x, uq, uz, us, 32, 0, 0)
        y = torch.nn.functional.silu(gate) * up
        return (y, gate) if shared_gate else y

    gm = torch.fx.symbolic_trace(f)
    w = mlp_weights("swiglu", inter=128, group_size=32, seed=3)
    gate, up = w["gate"].replace(g_idx=None), w["up"].replace(g_idx=None)  # treated as sorted: values don't matter
    x = torch.randn(2, 64)
    args = (x, x.clone(), gate.qweight, gate.qzeros, gate.scales, up.qweight, up.qzeros, up.scales)
    _record(gm, args)
    return gm, args


@pytest.mark.parametrize("shared_gate,other_x,fused", [(False, False, True), (True, False, False),
                                                      (False, True, False)])
def test_swiglu_fusion_only_where_it_is_exact(shared_gate, other_x, fused):
    """Fused only when gate and up read one x and nothing else reads gate, silu(gate) or up; the fused graph
    computes what the unfused one did."""
    from tpaware_compile.passes.lower import _fuse_swiglu

    gm, args = _traced_swiglu(shared_gate, other_x)
    before = gm(*args)
    pairs = _fuse_swiglu(gm)
    gm.recompile()
    targets = [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]
    assert ("tpaware.gptq_swiglu_fast.default" in targets) == fused and bool(pairs) == fused
    after = gm(*args)
    for a, b in zip(*(t if isinstance(t, tuple) else (t,) for t in (before, after))):
        assert rel_err(b, a) < 1e-6


@pytest.mark.interpreter
@pytest.mark.parametrize("kind,presort,fold", [("swiglu", False, True), ("gelu", False, True), ("swiglu", True, True),
                                               ("swiglu", False, False)])
def test_first_layers_read_x_through_perm(ranks, kind, presort, fold):
    """Through the backend (rewrite, lowering, eager hand-off, the converted module's retrace): the first layers'
    x[..., P1] (x a graph input here) is folded into their calls, with no index_select left, and matches the
    reference; the rewrite's P1 (a constant) and a presorted module's own in_perm alike. tpaware.fold_perm=False
    keeps the index_select."""
    for r in ranks(2, interpret=True).run(_compiled_mlp, kind, "reference", True, fold, presort):
        assert max(r["errs"]) < 1e-2, r["errs"]
        assert ("x[P1] folded into the call" in r["kernels"]) == fold, r["kernels"]
        assert len(r["gathers"]) == 2  # the rewritten graph, then the retrace of the converted module (form T)
        for gathers, perms in zip(r["gathers"], r["perms"]):
            first, down = perms[:-1], perms[-1]  # the first layers' op(s) come before down in graph order
            assert down is None
            if fold:
                assert gathers == [] and first and all(p in ("get_attr", "placeholder") for p in first), perms
            else:
                assert len(gathers) == 1 and first == [None] * len(first), (gathers, perms)
        # the rewrite's own P1 is a constant in its graph; a presorted module keeps its in_perm (an input)
        assert not fold or r["perms"][0][0] == ("placeholder" if presort else "get_attr"), r["perms"]


def _record(gm, args):
    """Run gm once, recording each node's output as its 'val' (what the lowering reads shapes from)."""

    class Record(torch.fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            n.meta["val"] = out
            return out

    Record(gm).run(*args)


def _traced_gather(variant: str):
    """silu(x[..., P] @ Wg) * (x[..., P] @ Wu) on the fast op, the gather spelled as the rewrite does; variants:
    another reader of x[..., P], a gather along dim 0, a P that takes only some of x's columns, or an x computed
    in the graph (Inductor would fuse the gather into its producer)."""
    from tpaware_compile.kernels import op  # noqa: F401  registers tpaware::gptq_mm_fast

    dim = {"dim0": 0, "dim1": 1}.get(variant, -1)

    def f(x, perm, gq, gz, gs, uq, uz, us):
        fast = torch.ops.tpaware.gptq_mm_fast
        xp = torch.index_select(x * 2 if variant == "computed" else x, dim, perm)
        y = torch.nn.functional.silu(fast(xp, gq, gz, gs, 32, 0, 0)) * fast(xp, uq, uz, us, 32, 0, 0)
        return (y, xp.sum()) if variant == "other_reader" else y

    gm = torch.fx.symbolic_trace(f)
    w = mlp_weights("swiglu", inter=128, group_size=32, seed=3)
    gate, up = w["gate"].replace(g_idx=None), w["up"].replace(g_idx=None)  # treated as sorted: values don't matter
    wide = variant == "subset"  # x has 128 columns, P picks 64 of them: not a permutation of x's last dim
    x = torch.randn(64 if variant == "dim0" else 2, 128 if wide else 64)
    perm = torch.randperm(x.shape[dim])[:64] if wide else torch.randperm(x.shape[dim])
    args = (x, perm, gate.qweight, gate.qzeros, gate.scales, up.qweight, up.qzeros, up.scales)
    _record(gm, args)
    return gm, args


@pytest.mark.parametrize("fuse", [True, False])
@pytest.mark.parametrize("variant,folded", [("plain", True), ("dim1", True), ("other_reader", False),
                                            ("dim0", False), ("subset", False), ("computed", False)])
def test_perm_fold_only_where_every_reader_is_a_fast_op(variant, folded, fuse):
    """The gather is folded only when it permutes a graph input's whole last dim and every reader takes it as its
    x; the folded graph computes what the gather did (fused SwiGLU or two calls)."""
    from tpaware_compile.passes.lower import _fold_perms, _fuse_swiglu

    gm, args = _traced_gather(variant)
    before = gm(*args)
    if fuse:
        assert _fuse_swiglu(gm)
    names = _fold_perms(gm)
    gm.graph.lint()
    gm.recompile()
    ops = [n for n in gm.graph.nodes if str(n.target).startswith("tpaware.")]
    gathers = [n for n in gm.graph.nodes if n.target is torch.index_select]
    assert bool(gathers) != folded and sorted(names) == (sorted(["gptq_mm_fast", "gptq_mm_fast_1"]) if folded else [])
    x, perm = (n for n in gm.graph.nodes if n.op == "placeholder" and n.name in ("x", "perm"))
    assert all((o.args[0], o.args[-1]) == (x, perm) for o in ops) == folded
    after = gm(*args)
    for a, b in zip(*(t if isinstance(t, tuple) else (t,) for t in (before, after))):
        assert rel_err(b, a) < 1e-6
