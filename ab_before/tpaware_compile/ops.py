"""Custom ops, so Dynamo captures each quantized matmul as one node that the passes can find and lower.

``tpaware::gptq_mm`` is the reference (dequantize, then matmul; accumulated in fp64), on every device. The lowering pass
swaps it for the fast op of ``kernels/`` where one applies. Bias stays outside the op: it is an ordinary add
that Inductor fuses, and a row-parallel layer must add it after the AllReduce anyway.
"""

from typing import Optional

import torch

from .gptq import GPTQWeight, contiguous_group_index, dequantize_unchecked
from .layout import packed_shape


@torch.library.custom_op("tpaware::gptq_mm", mutates_args=())
def gptq_mm(
    x: torch.Tensor,  # [..., K]
    qweight: torch.Tensor,  # [K/8, N] int32, or tiled (layout.py)
    qzeros: torch.Tensor,  # [G, N/8] int32
    scales: torch.Tensor,  # [G, N]
    g_idx: Optional[torch.Tensor],  # [K], None for contiguous groups
    group_size: int,
    group_offset: int,
    zero_offset: int,
) -> torch.Tensor:  # [..., N] in x.dtype
    k = packed_shape(qweight)[0] * 8
    groups = g_idx if g_idx is not None else contiguous_group_index(k, group_size, group_offset, qweight.device)
    # fp64 accumulation: a column's result must not depend on where it sits (BLAS blocks by position), or a
    # rewrite that only permutes columns would change bits; one final rounding makes it position-independent
    w = dequantize_unchecked(qweight, qzeros, scales, groups, zero_offset, torch.float64)  # [K, N]
    return (x.to(torch.float64) @ w).to(x.dtype)


@gptq_mm.register_fake
def _(x, qweight, qzeros, scales, g_idx, group_size, group_offset, zero_offset):
    return fake_matmul_out(x, qweight, "gptq_mm")


def fake_matmul_out(x: torch.Tensor, qweight: torch.Tensor, op_name: str) -> torch.Tensor:
    """A quantized matmul's output under fake tensors: [..., N] in x's dtype, x's K checked against qweight's
    (either layout). The fake kernels of every op here and in kernels/op.py."""
    words, n = packed_shape(qweight)
    torch._check(x.shape[-1] == words * 8, lambda: f"{op_name}: x's last dim must equal 8 x qweight's words")
    return x.new_empty(*x.shape[:-1], n)


def gptq_linear(x: torch.Tensor, w: GPTQWeight, add_bias: bool = True) -> torch.Tensor:
    """``x @ W (+ bias)`` through the custom op."""
    y = torch.ops.tpaware.gptq_mm(x, w.qweight, w.qzeros, w.scales, w.g_idx, w.group_size, w.group_offset,
                                  w.zero_offset)
    return y + w.bias if add_bias and w.bias is not None else y
