"""The fast custom ops. ``tpaware::gptq_mm_fast``: what the lowering pass puts in place of ``tpaware::gptq_mm``
nodes whose groups are contiguous (g_idx None). ``tpaware::gptq_mm_triton``: ``gptq_mm``'s signature on the
best Triton kernel for the layout (sorted groups, or the per-row g_idx kernel), for eager models that must not
run the fp32 reference (``GPTQLinear(kernel="triton")``). ``tpaware::gptq_swiglu_fast``: gate and up in one.
Opaque (torch.library.custom_op), so Dynamo and Inductor keep each as one extern call: ``triton_op`` /
``wrap_triton`` would not compile under the interpreter. (An op registered through ``Library.impl`` cost less
host time on an empty op, but not consistently on these: bench/README.md, "Model".)

CUDA runs the Triton kernels; CPU runs them under TRITON_INTERPRET=1 (tests) and the reference otherwise.
Bias stays outside, as for ``gptq_mm``. The fast ops' optional last argument ``perm`` [K] makes them compute
x[..., perm] @ W (the lowering folds an ``index_select`` into it): read inside the decode x-prep kernel, a gather
before the other kernels (kernels.gptq_mm_sorted). The fast ops take qweight N-major or tiled (layout.py).
"""

from typing import Optional

import torch

from ..gptq import GPTQWeight, reference_matmul
from ..layout import packed_shape
from ..ops import fake_matmul_out, gptq_mm
from . import INTERPRET, check_perm, check_sorted_args, gptq_mm_gidx, gptq_mm_sorted, gptq_swiglu_sorted


@torch.library.custom_op("tpaware::gptq_mm_fast", mutates_args=())
def gptq_mm_fast(
    x: torch.Tensor,  # [..., K]
    qweight: torch.Tensor,  # [K/8, N] int32, or tiled (layout.py)
    qzeros: torch.Tensor,  # [G, N/8] int32
    scales: torch.Tensor,  # [G, N]
    group_size: int,
    group_offset: int,
    zero_offset: int,
    perm: Optional[torch.Tensor] = None,  # [K] int32 / int64: x[..., perm] @ W
) -> torch.Tensor:  # [..., N] in x.dtype
    if INTERPRET:
        return gptq_mm_sorted(x, qweight, qzeros, scales, group_size, group_offset, zero_offset, perm=perm)
    check_sorted_args(x, qweight, qzeros, scales, group_size, group_offset, zero_offset)
    x = _permuted(x, perm)
    w = GPTQWeight(qweight, qzeros, scales, None, group_size, zero_offset, group_offset)
    return reference_matmul(x.reshape(-1, x.shape[-1]), w).reshape(*x.shape[:-1], w.out_features)


@gptq_mm_fast.register_kernel("cuda")
def _(x, qweight, qzeros, scales, group_size, group_offset, zero_offset, perm=None):
    return gptq_mm_sorted(x, qweight, qzeros, scales, group_size, group_offset, zero_offset, perm=perm)


@gptq_mm_fast.register_fake
def _(x, qweight, qzeros, scales, group_size, group_offset, zero_offset, perm=None):
    out = fake_matmul_out(x, qweight, "gptq_mm_fast")
    _check_perm_shape(perm, x, "gptq_mm_fast")
    return out


def _permuted(x: torch.Tensor, perm: Optional[torch.Tensor]) -> torch.Tensor:
    """The reference path's x[..., perm]: validated as the kernels validate it, then gathered."""
    return x if perm is None else x.index_select(-1, check_perm(perm, x))


def _check_perm_shape(perm: Optional[torch.Tensor], x, op: str) -> None:
    if perm is not None:
        torch._check(perm.dim() == 1 and perm.shape[0] == x.shape[-1], lambda: f"{op}: perm must be [x.shape[-1]]")


def gptq_mm_fast_linear(x: torch.Tensor, w: GPTQWeight) -> torch.Tensor:
    """``x @ W`` (no bias) through the fast op; w must have contiguous groups."""
    if w.g_idx is not None:
        raise ValueError("gptq_mm_fast needs contiguous groups (g_idx None); sort the rows first")
    return torch.ops.tpaware.gptq_mm_fast(x, w.qweight, w.qzeros, w.scales, w.group_size, w.group_offset,
                                          w.zero_offset)


@torch.library.custom_op("tpaware::gptq_mm_triton", mutates_args=())
def gptq_mm_triton(
    x: torch.Tensor,  # [..., K]
    qweight: torch.Tensor,  # [K/8, N] int32, or tiled (layout.py) with g_idx None
    qzeros: torch.Tensor,  # [G, N/8] int32
    scales: torch.Tensor,  # [G, N]
    g_idx: Optional[torch.Tensor],  # [K], None for contiguous groups
    group_size: int,
    group_offset: int,
    zero_offset: int,
) -> torch.Tensor:  # [..., N] in x.dtype
    if not INTERPRET:  # CPU without the interpreter: the Triton kernels cannot run, the reference can
        return gptq_mm(x, qweight, qzeros, scales, g_idx, group_size, group_offset, zero_offset)
    return _triton_mm(x, qweight, qzeros, scales, g_idx, group_size, group_offset, zero_offset)


@gptq_mm_triton.register_kernel("cuda")
def _triton_mm(x, qweight, qzeros, scales, g_idx, group_size, group_offset, zero_offset):
    if g_idx is None:
        return gptq_mm_sorted(x, qweight, qzeros, scales, group_size, group_offset, zero_offset)
    return gptq_mm_gidx(x, qweight, qzeros, scales, g_idx, zero_offset)


@gptq_mm_triton.register_fake
def _(x, qweight, qzeros, scales, g_idx, group_size, group_offset, zero_offset):
    return fake_matmul_out(x, qweight, "gptq_mm_triton")


@torch.library.custom_op("tpaware::gptq_swiglu_fast", mutates_args=())
def gptq_swiglu_fast(
    x: torch.Tensor,  # [..., K]
    gate_qweight: torch.Tensor,  # [K/8, N] int32, or tiled (layout.py)
    gate_qzeros: torch.Tensor,  # [G, N/8] int32
    gate_scales: torch.Tensor,  # [G, N]
    up_qweight: torch.Tensor,
    up_qzeros: torch.Tensor,
    up_scales: torch.Tensor,
    group_size: int,
    group_offset: int,
    zero_offset: int,
    perm: Optional[torch.Tensor] = None,  # [K] int32 / int64: of x[..., perm]
) -> torch.Tensor:  # [..., N] in x.dtype: silu(x @ W_gate) * (x @ W_up)
    gate, up = (gate_qweight, gate_qzeros, gate_scales), (up_qweight, up_qzeros, up_scales)
    if INTERPRET:
        return gptq_swiglu_sorted(x, gate, up, group_size, group_offset, zero_offset, perm=perm)
    x = _permuted(x, perm)
    x2 = x.reshape(-1, x.shape[-1])
    ws = (GPTQWeight(*w, None, group_size, zero_offset, group_offset) for w in (gate, up))
    g, u = (reference_matmul(x2.float(), w) for w in ws)
    return (torch.nn.functional.silu(g) * u).to(x.dtype).reshape(*x.shape[:-1], packed_shape(gate_qweight)[1])


@gptq_swiglu_fast.register_kernel("cuda")
def _(x, gate_qweight, gate_qzeros, gate_scales, up_qweight, up_qzeros, up_scales, group_size, group_offset,
      zero_offset, perm=None):
    gate, up = (gate_qweight, gate_qzeros, gate_scales), (up_qweight, up_qzeros, up_scales)
    return gptq_swiglu_sorted(x, gate, up, group_size, group_offset, zero_offset, perm=perm)


@gptq_swiglu_fast.register_fake
def _(x, gate_qweight, gate_qzeros, gate_scales, up_qweight, up_qzeros, up_scales, group_size, group_offset,
      zero_offset, perm=None):
    out = fake_matmul_out(x, gate_qweight, "gptq_swiglu_fast")
    _check_perm_shape(perm, x, "gptq_swiglu_fast")
    return out
