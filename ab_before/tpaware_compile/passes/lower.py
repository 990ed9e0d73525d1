"""Lower reference ``tpaware::gptq_mm`` nodes to the project's Triton kernels.

Contiguous-group weights (g_idx None, what the TP-aware rewrite leaves behind) go to ``tpaware::gptq_mm_fast``,
which takes no g_idx at all; a weight that still carries a g_idx goes to the per-row g_idx kernel
(``tpaware::gptq_mm_triton``). Then ``silu(x @ W_gate) * (x @ W_up)`` on two such fast calls of one x becomes one
``tpaware::gptq_swiglu_fast`` (one x prep, one epilogue instead of two split-K reductions and a multiply).
Last, with fold_perm (off by default), an ``index_select(x, -1, P)`` of a graph input x, read only by fast ops
as their x (the rewrite's x[..., P1] before the first layers, or a presorted module's own), is folded into them:
they take x and ``perm=P`` (the decode x-prep kernel reads x[..., P] itself, the other kernels gather first).
Where x is computed in the graph the gather always stays: Inductor fuses it into x's producer (an RMSNorm and the
gather compile to one kernel). On CPU the reference stays unless the Triton interpreter runs (tests): there the
Triton ops would only call the reference too. A weight the rewrite tiled (layout.py) goes to the same ops, which
read either layout; its line in the report says "tiled words".
"""

import operator
from typing import List, Optional

import torch
import torch.nn.functional as F
from torch.fx import GraphModule, Node

from ..layout import is_tiled
from ..ops import gptq_mm  # noqa: F401  registers tpaware::gptq_mm
from ..report import PERM_FOLDED, SWIGLU_FUSED, TILED  # the report reads these words in the lines returned here

GPTQ_MM = (torch.ops.tpaware.gptq_mm, torch.ops.tpaware.gptq_mm.default)
MODES = ("auto", "always", "never")
_FUSED_FROM = "tpaware_fused_from"  # meta key: the gptq_mm nodes a fused call replaced (their report lines)


def lower_gptq_mm(gm: GraphModule, mode: str = "auto", fuse_swiglu: bool = True, fold_perm: bool = False
                  ) -> List[str]:
    """Swap eligible nodes in place; returns one line per gptq_mm node saying which kernel it got."""
    if mode not in MODES:
        raise ValueError(f"lower must be one of {MODES}, got {mode!r}")
    # imported here: importing triton is slow and the CPU path may never need it
    from .. import kernels
    from ..kernels import op  # noqa: F401  registers tpaware::gptq_mm_fast

    choices, tiled = [], set()
    for node in gm.graph.find_nodes(op="call_function", target=GPTQ_MM[1]) + \
            gm.graph.find_nodes(op="call_function", target=GPTQ_MM[0]):
        if _holds_tiled(gm, node.args[1]):
            tiled.add(node.name)
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
        fused = {n: f"triton, sorted groups, {SWIGLU_FUSED} with {partner} (gptq_swiglu_fast)"
                 for n, partner in _fuse_swiglu(gm)}
        choices = [f"{name}: {fused[name]}" if name in fused else line
                   for line, name in ((c, c.split(": ", 1)[0]) for c in choices)]
    if fold_perm:
        choices = _noted(choices, set(_fold_perms(gm)), PERM_FOLDED)
    choices = _noted(choices, tiled, TILED)
    gm.recompile()
    return choices


def _noted(choices: List[str], names: set, note: str) -> List[str]:
    """The report lines (``name: how``) with ``, note`` appended to those of the named nodes."""
    return [f"{c}, {note}" if c.split(": ", 1)[0] in names else c for c in choices]


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
                                         (gate.args[0], *gate.args[1:4], *up.args[1:4], *gate.args[4:]))
        new.meta.update(mul.meta)
        new.meta[_FUSED_FROM] = (gate.name, up.name)
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


_INDEX_SELECTS = {torch.index_select, torch.ops.aten.index_select.default}


def _fold_perms(gm: GraphModule) -> List[str]:
    """Fold each last-dim ``index_select(x, -1, P)`` of a graph input x whose only readers are fast ops taking it
    as x (and not already a perm) into them: they read x and gather through ``perm=P``. Returns the gptq_mm node
    names (report lines) of the calls that now do. Any other reader, or an x computed in the graph (Inductor
    fuses the gather into its producer), keeps the gather as it is."""
    folded = []
    for sel in list(gm.graph.nodes):  # a copy: folded gathers are erased on the way
        gather = _last_dim_gather(sel)
        if gather is None:
            continue
        x, perm = gather
        if x.op != "placeholder" or not sel.users or not all(_takes_as_x(u, sel) for u in sel.users):
            continue
        for user in list(sel.users):
            user.args = (x, *user.args[1:], perm)  # perm is the ops' last argument
            folded += user.meta.get(_FUSED_FROM, (user.name,))
        gm.graph.erase_node(sel)
    return folded


def _last_dim_gather(n: Node):
    """(x, P) when n is ``index_select(x, -1 or x's last dim, P)`` with P as long as x's last dim, else None.
    (The rewrite spells x[..., P1] this way; canonicalize brings ``x[..., P]`` and ``x.index_select`` to it.)"""
    if not (_is_call(n, _INDEX_SELECTS) or (n.op == "call_method" and n.target == "index_select")):
        return None
    if len(n.args) != 3 or n.kwargs or not all(isinstance(a, Node) for a in (n.args[0], n.args[2])):
        return None
    x, dim, perm = n.args
    vx, vn = (_val(a) for a in (x, n))
    if not (isinstance(vx, torch.Tensor) and isinstance(vn, torch.Tensor)) or dim not in (-1, vx.dim() - 1):
        return None
    k, kp = vx.shape[-1], vn.shape[-1]  # P must index all of x's last dim: the kernels read x[..., P] as [..., K]
    return (x, perm) if isinstance(k, int) and isinstance(kp, int) and k == kp else None


def _takes_as_x(user: Node, sel: Node) -> bool:
    """user is a fast op reading sel as its x only, with no perm of its own yet."""
    fast, swiglu = torch.ops.tpaware.gptq_mm_fast, torch.ops.tpaware.gptq_swiglu_fast
    slots = {fast: 7, fast.default: 7, swiglu: 10, swiglu.default: 10}  # positional args before perm
    slot = slots.get(user.target) if user.op == "call_function" else None
    return (slot is not None and len(user.args) == slot and not user.kwargs and user.args[0] is sel
            and sel not in user.args[1:])


def _is_call(n, targets) -> bool:
    return isinstance(n, Node) and n.op == "call_function" and n.target in targets


def _is_fast(n) -> bool:
    fast = torch.ops.tpaware.gptq_mm_fast  # registered by kernels.op, imported before any lowering
    return _is_call(n, (fast, fast.default))


def _val(n: Node):
    return n.meta.get("val", n.meta.get("example_value"))


def _same_shape(a: Node, b: Node) -> bool:
    va, vb = (_val(n) for n in (a, b))
    return va is not None and vb is not None and va.shape == vb.shape and va.dtype == vb.dtype


def _skip_reason(node: Node, mode: str, interpreted: bool) -> Optional[str]:
    if mode == "never":
        return "lowering off"
    if mode == "always" or interpreted:
        return None
    device = _device(node.args[0])
    return None if device is not None and device.type == "cuda" else f"no Triton kernel on {device}"


def _holds_tiled(gm: GraphModule, qweight: Node) -> bool:
    """Whether the qweight a node reads is tiled (layout.py): a constant of the rewrite, or a module's buffer."""
    value = getattr(gm, qweight.target, None) if qweight.op == "get_attr" else _val(qweight)
    return isinstance(value, torch.Tensor) and is_tiled(value)


def _device(node: Node) -> Optional[torch.device]:
    return getattr(_val(node), "device", None)
