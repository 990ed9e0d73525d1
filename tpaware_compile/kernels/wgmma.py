"""Hopper tensor-core kernel for decode batches (tiles of 16-64 tokens; dispatched for M = 1..32, to 64 on tiled
words, wgmma_prefill.py above): the dequantized weights go straight from the loaded int32 words into the registers
of ``wgmma``'s A operand, with no shared-memory round trip.

The plain ``tl.dot`` kernels (gemm.py) unpack a weight tile in one register layout and Triton moves it through
shared memory into the MMA operand layout (on an H100 that stalled every variant near a third of the copy
roof). Here the kernel is written in Gluon (explicit layouts) and computes ``out^T [BN, BM] = W^T @ x^T`` with
the weight tile as A in registers and x^T [BK, BM] as B in shared memory. A thread's A fragment holds, per 16
rows of K, rows {2t, 2t+1, 2t+8, 2t+9} (t = lane % 4) of two output columns, K-adjacent pairs sharing a 32-bit
register. The checkpoint's words need no repack for that: the sum over K does not care about K's order, so the
MMA's K order is chosen so that a thread's fragment rows of each 32-row block are exactly the 8 nibbles of one
packed word (word 4b + t of the step holds weight rows 32b + 8t + 0..7), the nibbles j and j + 4 of a word
sharing a register, and x's rows are read in the same order:

    MMA row 32b + 16h + 8c + 2t + e  <-  weight row 32b + 8t + 4e + 2h + c     (unpack_pairs, x_in_mma_order)

The words are loaded in a layout where lane t of each quad holds words t, t+4, ..., so after unpacking
``convert_layout(..., assert_trivial=True)`` into the MMA operand layout is free: the compiler checks it. Tiled
words (layout.py, TILED) were repacked so that the word of thread t and block b holds rows 32b + 16h + 8c + 2t +
e at nibble 4e + 2h + c: MMA row r is weight row r, x is read as it lies, and a thread's words of a step lie side
by side in memory (one vector load per column and step; _tiled_slots). The
operand is (q - z)/16, exact in fp16 and bf16 (unpack_pairs: an AND-OR puts two nibbles into the mantissas of
a float pair, one paired multiply-add takes the zero point off), so the scale is the only per-group factor on
the fp32 accumulator; the split-K is reduced inside the launch as in the other kernels (common.store_split).
Where every step and tile lies inside the matrix (even_shape) the loads carry no masks. At 16 tokens a 64-column
program reads as many bytes of x per step as of weights; a program of two 64-column parts (PARTS) shares each
x tile between the two parts' MMAs. Gluon does not run under TRITON_INTERPRET: CPU tests compile it for sm_90a
and check the SASS; the GPU tests check its results.
"""

import functools

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, warpgroup_mma

from ..layout import is_tiled, packed_shape, word_stride
from .common import ceil_div, splits_of, store_split, tiled_offsets, tl_dtype
from .launcher import launch_kernel

NUM_WARPS = 4  # one warpgroup: each warp owns 16 of every 64 output columns
X_DTYPES = (torch.float16, torch.bfloat16)  # the 16-bit MMA operands this kernel is written for
TOKEN_TILES = (16, 32, 64)  # the MMA's N; 8 faulted on an H100 with triton 3.6, 128 spills (x is in registers)
# x's dtype -> bits of the 16-bit float R OR-ed over each nibble pair's field (pair_fields, unpack_pairs); a
# kernel argument, not a constant: as a constant ptxas splits the AND-OR in two
PAIR_BASE_BITS = {torch.float16: 0x6400, torch.bfloat16: 0x3F80}  # 1024.0, 1.0
# The 16-token tile on tiled words needs 96 registers (fp16; 5 programs per SM); capped at 80 (20 bytes of spills)
# it keeps kernels.DECODE_PROGRAMS_PER_SM = 6. At one token the cap measured 0.91-0.99x the time of N-major words on
# all 16 Llama-70B / Granite-20B shapes, where uncapped Granite's TP 1-4 shards took 1.06-1.25x (decode_split's
# waves are planned for 6); at 16 tokens the cap cost Llama 1.14-1.23x the uncapped time (H100, bench/README.md)
ONE_TOKEN_TILED_REGISTERS = 80
# Two 64-column parts per program (PARTS 2) take 167 registers (fp16; 3 programs per SM); capped at 128 (no spills,
# fp16 or bf16) 4 run per SM, which was faster on the Llama-70B TP 1 / 2 up shards at 16 tokens (H100 sweep
# sweep_parts: 52.5 against 57.1 us at TP 1)
TWO_PART_REGISTERS = 128


def _powers(n):
    return [1 << i for i in range(n.bit_length() - 1)]


@functools.lru_cache(maxsize=None)
def word_layout(block_n: int, block_k: int, num_warps: int = NUM_WARPS, tiled: bool = False
                ) -> gl.DistributedLinearLayout:
    """Layout of the tile [BN, BK/8 words, 4 nibble pairs]: lane g (of 8 per quad row) holds column g, lane t
    (of 4) words t, t+4, ... (tiled: words (BK/32) t + b, b < BK/32, contiguous in memory); registers hold the 4
    pairs, column + 8, the further words and column + 16 * warps, and warp w columns 16w: what the A operand
    layout needs once the nibbles are put in MMA K order (module doc)."""
    words = block_k // 8
    own = _powers(words)[:-2] if tiled else _powers(words)[2:]  # a thread's words: its b bits
    quad = _powers(words)[-2:] if tiled else [1, 2]  # its t bits
    reg = ([[0, w, 0] for w in own] if tiled else []) + [[0, 0, 1], [0, 0, 2], [8, 0, 0]] + (
        [] if tiled else [[0, w, 0] for w in own]) + [[c, 0, 0] for c in _powers(block_n) if c >= 16 * num_warps]
    lane = [[0, quad[0], 0], [0, quad[1], 0], [1, 0, 0], [2, 0, 0], [4, 0, 0]]
    warp = [[16 * w, 0, 0] for w in _powers(num_warps)]
    return gl.DistributedLinearLayout(reg, lane, warp, [], [block_n, words, 4])


@functools.lru_cache(maxsize=None)
def x_layout(block_m: int, block_k: int) -> gl.BlockedLayout:
    """Layout of x's tile [BM, BK] as loaded: 8 consecutive rows of K per thread (one 16-byte load)."""
    lanes_k = min(32, block_k // 8)
    return gl.BlockedLayout([1, 8], [32 // lanes_k, lanes_k], [NUM_WARPS, 1], [1, 0])


@gluon.constexpr_function
def mma_layout(block_m, warps):
    """The accumulator out^T [BN, BM] of wgmma.mma_v3: a warpgroup's 64 output columns by block_m tokens per
    instruction, ``warps`` warps stacked along the columns (every wgmma kernel here)."""
    return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[warps, 1], instr_shape=[16, block_m, 16])


@gluon.constexpr_function
def a_operand_layout(mma):
    """The weight tile's layout as the MMA's A operand in registers (16-bit values, k_width 2) for accumulator
    layout ``mma``."""
    return gl.DotOperandLayout(operand_index=0, parent=mma, k_width=2)


@gluon.jit
def _pairs_fma(a, b, c, DTYPE: gl.constexpr):
    """a * b + c on the two 16-bit halves of int32 registers at once (fma.rn.{f16,bf16}x2: one rounding)."""
    asm: gl.constexpr = "fma.rn.f16x2 $0, $1, $2, $3;" if DTYPE == gl.float16 else "fma.rn.bf16x2 $0, $1, $2, $3;"
    return gl.inline_asm_elementwise(asm, "=r,r,r,r", [a, b, c], dtype=gl.int32, is_pure=True, pack=1)


@gluon.jit
def _pairs_mul(a, b, DTYPE: gl.constexpr):
    """a * b on the two 16-bit halves of int32 registers at once (mul.rn.{f16,bf16}x2)."""
    asm: gl.constexpr = "mul.rn.f16x2 $0, $1, $2;" if DTYPE == gl.float16 else "mul.rn.bf16x2 $0, $1, $2;"
    return gl.inline_asm_elementwise(asm, "=r,r,r", [a, b], dtype=gl.int32, is_pure=True, pack=1)


@gluon.jit
def pair_fields(WORDS: gl.constexpr, DTYPE: gl.constexpr):
    """For nibble pair j (nibbles j and j + 4 of a word: bits 4j and 16 + 4j), as [1, 1, 4] tensors of compile-time
    constants: the shifts and mask that leave its two nibbles q inside the mantissas of a 16-bit float R (the
    bits PAIR_BASE_BITS the caller ORs in), which then reads R + q u_j; 1 / (16 u_j) in fp32; and zero_bits,
    zero_step such that zero_bits + z zero_step are the bits of -(R / (16 u_j) + z / 16) for z in 0..16 (z / 16
    is a whole number of the last mantissa place there, and z = 16 carries into the exponent as the value does).
    fp16 (R = 1024, 10 mantissa bits): pairs 0 and 1 stay where they are (u = 1, 16), pairs 2 and 3 move down by
    8 bits, one shift for both: 9 instructions per word instead of 12 with a shift per pair. -(64 + z/16) and
    -(4 + z/16): 0xD400 + z and 0xC400 + 16 z.
    bf16 (R = 1, 7 mantissa bits: 16 q would not fit): every pair moves to the mantissa's top (u = 1/16);
    -(1 + z/16): 0xBF80 + 8 z."""
    j = gl.arange(0, 4, layout=gl.SliceLayout(0, gl.SliceLayout(1, WORDS)))
    if DTYPE == gl.float16:
        lshift = j * 0
        rshift = (j // 2) * 8
        mask = (0xF << (j % 2) * 4) * 0x10001
        unit = gl.where(j % 2 == 1, 1.0 / 256, 1.0 / 16)
        zero_bits = gl.where(j % 2 == 1, 0xC400, 0xD400)
        zero_step = gl.where(j % 2 == 1, 16, 1)
    else:
        lshift = gl.maximum(3 - 4 * j, 0)
        rshift = gl.maximum(4 * j - 3, 0)
        mask = j * 0 + (0xF << 3) * 0x10001
        unit = j * 0.0 + 1.0
        zero_bits = j * 0 + 0xBF80
        zero_step = j * 0 + 8
    return (_as_pair_axis(lshift.to(gl.uint32)), _as_pair_axis(rshift.to(gl.uint32)),
            _as_pair_axis(mask.to(gl.uint32)), _as_pair_axis(unit), _as_pair_axis(zero_bits),
            _as_pair_axis(zero_step))


@gluon.jit
def _as_pair_axis(v):
    """[4] -> [1, 1, 4]: along the nibble pairs of the [BN, BW, 4] tile."""
    return gl.expand_dims(gl.expand_dims(v, 0), 1)


@gluon.jit
def _as_column(v):
    """[BN] -> [BN, 1, 1]: one value per output column of the [BN, BW, 4] tile."""
    return gl.expand_dims(gl.expand_dims(v, 1), 2)


@gluon.jit
def unpack_pairs(q, z, s16, base_pair, DTYPE: gl.constexpr, SCALED_A: gl.constexpr, BLOCK_N: gl.constexpr,
                 BLOCK_K: gl.constexpr, TILED: gl.constexpr = False):
    """Words [BN, BW] -> (q - z) / 16 [BN, BK] in x's dtype (exact), or with SCALED_A (q - z) * s (one rounding),
    in MMA K order (module doc); z (int32) and s16 = 16 s (fp32) are [BN]. Nibbles j and j + 4 sit 16 bits
    apart, so a shift (pair_fields; none for half the pairs in fp16) and one AND-OR with base_pair (R in both
    halves) make both halves of a 32-bit register R + q u_j (no int-to-float), and one paired multiply-add,
    times 1 / (16 u_j) plus -(R / (16 u_j) + z/16), leaves (q - z)/16: the two K-adjacent values a thread's MMA
    fragment register holds. R / (16 u_j) + z/16 is exact (fp16: 64 or 4 + z/16; bf16: 1 + z/16; z in 0..16:
    a v1 checkpoint's stored 15 plus zero_offset 1), and so is the multiply-add's result; its bits come from z by
    integer arithmetic (pair_fields). SCALED_A then multiplies by 16 s in the same paired way."""
    w = gl.expand_dims(q, 2).to(gl.uint32, bitcast=True)
    lshift, rshift, mask, unit, zero_bits, zero_step = pair_fields(gl.constexpr(w.type.layout), DTYPE)
    zero_pairs = (_as_column(z) * zero_step + zero_bits) * 0x10001  # [BN, 1, 4]: -(R / (16 u_j) + z/16), paired
    pairs = ((w << lshift) >> rshift & mask).to(gl.int32, bitcast=True) | base_pair  # [BN, BW, 4]: nibbles j, j+4
    pairs = _pairs_fma(pairs, _both_halves(unit, DTYPE), zero_pairs, DTYPE)
    if SCALED_A:
        pairs = _pairs_mul(pairs, _both_halves(_as_column(s16), DTYPE), DTYPE)
    lo = pairs.to(gl.int16).to(DTYPE, bitcast=True)
    hi = (pairs >> 16).to(gl.int16).to(DTYPE, bitcast=True)
    if TILED:
        f = gl.reshape(gl.join(lo, hi), [BLOCK_N, 4, BLOCK_K // 32, 2, 2, 2])  # [n, t, b, h, c, e]
        f = gl.permute(f, [0, 2, 3, 4, 1, 5])  # [n, b, h, c, t, e]
    else:
        f = gl.reshape(gl.join(lo, hi), [BLOCK_N, BLOCK_K // 32, 4, 2, 2, 2])  # [n, b, t, h, c, e]: nibble 4e+2h+c
        f = gl.permute(f, [0, 1, 3, 4, 2, 5])  # [n, b, h, c, t, e]
    return gl.reshape(f, [BLOCK_N, BLOCK_K])


@gluon.jit
def _both_halves(v, DTYPE: gl.constexpr):
    """fp32 (any shape) -> int32 holding v in x's dtype in both 16-bit halves (a paired operand)."""
    bits = v.to(DTYPE).to(gl.int16, bitcast=True).to(gl.int32) & 0xFFFF
    return bits * 0x10001


@gluon.jit
def x_in_mma_order(x, BLOCK_K: gl.constexpr, TILED: gl.constexpr = False):
    """x [BM, BK] (row 32b + 8t + 4e + 2h + c of the step) -> MMA K order 32b + 16h + 8c + 2t + e: a relabelling
    of registers, no data moves. Tiled words hold their nibbles in that order already (layout.py): x as it is."""
    rows: gl.constexpr = x.shape[0]
    if not TILED:
        x = gl.reshape(x, [rows, BLOCK_K // 32, 4, 2, 2, 2])  # [r, b, t, e, h, c]
        x = gl.reshape(gl.permute(x, [0, 1, 4, 5, 2, 3]), [rows, BLOCK_K])  # [r, b, h, c, t, e]
    return x


@gluon.jit
def _word_offsets(words, cols, stride_q, TILED: gl.constexpr):
    """[BN, BW] offsets in qweight of words [BW] (N-major word indices, or tiled slots: _tiled_slots) of columns
    [BN]."""
    if TILED:
        off = tiled_offsets(gl.expand_dims(words, 0), gl.expand_dims(cols, 1), stride_q)
    else:
        off = gl.expand_dims(words, 0) * stride_q + gl.expand_dims(cols, 1)
    return off


@gluon.jit
def _tiled_slots(seg, offs_w, BLOCK_K: gl.constexpr):
    """The slots of K-step seg's words in tiled qweight (layout.py: word 4t + b of a 128-row step is thread t's word
    of 32-row block b), offs_w = (BK/32) t + b' as word_layout places them, b' counted from the step's first block
    (so a thread's words of a step are contiguous: one vector)."""
    B: gl.constexpr = BLOCK_K // 32
    first = seg * B  # the step's first 32-row block
    if B == 4:
        slots = first * 4 + offs_w
    else:
        slots = gl.multiple_of((first // 4) * 16 + first % 4, B) + offs_w + (offs_w // B) * (4 - B)
    return slots


@gluon.jit
def weight_loads(seg, live, qw_ptr, qz_ptr, sc_ptr, N, K, group_offset, offs_nq, offs_w, offs_s, stride_q,
                 GROUP_SIZE: gl.constexpr, BLOCK_K: gl.constexpr, EVEN: gl.constexpr = False,
                 TILED: gl.constexpr = False):
    """K-step seg's packed words [BN, BW], scales (at offs_s) and zero words [BN] (zeros outside the matrix or
    when not live: the prefetch past the last step). EVEN: the caller's promise that step seg lies inside the
    matrix (no group offset, K and N whole steps and tiles; live is then not looked at), so no masks. Tiled words
    have no group offset (kernels.check_sorted_args)."""
    g = (seg * BLOCK_K) // GROUP_SIZE
    if TILED:
        words = _tiled_slots(seg, offs_w, BLOCK_K)
    elif EVEN:  # group_offset is 0: the words' index without the signed division below (fewer instructions)
        words = seg * (BLOCK_K // 8) + offs_w
    else:
        words = (seg * BLOCK_K - group_offset) // 8 + offs_w  # < 0 in the first step of a shard cut in a group
    if EVEN:
        q = gl.load(qw_ptr + _word_offsets(words, offs_nq, stride_q, TILED))
        s = gl.load(sc_ptr + g * N + offs_s)
        zw = gl.load(qz_ptr + g * (N // 8) + offs_nq // 8)
    else:
        w_ok = (words >= 0) & (words < K // 8) & live
        q = gl.load(qw_ptr + _word_offsets(words, offs_nq, stride_q, TILED),
                    mask=gl.expand_dims(w_ok, 0) & gl.expand_dims(offs_nq < N, 1), other=0)
        s = gl.load(sc_ptr + g * N + offs_s, mask=(offs_s < N) & live, other=0.0)
        zw = gl.load(qz_ptr + g * (N // 8) + offs_nq // 8, mask=(offs_nq < N) & live, other=0)
    return q, s, zw


@gluon.jit
def _x_loads(seg, live, x_ptr, K, M, stride_xm, group_offset, offs_kx, offs_mx, BLOCK_K: gl.constexpr,
             EVEN: gl.constexpr):
    """K-step seg's x [BM, BK] (zeros outside the matrix or when not live). EVEN as weight_loads, with offs_mx
    clamped to x's rows by the caller (rows past M repeat the last one; their outputs are not stored)."""
    # a multiple of 8 (group_offset is checked on the host), which lets x's rows load as 16-byte vectors
    rows = gl.multiple_of(seg * BLOCK_K - group_offset, 8) + offs_kx
    ptrs = x_ptr + gl.expand_dims(offs_mx, 1) * stride_xm + gl.expand_dims(rows, 0)
    if EVEN:
        xv = gl.load(ptrs)
    else:
        r_ok = (rows >= 0) & (rows < K) & live
        xv = gl.load(ptrs, mask=gl.expand_dims(offs_mx < M, 1) & gl.expand_dims(r_ok, 0), other=0.0)
    return xv


@gluon.jit
def _step_loads(seg, seg_end, x_ptr, qw_ptr, qz_ptr, sc_ptr, M, N, K, stride_xm, stride_q, group_offset,
                offs_nq, offs_w, offs_n, offs_kx, offs_mx, GROUP_SIZE: gl.constexpr, BLOCK_K: gl.constexpr,
                EVEN: gl.constexpr, TILED: gl.constexpr):
    """K-step seg's (words, scales, zero words, x) (_loaded_step)."""
    q, s, zw = _part_loads(seg, seg_end, qw_ptr, qz_ptr, sc_ptr, N, K, group_offset, offs_nq, offs_w, offs_n,
                           stride_q, GROUP_SIZE, BLOCK_K, EVEN, TILED)
    seg, live = _loaded_step(seg, seg_end, EVEN)
    return q, s, zw, _x_loads(seg, live, x_ptr, K, M, stride_xm, group_offset, offs_kx, offs_mx, BLOCK_K, EVEN)


@gluon.jit
def _part_loads(seg, seg_end, qw_ptr, qz_ptr, sc_ptr, N, K, group_offset, offs_nq, offs_w, offs_n, stride_q,
                GROUP_SIZE: gl.constexpr, BLOCK_K: gl.constexpr, EVEN: gl.constexpr, TILED: gl.constexpr):
    """K-step seg's weights of one column part (_step_loads without x; a two-part program's second part)."""
    seg, live = _loaded_step(seg, seg_end, EVEN)
    return weight_loads(seg, live, qw_ptr, qz_ptr, sc_ptr, N, K, group_offset, offs_nq, offs_w, offs_n, stride_q,
                        GROUP_SIZE, BLOCK_K, EVEN, TILED)


@gluon.jit
def _loaded_step(seg, seg_end, EVEN: gl.constexpr):
    """The step a load of step seg reads and whether it is live: past the split's last step the loads give
    zeros, or with EVEN read that last step again (unmasked loads; the loop never multiplies it)."""
    live = seg < seg_end
    if EVEN:
        seg = gl.minimum(seg, seg_end - 1)
    return seg, live


@gluon.jit
def a_operand(q, s, zw, offs_nq, base_pair, zero_offset, DTYPE: gl.constexpr, SCALED_A: gl.constexpr,
              A_REGS: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr, TILED: gl.constexpr = False):
    """One step's weights as wgmma's A operand in registers: (q - z) / 16, or (q - z) * s with SCALED_A."""
    z = ((zw >> ((offs_nq % 8) * 4)) & 0xF) + zero_offset  # [BN]
    f = unpack_pairs(q, z, 16.0 * s.to(gl.float32), base_pair, DTYPE, SCALED_A, BLOCK_N, BLOCK_K, TILED)
    return gl.convert_layout(f, A_REGS, assert_trivial=True)


@gluon.jit
def _x_tile(x_smem, i, xv, BLOCK_K: gl.constexpr, TILED: gl.constexpr):
    """Step i's x [BM, BK] into its shared-memory slot (of two: a step writes one while a warp that is behind may
    still be in the previous step's MMA); returns x^T [BK, BM] for the MMA."""
    slot = x_smem.index(i % 2)
    slot.store(x_in_mma_order(xv, BLOCK_K, TILED))
    fence_async_shared()
    gl.thread_barrier()  # every warp's part of x is in shared memory before the warpgroup's MMA reads it
    return slot.permute([1, 0])


@gluon.jit
def _scaled_mma(acc, q, s, zw, offs_nq, xt, zero, base_pair, zero_offset, DTYPE: gl.constexpr, A_REGS: gl.constexpr,
                BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr, TILED: gl.constexpr):
    """acc + one step's product: one exact MMA of the unpacked words, scaled per group on the fp32 accumulator."""
    a = a_operand(q, s, zw, offs_nq, base_pair, zero_offset, DTYPE, False, A_REGS, BLOCK_N, BLOCK_K, TILED)
    return acc + gl.expand_dims(16.0 * s.to(gl.float32), 1) * warpgroup_mma(a, xt, zero, use_acc=False)


@gluon.jit
def _one_part_steps(x_smem, seg_start, seg_end, x_ptr, qw_ptr, qz_ptr, sc_ptr, M, N, K, stride_xm, stride_q,
                    group_offset, zero_offset, base_pair, offs_nq, offs_w, offs_n, offs_kx, offs_mx,
                    GROUP_SIZE: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr,
                    DTYPE: gl.constexpr, EVEN: gl.constexpr, TILED: gl.constexpr, MMA: gl.constexpr):
    """The K-steps of a program of BLOCK_N columns; returns its accumulator."""
    A_REGS: gl.constexpr = a_operand_layout(MMA)
    acc = gl.zeros([BLOCK_N, BLOCK_M], gl.float32, MMA)
    zero = gl.zeros([BLOCK_N, BLOCK_M], gl.float32, MMA)
    q, s, zw, xv = _step_loads(seg_start, seg_end, x_ptr, qw_ptr, qz_ptr, sc_ptr, M, N, K, stride_xm, stride_q,
                               group_offset, offs_nq, offs_w, offs_n, offs_kx, offs_mx, GROUP_SIZE, BLOCK_K,
                               EVEN, TILED)
    for seg in range(seg_start, seg_end):
        # the next step's loads are issued before this step's arithmetic: two steps of weights in flight (three,
        # with 127 registers instead of 80, was slower on every Llama-70B shape at M = 1 / 16: bench/README.md)
        nq, ns, nzw, nxv = _step_loads(seg + 1, seg_end, x_ptr, qw_ptr, qz_ptr, sc_ptr, M, N, K, stride_xm,
                                       stride_q, group_offset, offs_nq, offs_w, offs_n, offs_kx, offs_mx,
                                       GROUP_SIZE, BLOCK_K, EVEN, TILED)
        xt = _x_tile(x_smem, seg - seg_start, xv, BLOCK_K, TILED)
        acc = _scaled_mma(acc, q, s, zw, offs_nq, xt, zero, base_pair, zero_offset, DTYPE, A_REGS, BLOCK_N, BLOCK_K,
                          TILED)
        q, xv, s, zw = nq, nxv, ns, nzw
    return acc


@gluon.jit
def _two_part_steps(x_smem, seg_start, seg_end, x_ptr, qw_ptr, qz_ptr, sc_ptr, M, N, K, stride_xm, stride_q,
                    group_offset, zero_offset, base_pair, offs_nq, offs_w, offs_n, offs_kx, offs_mx,
                    GROUP_SIZE: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr,
                    DTYPE: gl.constexpr, EVEN: gl.constexpr, TILED: gl.constexpr, MMA: gl.constexpr):
    """The K-steps of a program of two BLOCK_N-column parts side by side (offs_nq, offs_n: part 0's columns): one
    x tile per step serves both parts' MMAs, each part unpacked in turn, so x is read once per 2 BLOCK_N columns
    with the registers of one part's operand. Returns the two parts' accumulators."""
    A_REGS: gl.constexpr = a_operand_layout(MMA)
    acc0 = gl.zeros([BLOCK_N, BLOCK_M], gl.float32, MMA)
    acc1 = gl.zeros([BLOCK_N, BLOCK_M], gl.float32, MMA)
    zero = gl.zeros([BLOCK_N, BLOCK_M], gl.float32, MMA)
    q0, s0, zw0, xv = _step_loads(seg_start, seg_end, x_ptr, qw_ptr, qz_ptr, sc_ptr, M, N, K, stride_xm, stride_q,
                                  group_offset, offs_nq, offs_w, offs_n, offs_kx, offs_mx, GROUP_SIZE, BLOCK_K,
                                  EVEN, TILED)
    q1, s1, zw1 = _part_loads(seg_start, seg_end, qw_ptr, qz_ptr, sc_ptr, N, K, group_offset, offs_nq + BLOCK_N,
                              offs_w, offs_n + BLOCK_N, stride_q, GROUP_SIZE, BLOCK_K, EVEN, TILED)
    for seg in range(seg_start, seg_end):
        nq0, ns0, nzw0, nxv = _step_loads(seg + 1, seg_end, x_ptr, qw_ptr, qz_ptr, sc_ptr, M, N, K, stride_xm,
                                          stride_q, group_offset, offs_nq, offs_w, offs_n, offs_kx, offs_mx,
                                          GROUP_SIZE, BLOCK_K, EVEN, TILED)
        nq1, ns1, nzw1 = _part_loads(seg + 1, seg_end, qw_ptr, qz_ptr, sc_ptr, N, K, group_offset,
                                     offs_nq + BLOCK_N, offs_w, offs_n + BLOCK_N, stride_q, GROUP_SIZE, BLOCK_K,
                                     EVEN, TILED)
        xt = _x_tile(x_smem, seg - seg_start, xv, BLOCK_K, TILED)
        acc0 = _scaled_mma(acc0, q0, s0, zw0, offs_nq, xt, zero, base_pair, zero_offset, DTYPE, A_REGS, BLOCK_N,
                           BLOCK_K, TILED)
        acc1 = _scaled_mma(acc1, q1, s1, zw1, offs_nq + BLOCK_N, xt, zero, base_pair, zero_offset, DTYPE, A_REGS,
                           BLOCK_N, BLOCK_K, TILED)
        q0, s0, zw0, q1, s1, zw1, xv = nq0, ns0, nzw0, nq1, ns1, nzw1, nxv
    return acc0, acc1


@gluon.jit
def _output_tile(offs_m, offs_n, M, N):
    """Offsets of a program's output tile [BN, BM] (row * N + column) and which of its rows lie inside x. Called
    after the K-steps, not before: kept live through the loop they took registers it needs (spills)."""
    return gl.expand_dims(offs_m, 0) * N + gl.expand_dims(offs_n, 1), gl.expand_dims(offs_m < M, 0)


@gluon.jit
def _wgmma_kernel(
    x_ptr,  # [M, K] fp16 / bf16, row stride stride_xm
    qw_ptr,  # [K/8, N] int32 packed along K, N-major or TILED (layout.py)
    qz_ptr,  # [G, N/8] int32, packed along N
    sc_ptr,  # [G, N]
    out_ptr,  # [SPLIT_K, M, N] fp32 partials, or [M, N] output when SPLIT_K == 1
    final_ptr,  # [M, N] output of a one-launch split-K (SERIAL), else unused
    count_ptr,  # [tiles] int32 zeros (SERIAL: common.tile_counters), else None
    gate_ptr,  # [SPLIT_K, M, N] fp32 partials of gate when this is up's launch of a serial SwiGLU, else None
    M, N, K, stride_xm, stride_q,  # stride_q: layout.word_stride(qweight)
    group_offset, zero_offset, segs_per_split, base_bits,
    GROUP_SIZE: gl.constexpr,
    BLOCK_M: gl.constexpr,  # tokens per tile: the MMA's N (TOKEN_TILES)
    BLOCK_N: gl.constexpr,  # output columns per tile (per part): the MMA's M (64 or 128)
    BLOCK_K: gl.constexpr,  # rows per step: a multiple of 32 dividing GROUP_SIZE
    DTYPE: gl.constexpr,  # x's dtype (fp16 or bf16)
    SERIAL: gl.constexpr,  # the last program of each output tile sums the partials (common.store_split)
    SWIGLU: gl.constexpr,  # ... and writes silu(gate) * this
    EVEN: gl.constexpr,  # no group offset, K a whole number of steps and N of tiles: no masks on the loads
    TILED: gl.constexpr,  # qweight in the tiled layout (layout.py): a thread's words (BK/32) t + b
    WORDS: gl.constexpr,  # word_layout(BLOCK_N, BLOCK_K, NUM_WARPS, TILED)
    XL: gl.constexpr,  # x_layout(BLOCK_M, BLOCK_K)
    PARTS: gl.constexpr = 1,  # 2: a program computes two BLOCK_N-column parts on one x tile (_two_part_steps)
):
    MMA: gl.constexpr = mma_layout(BLOCK_M, 4)  # one warpgroup (NUM_WARPS)
    Q: gl.constexpr = gl.SliceLayout(2, WORDS)
    X_SMEM: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_M, BLOCK_K], DTYPE)
    pid_n = gl.program_id(0)
    pid_k = gl.program_id(1)
    pid_m = gl.program_id(2)
    offs_nq = pid_n * (PARTS * BLOCK_N) + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, Q))
    offs_w = gl.arange(0, BLOCK_K // 8, layout=gl.SliceLayout(0, Q))
    base_pair = base_bits * 0x10001  # R in both halves
    offs_kx = gl.arange(0, BLOCK_K, layout=gl.SliceLayout(0, XL))
    offs_mx = pid_m * BLOCK_M + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, XL))
    if EVEN:
        offs_mx = gl.minimum(offs_mx, M - 1)
    offs_n = pid_n * (PARTS * BLOCK_N) + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, MMA))
    offs_m = pid_m * BLOCK_M + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, MMA))
    # two x slots (K-major: the MMA reads its transpose; _x_tile)
    x_smem = gl.allocate_shared_memory(DTYPE, [2, BLOCK_M, BLOCK_K], X_SMEM)
    seg_start = pid_k * segs_per_split
    seg_end = gl.minimum(seg_start + segs_per_split, gl.cdiv(K + group_offset, BLOCK_K))
    if PARTS == 2:
        acc0, acc1 = _two_part_steps(x_smem, seg_start, seg_end, x_ptr, qw_ptr, qz_ptr, sc_ptr, M, N, K, stride_xm,
                                     stride_q, group_offset, zero_offset, base_pair, offs_nq, offs_w, offs_n, offs_kx,
                                     offs_mx, GROUP_SIZE, BLOCK_M, BLOCK_N, BLOCK_K, DTYPE, EVEN, TILED, MMA)
        offs, rows_ok = _output_tile(offs_m, offs_n, M, N)
        # one store of both parts ([BN, BM, 2]): the one-launch split-K counts a program once
        store_split(gl.join(acc0, acc1), out_ptr, final_ptr, count_ptr, gate_ptr, pid_k, M * N,
                    gl.join(offs, offs + BLOCK_N), gl.join(gl.expand_dims(offs_n < N, 1) & rows_ok,
                                                           gl.expand_dims(offs_n + BLOCK_N < N, 1) & rows_ok),
                    SERIAL, SWIGLU)
    else:
        acc = _one_part_steps(x_smem, seg_start, seg_end, x_ptr, qw_ptr, qz_ptr, sc_ptr, M, N, K, stride_xm, stride_q,
                              group_offset, zero_offset, base_pair, offs_nq, offs_w, offs_n, offs_kx, offs_mx,
                              GROUP_SIZE, BLOCK_M, BLOCK_N, BLOCK_K, DTYPE, EVEN, TILED, MMA)
        offs, rows_ok = _output_tile(offs_m, offs_n, M, N)
        store_split(acc, out_ptr, final_ptr, count_ptr, gate_ptr, pid_k, M * N, offs,
                    gl.expand_dims(offs_n < N, 1) & rows_ok, SERIAL, SWIGLU)


def register_cap(m: int, tiles: tuple, tiled: bool, parts: int = 1):
    """ptxas's register limit for a launch (None: none): TWO_PART_REGISTERS for two-part programs;
    ONE_TOKEN_TILED_REGISTERS for one token in the dispatched 16 x 64 x 128 tile (``tiles``: BLOCK_M, BLOCK_N of a
    part, BLOCK_K) on tiled words, the one measured (smaller steps need fewer registers than the cap, larger tiles
    would spill: bench/kernel_regs.py)."""
    if parts == 2:
        return TWO_PART_REGISTERS
    return ONE_TOKEN_TILED_REGISTERS if tiled and m == 1 and tuple(tiles) == (16, 64, 128) else None


def even_shape(k: int, n: int, group_offset: int, cfg: dict) -> bool:
    """Whether every K-step and output tile lies inside the matrix, so the kernel may load without masks (its
    bounds checks were a seventh of the decode loop's instructions, bench/kernel_regs.py); config MASKED forces
    the masked loads."""
    return group_offset == 0 and k % cfg["BLOCK_K"] == 0 and n % cfg["BLOCK_N"] == 0 and not cfg.get("MASKED")


def launch_wgmma(x, qweight, qzeros, scales, group_size, group_offset, zero_offset, part, per, cfg, out=None,
                 counts=None, gate=None):
    """One launch into part [SPLIT_K, M, N] (or the [M, N] output); with counts also the in-launch reduction into
    out (silu(gate) * up with gate's partials). launch_dot's contract; x fp16 or bf16. Config PARTS 2: BLOCK_N 128
    as two 64-column parts per program; MAXNREG overrides register_cap (sweeps)."""
    m, k = x.shape
    n = packed_shape(qweight)[1]
    bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    if bk % 32 or bn not in (64, 128) or bm not in TOKEN_TILES:
        raise ValueError(f"wgmma tiles need BLOCK_K a multiple of 32, BLOCK_N 64 or 128, BLOCK_M in {TOKEN_TILES}: "
                         f"{cfg}")
    parts = cfg.get("PARTS", 1)
    if parts not in (1, 2) or (parts == 2 and bn != 128):
        raise ValueError(f"PARTS is 1, or 2 for BLOCK_N 128 as two 64-column parts: {cfg}")
    tiled = is_tiled(qweight)
    grid = (ceil_div(n, bn), splits_of(part), ceil_div(m, bm))
    bn //= parts
    launch_kernel(
        _wgmma_kernel, grid, x, qweight, qzeros, scales, part, out, counts, gate, m, n, k, x.stride(0),
        word_stride(qweight), group_offset, zero_offset, per, PAIR_BASE_BITS[x.dtype], GROUP_SIZE=group_size,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, DTYPE=tl_dtype(x.dtype), SERIAL=counts is not None, SWIGLU=gate is not None,
        EVEN=even_shape(k, n, group_offset, cfg), TILED=tiled, WORDS=word_layout(bn, bk, NUM_WARPS, tiled),
        XL=x_layout(bm, bk), PARTS=parts, num_warps=NUM_WARPS,
        maxnreg=cfg.get("MAXNREG", register_cap(m, (bm, bn, bk), tiled, parts)),
    )
