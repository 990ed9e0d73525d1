"""Stream-K schedule of the Hopper decode kernel (wgmma.py): one wave of equal programs over all K-steps.

A split-K grid runs tiles x SPLIT_K programs in waves of (programs per SM) x SMs places; its last wave is part
full, and every program pays its first loads' latency alone. A pure streaming read of a shard's bytes reaches
88-95% of the copy roof on an H100 with one wave of equal contiguous chunks (bench/probe_stream.py) where the
split-K grids stop near 75-82%. Here the grid is one wave: program p of P takes the K-steps [p T / P, (p + 1) T / P)
of the T = tiles x steps of the whole matmul, in tile order, so it finishes the end of one tile, maybe whole tiles,
and starts another. A tile a program covers whole is stored directly; a tile shared by programs p_a..p_b gets one
fp32 partial from each (two slots per program: the first tile it touches and the last), and the last of them to
finish, counted by a per-tile counter, sums the partials in program order (deterministic) and writes the output,
re-arming the counter as common.store_split does. One token tile (M <= BLOCK_M), 64-column tiles.
"""

import torch
import triton
import triton.language as tl
from triton.experimental import gluon
from triton.experimental.gluon import language as gl

from ..layout import is_tiled, packed_shape, word_stride
from .common import tile_counters, tl_dtype
from .wgmma import NUM_WARPS, PAIR_BASE_BITS, _one_part_steps, even_shape, register_cap, word_layout, x_layout


@triton.jit
def _first_program(step, total, programs):
    """The program whose K-step range [p T / P, (p + 1) T / P) holds global step ``step``."""
    return ((step + 1) * programs - 1) // total


@triton.jit
def _stream_store(acc, part_ptr, out_ptr, count_ptr, gate_ptr, tile, s, s0, p, a, b, steps, total, programs, offs,
                  local, mask, PART_MN, SWIGLU: tl.constexpr):
    """Store the contribution acc of K-steps [a, b) of ``tile`` (program p, whose range starts at s0; s is the
    global step of a): the output itself when they are the whole tile, else a partial in the program's slot, and the
    last contributor to finish sums them all. SWIGLU: the output is silu(gate) * acc, gate's full sum read at offs."""
    if (a == 0) & (b == steps):
        y = acc
    else:
        slot = 2 * p + (s != s0).to(tl.int32)  # the program's first tile touched, or its last
        tl.store(part_ptr + slot * PART_MN + local, acc, mask=mask)
        tl.debug_barrier()  # every thread's partial is written before this program counts as done
        p_a = _first_program(tile * steps, total, programs)
        p_b = _first_program(tile * steps + steps - 1, total, programs)
        done = tl.atomic_add(count_ptr + tile, 1, sem="acq_rel", scope="gpu")
        y = acc * 0.0
        if done == p_b - p_a:
            # p_a's share is its last tile touched unless its range starts at this tile's first step
            first = 2 * p_a + ((p_a * total) // programs < tile * steps).to(tl.int32)
            y = tl.load(part_ptr + first * PART_MN + local, mask=mask, other=0.0, cache_modifier=".cg")
            for q in range(p_a + 1, p_b + 1):
                y += tl.load(part_ptr + 2 * q * PART_MN + local, mask=mask, other=0.0, cache_modifier=".cg")
            tl.atomic_xchg(count_ptr + tile, 0, sem="relaxed", scope="gpu")
        else:
            mask = mask & False
    if SWIGLU:
        g = tl.load(gate_ptr + offs, mask=mask, other=0.0)
        y = g / (1.0 + tl.exp(-g)) * y
    tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


@gluon.jit
def _stream_kernel(
    x_ptr,  # [M, K] fp16 / bf16, M <= BLOCK_M
    qw_ptr, qz_ptr, sc_ptr,  # as wgmma._wgmma_kernel
    part_ptr,  # [programs, 2, M, BLOCK_N] fp32 partials
    out_ptr,  # [M, N] output (x's dtype, or fp32 for a SwiGLU's gate)
    count_ptr,  # [tiles] int32 zeros (common.tile_counters)
    gate_ptr,  # [M, N] fp32 gate of a SwiGLU when this is up's launch, else None
    M, N, K, stride_xm, stride_q, group_offset, zero_offset, base_bits,
    GROUP_SIZE: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr,
    DTYPE: gl.constexpr, SWIGLU: gl.constexpr, EVEN: gl.constexpr, TILED: gl.constexpr, WORDS: gl.constexpr,
    XL: gl.constexpr,
):
    MMA: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BLOCK_M, 16])
    Q: gl.constexpr = gl.SliceLayout(2, WORDS)
    X_SMEM: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_M, BLOCK_K], DTYPE)
    p = gl.program_id(0)
    programs = gl.num_programs(0)
    steps = gl.cdiv(K + group_offset, BLOCK_K)
    total = gl.cdiv(N, BLOCK_N) * steps
    s0 = (p * total) // programs
    s1 = ((p + 1) * total) // programs
    cols_q = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, Q))
    cols = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, MMA))
    rows = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, MMA))
    offs_w = gl.arange(0, BLOCK_K // 8, layout=gl.SliceLayout(0, Q))
    offs_kx = gl.arange(0, BLOCK_K, layout=gl.SliceLayout(0, XL))
    offs_mx = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, XL))
    if EVEN:
        offs_mx = gl.minimum(offs_mx, M - 1)
    base_pair = base_bits * 0x10001
    x_smem = gl.allocate_shared_memory(DTYPE, [2, BLOCK_M, BLOCK_K], X_SMEM)
    local = gl.expand_dims(rows, 0) * BLOCK_N + gl.expand_dims(cols, 1)  # [BN, BM] in a partial slot
    s = s0
    while s < s1:
        gl.thread_barrier()  # the last tile's MMAs are done in every warp before x's slots are written again
        tile = s // steps
        a = s - tile * steps
        b = gl.minimum(steps, a + (s1 - s))
        offs_n = tile * BLOCK_N + cols
        acc = _one_part_steps(x_smem, a, b, x_ptr, qw_ptr, qz_ptr, sc_ptr, M, N, K, stride_xm, stride_q, group_offset,
                              zero_offset, base_pair, tile * BLOCK_N + cols_q, offs_w, offs_n, offs_kx, offs_mx,
                              GROUP_SIZE, BLOCK_M, BLOCK_N, BLOCK_K, DTYPE, EVEN, TILED, MMA)
        _stream_store(acc, part_ptr, out_ptr, count_ptr, gate_ptr, tile, s, s0, p, a, b, steps, total, programs,
                      gl.expand_dims(rows, 0) * N + gl.expand_dims(offs_n, 1), local,
                      gl.expand_dims(offs_n < N, 1) & gl.expand_dims(rows < M, 0), M * BLOCK_N, SWIGLU)
        s += b - a


def launch_stream(x, qweight, qzeros, scales, group_size, group_offset, zero_offset, out, cfg, gate=None):
    """x [M, K] (M <= 16, fp16 / bf16) @ W into out [M, N] in one stream-K launch of cfg["PROGRAMS"] programs
    (MAXNREG: their register cap);
    with gate ([M, N] fp32, the gate's output), out = silu(gate) * (x @ W). Returns False, having launched
    nothing, where the tile counters cannot be had (a first use during CUDA-graph capture): the caller then runs
    the split-K kernel."""
    m, k = x.shape
    n = packed_shape(qweight)[1]
    bm, bn, bk = 16, 64, cfg["BLOCK_K"]
    if m > bm or bk % 32:
        raise ValueError(f"the stream-K kernel takes up to {bm} tokens and 32-row multiples per step: M = {m}, {cfg}")
    counts = tile_counters(triton.cdiv(n, bn), x.device)
    if counts is None:
        return False
    programs = cfg["PROGRAMS"]
    part = torch.empty((programs, 2, m, bn), dtype=torch.float32, device=x.device)
    tiled = is_tiled(qweight)
    _stream_kernel[(programs,)](
        x, qweight, qzeros, scales, part, out, counts, gate, m, n, k, x.stride(0), word_stride(qweight),
        group_offset, zero_offset, PAIR_BASE_BITS[x.dtype], GROUP_SIZE=group_size, BLOCK_M=bm, BLOCK_N=bn,
        BLOCK_K=bk, DTYPE=tl_dtype(x.dtype), SWIGLU=gate is not None, EVEN=even_shape(k, n, group_offset, cfg),
        TILED=tiled, WORDS=word_layout(bn, bk, NUM_WARPS, tiled), XL=x_layout(bm, bk), num_warps=NUM_WARPS,
        maxnreg=cfg.get("MAXNREG", register_cap(m, (bm, bn, bk), tiled)),
    )
    return True
