"""Hopper tensor-core kernel for prefill batches (dispatched from 33 tokens): wgmma.py's weight path (the
dequantized weights go straight from the loaded int32 words into the registers of wgmma's A operand) with x
streamed by TMA and the MMAs running while the next operand is unpacked.

At 128-256 tokens per tile, x's tile no longer fits in registers beside the accumulator (the decode kernel
spills there), so x goes from global to shared memory by the tensor memory accelerator into a ring of STAGES
slots, each with an mbarrier, issued STAGES - 1 steps ahead. The TMA copies rows as they are: tiled words
(layout.py) hold their nibbles in the MMA's K order, so it reads x as it lies; for N-major words x is written
once in that order first (``x_in_mma_order``: a permutation within each 32-row block, relative to the shard's
group offset, which it also pads in): one more launch and pass over x per call.

The scale goes into the operand ((q - z) * s, one rounding in x's dtype, as the weights of a dequantize-then-
matmul in that dtype are rounded) so that the MMAs accumulate over all of K in place: no second accumulator,
no per-step multiply-add over it. The MMAs are asynchronous: the loop body runs two steps, each starting its
MMA and then, once the previous MMA is done, unpacking the next operand into that MMA's registers (with one
loop-carried operand ptxas serialized every MMA). Two warpgroups (8 warps) share each x tile. The split-K (for
tile counts short of the SMs) and the SwiGLU's epilogue are common.store_split's, as in the other kernels.
"""

import functools
from typing import NamedTuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma, warpgroup_mma, warpgroup_mma_wait
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from ..layout import is_tiled, packed_shape, word_stride
from .common import ceil_div, is_interpreted, splits_of, store_split, tl_dtype
from .launcher import launch_kernel
from .wgmma import PAIR_BASE_BITS, a_operand, a_operand_layout, mma_layout, weight_loads, word_layout

TOKEN_TILES = (16, 32, 64, 128, 256)  # the MMA's N


def x_in_mma_order(x: torch.Tensor, group_offset: int) -> torch.Tensor:
    """x [M, K] -> [M, Kp] for N-major words: group_offset zero columns in front (the shard's first group starts
    before its first row), zeros up to a multiple of 32 behind, and each 32 columns in the MMA's K order
    (wgmma.py's module doc: position 32b + 16h + 8c + 2t + e of a block holds its column 32b + 8t + 4e + 2h + c).
    On the GPU (and under the interpreter) one launch (_x_order_kernel), else views and a copy. Tiled words need
    none of this (their nibbles are in that order: layout.py)."""
    m, k = x.shape
    kp = ceil_div(k + group_offset, 32) * 32
    out = torch.empty(m, kp, dtype=x.dtype, device=x.device)
    if x.is_cuda or is_interpreted(_x_order_kernel):
        # the strided copy of the views below was a fifth of a 256-token prefill on Llama-70B's TP 8 up shard
        # (9 of 42 us on an H100; bench/README.md)
        x = x if x.stride(1) == 1 else x.contiguous()
        grid = (ceil_div(m, X_ORDER_ROWS), ceil_div(kp, X_ORDER_COLUMNS))
        launch_kernel(_x_order_kernel, grid, x, out, m, k, kp, x.stride(0), group_offset, BLOCK_R=X_ORDER_ROWS,
                      BLOCK_C=X_ORDER_COLUMNS)
        return out
    if group_offset or kp != k:
        x = F.pad(x, (group_offset, kp - k - group_offset))
    # out [m, block, h, c, t, e] <- x [m, block, t, e, h, c]
    out.view(m, kp // 32, 2, 2, 4, 2).permute(0, 1, 4, 5, 2, 3).copy_(x.contiguous().view(m, kp // 32, 4, 2, 2, 2))
    return out


X_ORDER_ROWS = 16  # a program's tile of x_in_mma_order's output: these rows of this many columns (whole blocks)
X_ORDER_COLUMNS = 256


@triton.jit
def _x_order_kernel(x_ptr, out_ptr, M, K, KP, stride_xm, group_offset, BLOCK_R: tl.constexpr,
                    BLOCK_C: tl.constexpr):
    """out [M, KP] <- x [M, K] (columns contiguous) in the MMA's K order (x_in_mma_order), zeros outside x: a tile
    of whole 32-column blocks is loaded as it lies, its columns permuted on chip and stored as it lies."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    pos = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    src = pos - group_offset
    row_ok = rows < M
    v = tl.load(x_ptr + rows[:, None] * stride_xm + src[None, :],
                mask=row_ok[:, None] & ((src >= 0) & (src < K))[None, :], other=0.0)
    v = tl.reshape(v, [BLOCK_R, BLOCK_C // 32, 4, 2, 2, 2])  # [r, block, t, e, h, c]
    v = tl.permute(v, (0, 1, 4, 5, 2, 3))  # [r, block, h, c, t, e]
    tl.store(out_ptr + rows[:, None] * KP + pos[None, :], tl.reshape(v, [BLOCK_R, BLOCK_C]),
             mask=row_ok[:, None] & (pos < KP)[None, :])


def tma_ready(x: torch.Tensor) -> torch.Tensor:
    """x as a TMA descriptor can take it: unit column stride, rows and start 16-byte aligned (a copy where not)."""
    aligned = x.stride(0) * x.element_size() % 16 == 0 and x.data_ptr() % 16 == 0
    return x if x.stride(1) == 1 and aligned else x.clone(memory_format=torch.contiguous_format)


class PrefillX(NamedTuple):
    """x prepared for prefill launches: the TMA descriptor of x itself (tiled words: layout.py) or of
    x_in_mma_order(x, group_offset) (N-major words) for one (BLOCK_M, BLOCK_K) tile, which gate's and up's launches
    of a SwiGLU share (one descriptor where there were two: plain-call prefill is host-bound, bench/README.md).
    shape and dtype are x's, so that the launch path reads it as it reads x."""
    desc: TensorDescriptor
    group_offset: int
    tiled: bool
    shape: torch.Size
    dtype: torch.dtype


def prefill_x(x: torch.Tensor, group_offset: int, cfg: dict, tiled: bool) -> PrefillX:
    """x [M, K] for the TMA, with its descriptor for cfg's tiles, for a qweight in the tiled layout or not
    (layout.is_tiled): as it lies for tiled words (whose group offset is 0: kernels.check_sorted_args), else
    reordered and padded (x_in_mma_order)."""
    bm, bk = cfg["BLOCK_M"], cfg["BLOCK_K"]
    layout = x_smem_layout(bm, bk, tl_dtype(x.dtype))
    xr = tma_ready(x) if tiled else x_in_mma_order(x, group_offset)
    return PrefillX(TensorDescriptor.from_tensor(xr, [x_box(cfg), bk], layout), group_offset, tiled, x.shape, x.dtype)


def x_box(cfg: dict) -> int:
    """Rows of x per TMA copy (config X_BOX, default the whole tile): _load_x copies a tile in BLOCK_M / X_BOX
    boxes, each from rows of x where x has X_BOX rows (box_rows)."""
    return cfg.get("X_BOX", cfg["BLOCK_M"])


@functools.lru_cache(maxsize=None)
def x_smem_layout(block_m: int, block_k: int, dtype) -> gl.NVMMASharedLayout:
    return gl.NVMMASharedLayout.get_default_for([block_m, block_k], dtype)


@triton.jit
def box_rows(first_row, t, M, BOX: tl.constexpr, BLOCK_M: tl.constexpr):
    """(x's rows in token columns t of the tile whose first row is first_row, whether the tile stores each). A tile
    copied in boxes (BOX < BLOCK_M) copies a box reaching past x's last row from x's last BOX rows instead (rows
    >= 0), so with M >= BOX the TMA zero-fills no row, and a column whose row an earlier box holds is not stored.
    The one-warpgroup tiles lost time to the zero-fill (a 128 x 64 tile at 72 tokens, its fastest split: 1.04-1.51x
    the time of the tile dispatched then; in 64-row boxes so copied 0.84-0.97x, H200); a whole-tile box keeps it,
    rows past M as zeros, not stored: on 256-row tiles reading real rows instead took up to 1.07x the time
    (bench/README.md). The prefill
    kernels' loads and stores and the stream-K reduction (a Triton kernel) share it; integer arithmetic only, as
    _owner (tests run it in Python too)."""
    start = first_row + t // BOX * BOX  # the box's own first row
    last_box = (M - BOX) * (M >= BOX)  # x's last BOX rows (from row 0 where x has fewer)
    rows = start - (start + BOX > M) * (BOX < BLOCK_M) * (start - last_box) + t % BOX
    return rows, (rows >= start) & (rows < M)


@gluon.jit
def _load_x(x_desc, seg, live, pid_m, M, ready, slot, BLOCK_M: gl.constexpr, BLOCK_K: gl.constexpr):
    """Start the TMA copies of K-step seg's x tile [BM, BK] into slot, one per box of the descriptor's rows (from
    the rows box_rows gives); ready's phase flips when all have landed."""
    BOX: gl.constexpr = x_desc.block_type.shape[0]
    mbarrier.expect(ready, x_desc.block_type.nbytes * (BLOCK_M // BOX), pred=live)
    for i in gl.static_range(BLOCK_M // BOX):
        row = box_rows(pid_m * BLOCK_M, i * BOX, M, BOX, BLOCK_M)[0]
        tma.async_copy_global_to_shared(x_desc, [row, seg * BLOCK_K], ready, slot.slice(i * BOX, BOX), pred=live)


@gluon.jit
def _mma_step(step, a, a_free, q, s, zw, acc, seg_start, seg_end, steps, x_desc, x_smem, ready, pid_m, M, qw_ptr,
              qz_ptr, sc_ptr, N, K, stride_q, group_offset, zero_offset, offs_nq, offs_w, base_pair,
              GROUP_SIZE: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr,
              STAGES: gl.constexpr, DTYPE: gl.constexpr, A_REGS: gl.constexpr, TILED: gl.constexpr):
    """Start step's MMA on operand a (async), then, once the previous MMA (operand a_free) is done, unpack the
    next step's operand into a_free's place while this one runs. Returns (acc, next operand, the weights after)."""
    mbarrier.wait(ready.index(step % STAGES), (step // STAGES) & 1)
    acc = warpgroup_mma(a, x_smem.index(step % STAGES).permute([1, 0]), acc, is_async=True)
    acc, a_free = warpgroup_mma_wait(1, deps=[acc, a_free])
    # every warpgroup is past the previous MMA: its x slot takes the step STAGES - 1 ahead
    gl.thread_barrier()
    ahead = step + STAGES - 1
    _load_x(x_desc, seg_start + ahead, ahead < steps, pid_m, M, ready.index(ahead % STAGES),
            x_smem.index(ahead % STAGES), BLOCK_M, BLOCK_K)
    nxt = a_operand(q, s, zw, offs_nq, base_pair, zero_offset, DTYPE, True, A_REGS, BLOCK_N, BLOCK_K, TILED)
    seg = seg_start + step + 2
    q, s, zw = weight_loads(seg, seg < seg_end, qw_ptr, qz_ptr, sc_ptr, N, K, group_offset, offs_nq, offs_w, offs_nq,
                            stride_q, GROUP_SIZE, BLOCK_K, False, TILED)
    return acc, nxt, q, s, zw


@gluon.jit
def _pinned_below_wait(acc, sc_ptr, offs_n):
    """acc, with a dependency that keeps its readers below the final MMA wait. ptxas (triton 3.6, sm_90a) moved
    the epilogue's fp16 conversions of acc above that wait, so they read MMA results still being written (wrong
    outputs at 256-token tiles on an H100). Adding 0 * (a scale loaded after a CTA barrier) ties them to that
    load, which cannot move above the barrier, which comes after the wait. Exact: scales are finite."""
    gl.thread_barrier()
    pin = gl.load(sc_ptr + offs_n * 0).to(gl.float32) * 0.0  # [BN] of zeros, known only at run time
    return acc + gl.expand_dims(pin, 1)


@gluon.jit
def _tile_acc(pid_n, pid_m, seg_start, seg_end, x_desc, x_smem, ready, qw_ptr, qz_ptr, sc_ptr, M, N, K, stride_q,
              group_offset, zero_offset, base_pair, offs_nq, offs_w, GROUP_SIZE: gl.constexpr, BLOCK_M: gl.constexpr,
              BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr, STAGES: gl.constexpr, DTYPE: gl.constexpr,
              A_REGS: gl.constexpr, TILED: gl.constexpr, MMA: gl.constexpr):
    """Output tile (pid_n, pid_m)'s sum over K-steps [seg_start, seg_end): acc [BN, BM] fp32, every MMA done and
    every x slot free again when it returns (a program may run several tiles: _stream_kernel)."""
    for i in gl.static_range(STAGES):
        mbarrier.init(ready.index(i), count=1)
    # steps run in pairs (the loop alternates two operand register sets); an odd count gets one more step whose
    # weights load as zeros (scale 0: its operand is 0) and whose x the TMA fills as it may (zeros past Kp)
    steps = (seg_end - seg_start + 1) // 2 * 2
    for i in gl.static_range(STAGES - 1):
        _load_x(x_desc, seg_start + i, i < steps, pid_m, M, ready.index(i), x_smem.index(i), BLOCK_M, BLOCK_K)
    q, s, zw = weight_loads(seg_start, seg_start < seg_end, qw_ptr, qz_ptr, sc_ptr, N, K, group_offset, offs_nq,
                            offs_w, offs_nq, stride_q, GROUP_SIZE, BLOCK_K, False, TILED)
    a0 = a_operand(q, s, zw, offs_nq, base_pair, zero_offset, DTYPE, True, A_REGS, BLOCK_N, BLOCK_K, TILED)
    q, s, zw = weight_loads(seg_start + 1, seg_start + 1 < seg_end, qw_ptr, qz_ptr, sc_ptr, N, K, group_offset,
                            offs_nq, offs_w, offs_nq, stride_q, GROUP_SIZE, BLOCK_K, False, TILED)
    a1 = a0
    acc = gl.zeros([BLOCK_N, BLOCK_M], gl.float32, MMA)
    for step in range(0, steps, 2):
        acc, a1, q, s, zw = _mma_step(step, a0, a1, q, s, zw, acc, seg_start, seg_end, steps, x_desc, x_smem, ready,
                                      pid_m, M, qw_ptr, qz_ptr, sc_ptr, N, K, stride_q, group_offset, zero_offset,
                                      offs_nq, offs_w, base_pair, GROUP_SIZE, BLOCK_M, BLOCK_N, BLOCK_K, STAGES,
                                      DTYPE, A_REGS, TILED)
        acc, a0, q, s, zw = _mma_step(step + 1, a1, a0, q, s, zw, acc, seg_start, seg_end, steps, x_desc, x_smem,
                                      ready, pid_m, M, qw_ptr, qz_ptr, sc_ptr, N, K, stride_q, group_offset,
                                      zero_offset, offs_nq, offs_w, base_pair, GROUP_SIZE, BLOCK_M, BLOCK_N, BLOCK_K,
                                      STAGES, DTYPE, A_REGS, TILED)
    acc = warpgroup_mma_wait(0, deps=[acc, a0, a1])[0]
    for i in gl.static_range(STAGES):
        mbarrier.invalidate(ready.index(i))
    offs_n = pid_n * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, MMA))
    return _pinned_below_wait(acc, sc_ptr, offs_n)


@gluon.jit
def _prefill_kernel(
    x_desc,  # TMA descriptor of x (TILED) or x_in_mma_order(x, group_offset) [M, Kp], block [BM, BK]
    qw_ptr,  # [K/8, N] int32 packed along K, N-major or TILED (layout.py)
    qz_ptr,  # [G, N/8] int32, packed along N
    sc_ptr,  # [G, N]
    out_ptr,  # [SPLIT_K, M, N] fp32 partials, or [M, N] output when SPLIT_K == 1
    final_ptr,  # [M, N] output of a one-launch split-K (SERIAL), else unused
    count_ptr,  # [tiles] int32 zeros (SERIAL: common.tile_counters), else None
    gate_ptr,  # [SPLIT_K, M, N] fp32 partials of gate when this is up's launch of a serial SwiGLU, else None
    M, N, K, stride_q,  # stride_q: layout.word_stride(qweight)
    group_offset, zero_offset, segs_per_split, base_bits,
    GROUP_SIZE: gl.constexpr,
    BLOCK_M: gl.constexpr,  # tokens per tile: the MMA's N (TOKEN_TILES)
    BLOCK_N: gl.constexpr,  # output columns per tile: 64 (one MMA) or 128 per warpgroup
    BLOCK_K: gl.constexpr,  # rows per step: a multiple of 32 dividing GROUP_SIZE
    STAGES: gl.constexpr,  # x slots in shared memory
    DTYPE: gl.constexpr,  # x's dtype (fp16 or bf16)
    SERIAL: gl.constexpr,  # the last program of each output tile sums the partials (common.store_split)
    SWIGLU: gl.constexpr,  # ... and writes silu(gate) * this
    WARPS: gl.constexpr,  # 4 or 8: one or two warpgroups, each 64 of every BLOCK_N output columns
    TILED: gl.constexpr,  # qweight in the tiled layout (layout.py)
    WORDS: gl.constexpr,  # wgmma.word_layout(BLOCK_N, BLOCK_K, WARPS, TILED)
):
    MMA: gl.constexpr = mma_layout(BLOCK_M, WARPS)
    A_REGS: gl.constexpr = a_operand_layout(MMA)
    Q: gl.constexpr = gl.SliceLayout(2, WORDS)
    pid_n = gl.program_id(0)
    pid_k = gl.program_id(1)
    pid_m = gl.program_id(2)
    offs_nq = pid_n * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, Q))
    offs_w = gl.arange(0, BLOCK_K // 8, layout=gl.SliceLayout(0, Q))
    x_smem = gl.allocate_shared_memory(DTYPE, [STAGES, BLOCK_M, BLOCK_K], x_desc.layout)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    seg_start = pid_k * segs_per_split
    seg_end = gl.minimum(seg_start + segs_per_split, gl.cdiv(K + group_offset, BLOCK_K))
    base_pair = base_bits * 0x10001  # R in both halves (wgmma.PAIR_BASE_BITS)
    acc = _tile_acc(pid_n, pid_m, seg_start, seg_end, x_desc, x_smem, ready, qw_ptr, qz_ptr, sc_ptr, M, N, K, stride_q,
                    group_offset, zero_offset, base_pair, offs_nq, offs_w, GROUP_SIZE, BLOCK_M, BLOCK_N, BLOCK_K,
                    STAGES, DTYPE, A_REGS, TILED, MMA)
    offs_n = pid_n * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, MMA))
    toks = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, MMA))
    offs_m, keep = box_rows(pid_m * BLOCK_M, toks, M, x_desc.block_type.shape[0], BLOCK_M)
    store_split(acc, out_ptr, final_ptr, count_ptr, gate_ptr, pid_k, M * N,
                gl.expand_dims(offs_m, 0) * N + gl.expand_dims(offs_n, 1),
                gl.expand_dims(offs_n < N, 1) & gl.expand_dims(keep, 0), SERIAL, SWIGLU)


# tiles_m == 1 compiled as a constant spilled 512 bytes of registers (ptxas, sm_90a): one variant for every shape
@gluon.jit(do_not_specialize=["tiles_m", "whole", "pairs", "units"])
def _stream_kernel(
    x_desc, qw_ptr, qz_ptr, sc_ptr,  # as _prefill_kernel's
    ws_ptr,  # [programs, 2, BM * BN] fp32: each program's sums over its part of its first and of its last cut tile
    out_ptr,  # [M, N] output (any float dtype)
    M, N, K, stride_q, group_offset, zero_offset, base_bits,
    tiles_m,  # output tiles along M; a column block's tiles are consecutive (they share its weights in L2)
    whole,  # the first tiles, run whole in waves of one per program (a multiple of the programs)
    pairs,  # pairs of K-steps per tile: the unit of work of the tiles after those
    units,  # (tiles - whole) * pairs, shared out evenly between the programs
    GROUP_SIZE: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr,
    STAGES: gl.constexpr, DTYPE: gl.constexpr, WARPS: gl.constexpr, TILED: gl.constexpr, WORDS: gl.constexpr,
):
    """Stream-K after data-parallel waves: program p runs tiles p, p + P, ... of the first ``whole`` (every program
    on the same K-steps at about the same time, so x's and the weights' reads meet in L2, as in the split-K
    kernel's waves), then units [p U / P, (p + 1) U / P) of the U pairs of K-steps of the other tiles, tile by tile,
    so every SM gets the same work whatever the tile count. A tile it runs whole goes to out; its part of a tile
    cut between programs goes to its workspace slot (_ws_slot), which _stream_reduce_kernel sums after the launch.
    (Summing them here, in the last program of each tile to finish, took up to 2.7x the time of the split-K kernel
    on an H100, bench/README.md: presumably few of its loads of the other programs' sums were in flight beside
    the accumulator's 128 registers.)"""
    MMA: gl.constexpr = mma_layout(BLOCK_M, WARPS)
    A_REGS: gl.constexpr = a_operand_layout(MMA)
    Q: gl.constexpr = gl.SliceLayout(2, WORDS)
    pid = gl.program_id(0)
    programs = gl.num_programs(0)
    steps = gl.cdiv(K + group_offset, BLOCK_K)
    offs_w = gl.arange(0, BLOCK_K // 8, layout=gl.SliceLayout(0, Q))
    x_smem = gl.allocate_shared_memory(DTYPE, [STAGES, BLOCK_M, BLOCK_K], x_desc.layout)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    cols = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, MMA))
    toks = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, MMA))
    local = gl.expand_dims(toks, 0) * BLOCK_N + gl.expand_dims(cols, 1)  # a slot holds [BM, BN], as out's rows
    base_pair = base_bits * 0x10001  # R in both halves (wgmma.PAIR_BASE_BITS)
    start = pid * units // programs
    end = (pid + 1) * units // programs
    first_cut = whole // programs  # waves of whole tiles, then this program's part of the others (relative t)
    for i in range(0, first_cut + gl.cdiv(end, pairs) - start // pairs):
        t = start // pairs + i - first_cut
        tile = gl.where(i < first_cut, i * programs + pid, whole + t)
        first = gl.where(i < first_cut, 0, gl.maximum(start, t * pairs) - t * pairs)  # pairs of the tile it runs
        last = gl.where(i < first_cut, pairs, gl.minimum(end, t * pairs + pairs) - t * pairs)
        pid_n = tile // tiles_m
        pid_m = tile % tiles_m
        offs_nq = pid_n * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, Q))
        acc = _tile_acc(pid_n, pid_m, 2 * first, gl.minimum(2 * last, steps), x_desc, x_smem, ready, qw_ptr,
                        qz_ptr, sc_ptr, M, N, K, stride_q, group_offset, zero_offset, base_pair, offs_nq, offs_w,
                        GROUP_SIZE, BLOCK_M, BLOCK_N, BLOCK_K, STAGES, DTYPE, A_REGS, TILED, MMA)
        if last - first == pairs:
            offs_n = pid_n * BLOCK_N + cols
            offs_m, keep = box_rows(pid_m * BLOCK_M, toks, M, x_desc.block_type.shape[0], BLOCK_M)
            gl.store(out_ptr + gl.expand_dims(offs_m, 0) * N + gl.expand_dims(offs_n, 1),
                     acc.to(out_ptr.dtype.element_ty),
                     mask=gl.expand_dims(offs_n < N, 1) & gl.expand_dims(keep, 0))
        else:
            gl.store(ws_ptr + _ws_slot(pid, t, pairs, units, programs) * (BLOCK_M * BLOCK_N) + local, acc)


@triton.jit
def _owner(unit, units, programs):
    """The program whose streamed units [p U / P, (p + 1) U / P) hold ``unit``: the last p with p U / P <= unit
    (integer arithmetic only: tests run it in Python too)."""
    return ((unit + 1) * programs - 1) // units


@triton.jit
def _ws_slot(program, t, pairs, units, programs):
    """Where ``program`` keeps its sums over its part of tile t (counted from the first streamed one): slot 2 p for
    its first such tile, 2 p + 1 for its last (the tiles between are whole: not kept). Integer arithmetic only, as
    _owner."""
    past_first = t - (program * units // programs) // pairs  # >= 0: a program's tiles start at its first
    return 2 * program + 1 - 1 // (past_first + 1)


@triton.jit
def _stream_reduce_kernel(ws_ptr, out_ptr, M, N, tiles_m, whole, pairs, units, programs, BLOCK_M: tl.constexpr,
                          BLOCK_N: tl.constexpr, ROWS: tl.constexpr, BOX: tl.constexpr):
    """out's rows of token columns [ROWS x program 1, + ROWS) of tile whole + t (t: program 0), if _stream_kernel's
    programs cut it: the sum of their workspace slots in program order (deterministic). Whole tiles return at
    once. BOX: the rows of x's TMA copies (box_rows)."""
    t = tl.program_id(0)
    tile = whole + t
    owner = _owner(t * pairs, units, programs)
    parts = _owner(t * pairs + pairs - 1, units, programs) - owner + 1
    if parts > 1:
        rows = tl.program_id(1) * ROWS + tl.arange(0, ROWS)
        cols = tl.arange(0, BLOCK_N)
        local = rows[:, None] * BLOCK_N + cols[None, :]
        acc = tl.zeros([ROWS, BLOCK_N], tl.float32)
        for p in range(owner, owner + parts):
            acc += tl.load(ws_ptr + _ws_slot(p, t, pairs, units, programs) * (BLOCK_M * BLOCK_N) + local)
        offs_m, keep = box_rows((tile % tiles_m) * BLOCK_M, rows, M, BOX, BLOCK_M)
        offs_n = (tile // tiles_m) * BLOCK_N + cols
        tl.store(out_ptr + offs_m[:, None] * N + offs_n[None, :], acc.to(out_ptr.dtype.element_ty),
                 mask=keep[:, None] & (offs_n < N)[None, :])


STREAM_REDUCE_ROWS = 32  # tokens per program of _stream_reduce_kernel: 32 x 128 fp32 partials per slot


def _check_tiles(cfg: dict) -> None:
    bm, bn, bk, stages, warps = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"], cfg["STAGES"], cfg["num_warps"]
    if bk % 32 or bm not in TOKEN_TILES or warps not in (4, 8) or bn not in (16 * warps, 32 * warps) or stages < 2 \
            or x_box(cfg) % 8 or bm % x_box(cfg):
        raise ValueError(f"prefill wgmma tiles need BLOCK_K a multiple of 32, BLOCK_M in {TOKEN_TILES}, 4 or 8 "
                         f"warps, BLOCK_N 16 or 32 times the warps, STAGES >= 2, X_BOX a multiple of 8 dividing "
                         f"BLOCK_M: {cfg}")


def _prepared(x, group_offset: int, cfg: dict, tiled: bool) -> PrefillX:
    """prefill_x(x) unless x is one already, which must then suit cfg's tiles, the group offset and the layout."""
    px = x if isinstance(x, PrefillX) else prefill_x(x, group_offset, cfg, tiled)
    box = [x_box(cfg), cfg["BLOCK_K"]]
    if list(px.desc.block_shape) != box or px.group_offset != group_offset or px.tiled != tiled:
        raise ValueError(f"x was prepared for {px.desc.block_shape} boxes at group offset {px.group_offset} "
                         f"(tiled weights: {px.tiled}), not {box} at {group_offset} ({tiled})")
    return px


def launch_prefill(x, qweight, qzeros, scales, group_size, group_offset, zero_offset, part, per, cfg, out=None,
                   counts=None, gate=None):
    """launch_wgmma's contract (wgmma.py) for configs with PREFILL: x fp16 or bf16 [M, K], or prefill_x of it.
    MAXNREG caps ptxas's registers per thread (sweeps)."""
    _check_tiles(cfg)
    m, k = x.shape
    n = packed_shape(qweight)[1]
    bm, bn, bk, warps = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"], cfg["num_warps"]
    tiled = is_tiled(qweight)
    px = _prepared(x, group_offset, cfg, tiled)
    grid = (ceil_div(n, bn), splits_of(part), ceil_div(m, bm))
    launch_kernel(
        _prefill_kernel, grid, px.desc, qweight, qzeros, scales, part, out, counts, gate, m, n, k, word_stride(qweight),
        group_offset, zero_offset, per, PAIR_BASE_BITS[x.dtype], GROUP_SIZE=group_size, BLOCK_M=bm, BLOCK_N=bn,
        BLOCK_K=bk, STAGES=cfg["STAGES"], DTYPE=tl_dtype(x.dtype), SERIAL=counts is not None, SWIGLU=gate is not None,
        WARPS=warps, TILED=tiled, WORDS=word_layout(bn, bk, warps, tiled), num_warps=warps,
        maxnreg=cfg.get("MAXNREG"),
    )


class StreamPlan(NamedTuple):
    """How _stream_kernel shares a matmul out: ``programs`` (one per SM: the 256-token tile takes one SM's
    registers) run the first ``whole`` of the ``tiles`` output tiles (``tiles_m`` of them along M) in waves, then
    ``units / programs`` each of the other tiles' pairs of K-steps."""
    programs: int
    tiles: int
    tiles_m: int
    whole: int
    pairs: int

    @property
    def units(self) -> int:
        return (self.tiles - self.whole) * self.pairs


def stream_plan(m: int, n: int, k: int, group_offset: int, cfg: dict) -> StreamPlan:
    """The stream-K split of an [M, K] x [K, N] matmul for cfg's tiles over cfg["PROGRAMS"] programs (fewer where
    there are fewer units): whole tiles in waves but for the last full wave and what is left after it, which are
    streamed (each program then runs 1 to 2 tiles' worth of them, so no tile is cut in more than 3 parts; CUTLASS's
    data-parallel + stream-K hybrid). With fewer tiles than programs every tile is streamed."""
    tiles_m = ceil_div(m, cfg["BLOCK_M"])
    tiles = ceil_div(n, cfg["BLOCK_N"]) * tiles_m
    pairs = ceil_div(ceil_div(k + group_offset, cfg["BLOCK_K"]), 2)
    programs = min(cfg["PROGRAMS"], tiles * pairs)
    return StreamPlan(programs, tiles, tiles_m, max(tiles // programs - 1, 0) * programs, pairs)


def stream_mm(x, qweight, qzeros, scales, group_size, group_offset, zero_offset, out, cfg):
    """out [M, N] (contiguous, any float dtype) <- x @ W by _stream_kernel (config STREAM), then
    _stream_reduce_kernel for the tiles it cut; x fp16 or bf16 [M, K], or prefill_x of it. Returns out."""
    _check_tiles(cfg)
    m, k = x.shape
    n = packed_shape(qweight)[1]
    plan = stream_plan(m, n, k, group_offset, cfg)
    bm, bn, bk, warps = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"], cfg["num_warps"]
    tiled = is_tiled(qweight)
    px = _prepared(x, group_offset, cfg, tiled)
    ws = torch.empty((plan.programs, 2, bm * bn), dtype=torch.float32, device=qweight.device)
    launch_kernel(
        _stream_kernel, (plan.programs,), px.desc, qweight, qzeros, scales, ws, out, m, n, k, word_stride(qweight),
        group_offset, zero_offset, PAIR_BASE_BITS[x.dtype], plan.tiles_m, plan.whole, plan.pairs, plan.units,
        GROUP_SIZE=group_size, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, STAGES=cfg["STAGES"], DTYPE=tl_dtype(x.dtype),
        WARPS=warps, TILED=tiled, WORDS=word_layout(bn, bk, warps, tiled), num_warps=warps,
    )
    rows = min(STREAM_REDUCE_ROWS, bm)
    launch_kernel(_stream_reduce_kernel, (plan.tiles - plan.whole, bm // rows), ws, out, m, n, plan.tiles_m,
                  plan.whole, plan.pairs, plan.units, plan.programs, BLOCK_M=bm, BLOCK_N=bn, ROWS=rows,
                  BOX=x_box(cfg))
    return out
