"""Decode GEMV (M small, one program per activation row): memory-bound, so every byte of qweight is read once,
as 16-byte vectors along N (the GPTQ layout packs along K, so a word row is contiguous along N), with no
tensor cores: fp32 multiply-accumulate of x against ``1 + q/16`` and the group's scale/zero applied once per
K-step and column. Split-K keeps every SM busy at TP 8 shard sizes.

K-steps are BLOCK_K rows of the *virtual* row index ``v = k + group_offset``, aligned to BLOCK_K, with
BLOCK_K dividing group_size: every step lies inside one group, also for shards that start inside a group.
"""

import torch
import triton
import triton.language as tl

from ..layout import is_tiled, packed_shape, word_stride
from .common import (affine_factors, ceil_div, load_group, mantissa_args, nibble_floats, split_k_matmul, splits_of,
                     step_words, store_split, word_rows)
from .launcher import launch_kernel

FP32_SHIFT: tl.constexpr = tl.constexpr(19)  # a literal argument would not stay a compile-time constant


@triton.jit
def _gemv_kernel(
    x_ptr,  # [M, K] fp16 / bf16 / fp32, row stride stride_xm
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
    x_row = x_ptr + pid_m * stride_xm
    seg_start = pid_k * segs_per_split
    seg_end = tl.minimum(seg_start + segs_per_split, tl.cdiv(K + group_offset, BLOCK_K))
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
        s16, sz = affine_factors(s, zw, offs_n, zero_offset)
        rows = seg * BLOCK_K - group_offset + offs_w * 8  # [BW] position of nibble 0 of each word
        d = tl.zeros([BLOCK_K // 8, BLOCK_N], dtype=tl.float32)
        xs = tl.zeros([BLOCK_K // 8], dtype=tl.float32)
        # 2-D tiles in the load's layout, one nibble at a time: no 3-D broadcast to re-layout the words.
        for j in tl.static_range(8):
            # one unsigned compare is 0 <= row < K
            r = word_rows(rows + j, TILED)
            xj = tl.load(x_row + r, mask=r.to(tl.uint32) < K, other=0.0).to(tl.float32)
            d += nibble_floats(q, one_bits, 4 * j, FP32_SHIFT, tl.float32) * xj[:, None]  # (1 + q/16) x
            xs += xj
        acc += s16[None, :] * d - sz[None, :] * xs[:, None]
        q, s, zw = q_nxt, s_nxt, zw_nxt
    y = tl.sum(acc, axis=0)  # [BN]
    store_split(y, out_ptr, final_ptr, count_ptr, gate_ptr, pid_k, M * N, pid_m * N + offs_n, n_mask, SERIAL, SWIGLU)


def gemv(x, qweight, qzeros, scales, group_size, group_offset, zero_offset, out_dtype, cfg, out=None):
    """x [M, K] (row-contiguous) -> [M, N] in out_dtype (into ``out`` where given). cfg: BLOCK_N, BLOCK_K, SPLIT_K
    (wanted), num_warps, SERIAL (split-K reduced inside the one launch; default False: a second, reduction
    launch)."""
    return split_k_matmul(launch_gemv, x, qweight, qzeros, scales, group_size, group_offset, zero_offset, out_dtype,
                          cfg, out)


def launch_gemv(x, qweight, qzeros, scales, group_size, group_offset, zero_offset, part, per, cfg, out=None,
                counts=None, gate=None):
    """One GEMV launch into part [SPLIT_K, M, N] (split_k = part.shape[0]) or the [M, N] output; with counts
    (tile_counters) the launch also reduces part into out, as silu(gate) * up with gate's partials."""
    m, k = x.shape
    n = packed_shape(qweight)[1]
    split_k = splits_of(part)
    one_bits, _ = mantissa_args(torch.float32)
    grid = (ceil_div(n, cfg["BLOCK_N"]), split_k, m)
    launch_kernel(
        _gemv_kernel, grid, x, qweight, qzeros, scales, part, out, counts, gate, m, n, k, x.stride(0),
        word_stride(qweight), group_offset, zero_offset, per, one_bits, GROUP_SIZE=group_size, BLOCK_K=cfg["BLOCK_K"],
        BLOCK_N=cfg["BLOCK_N"], SERIAL=counts is not None, SWIGLU=gate is not None, TILED=is_tiled(qweight),
        num_warps=cfg.get("num_warps", 4), num_stages=1,
    )
