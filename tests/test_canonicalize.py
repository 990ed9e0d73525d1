"""Spellings of one step reach the matcher as one spelling (in-process, no ranks)."""

import operator

import torch

from tpaware_compile.passes.canonicalize import canonicalize


def _canonical_graph(fn, *args):
    graphs = []

    def backend(gm, example_inputs):
        canonicalize(gm)
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    out = torch.compile(fn, backend=backend)(*args)
    assert torch.equal(out, fn(*args))  # canonicalizing is exact
    return graphs[0]


def _targets(gm):
    return [n.target for n in gm.graph.nodes if n.op in ("call_function", "call_method")]


def test_slices_become_narrow_and_index_becomes_index_select():
    def fn(h, idx):
        return (h.chunk(2, -1)[1] + h[..., 4:8] + h.split(4, dim=-1)[0] + torch.chunk(h, 2, dim=1)[0]
                + h[..., idx][..., :4])

    gm = _canonical_graph(fn, torch.randn(3, 8), torch.randperm(8))
    targets = _targets(gm)
    assert targets.count(torch.narrow) == 5 and targets.count(torch.index_select) == 1
    assert operator.getitem not in targets and "chunk" not in targets and torch.chunk not in targets


def test_multi_dim_index_is_not_a_permutation():
    gm = _canonical_graph(lambda h, i: h[..., i] * 2, torch.randn(3, 8), torch.randint(0, 8, (2, 2)))
    assert torch.index_select not in _targets(gm)
