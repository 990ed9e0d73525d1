"""Lower reference ``tpaware::gptq_mm`` nodes to the project's Triton kernels.

Contiguous-group weights (g_idx None, what the TP-aware rewrite leaves behind) go to ``tpaware::gptq_mm_fast``,
which takes no g_idx at all; a weight that still carries a g_idx goes to the per-row g_idx kernel
(``tpaware::gptq_mm_triton``). Then ``silu(x @ W_gate) * (x @ W_up)`` on two such fast calls of one x becomes one
``tpaware::gptq_swiglu_fast`` (one x prep, one epilogue instead of two split-K reductions and a multiply).
On CPU the reference stays unless the Triton interpreter runs (tests): there the Triton ops would only call
the reference too.
"""

import operator
from typing import List, Optional

import torch
import torch.nn.functional as F
from torch.fx import GraphModule, Node

from ..ops import gptq_mm  # noqa: F401  registers tpaware::gptq_mm

GPTQ_MM = (torch.ops.tpaware.gptq_mm, torch.ops.tpaware.gptq_mm.default)
MODES = ("auto", "always", "never")


def lower_gptq_mm(gm: GraphModule, mode: str = "auto", fuse_swiglu: bool = True) -> List[str]:
    """Swap eligible nodes in place; returns one line per gptq_mm node saying which kernel it got."""
    if mode not in MODES:
        raise ValueError(f"lower must be one of {MODES}, got {mode!r}")
    # imported here: importing triton is slow and the CPU path may never need it
    from .. import kernels
    from ..kernels import op  # noqa: F401  registers tpaware::gptq_mm_fast

    choices = []
    for node in gm.graph.find_nodes(op="call_function", target=GPTQ_MM[1]) + \
            gm.graph.find_nodes(op="call_function", target=GPTQ_MM[0]):
        reason = _skip_reason(node, mode, kernels.INTERPRET)
        if reason is not None:
            choices.append(f"{node.name}: reference ({reason})")
        elif node.args[4] is None:
            x, qweight, qzeros, scales, _, group_size, group_offset, zero_offset = node.args
            node.target = torch.ops.tpaware.gptq_mm_fast.default
            node.args = (x, qweight, qzeros, scales, group_size, group_offset, zero_offset)
            choices.append(f"{node.name}: triton, sorted groups (gptq_mm_fast)")
        else:
            node.target = torch.ops.tpaware.gptq_mm_triton.default
            choices.append(f"{node.name}: triton, per-row g_idx (gptq_mm_triton)")
    if fuse_swiglu:
        fused = {n: f"triton, sorted groups, fused SwiGLU with {partner} (gptq_swiglu_fast)"
                 for n, partner in _fuse_swiglu(gm)}
        choices = [f"{name}: {fused[name]}" if name in fused else line
                   for line, name in ((c, c.split(": ", 1)[0]) for c in choices)]
    gm.recompile()
    return choices


_MULS = {operator.mul, torch.mul, torch.ops.aten.mul.Tensor}
_SILUS = {F.silu, torch.ops.aten.silu.default}


def _fuse_swiglu(gm: GraphModule) -> List[tuple]:
    """Rewrite each ``mul(silu(gate), up)`` of two fast calls on one x; returns (node name, partner) pairs."""
    fused = []
    for mul in [n for n in gm.graph.nodes if n.op == "call_function" and n.target in _MULS]:
        pair = _swiglu_pair(mul)
        if pair is None:
            continue
        silu, gate, up = pair
        with gm.graph.inserting_before(mul):
            new = gm.graph.call_function(torch.ops.tpaware.gptq_swiglu_fast.default,
                                         (gate.args[0], *gate.args[1:4], *up.args[1:4], *gate.args[4:7]))
        new.meta.update(mul.meta)
        mul.replace_all_uses_with(new)
        for n in (mul, silu, gate, up):
            gm.graph.erase_node(n)
        fused += [(gate.name, up.name), (up.name, gate.name)]
    return fused


def _swiglu_pair(mul: Node):
    """(silu, gate, up) when ``mul`` is silu(gate) * up (either order) and nothing else reads them."""
    if len(mul.args) != 2 or mul.kwargs:
        return None
    for silu, up in (mul.args, mul.args[::-1]):
        if not (_is_call(silu, _SILUS) and len(silu.args) == 1 and silu.kwargs in ({}, {"inplace": False})):
            continue
        gate = silu.args[0]
        if not (_is_fast(gate) and _is_fast(up)) or gate.args[0] is not up.args[0] or gate.args[4:] != up.args[4:]:
            continue
        if len(gate.users) == len(silu.users) == len(up.users) == 1 and _same_shape(gate, up):
            return silu, gate, up
    return None


def _is_call(n, targets) -> bool:
    return isinstance(n, Node) and n.op == "call_function" and n.target in targets


def _is_fast(n) -> bool:
    fast = torch.ops.tpaware.gptq_mm_fast  # registered by kernels.op, imported before any lowering
    return _is_call(n, (fast, fast.default))


def _same_shape(a: Node, b: Node) -> bool:
    va, vb = (n.meta.get("val", n.meta.get("example_value")) for n in (a, b))
    return va is not None and vb is not None and va.shape == vb.shape and va.dtype == vb.dtype


def _skip_reason(node: Node, mode: str, interpreted: bool) -> Optional[str]:
    if mode == "never":
        return "lowering off"
    if mode == "always" or interpreted:
        return None
    device = _device(node.args[0])
    return None if device is not None and device.type == "cuda" else f"no Triton kernel on {device}"


def _device(node: Node) -> Optional[torch.device]:
    val = node.meta.get("val", node.meta.get("example_value"))
    return getattr(val, "device", None)
