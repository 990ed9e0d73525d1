"""Plain per-row g_idx kernel (the `gidx_triton` baseline): what a kernel that reads ``scales[g_idx[k]]`` row
by row costs. Deliberately unsorted and straightforward: every row gathers its own scale and zero, and each
packed word is loaded once per row it holds. Used for act-order weights the rewrite did not sort, and as the
benchmark baseline the TP-aware layout is measured against.
"""

import torch
import triton
import triton.language as tl

from .common import tl_dtype


@triton.jit
def _gidx_kernel(
    x_ptr,  # [M, K] in DTYPE, row stride stride_xm
    qw_ptr,  # [K/8, N] int32, packed along K
    qz_ptr,  # [G, N/8] int32
    sc_ptr,  # [G, N]
    gi_ptr,  # [K] int32 group of every row
    out_ptr,  # [M, N]
    M, N, K, stride_xm, zero_offset,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DTYPE: tl.constexpr,
):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask, n_mask = offs_m < M, offs_n < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rows = k0 + tl.arange(0, BLOCK_K)
        r_mask = rows < K
        mask = r_mask[:, None] & n_mask[None, :]
        q = tl.load(qw_ptr + (rows // 8)[:, None] * N + offs_n[None, :], mask=mask, other=0)
        q = (q >> ((rows % 8) * 4)[:, None]) & 0xF
        g = tl.load(gi_ptr + rows, mask=r_mask, other=0)
        s = tl.load(sc_ptr + g[:, None] * N + offs_n[None, :], mask=mask, other=0.0).to(tl.float32)
        zw = tl.load(qz_ptr + g[:, None] * (N // 8) + (offs_n // 8)[None, :], mask=mask, other=0)
        z = ((zw >> ((offs_n % 8) * 4)[None, :]) & 0xF) + zero_offset
        w = ((q - z).to(tl.float32) * s).to(DTYPE)  # [BK, BN]
        xv = tl.load(x_ptr + offs_m[:, None] * stride_xm + rows[None, :], mask=m_mask[:, None] & r_mask[None, :],
                     other=0.0)
        acc += tl.dot(xv.to(DTYPE), w, input_precision="ieee")
    dst = out_ptr + offs_m[:, None] * N + offs_n[None, :]
    tl.store(dst, acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


def gidx_mm(x, qweight, qzeros, scales, g_idx, zero_offset, out_dtype, block=(16, 64, 32), num_warps=4):
    """x [M, K] (row-contiguous) -> [M, N] in out_dtype, groups read through g_idx row by row."""
    m, k = x.shape
    n = qweight.shape[1]
    out = torch.empty((m, n), dtype=out_dtype, device=x.device)
    bm, bn, bk = block
    grid = (triton.cdiv(m, bm), triton.cdiv(n, bn))
    _gidx_kernel[grid](x, qweight, qzeros, scales, g_idx.to(torch.int32), out, m, n, k, x.stride(0), zero_offset,
                       BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, DTYPE=tl_dtype(x.dtype), num_warps=num_warps)
    return out
