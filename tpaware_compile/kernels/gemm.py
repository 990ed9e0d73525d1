"""Tensor-core path: ``tl.dot`` on dequantized tiles (M >= 2 without sm_90 or with fp32 x; on sm_90 config WGMMA
hands fp16 / bf16 x to wgmma.py and wgmma_prefill.py), and dequantize-then-cuBLAS for large M.

The dot is computed transposed, ``out^T [BN, BM] = W^T [BN, BK] @ x^T [BK, BM]``: the weight tile fills the
MMA's large M side (64+), so a decode batch of 16 tokens does not waste 3/4 of each MMA (the design probe
measured ~1.5x over the un-swapped form at M = 16 on H100). From M ~ 32 the un-swapped form wins (measured
here: 172-191 us vs 245-253 us at M = 64, TP 1 shapes), since its weight tile is the B operand read by the MMA
straight from shared memory. The weight operand is ``1 + q/16`` in x's dtype (exact), and the
scale/zero correction is applied once per K-step to the fp32 accumulator (see common.py).
"""

import torch
import triton
import triton.language as tl

from ..layout import is_tiled, packed_shape, word_stride
from .common import (ceil_div, group_affine, is_interpreted, load_group, mantissa_args, nibble_floats,
                     segment_rows, split_k_matmul, splits_of, store_split, tl_dtype, word_offsets, word_rows)
from .launcher import launch_kernel
from .wgmma import X_DTYPES as WGMMA_DTYPES, launch_wgmma
from .wgmma_prefill import launch_prefill, stream_mm


@triton.jit
def _dot_kernel(
    x_ptr,  # [M, K] in DTYPE, row stride stride_xm
    qw_ptr,  # [K/8, N] int32 packed along K, N-major or TILED (layout.py)
    qz_ptr,  # [G, N/8] int32, packed along N
    sc_ptr,  # [G, N]
    out_ptr,  # [SPLIT_K, M, N] fp32 partials, or [M, N] output when SPLIT_K == 1
    final_ptr,  # [M, N] output of a one-launch split-K (SERIAL), else unused
    count_ptr,  # [tiles] int32 zeros (SERIAL: common.tile_counters), else None
    gate_ptr,  # [SPLIT_K, M, N] fp32 partials of gate when this is up's launch of a serial SwiGLU, else None
    M, N, K, stride_xm, stride_q,  # stride_q: layout.word_stride(qweight)
    group_offset, zero_offset, segs_per_split, one_bits,
    GROUP_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,  # rows per step, divides GROUP_SIZE
    MANTISSA_SHIFT: tl.constexpr,
    DTYPE: tl.constexpr,  # dot operand dtype (x's)
    SERIAL: tl.constexpr,  # the last program of each output tile sums the partials (common.store_split)
    SWIGLU: tl.constexpr,  # ... and writes silu(gate) * this
    TILED: tl.constexpr,  # qweight in the tiled layout
):
    pid_n, pid_k, pid_m = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n_mask, m_mask = offs_n < N, offs_m < M
    offs_w = tl.arange(0, BLOCK_K // 8)
    offs_r = tl.arange(0, BLOCK_K)
    shifts = (tl.arange(0, 8) * 4)[None, None, :]  # [1, 1, 8]
    seg_start = pid_k * segs_per_split
    seg_end = tl.minimum(seg_start + segs_per_split, tl.cdiv(K + group_offset, BLOCK_K))
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    for seg in range(seg_start, seg_end):
        k0 = seg * BLOCK_K - group_offset  # first row; negative in the first step of a cut shard
        words = k0 // 8 + offs_w  # [BW]
        w_ok = (words >= 0) & (words < K // 8)
        q = tl.load(qw_ptr + word_offsets(words[None, :], offs_n[:, None], stride_q, TILED),
                    mask=w_ok[None, :] & n_mask[:, None], other=0)
        rows = word_rows(k0 + offs_r, TILED)  # [BK]: the row each position of the unpacked words holds
        xt = tl.load(x_ptr + offs_m[None, :] * stride_xm + rows[:, None],
                     mask=(rows >= 0)[:, None] & (rows < K)[:, None] & m_mask[None, :], other=0.0)  # [BK, BM]
        f = nibble_floats(q[:, :, None], one_bits, shifts, MANTISSA_SHIFT, DTYPE)  # [BN, BW, 8]
        f = tl.reshape(f, [BLOCK_N, BLOCK_K])  # position 8 * word + nibble
        d = tl.dot(f, xt.to(DTYPE), input_precision="ieee")  # [BN, BM]
        xs = tl.sum(xt.to(tl.float32), axis=0)  # [BM]
        s16, sz = group_affine(qz_ptr, sc_ptr, (seg * BLOCK_K) // GROUP_SIZE, offs_n, n_mask, N, zero_offset)
        acc += s16[:, None] * d - sz[:, None] * xs[None, :]
    store_split(acc, out_ptr, final_ptr, count_ptr, gate_ptr, pid_k, M * N, offs_m[None, :] * N + offs_n[:, None],
                n_mask[:, None] & m_mask[None, :], SERIAL, SWIGLU)


@triton.jit
def _dot_kernel_plain(
    x_ptr,  # [M, K] in DTYPE, row stride stride_xm
    qw_ptr,  # [K/8, N] int32 packed along K, N-major or TILED (layout.py)
    qz_ptr,  # [G, N/8] int32, packed along N
    sc_ptr,  # [G, N]
    out_ptr,  # [SPLIT_K, M, N] fp32 partials, or [M, N] output when SPLIT_K == 1
    final_ptr,  # [M, N] output of a one-launch split-K (SERIAL), else unused
    count_ptr,  # [tiles] int32 zeros (SERIAL: common.tile_counters), else None
    gate_ptr,  # [SPLIT_K, M, N] fp32 partials of gate when this is up's launch of a serial SwiGLU, else None
    M, N, K, stride_xm, stride_q,  # stride_q: layout.word_stride(qweight)
    group_offset, zero_offset, segs_per_split, one_bits,
    GROUP_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,  # rows per step, divides GROUP_SIZE
    MANTISSA_SHIFT: tl.constexpr,
    DTYPE: tl.constexpr,
    SERIAL: tl.constexpr,  # the last program of each output tile sums the partials (common.store_split)
    SWIGLU: tl.constexpr,  # ... and writes silu(gate) * this
    TILED: tl.constexpr,  # qweight in the tiled layout
):
    """out = x @ (1 + q/16) tiles, un-swapped: for M >= 64 the weight tile can feed the MMA straight from shared
    memory as the B operand (the swapped form must bring it back to registers as A)."""
    pid_n, pid_k, pid_m = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n_mask, m_mask = offs_n < N, offs_m < M
    offs_w = tl.arange(0, BLOCK_K // 8)
    offs_r = tl.arange(0, BLOCK_K)
    shifts = (tl.arange(0, 8) * 4)[None, :, None]  # [1, 8, 1]
    seg_start = pid_k * segs_per_split
    seg_end = tl.minimum(seg_start + segs_per_split, tl.cdiv(K + group_offset, BLOCK_K))
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for seg in range(seg_start, seg_end):
        k0 = seg * BLOCK_K - group_offset
        words = k0 // 8 + offs_w  # [BW]
        w_ok = (words >= 0) & (words < K // 8)
        q = tl.load(qw_ptr + word_offsets(words[:, None], offs_n[None, :], stride_q, TILED),
                    mask=w_ok[:, None] & n_mask[None, :], other=0)
        rows = word_rows(k0 + offs_r, TILED)  # [BK]: the row each position of the unpacked words holds
        xv = tl.load(x_ptr + offs_m[:, None] * stride_xm + rows[None, :],
                     mask=m_mask[:, None] & (rows.to(tl.uint32) < K)[None, :], other=0.0)  # [BM, BK]
        f = nibble_floats(q[:, None, :], one_bits, shifts, MANTISSA_SHIFT, DTYPE)  # [BW, 8, BN]
        f = tl.reshape(f, [BLOCK_K, BLOCK_N])  # position 8 * word + nibble
        d = tl.dot(xv.to(DTYPE), f, input_precision="ieee")  # [BM, BN]
        xs = tl.sum(xv.to(tl.float32), axis=1)  # [BM]
        s16, sz = group_affine(qz_ptr, sc_ptr, (seg * BLOCK_K) // GROUP_SIZE, offs_n, n_mask, N, zero_offset)
        acc += s16[None, :] * d - sz[None, :] * xs[:, None]
    store_split(acc, out_ptr, final_ptr, count_ptr, gate_ptr, pid_k, M * N, offs_m[:, None] * N + offs_n[None, :],
                m_mask[:, None] & n_mask[None, :], SERIAL, SWIGLU)


def dot_mm(x, qweight, qzeros, scales, group_size, group_offset, zero_offset, out_dtype, cfg, out=None):
    """x [M, K] (row-contiguous, dtype = dot operand dtype) -> [M, N] in out_dtype (into ``out`` where given).
    Config STREAM: the prefill kernel's stream-K form (wgmma_prefill.stream_mm) for fp16 / bf16 x."""
    if cfg.get("STREAM") and runs_wgmma(cfg, x):
        if out is None:
            out = torch.empty((x.shape[0], packed_shape(qweight)[1]), dtype=out_dtype, device=x.device)
        return stream_mm(x, qweight, qzeros, scales, group_size, group_offset, zero_offset, out, cfg)
    return split_k_matmul(launch_dot, x, qweight, qzeros, scales, group_size, group_offset, zero_offset, out_dtype,
                          cfg, out)


def runs_wgmma(cfg, x) -> bool:
    """Whether launch_dot runs wgmma.py's kernel for this config and x (config WGMMA; fp32 x takes tl.dot)."""
    return bool(cfg.get("WGMMA")) and x.dtype in WGMMA_DTYPES


def launch_dot(x, qweight, qzeros, scales, group_size, group_offset, zero_offset, part, per, cfg, out=None,
               counts=None, gate=None):
    """One tensor-core launch into part [SPLIT_K, M, N] (split_k = part.shape[0]) or the [M, N] output; with counts
    (tile_counters) the launch also reduces part into out, as silu(gate) * up with gate's partials. Config WGMMA
    runs the Hopper kernels of wgmma.py (wgmma_prefill.py with PREFILL) for fp16 / bf16 x."""
    if runs_wgmma(cfg, x):
        if is_interpreted(_dot_kernel):
            raise ValueError("WGMMA configs run a Gluon kernel, which TRITON_INTERPRET cannot run")
        launch = launch_prefill if cfg.get("PREFILL") else launch_wgmma
        return launch(x, qweight, qzeros, scales, group_size, group_offset, zero_offset, part, per, cfg, out, counts,
                      gate)
    m, k = x.shape
    n = packed_shape(qweight)[1]
    split_k = splits_of(part)
    one_bits, shift = mantissa_args(x.dtype)
    grid = (ceil_div(n, cfg["BLOCK_N"]), split_k, ceil_div(m, cfg["BLOCK_M"]))
    kernel = _dot_kernel if cfg.get("SWAP", True) else _dot_kernel_plain
    launch_kernel(
        kernel, grid, x, qweight, qzeros, scales, part, out, counts, gate, m, n, k, x.stride(0), word_stride(qweight),
        group_offset, zero_offset, per, one_bits, GROUP_SIZE=group_size, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
        BLOCK_K=cfg["BLOCK_K"], MANTISSA_SHIFT=shift, DTYPE=tl_dtype(x.dtype), SERIAL=counts is not None,
        SWIGLU=gate is not None, TILED=is_tiled(qweight), num_warps=cfg.get("num_warps", 4),
        num_stages=cfg.get("num_stages", 2),
    )


@triton.jit
def _dequant_kernel(
    qw_ptr,  # [K/8, N] int32, N-major or TILED (layout.py)
    qz_ptr,  # [G, N/8] int32
    sc_ptr,  # [G, N]
    w_ptr,  # [K, N] out, in the activation dtype
    N, K, stride_q, group_offset, zero_offset,  # stride_q: layout.word_stride(qweight)
    GROUP_SIZE: tl.constexpr,
    BLOCK_K: tl.constexpr,  # rows per program, divides GROUP_SIZE: one scale row per program
    BLOCK_N: tl.constexpr,
    TILED: tl.constexpr,
):
    seg = tl.program_id(0)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    words = (seg * BLOCK_K - group_offset) // 8 + tl.arange(0, BLOCK_K // 8)  # [BW]
    mask = ((words >= 0) & (words < K // 8))[:, None] & n_mask[None, :]
    q = tl.load(qw_ptr + word_offsets(words[:, None], offs_n[None, :], stride_q, TILED), mask=mask, other=0)  # [BW, BN]
    s, zw = load_group(qz_ptr, sc_ptr, (seg * BLOCK_K) // GROUP_SIZE, offs_n, n_mask, N)
    z = ((zw >> ((offs_n % 8) * 4)) & 0xF) + zero_offset
    for j in tl.static_range(8):
        # (q - z) * s in fp32, rounded once: bit-identical to gptq.dequantize
        w = (((q >> (4 * j)) & 0xF) - z[None, :]).to(tl.float32) * s.to(tl.float32)[None, :]
        dst = w_ptr + word_rows(words * 8 + j, TILED)[:, None] * N + offs_n[None, :]
        tl.store(dst, w.to(w_ptr.dtype.element_ty), mask=mask)


def dequantize_sorted(qweight, qzeros, scales, group_size, group_offset, zero_offset, dtype):
    """[K, N] weights in dtype, bit-identical to gptq.dequantize for contiguous groups."""
    words, n = packed_shape(qweight)
    k = words * 8
    w = torch.empty((k, n), dtype=dtype, device=qweight.device)
    bk, bn = segment_rows(group_size, 64), 256
    grid = (ceil_div(k + group_offset, bk), ceil_div(n, bn))
    launch_kernel(_dequant_kernel, grid, qweight, qzeros, scales, w, n, k, word_stride(qweight), group_offset,
                  zero_offset, GROUP_SIZE=group_size, BLOCK_K=bk, BLOCK_N=bn, TILED=is_tiled(qweight))
    return w


def dequant_mm(x, qweight, qzeros, scales, group_size, group_offset, zero_offset, out_dtype, out=None):
    """Large M: dequantize once into x's dtype, then cuBLAS (compute-bound there, so the extra pass is cheap); into
    ``out`` (in x's dtype) where given."""
    w = dequantize_sorted(qweight, qzeros, scales, group_size, group_offset, zero_offset, x.dtype)
    return torch.matmul(x, w).to(out_dtype) if out is None else torch.matmul(x, w, out=out)
