"""Lower reference ``tpaware::gptq_mm`` nodes to the project's Triton kernels.

Contiguous-group weights (g_idx None, what the TP-aware rewrite leaves behind) go to ``tpaware::gptq_mm_fast``,
which takes no g_idx at all; a weight that still carries a g_idx goes to the per-row g_idx kernel
(``tpaware::gptq_mm_triton``). On CPU the reference stays unless the Triton interpreter runs (tests): there the
Triton ops would only call the reference too.
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
    gm.recompile()
    return choices


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
