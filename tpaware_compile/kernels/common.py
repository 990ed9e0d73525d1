"""Pieces shared by the GPTQ kernels: nibble unpacking, the split-K reduction and small host helpers.

Dequantization uses the mantissa trick: a nibble ``q`` shifted into the top of a float's mantissa and OR-ed
with the bits of 1.0 is the float ``1 + q/16`` exactly (fp32, fp16 and bf16 all have >= 4 mantissa bits),
with no int-to-float instruction. The affine part is then applied once per group and output column:

    sum_k x_k (q_k - z) s = 16 s * sum_k x_k f_k  -  s (16 + z) * sum_k x_k,      f_k = 1 + q_k / 16
"""

import math

import torch
import triton
import triton.language as tl

from ..layout import TILE_COLS, TILE_WORDS, packed_shape
from .launcher import launch_kernel

# float format -> (bits of 1.0, left shift that puts a nibble at the top 4 mantissa bits)
_MANTISSA = {torch.float32: (0x3F800000, 19), torch.float16: (0x3C00, 6), torch.bfloat16: (0x3F80, 3)}
_TL_DTYPE = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


def mantissa_args(dtype: torch.dtype):
    """(one_bits, MANTISSA_SHIFT) for the dot operand dtype. one_bits is passed at run time: as a constant
    ptxas splits the OR into two instructions."""
    return _MANTISSA[dtype]


def tl_dtype(dtype: torch.dtype):
    return _TL_DTYPE[dtype]


def is_interpreted(kernel) -> bool:
    """True when ``kernel`` was decorated under TRITON_INTERPRET=1 (read by triton.jit at import time)."""
    return type(kernel).__name__ == "InterpretedFunction"


def segment_rows(group_size: int, block_k_max: int) -> int:
    """Rows per K-step: a power of two dividing group_size, so a step never straddles two groups."""
    return math.gcd(group_size, block_k_max)


def ceil_div(a: int, b: int) -> int:
    """a / b rounded up, for host code: triton.cdiv is a constexpr function, whose wrapper costs microseconds per
    call on the host, a dozen calls per kernel call (bench/probe_host_python.py)."""
    return -(-a // b)


def split_plan(n_segs: int, want_splits: int):
    """(segments per split, number of splits) covering n_segs segments with at most want_splits programs."""
    want = max(1, min(want_splits, n_segs))
    per = ceil_div(n_segs, want)
    return per, ceil_div(n_segs, per)


@triton.jit
def nibble_floats(words, one_bits, SHIFTS, MANTISSA_SHIFT: tl.constexpr, DTYPE: tl.constexpr):
    """int32 words (any shape) and SHIFTS (broadcastable, 4 * nibble index) -> floats 1 + q/16 in DTYPE."""
    # The shift amounts are compile-time per register, so this is one shift and one LOP3 per weight.
    bits = ((words >> SHIFTS) << MANTISSA_SHIFT) & (tl.constexpr(0xF) << MANTISSA_SHIFT) | one_bits
    if MANTISSA_SHIFT == 19:  # fp32; an early return would still compile the code after it
        out = bits.to(tl.float32, bitcast=True)
    else:
        out = bits.to(tl.int16).to(DTYPE, bitcast=True)
    return out


@triton.jit
def x_columns(perm_ptr, rows, K, HAS_PERM: tl.constexpr):
    """The x column each weight row multiplies: ``perm[rows]`` when the kernel computes x[..., perm] @ W (the
    gather folded into its x loads instead of a separate launch), else ``rows``. A constexpr branch, so the
    no-perm kernel compiles exactly as without it. Rows outside [0, K) read nothing here; the caller masks them."""
    if HAS_PERM:
        cols = tl.load(perm_ptr + rows, mask=rows.to(tl.uint32) < K, other=0)
    else:
        cols = rows
    return cols


_TILE_COLS = tl.constexpr(TILE_COLS)  # layout.py's tile, as compile-time constants of the kernels
_TILE_WORDS = tl.constexpr(TILE_WORDS)


@triton.jit
def word_offsets(words, cols, stride_q, TILED: tl.constexpr):
    """Offsets in qweight of packed words ``words`` of columns ``cols`` (broadcast together): N-major rows
    (stride_q = N) or TILED (layout.py, stride_q = words per 64-column tile), where word w of the K order the
    kernels step through (nibble i: row word_rows(8w + i)) is 32-row block w // 4's word for thread w % 4, which
    tile() put in slot 4 (w % 4) + (w % 16) // 4 of its 128-row step."""
    if TILED:
        off = tiled_offsets((words // _TILE_WORDS) * _TILE_WORDS + (words % 4) * 4 + (words % _TILE_WORDS) // 4, cols,
                            stride_q)
    else:
        off = words * stride_q + cols
    return off


@triton.jit
def tiled_offsets(slots, cols, stride_q):
    """Offsets in tiled qweight (layout.py: [N/64, K/128, 64, 16]) of the words in slots 16 s + i (step s, slot i)
    of columns ``cols``. The slots' and the columns' parts are summed apart, each on its own (unbroadcast) shape,
    then added once. The Gluon kernels call it too (wgmma.py)."""
    return (((slots // _TILE_WORDS) * (_TILE_COLS * _TILE_WORDS) + slots % _TILE_WORDS)
            + ((cols // _TILE_COLS) * stride_q + (cols % _TILE_COLS) * _TILE_WORDS))


@triton.jit
def word_rows(pos, TILED: tl.constexpr):
    """The K row that position pos = 8w + i (nibble i of word w, as word_offsets counts words) holds: pos itself in
    N-major words; in tiled ones (layout.py) pos = 32b + 8t + 4e + 2h + c holds row 32b + 16h + 8c + 2t + e."""
    if TILED:
        rows = (pos // 32) * 32 + (pos // 8 % 4) * 2 + (pos // 2 % 2) * 16 + (pos % 2) * 8 + pos // 4 % 2
    else:
        rows = pos
    return rows


@triton.jit
def step_words(qw_ptr, seg, word_offs, cols, col_mask, stride_q, K, group_offset, BLOCK_K: tl.constexpr, live,
               TILED: tl.constexpr):
    """K-step ``seg``'s packed words (zeros outside [0, K) or when not live), in whatever shape ``word_offs`` (the
    step's words 0..BLOCK_K/8-1) and ``cols`` broadcast to: [BW, 1] and [1, BN] give [BW, BN]."""
    words = (seg * BLOCK_K - group_offset) // 8 + word_offs  # exact: both terms are multiples of 8
    w_ok = (words >= 0) & (words < K // 8) & live
    return tl.load(qw_ptr + word_offsets(words, cols, stride_q, TILED), mask=w_ok & col_mask, other=0)


@triton.jit
def load_group(qz_ptr, sc_ptr, g, offs_n, n_mask, N):
    """Group g's scales [BN] and packed zero words [BN] (each word read for its 8 columns; L1 serves repeats)."""
    s = tl.load(sc_ptr + g * N + offs_n, mask=n_mask, other=0.0)
    zw = tl.load(qz_ptr + g * (N // 8) + offs_n // 8, mask=n_mask, other=0)
    return s, zw


@triton.jit
def affine_factors(s, zw, offs_n, zero_offset):
    """Per-column (16 s, s (16 + z)) in fp32: the two factors of the per-group correction."""
    z = ((zw >> ((offs_n % 8) * 4)) & 0xF) + zero_offset
    s = s.to(tl.float32)
    return 16.0 * s, s * (16 + z).to(tl.float32)


@triton.jit
def group_affine(qz_ptr, sc_ptr, g, offs_n, n_mask, N, zero_offset):
    """Per-column (16 s, s (16 + z)) of group g, fp32."""
    s, zw = load_group(qz_ptr, sc_ptr, g, offs_n, n_mask, N)
    return affine_factors(s, zw, offs_n, zero_offset)


@triton.jit
def _splitk_reduce_kernel(
    part_ptr,  # [SPLIT_K, M*N] fp32 partial sums
    out_ptr,  # [M*N] in the output dtype
    MN,
    SPLIT_K: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < MN
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for i in tl.static_range(SPLIT_K):
        acc += tl.load(part_ptr + i * MN + offs, mask=mask, other=0.0)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def store_split(y, part_ptr, out_ptr, count_ptr, gate_ptr, pid_k, MN, offs, mask, SERIAL: tl.constexpr,
                SWIGLU: tl.constexpr):
    """Store a program's output tile y (any shape; offs = row * N + column of each element, mask its bounds) into
    part [SPLIT_K, M, N] (or the output itself when there is no split-K). With SERIAL (one-launch split-K) the
    last of the tile's SPLIT_K programs (grid axis 1) to finish then sums every partial in split order
    (deterministic, as the reduction kernel) into out [M, N] and re-arms the tile's counter for the next launch:
    no second launch. With SWIGLU this launch is up's, and out gets silu(gate) * up, gate summed from gate_ptr's
    partials (written by the launch before, complete in stream order)."""
    tl.store(part_ptr + pid_k * MN + offs, y.to(part_ptr.dtype.element_ty), mask=mask)
    if SERIAL:
        split_k = tl.num_programs(1)
        tile = tl.program_id(2) * tl.num_programs(0) + tl.program_id(0)
        tl.debug_barrier()  # every thread's partial is written before this program counts as done
        done = tl.atomic_add(count_ptr + tile, 1, sem="acq_rel", scope="gpu")
        if done == split_k - 1:
            acc = _sum_splits(part_ptr, split_k, MN, offs, mask)
            if SWIGLU:
                g = _sum_splits(gate_ptr, split_k, MN, offs, mask)
                acc = g / (1.0 + tl.exp(-g)) * acc
            tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)
            tl.atomic_xchg(count_ptr + tile, 0, sem="relaxed", scope="gpu")


@triton.jit
def _sum_splits(part_ptr, split_k, MN, offs, mask):
    # starts from partial 0 rather than zeros so that no layout is named here: Gluon kernels call this too
    acc = tl.load(part_ptr + offs, mask=mask, other=0.0, cache_modifier=".cg")  # .cg: from L2, where the
    for i in range(1, split_k):  # other programs' stores are
        acc += tl.load(part_ptr + i * MN + offs, mask=mask, other=0.0, cache_modifier=".cg")
    return acc


def cuda_index(device) -> int:
    """A CUDA device's index (the current device for a bare "cuda")."""
    return device.index if device.index is not None else torch.cuda.current_device()


_TILE_COUNTS = {}  # (device type, index) -> int32 zeros: the one-launch split-K's per-tile counters


def tile_counters(tiles: int, device):
    """Zeroed int32 counters for a one-launch split-K over ``tiles`` output tiles (store_split), or None where
    they cannot be had: a first use, or a larger one, during CUDA-graph capture (allocating there would bake a
    memset into the graph; the caller then reduces with a second launch). One buffer per device, shared by
    launches in stream order (each leaves its counters at zero); two such launches at once on two streams of one
    device would share counters, as a Marlin-style kernel's workspace would: use one stream per device."""
    key = (device.type, cuda_index(device) if device.type == "cuda" else device.index)
    buf = _TILE_COUNTS.get(key)
    if buf is None or buf.numel() < tiles:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return None
        buf = torch.zeros(max(tiles, 4096), dtype=torch.int32, device=device)
        _TILE_COUNTS[key] = buf
    return buf


def serial_counters(cfg: dict, m: int, n: int, split_k: int, device):
    """tile_counters when cfg asks for the one-launch split-K (SERIAL) and there are splits to reduce; None means
    a reduction launch after the kernel. One counter per output row and column block: at least one per tile."""
    if not (cfg.get("SERIAL") and split_k > 1):
        return None
    return tile_counters(ceil_div(n, cfg["BLOCK_N"]) * m, device)


def splitk_buffers(m: int, n: int, split_k: int, dtype: torch.dtype, device, out=None):
    """(buffer the kernel writes, final output: ``out`` where given). Without split-K they are one tensor."""
    out = torch.empty((m, n), dtype=dtype, device=device) if out is None else out
    if split_k == 1:
        return out, out
    return torch.empty((split_k, m, n), dtype=torch.float32, device=device), out


def splits_of(part: torch.Tensor) -> int:
    """How many split-K partials a launch writes: ``part`` is [SPLIT_K, M, N] (splitk_buffers) or the [M, N] output."""
    return part.shape[0] if part.dim() == 3 else 1


def split_k_matmul(launch, x, qweight, qzeros, scales, group_size, group_offset, zero_offset, out_dtype, cfg,
                   out=None):
    """Plan split-K over x's K (group offset included), run ``launch`` once into the partials, reduce them (inside
    that launch with cfg SERIAL: ``launch`` then also takes out and counts) into ``out`` (contiguous [M, N] in
    out_dtype; a new tensor when None). Returns the output."""
    per, split_k = split_plan(ceil_div(x.shape[1] + group_offset, cfg["BLOCK_K"]), cfg["SPLIT_K"])
    n = packed_shape(qweight)[1]
    part, out = splitk_buffers(x.shape[0], n, split_k, out_dtype, x.device, out)
    counts = serial_counters(cfg, x.shape[0], n, split_k, x.device)
    serial = {} if counts is None else dict(out=out, counts=counts)
    launch(x, qweight, qzeros, scales, group_size, group_offset, zero_offset, part, per, cfg, **serial)
    return out if counts is not None else splitk_finish(part, out, split_k)


# the reduction launch's elements and warps per program: the fastest of four sizes (bench/probe_reduce.py)
REDUCE_BLOCK, REDUCE_WARPS = 1024, 4


def splitk_finish(part: torch.Tensor, out: torch.Tensor, split_k: int) -> torch.Tensor:
    """Sum the split-K partials into ``out`` (deterministic: no atomics, no memset)."""
    if split_k > 1:
        mn = out.numel()
        launch_kernel(_splitk_reduce_kernel, (ceil_div(mn, REDUCE_BLOCK),), part, out, mn, SPLIT_K=split_k,
                      BLOCK=REDUCE_BLOCK, num_warps=REDUCE_WARPS)
    return out
