"""The lowering pass after the rewrite, with the Triton kernels running under the interpreter (CPU ranks)."""

import pytest
import torch

from mlp_cases import mlp_weights, rel_err
from tpaware_compile.nn import TPMLP, reference_mlp


def _compiled_mlp(rank, world, kind, kernel, fuse=True):
    from tpaware_compile import report
    from tpaware_compile.backend import tpaware

    report.clear_reports()
    weights = mlp_weights(kind, inter=128, group_size=32, seed=3)
    mlp = TPMLP.from_full(kind, weights, "N", rank, world, kernel=kernel)
    x = torch.randn(2, 64, generator=torch.Generator().manual_seed(9)).half()
    opts = {"tpaware.hand_off": "eager", "tpaware.keep_graph": True, "tpaware.fuse_swiglu": fuse}
    compiled = torch.compile(mlp, backend=tpaware, options=opts)
    first, second = compiled(x), compiled(x)  # the second call runs the retrace of the converted module
    ref = reference_mlp(kind, weights, x)
    targets = [sorted(str(n.target) for n in r.graph_module.graph.nodes
                      if n.op == "call_function" and str(n.target).startswith("tpaware."))
               for r in report.all_reports()]
    return rel_err(first, ref), rel_err(second, ref), targets, report.all_reports()[0].rows[0].kernels


@pytest.mark.interpreter
@pytest.mark.parametrize("kind,kernel,fuse", [("swiglu", "reference", True), ("swiglu", "triton", False),
                                              ("gelu", "triton", True)])
def test_rewrite_then_lowering_runs_triton(ranks, kind, kernel, fuse):
    for first, second, targets, kernels in ranks(2, interpret=True).run(_compiled_mlp, kind, kernel, fuse):
        assert first < 1e-2 and second < 1e-2
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

    class Record(torch.fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            n.meta["val"] = out
            return out

    Record(gm).run(*args)
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
