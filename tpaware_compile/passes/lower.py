"""Lower reference ``tpaware::gptq_mm`` nodes to the Triton op ``tpaware::gptq_mm_fast``.

Only contiguous-group weights (g_idx None, what the TP-aware rewrite leaves behind) have a fast kernel; a node
that still carries a g_idx keeps the reference op, and the report says so. On CPU the reference stays unless
the Triton interpreter runs (tests), since the fast op would only call the reference there too.
"""

from typing import List, Optional

import torch
from torch.fx import GraphModule, Node

from ..ops import gptq_mm  # noqa: F401  registers tpaware::gptq_mm

GPTQ_MM = (torch.ops.tpaware.gptq_mm, torch.ops.tpaware.gptq_mm.default)
MODES = ("auto", "always", "never")


def lower_gptq_mm(gm: GraphModule, mode: str = "auto") -> List[str]:
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
        if reason is None:
            x, qweight, qzeros, scales, _g_idx, group_size, group_offset, zero_offset = node.args
            node.target = torch.ops.tpaware.gptq_mm_fast.default
            node.args = (x, qweight, qzeros, scales, group_size, group_offset, zero_offset)
        choices.append(f"{node.name}: {'triton gptq_mm_fast' if reason is None else 'reference (' + reason + ')'}")
    gm.recompile()
    return choices


def _skip_reason(node: Node, mode: str, interpreted: bool) -> Optional[str]:
    if mode == "never":
        return "lowering off"
    if node.args[4] is not None:
        return "weight keeps a g_idx"
    if mode == "always" or interpreted:
        return None
    device = _device(node.args[0])
    return None if device is not None and device.type == "cuda" else f"no Triton kernel on {device}"


def _device(node: Node) -> Optional[torch.device]:
    val = node.meta.get("val", node.meta.get("example_value"))
    return getattr(val, "device", None)
