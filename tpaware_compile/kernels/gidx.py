"""Per-row g_idx kernel (the `gidx_triton` provider): act-order weights as stored, every row reading its own
group's scale and zero through ``g_idx``. The eager baselines (forms N and L) run their act-order layers on it,
so it is built as well as the layout allows: split-K so every SM is busy at decode sizes, each packed word
loaded once and unpacked in registers, and the transposed dot of gemm.py (weight tile on the MMA's large side).
What it cannot avoid is the layout's own cost: a scale and a zero gathered per weight (L2-resident tables)
instead of one per group, and a full dequantization to x's dtype before the dot.
Above ``DOT_MAX_M`` tokens it dequantizes once (torch) and calls cuBLAS, as the sorted path does.
"""

import torch
import triton
import triton.language as tl

from ..gptq import dequantize_unchecked
from .common import ceil_div, split_k_matmul, splits_of, tl_dtype
from .launcher import launch_kernel


@triton.jit
def _gidx_kernel(
    x_ptr,  # [M, K] in DTYPE, row stride stride_xm
    qw_ptr,  # [K/8, N] int32, packed along K
    qz_ptr,  # [G, N/8] int32, packed along N
    sc_ptr,  # [G, N]
    gi_ptr,  # [K] int32: the group of every row
    out_ptr,  # [SPLIT_K, M, N] fp32 partials, or [M, N] output when SPLIT_K == 1
    M, N, K, stride_xm, zero_offset, steps_per_split,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,  # rows per step, a multiple of 8
    DTYPE: tl.constexpr,
):
    pid_n, pid_k, pid_m = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n_mask, m_mask = offs_n < N, offs_m < M
    shifts = (tl.arange(0, 8) * 4)[None, None, :]  # [1, 1, 8]
    zero_shift = ((offs_n % 8) * 4)[:, None]  # [BN, 1]
    step_end = tl.minimum((pid_k + 1) * steps_per_split, tl.cdiv(K, BLOCK_K))
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    for step in range(pid_k * steps_per_split, step_end):
        words = step * (BLOCK_K // 8) + tl.arange(0, BLOCK_K // 8)  # [BW]
        w_ok = words < K // 8
        q = tl.load(qw_ptr + words[None, :] * N + offs_n[:, None], mask=w_ok[None, :] & n_mask[:, None], other=0)
        q = tl.reshape((q[:, :, None] >> shifts) & 0xF, [BLOCK_N, BLOCK_K])  # row k = 8 * word + nibble
        rows = step * BLOCK_K + tl.arange(0, BLOCK_K)  # [BK]
        r_ok = rows < K
        g = tl.load(gi_ptr + rows, mask=r_ok, other=0)
        gather_mask = r_ok[None, :] & n_mask[:, None]
        s = tl.load(sc_ptr + g[None, :] * N + offs_n[:, None], mask=gather_mask, other=0.0)  # [BN, BK]
        zw = tl.load(qz_ptr + g[None, :] * (N // 8) + (offs_n // 8)[:, None], mask=gather_mask, other=0)
        z = ((zw >> zero_shift) & 0xF) + zero_offset
        w = ((q - z).to(tl.float32) * s.to(tl.float32)).to(DTYPE)  # one rounding: gptq.dequantize's bits
        xt = tl.load(x_ptr + offs_m[None, :] * stride_xm + rows[:, None], mask=r_ok[:, None] & m_mask[None, :],
                     other=0.0)  # [BK, BM]
        acc += tl.dot(w, xt.to(DTYPE), input_precision="ieee")  # [BN, BM]
    dst = out_ptr + pid_k * M * N + offs_m[None, :] * N + offs_n[:, None]
    tl.store(dst, acc.to(out_ptr.dtype.element_ty), mask=n_mask[:, None] & m_mask[None, :])


def gidx_config(m: int, n: int, sms: int) -> dict:
    """Tiles and split-K: about 4 programs per SM on large shards, more splits on small ones (as gemm.py)."""
    block_m = 16 if m <= 16 else (32 if m <= 32 else 64)
    tiles = ceil_div(n, 64) * ceil_div(m, block_m)
    return dict(BLOCK_M=block_m, BLOCK_N=64, BLOCK_K=64, SPLIT_K=min(max(1, 4 * sms // tiles), 16), num_warps=4,
                num_stages=3)


def gidx_mm(x, qweight, qzeros, scales, g_idx, zero_offset, out_dtype, cfg):
    """x [M, K] (row-contiguous) -> [M, N] in out_dtype, groups read through g_idx row by row."""
    g32 = g_idx.to(torch.int32)

    def launch(x, qweight, qzeros, scales, _group_size, _group_offset, zero_offset, part, per, cfg):
        m, k = x.shape
        n = qweight.shape[1]
        split_k = splits_of(part)
        grid = (ceil_div(n, cfg["BLOCK_N"]), split_k, ceil_div(m, cfg["BLOCK_M"]))
        launch_kernel(_gidx_kernel, grid, x, qweight, qzeros, scales, g32, part, m, n, k, x.stride(0), zero_offset,
                      per, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"],
                      DTYPE=tl_dtype(x.dtype), num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])

    return split_k_matmul(launch, x, qweight, qzeros, scales, 0, 0, zero_offset, out_dtype, cfg)


def gidx_dequant_mm(x, qweight, qzeros, scales, g_idx, zero_offset, out_dtype):
    """Large M: dequantize through g_idx once, then cuBLAS."""
    w = dequantize_unchecked(qweight, qzeros, scales, g_idx, zero_offset, x.dtype)
    return torch.matmul(x, w).to(out_dtype)
