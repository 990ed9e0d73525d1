"""Decode GEMV with the activation prepared once per call: fewer instructions per weight than gemv.py.

gemv.py spends ~6.3 SASS instructions per weight (sm_90a, counted in its loop), a third of them on x: masked
fp16 loads, conversions and row sums repeated by every program. Here a tiny kernel first writes, per
activation row, x as fp32 zero-padded to whole K-steps (no masks, no conversions in the hot loop) and the
per-word sums the affine correction needs. The weights are also decoded with half the shifts:

    even nibble j: moved to bits 16..19 of the word (w << 16, w << 8, w, w >> 8), OR 1.0f  ->  1 + q/128
    odd  nibble j: moved to bits 12..15 of the word (w << 8, w, w >> 8, w >> 16), OR 1.0f  ->  1 + q/2048

four shifts per word instead of eight, one LOP3 per nibble (4.75 instructions per weight at BN 256 / BK 64).
The prepared activation is 16 x on odd rows, so every term is x (1 + q/128) + ..., and per word:
sum x q = 128 (sum xp f - sum xp). Precision: the q part of 1 + q/2048 sits 7 bits below the leading bit, so
fp32 products keep ~16 bits of it (error ~2e-5, far under fp16/bf16 output rounding).

For a few rows (decode of M = 2..8: small batches, speculative tokens) ``_gemv_prep_rows_kernel`` decodes each
word once and multiplies it into ROWS prepared rows: one weight read for all of them, where the one-row kernel
would read the weights once per row and the tensor-core kernel round-trips the dequantized tile through shared
memory. Chosen by the config's ROWS (default 1: the one-row kernel).
"""

import torch
import triton
import triton.language as tl

from ..layout import is_tiled, packed_shape, word_stride
from .common import (ceil_div, load_group, split_k_matmul, splits_of, step_words, store_split, word_rows,
                     x_columns)
from .launcher import launch_kernel


@triton.jit
def _xprep_kernel(
    x_ptr,  # [M, K] activations, row stride stride_xm
    perm_ptr,  # [K] int32 / int64: row k of the weight multiplies x[:, perm[k]] (HAS_PERM), else None
    xp_ptr,  # [M, KPAD] fp32: x (even rows) or 16 x (odd rows), zero outside [0, K)
    c_ptr,  # [M, KPAD/8] fp32: 128 * sum of xp over each word's 8 rows
    xs_ptr,  # [M, KPAD/8] fp32: sum of x over each word's 8 rows
    K, KPAD, stride_xm, group_offset,
    BLOCK_W: tl.constexpr,
    HAS_PERM: tl.constexpr,
    TILED: tl.constexpr,  # prepared for tiled words: position 8w + j holds x's row word_rows(8w + j)
):
    m = tl.program_id(1)
    w = tl.program_id(0) * BLOCK_W + tl.arange(0, BLOCK_W)  # [BW] padded word index
    j = tl.arange(0, 8)
    rows = word_rows(w[:, None] * 8 + j[None, :] - group_offset, TILED)  # [BW, 8] real row (padding: the shard's
    # group offset; 0 on tiled words)
    w_ok = w < KPAD // 8
    # x[..., perm] costs nothing extra here: this kernel rewrites x once per call anyway (one gathered load)
    cols = x_columns(perm_ptr, rows, K, HAS_PERM)
    x = tl.load(x_ptr + m * stride_xm + cols, mask=(rows >= 0) & (rows < K) & w_ok[:, None], other=0.0)
    x = x.to(tl.float32)
    xp = x * tl.where(j % 2 == 1, 16.0, 1.0)[None, :]
    tl.store(xp_ptr + m * KPAD + w[:, None] * 8 + j[None, :], xp, mask=w_ok[:, None])
    tl.store(c_ptr + m * (KPAD // 8) + w, 128.0 * tl.sum(xp, axis=1), mask=w_ok)
    tl.store(xs_ptr + m * (KPAD // 8) + w, tl.sum(x, axis=1), mask=w_ok)


@triton.jit
def _nib(word, MASK: tl.constexpr, one_bits):
    # (word & MASK) | 1.0f as one LOP3; the OR constant arrives at run time so ptxas keeps it one instruction
    return ((word & MASK) | one_bits).to(tl.float32, bitcast=True)


@triton.jit
def _word_dot(q, xrow, one_bits):
    """sum_j xp[8w + j] * f_j for every word of q [BW, BN]; xrow [BW] points at each word's 8 prepared rows."""
    hi = 0x000F0000  # bits 16..19: 1 + q/128
    lo = 0x0000F000  # bits 12..15: 1 + q/2048
    w8, w16, v8, v16 = q << 8, q << 16, q >> 8, q >> 16
    d = _nib(w16, hi, one_bits) * tl.load(xrow + 0)[:, None]
    d += _nib(w8, lo, one_bits) * tl.load(xrow + 1)[:, None]
    d += _nib(w8, hi, one_bits) * tl.load(xrow + 2)[:, None]
    d += _nib(q, lo, one_bits) * tl.load(xrow + 3)[:, None]
    d += _nib(q, hi, one_bits) * tl.load(xrow + 4)[:, None]
    d += _nib(v8, lo, one_bits) * tl.load(xrow + 5)[:, None]
    d += _nib(v8, hi, one_bits) * tl.load(xrow + 6)[:, None]
    d += _nib(v16, lo, one_bits) * tl.load(xrow + 7)[:, None]
    return d


@triton.jit
def _gemv_prep_kernel(
    xp_ptr,  # [M, KPAD] fp32 prepared activations
    c_ptr,  # [M, KPAD/8] fp32
    xs_ptr,  # [M, KPAD/8] fp32
    qw_ptr,  # [K/8, N] int32 packed along K, N-major or TILED (layout.py)
    qz_ptr,  # [G, N/8] int32, packed along N
    sc_ptr,  # [G, N]
    out_ptr,  # [SPLIT_K, M, N] fp32 partials, or [M, N] output when SPLIT_K == 1
    final_ptr,  # [M, N] output of a one-launch split-K (SERIAL), else unused
    count_ptr,  # [tiles] int32 zeros (SERIAL: common.tile_counters), else None
    gate_ptr,  # [SPLIT_K, M, N] fp32 partials of gate when this is up's launch of a serial SwiGLU, else None
    M, N, K, KPAD, stride_q,  # stride_q: layout.word_stride(qweight)
    group_offset, zero_offset, segs_per_split, one_bits,
    GROUP_SIZE: tl.constexpr,
    BLOCK_K: tl.constexpr,  # rows per step, divides GROUP_SIZE
    BLOCK_N: tl.constexpr,
    SERIAL: tl.constexpr,  # the last program of each output tile sums the partials (common.store_split)
    SWIGLU: tl.constexpr,  # ... and writes silu(gate) * this
    TILED: tl.constexpr,  # qweight in the tiled layout
):
    pid_n, pid_k, pid_m = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_w = tl.arange(0, BLOCK_K // 8)
    seg_start = pid_k * segs_per_split
    seg_end = tl.minimum(seg_start + segs_per_split, KPAD // BLOCK_K)
    acc = tl.zeros([BLOCK_K // 8, BLOCK_N], dtype=tl.float32)
    # Register double buffer: the next step's words, scales and zeros are in flight while this step computes.
    q = step_words(qw_ptr, seg_start, offs_w[:, None], offs_n[None, :], n_mask[None, :], stride_q, K, group_offset,
                   BLOCK_K, seg_start < seg_end, TILED)
    s, zw = load_group(qz_ptr, sc_ptr, (seg_start * BLOCK_K) // GROUP_SIZE, offs_n, n_mask & (seg_start < seg_end), N)
    for seg in range(seg_start, seg_end):
        live = seg + 1 < seg_end
        q_nxt = step_words(qw_ptr, seg + 1, offs_w[:, None], offs_n[None, :], n_mask[None, :], stride_q, K,
                           group_offset, BLOCK_K, live, TILED)
        s_nxt, zw_nxt = load_group(qz_ptr, sc_ptr, ((seg + 1) * BLOCK_K) // GROUP_SIZE, offs_n, n_mask & live, N)
        pw = pid_m * (KPAD // 8) + seg * (BLOCK_K // 8) + offs_w  # [BW] prepared-word index
        d = _word_dot(q, xp_ptr + pw * 8, one_bits)  # [BW, BN]
        sf = s.to(tl.float32)
        z = (((zw >> ((offs_n % 8) * 4)) & 0xF) + zero_offset).to(tl.float32)
        t = z[None, :] * tl.load(xs_ptr + pw)[:, None] + tl.load(c_ptr + pw)[:, None]  # z sum x + 128 sum xp
        acc += (128.0 * sf)[None, :] * d - sf[None, :] * t  # s (sum x q - z sum x)
        q, s, zw = q_nxt, s_nxt, zw_nxt
    y = tl.sum(acc, axis=0)  # [BN]
    store_split(y, out_ptr, final_ptr, count_ptr, gate_ptr, pid_k, M * N, pid_m * N + offs_n, n_mask, SERIAL, SWIGLU)


@triton.jit
def _gemv_prep_rows_kernel(
    xp_ptr,  # [M, KPAD] fp32 prepared activations
    c_ptr,  # [M, KPAD/8] fp32
    xs_ptr,  # [M, KPAD/8] fp32
    qw_ptr,  # [K/8, N] int32 packed along K, N-major or TILED (layout.py)
    qz_ptr,  # [G, N/8] int32, packed along N
    sc_ptr,  # [G, N]
    out_ptr,  # [SPLIT_K, M, N] fp32 partials, or [M, N] output when SPLIT_K == 1
    final_ptr,  # [M, N] output of a one-launch split-K (SERIAL), else unused
    count_ptr,  # [tiles] int32 zeros (SERIAL: common.tile_counters), else None
    gate_ptr,  # [SPLIT_K, M, N] fp32 partials of gate when this is up's launch of a serial SwiGLU, else None
    M, N, K, KPAD, stride_q,  # stride_q: layout.word_stride(qweight)
    group_offset, zero_offset, segs_per_split, one_bits,
    GROUP_SIZE: tl.constexpr,
    BLOCK_K: tl.constexpr,  # rows per step, divides GROUP_SIZE
    BLOCK_N: tl.constexpr,
    ROWS: tl.constexpr,  # activation rows per program, each weight word decoded once for all of them
    SERIAL: tl.constexpr,  # the last program of each output tile sums the partials (common.store_split)
    SWIGLU: tl.constexpr,  # ... and writes silu(gate) * this
    TILED: tl.constexpr,  # qweight in the tiled layout
):
    pid_n, pid_k, pid_m = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    # Every tensor is a view of one [R, BW, BN] layout, loads included (size-1 axes where a factor does not vary):
    # the decoded words broadcast over the rows and x over the columns in registers, with no layout conversion
    # through shared memory (a [BW, BN] load expanded to 3-D cost one per nibble).
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)[None, None, :]  # [1, 1, BN]
    n_mask = offs_n < N
    offs_w = tl.arange(0, BLOCK_K // 8)[None, :, None]  # [1, BW, 1]
    offs_r = pid_m * ROWS + tl.arange(0, ROWS)[:, None, None]  # [R, 1, 1] activation rows
    r_ok = offs_r < M
    seg_start = pid_k * segs_per_split
    seg_end = tl.minimum(seg_start + segs_per_split, KPAD // BLOCK_K)
    acc = tl.zeros([ROWS, BLOCK_K // 8, BLOCK_N], dtype=tl.float32)  # 128 s sum x q, summed over words at the end
    corr = tl.zeros([ROWS, 1, BLOCK_N], dtype=tl.float32)  # s (z sum x + 128 sum xp): per row, no word axis
    q = step_words(qw_ptr, seg_start, offs_w, offs_n, n_mask, stride_q, K, group_offset, BLOCK_K, seg_start < seg_end,
                   TILED)
    s, zw = load_group(qz_ptr, sc_ptr, (seg_start * BLOCK_K) // GROUP_SIZE, offs_n, n_mask & (seg_start < seg_end), N)
    for seg in range(seg_start, seg_end):
        live = seg + 1 < seg_end
        q_nxt = step_words(qw_ptr, seg + 1, offs_w, offs_n, n_mask, stride_q, K, group_offset, BLOCK_K, live, TILED)
        s_nxt, zw_nxt = load_group(qz_ptr, sc_ptr, ((seg + 1) * BLOCK_K) // GROUP_SIZE, offs_n, n_mask & live, N)
        pw = offs_r * (KPAD // 8) + seg * (BLOCK_K // 8) + offs_w  # [R, BW, 1] prepared words
        sf = s.to(tl.float32)
        acc += 128.0 * sf * _rows_word_dot(q, xp_ptr + pw * 8, r_ok, one_bits)
        z = (((zw >> ((offs_n % 8) * 4)) & 0xF) + zero_offset).to(tl.float32)
        xs = tl.sum(tl.load(xs_ptr + pw, mask=r_ok, other=0.0), axis=1, keep_dims=True)  # [R, 1, 1]: sum of x
        c = tl.sum(tl.load(c_ptr + pw, mask=r_ok, other=0.0), axis=1, keep_dims=True)  # [R, 1, 1]: 128 sum xp
        corr += sf * (z * xs + c)
        q, s, zw = q_nxt, s_nxt, zw_nxt
    # corr spread evenly over the word axis (an exact power-of-two scale) and summed with acc: one reduction, in
    # acc's layout (summing corr on its own would give a tensor of another layout to subtract)
    y = tl.sum(acc - corr / (BLOCK_K // 8), axis=1)  # [R, BN]
    rows = pid_m * ROWS + tl.arange(0, ROWS)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    store_split(y, out_ptr, final_ptr, count_ptr, gate_ptr, pid_k, M * N, rows[:, None] * N + cols[None, :],
                (rows < M)[:, None] & (cols < N)[None, :], SERIAL, SWIGLU)


@triton.jit
def _rows_word_dot(q, xrows, r_ok, one_bits):
    """_word_dot for several rows: each nibble of q [1, BW, BN] decoded once, times each row's x [R, BW, 1]
    -> [R, BW, BN]; xrows [R, BW, 1] points at each row's and word's 8 prepared values."""
    hi = 0x000F0000
    lo = 0x0000F000
    w8, w16, v8, v16 = q << 8, q << 16, q >> 8, q >> 16
    d = _nib(w16, hi, one_bits) * tl.load(xrows + 0, mask=r_ok, other=0.0)
    d += _nib(w8, lo, one_bits) * tl.load(xrows + 1, mask=r_ok, other=0.0)
    d += _nib(w8, hi, one_bits) * tl.load(xrows + 2, mask=r_ok, other=0.0)
    d += _nib(q, lo, one_bits) * tl.load(xrows + 3, mask=r_ok, other=0.0)
    d += _nib(q, hi, one_bits) * tl.load(xrows + 4, mask=r_ok, other=0.0)
    d += _nib(v8, lo, one_bits) * tl.load(xrows + 5, mask=r_ok, other=0.0)
    d += _nib(v8, hi, one_bits) * tl.load(xrows + 6, mask=r_ok, other=0.0)
    d += _nib(v16, lo, one_bits) * tl.load(xrows + 7, mask=r_ok, other=0.0)
    return d


def prepare_x(x, block_k, group_offset, perm=None, tiled=False):
    """(xp [M, KPAD], c [M, KPAD/8], xs [M, KPAD/8]) fp32, KPAD = whole K-steps of the padded row index; of
    x[:, perm] when perm [K] is given; in the K order of tiled words (layout.py) with ``tiled``."""
    m, k = x.shape
    kpad = ceil_div(k + group_offset, block_k) * block_k
    xp = torch.empty((m, kpad), dtype=torch.float32, device=x.device)
    c = torch.empty((m, kpad // 8), dtype=torch.float32, device=x.device)
    xs = torch.empty_like(c)
    bw = 128
    launch_kernel(_xprep_kernel, (ceil_div(kpad // 8, bw), m), x, perm, xp, c, xs, k, kpad, x.stride(0), group_offset,
                  BLOCK_W=bw, HAS_PERM=perm is not None, TILED=tiled)
    return xp, c, xs


def gemv_prep(x, qweight, qzeros, scales, group_size, group_offset, zero_offset, out_dtype, cfg, perm=None,
              out=None):
    """x [M, K] (row-contiguous) -> [M, N] in out_dtype (x[:, perm] @ W with perm; into ``out`` where given).
    cfg: BLOCK_N, BLOCK_K, SPLIT_K (wanted), num_warps, ROWS (activation rows per program, default 1), SERIAL
    (split-K reduced inside the launch; default False: a reduction launch after it)."""
    # its K-steps are the ones split_k_matmul plans
    prep = prepare_x(x, cfg["BLOCK_K"], group_offset, perm, is_tiled(qweight))

    def launch(x, *args, **serial):
        launch_gemv_prep(prep, x.shape[1], *args, **serial)

    return split_k_matmul(launch, x, qweight, qzeros, scales, group_size, group_offset, zero_offset, out_dtype, cfg,
                          out)


def launch_gemv_prep(prep, k, qweight, qzeros, scales, group_size, group_offset, zero_offset, part, per, cfg,
                     out=None, counts=None, gate=None):
    """One GEMV launch on prepared activations into part [SPLIT_K, M, N] (split_k = part.shape[0] or 1); with
    counts (tile_counters) the launch also reduces part into out, as silu(gate) * up with gate's partials."""
    xp, c, xs = prep
    m, kpad = xp.shape
    n = packed_shape(qweight)[1]
    split_k = splits_of(part)
    rows = cfg.get("ROWS", 1)
    if rows < 1 or rows & (rows - 1):
        raise ValueError(f"ROWS must be a power of two, got {rows}")
    grid = (ceil_div(n, cfg["BLOCK_N"]), split_k, ceil_div(m, rows))
    tensors = (xp, c, xs, qweight, qzeros, scales, part)
    sizes = (m, n, k, kpad, word_stride(qweight), group_offset, zero_offset, per, 0x3F800000)
    meta = dict(GROUP_SIZE=group_size, BLOCK_K=cfg["BLOCK_K"], BLOCK_N=cfg["BLOCK_N"], TILED=is_tiled(qweight),
                num_warps=cfg.get("num_warps", 4), num_stages=1)
    meta.update(SERIAL=counts is not None, SWIGLU=gate is not None)
    if rows == 1:
        launch_kernel(_gemv_prep_kernel, grid, *tensors, out, counts, gate, *sizes, **meta)
    else:
        launch_kernel(_gemv_prep_rows_kernel, grid, *tensors, out, counts, gate, *sizes, ROWS=rows, **meta)
