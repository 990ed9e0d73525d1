"""The lowering pass after the rewrite, with the Triton kernels running under the interpreter (CPU ranks)."""

import pytest
import torch

from mlp_cases import mlp_weights, rel_err
from tpaware_compile.nn import TPMLP, reference_mlp


def _compiled_mlp(rank, world, kind, kernel):
    from tpaware_compile import report
    from tpaware_compile.backend import tpaware

    report.clear_reports()
    weights = mlp_weights(kind, inter=128, group_size=32, seed=3)
    mlp = TPMLP.from_full(kind, weights, "N", rank, world, kernel=kernel)
    x = torch.randn(2, 64, generator=torch.Generator().manual_seed(9)).half()
    compiled = torch.compile(mlp, backend=tpaware, options={"tpaware.hand_off": "eager", "tpaware.keep_graph": True})
    first, second = compiled(x), compiled(x)  # the second call runs the retrace of the converted module
    ref = reference_mlp(kind, weights, x)
    targets = [sorted(str(n.target) for n in r.graph_module.graph.nodes
                      if n.op == "call_function" and str(n.target).startswith("tpaware."))
               for r in report.all_reports()]
    return rel_err(first, ref), rel_err(second, ref), targets


@pytest.mark.interpreter
@pytest.mark.parametrize("kind,kernel", [("swiglu", "reference"), ("gelu", "triton")])
def test_rewrite_then_lowering_runs_triton(ranks, kind, kernel):
    for first, second, targets in ranks(2, interpret=True).run(_compiled_mlp, kind, kernel):
        assert first < 1e-2 and second < 1e-2
        # every graph (the rewritten one and the retrace of the converted module): all quantized matmuls on the
        # sorted-group kernel, down by the rewrite and the first layer(s) by their folded act-order x[P1]
        n_first = 2 if kind == "swiglu" else 1
        assert len(targets) == 2
        for t in targets:
            assert t == ["tpaware.gptq_mm_fast.default"] * (n_first + 1), t
