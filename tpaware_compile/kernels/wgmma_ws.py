"""Warp-specialized Hopper prefill kernel (config WS): one warpgroup unpacks the weights into shared memory while
two others only run the MMAs.

In wgmma_prefill.py the warps that run the MMAs also unpack their operand, and a K-step is bound by each warp's
chain of dependent instructions (ncu: the tensor pipe 75% busy, a warp issuing once per 6.3 cycles; bench/README.md).
Here the kernel forks (gl.warp_specialize) into
- the unpack partition (4 warps, few registers): per K-step it loads the step's packed words, scales and zero
  words (the next step's before this one's arithmetic), waits for a free slot of the shared-memory ring, starts
  the TMA of x's tile into it, unpacks (q - z) * s (unpack_pairs, one rounding in x's dtype, as the prefill
  kernel's operand) and stores the [BN, BK] tile next to it, then arrives on the slot's "weights ready" barrier;
- the MMA partition (the default: 8 warps, the registers left): per K-step it waits for the slot's x and weights,
  runs out^T [BN, BM] += W^T [BN, BK] @ x^T [BK, BM] with both operands in shared memory (asynchronous, one MMA
  in flight), and frees the slot of the step before once that MMA is done. Its epilogue is the prefill kernel's.
The K order inside a step is the words' own: the unpack partition stores each word's 8 values side by side (one
16-byte store), nibbles j and j + 4 adjacent (unpack_pairs' WORD_ORDER), and the host writes x in the same order
(wgmma_prefill.x_in_word_order).
"""

import functools

import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, warpgroup_mma,
                                                              warpgroup_mma_wait)

from ..layout import is_tiled, packed_shape, word_stride
from .common import splits_of, store_split, tl_dtype
from .wgmma import PAIR_BASE_BITS, unpack_pairs, weight_loads
from .wgmma_prefill import _load_x, _pinned_below_wait, checked_prefill_x

MMA_WARPS = 8  # two warpgroups, 64 of each tile's BN = 128 output columns each
UNPACK_WARPS = 4
UNPACK_REGISTERS = 96
# maxnreg: (8 + 4 warps) x 32 threads x 168 registers fit an SM's 65536; the MMA partition gets what the unpack
# partition leaves, (12 x 168 - 4 x UNPACK_REGISTERS) / 8 = 212 per thread
MAX_REGISTERS = 168
_MMA_WARPS = gl.constexpr(MMA_WARPS)  # the same, as the kernels read them
_UNPACK_WARPS = gl.constexpr(UNPACK_WARPS)
_UNPACK_REGISTERS = gl.constexpr(UNPACK_REGISTERS)


@functools.lru_cache(maxsize=None)
def unpack_layout(block_n: int, block_k: int, tiled: bool) -> gl.BlockedLayout:
    """Layout of the unpack partition's [BN, BK/8 words, 4 nibble pairs]: on tiled words (a column's words of a
    step contiguous) 4 lanes share a column, two adjacent words (an 8-byte load) each; on N-major words a lane
    holds all of one column's words (each word load is 32 adjacent columns). Either way a thread's unpacked
    values of a word are 16 adjacent bytes of the shared-memory row."""
    words = block_k // 8
    if tiled:
        lanes = min(words // 2, 8)
        return gl.BlockedLayout([1, words // lanes, 4], [32 // lanes, lanes, 1], [UNPACK_WARPS, 1, 1], [2, 1, 0])
    return gl.BlockedLayout([1, words, 4], [32, 1, 1], [UNPACK_WARPS, 1, 1], [2, 1, 0])


@functools.lru_cache(maxsize=None)
def w_smem_layout(block_n: int, block_k: int, dtype) -> gl.NVMMASharedLayout:
    return gl.NVMMASharedLayout.get_default_for([block_n, block_k], dtype)


@gluon.jit
def _unpack_partition(x_desc, x_smem, w_smem, x_ready, w_ready, free, qw_ptr, qz_ptr, sc_ptr, N, K, stride_q,
                      group_offset, zero_offset, base_bits, seg_start, seg_end, pid_n, pid_m,
                      GROUP_SIZE: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr,
                      STAGES: gl.constexpr, DTYPE: gl.constexpr, TILED: gl.constexpr, WORDS: gl.constexpr):
    """Fill the ring: per K-step, x's tile by TMA and the unpacked weights by stores (module doc)."""
    Q: gl.constexpr = gl.SliceLayout(2, WORDS)
    offs_nq = pid_n * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, Q))
    offs_w = gl.arange(0, BLOCK_K // 8, layout=gl.SliceLayout(0, Q))
    base_pair = base_bits * 0x10001  # R in both halves (wgmma.PAIR_BASE_BITS)
    zero_shift = (offs_nq % 8) * 4
    # three steps' weights in flight: one warp per scheduler cannot hide a load's latency behind other warps
    q, s, zw = weight_loads(seg_start, seg_start < seg_end, qw_ptr, qz_ptr, sc_ptr, N, K, group_offset, offs_nq,
                            offs_w, offs_nq, stride_q, GROUP_SIZE, BLOCK_K, False, TILED)
    q1, s1, zw1 = weight_loads(seg_start + 1, seg_start + 1 < seg_end, qw_ptr, qz_ptr, sc_ptr, N, K, group_offset,
                               offs_nq, offs_w, offs_nq, stride_q, GROUP_SIZE, BLOCK_K, False, TILED)
    q2, s2, zw2 = weight_loads(seg_start + 2, seg_start + 2 < seg_end, qw_ptr, qz_ptr, sc_ptr, N, K, group_offset,
                               offs_nq, offs_w, offs_nq, stride_q, GROUP_SIZE, BLOCK_K, False, TILED)
    for i in range(seg_end - seg_start):
        slot = i % STAGES
        nxt = seg_start + i + 3
        q3, s3, zw3 = weight_loads(nxt, nxt < seg_end, qw_ptr, qz_ptr, sc_ptr, N, K, group_offset, offs_nq, offs_w,
                                   offs_nq, stride_q, GROUP_SIZE, BLOCK_K, False, TILED)
        # a fresh barrier's phase "1" counts as complete: the first pass through the ring does not wait
        mbarrier.wait(free.index(slot), (i // STAGES & 1) ^ 1)
        _load_x(x_desc, seg_start + i, True, pid_m, x_ready.index(slot), x_smem.index(slot), BLOCK_M, BLOCK_K)
        z = ((zw >> zero_shift) & 0xF) + zero_offset
        w = unpack_pairs(q, z, 16.0 * s.to(gl.float32), base_pair, DTYPE, True, BLOCK_N, BLOCK_K, TILED, True)
        w_smem.index(slot).store(w)
        fence_async_shared()  # the generic-proxy stores before the MMA's async-proxy reads
        gl.thread_barrier()  # the whole partition's stores, before its one arrival
        mbarrier.arrive(w_ready.index(slot), count=1)
        q, s, zw, q1, s1, zw1, q2, s2, zw2 = q1, s1, zw1, q2, s2, zw2, q3, s3, zw3


@gluon.jit
def _mma_partition(x_smem, w_smem, x_ready, w_ready, free, steps, sc_ptr, out_ptr, final_ptr, count_ptr, gate_ptr,
                   M, N, pid_n, pid_k, pid_m, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
                   SERIAL: gl.constexpr, SWIGLU: gl.constexpr):
    """Run the MMAs as the ring fills, then store the tile (wgmma_prefill's epilogue)."""
    MMA: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[_MMA_WARPS, 1],
                                                  instr_shape=[16, BLOCK_M, 16])
    acc = gl.zeros([BLOCK_N, BLOCK_M], gl.float32, MMA)
    for i in range(steps):
        slot = i % STAGES
        mbarrier.wait(x_ready.index(slot), i // STAGES & 1)
        mbarrier.wait(w_ready.index(slot), i // STAGES & 1)
        acc = warpgroup_mma(w_smem.index(slot), x_smem.index(slot).permute([1, 0]), acc, is_async=True)
        acc = warpgroup_mma_wait(1, deps=[acc])
        gl.thread_barrier()  # both warpgroups are past step i - 1's MMA: its slot is free
        mbarrier.arrive(free.index((i + STAGES - 1) % STAGES), count=1, pred=i > 0)
    acc = warpgroup_mma_wait(0, deps=[acc])
    offs_n = pid_n * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, MMA))
    acc = _pinned_below_wait(acc, sc_ptr, offs_n)
    offs_m = pid_m * BLOCK_M + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, MMA))
    store_split(acc, out_ptr, final_ptr, count_ptr, gate_ptr, pid_k, M * N,
                gl.expand_dims(offs_m, 0) * N + gl.expand_dims(offs_n, 1),
                gl.expand_dims(offs_n < N, 1) & gl.expand_dims(offs_m < M, 0), SERIAL, SWIGLU)


@gluon.jit
def _ws_prefill_kernel(
    x_desc,  # TMA descriptor of x_in_word_order(x, group_offset, BLOCK_K) [M, Kp], block [BM, BK]
    qw_ptr, qz_ptr, sc_ptr, out_ptr, final_ptr, count_ptr, gate_ptr,  # as wgmma_prefill._prefill_kernel's
    M, N, K, stride_q, group_offset, zero_offset, segs_per_split, base_bits,
    GROUP_SIZE: gl.constexpr,
    BLOCK_M: gl.constexpr,  # tokens per tile: the MMA's N
    BLOCK_N: gl.constexpr,  # output columns per tile: 128 (64 per MMA warpgroup)
    BLOCK_K: gl.constexpr,  # rows per step: a multiple of 32 dividing GROUP_SIZE
    STAGES: gl.constexpr,  # ring slots (x tile + weight tile each)
    DTYPE: gl.constexpr,  # x's dtype (fp16 or bf16)
    SERIAL: gl.constexpr,  # the last program of each output tile sums the partials (common.store_split)
    SWIGLU: gl.constexpr,  # ... and writes silu(gate) * this
    TILED: gl.constexpr,  # qweight in the tiled layout (layout.py)
    WORDS: gl.constexpr,  # unpack_layout(BLOCK_N, BLOCK_K, TILED)
    W_SMEM: gl.constexpr,  # w_smem_layout(BLOCK_N, BLOCK_K, DTYPE)
):
    pid_n = gl.program_id(0)
    pid_k = gl.program_id(1)
    pid_m = gl.program_id(2)
    x_smem = gl.allocate_shared_memory(DTYPE, [STAGES, BLOCK_M, BLOCK_K], x_desc.layout)
    w_smem = gl.allocate_shared_memory(DTYPE, [STAGES, BLOCK_N, BLOCK_K], W_SMEM)
    x_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    w_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    free = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(x_ready.index(i), count=1)
        mbarrier.init(w_ready.index(i), count=1)
        mbarrier.init(free.index(i), count=1)
    seg_start = pid_k * segs_per_split
    seg_end = gl.minimum(seg_start + segs_per_split, gl.cdiv(K + group_offset, BLOCK_K))
    gl.warp_specialize([
        (_mma_partition, (x_smem, w_smem, x_ready, w_ready, free, seg_end - seg_start, sc_ptr, out_ptr, final_ptr,
                          count_ptr, gate_ptr, M, N, pid_n, pid_k, pid_m, BLOCK_M, BLOCK_N, STAGES, SERIAL, SWIGLU)),
        (_unpack_partition, (x_desc, x_smem, w_smem, x_ready, w_ready, free, qw_ptr, qz_ptr, sc_ptr, N, K, stride_q,
                             group_offset, zero_offset, base_bits, seg_start, seg_end, pid_n, pid_m, GROUP_SIZE,
                             BLOCK_M, BLOCK_N, BLOCK_K, STAGES, DTYPE, TILED, WORDS)),
    ], [_UNPACK_WARPS], [_UNPACK_REGISTERS])


def launch_ws_prefill(x, qweight, qzeros, scales, group_size, group_offset, zero_offset, part, per, cfg, out=None,
                      counts=None, gate=None):
    """launch_wgmma's contract (wgmma.py) for configs with WS: x fp16 or bf16 [M, K], or prefill_x of it."""
    m, k = x.shape
    n = packed_shape(qweight)[1]
    bm, bn, bk, stages = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"], cfg["STAGES"]
    if bk % 32 or bm not in (64, 128, 256) or bn != 128 or cfg.get("num_warps", MMA_WARPS) != MMA_WARPS or stages < 2:
        raise ValueError(f"warp-specialized prefill tiles need BLOCK_K a multiple of 32, BLOCK_M 64, 128 or 256, "
                         f"BLOCK_N 128, {MMA_WARPS} warps, STAGES >= 2: {cfg}")
    tiled = is_tiled(qweight)
    px = checked_prefill_x(x, group_offset, cfg, tiled)
    dtype = tl_dtype(x.dtype)
    grid = (triton.cdiv(n, bn), splits_of(part), triton.cdiv(m, bm))
    _ws_prefill_kernel[grid](
        px.desc, qweight, qzeros, scales, part, out, counts, gate, m, n, k, word_stride(qweight), group_offset,
        zero_offset, per, PAIR_BASE_BITS[x.dtype], GROUP_SIZE=group_size, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
        STAGES=stages, DTYPE=dtype, SERIAL=counts is not None, SWIGLU=gate is not None, TILED=tiled,
        WORDS=unpack_layout(bn, bk, tiled), W_SMEM=w_smem_layout(bn, bk, dtype), num_warps=MMA_WARPS,
        maxnreg=MAX_REGISTERS,
    )
