"""Triton kernels for GPTQ int4 matmuls with contiguous (sorted) groups, and their one host entry.

    gptq_mm_sorted(x, qweight, qzeros, scales, group_size, group_offset, zero_offset, perm=None) -> x @ W

dispatches on M (table in pick_config, from H100 sweeps recorded in bench/README.md): for M = 1 the GEMV with a
prepared activation (gemv_prep.py) on large shards or the plain GEMV (gemv.py) on small ones; on Hopper (sm_90)
with fp16 / bf16 x instead the wgmma kernel (wgmma.py: dequantized weights straight into the MMA's registers) for
M = 1..32 (to 40 on tiled words) and its prefill form (wgmma_prefill.py: x through TMA) above (on tiled words up
to 64 tokens its one-warpgroup 64 x 64 tile, from 33 tokens where its split-K is not reduced in the launch, and
from 65 to 128 its one-warpgroup 128 x 64 tile), up to 256 (to 1024 where its time model beats dequantize +
cuBLAS's); elsewhere the two-row GEMV at M = 2 (gemv_prep.py) and the tl.dot kernels (gemm.py: swapped for M <=
32, un-swapped up to 128); dequantize-then-cuBLAS above. Where the prefill kernel runs whole 256-token tiles and
at most TAIL_MAX_M tokens follow, those run as a second launch on their own M's config, into the same output
(pick_config's "head_tail").
With ``perm`` [K] it computes x[..., perm] @ W (the TP-aware rewrite's x[..., P1] before the first layers, folded
by the lowering when x has no producer in the graph): read inside the x-prep kernel where that kernel runs, a
gather first for the other kinds (measured faster than a gather inside their loads; see _gather_unless_prepared).
qweight is N-major [K/8, N] as GPTQ stores it, or tiled (layout.py: the wgmma kernels' fastest layout; every
kernel here reads both). ``gptq_mm_gidx`` is the per-row g_idx kernel (gidx.py) for act-order weights as stored:
the baseline.
Under TRITON_INTERPRET=1 (CPU tests) one fixed config runs, and bf16 is computed through fp32 (the
interpreter's bf16 arithmetic is wrong).
"""

import functools
from typing import Optional

import torch

from ..layout import is_tiled, packed_shape
from .common import ceil_div, cuda_index, is_interpreted, segment_rows
from .gemm import _dot_kernel, dequant_mm, dequantize_sorted, dot_mm
from .fused import swiglu
from .gemv import gemv
from .gemv_prep import gemv_prep
from .gidx import gidx_config, gidx_dequant_mm, gidx_mm
from .wgmma import X_DTYPES as WGMMA_DTYPES

INTERPRET = is_interpreted(_dot_kernel)  # decided when triton.jit ran, i.e. at this package's import
ACT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
PERM_DTYPES = (torch.int32, torch.int64)
GEMV_MAX_M = 1  # one activation row: the GEMV (from M = 2 the one-row GEMV would re-read the weights per row)
# M = 2: the two-row GEMV, 1.48x over the tensor-core kernel at TP 1, 1.1x at TP 8 (H100, bench/README.md); with
# 4 or 8 rows it is issue-bound (12.7 / 30 instructions per weight) and loses, so M = 3.. go to the dot kernel
ROWS_MAX_M = 2
DOT_MAX_M = 128  # above this dequantize + cuBLAS wins (H100 sweep, bench/README.md)
# sm_90: the wgmma kernel from one token (it beat the GEMVs at M = 1 too) up to 32 tokens, its prefill form (x
# through TMA, asynchronous MMAs) above, up to 256 tokens, and from 257 to 1024 where prefill_seconds predicts it
# faster than dequantize + cuBLAS; dequantize + cuBLAS above (H100 runs, bench/README.md)
WGMMA_MAX_M = 32
# ... on tiled words its 64-token tile up to 40 tokens (it beat the two-warpgroup prefill tiles on all 13 Llama-70B
# TP 2-8 / Granite-20B shards of an H100 sweep at M = 64, sweep_m64_5e55bbf), and from 41 to 64 the prefill kernel's
# 64 x 64 tile on one warpgroup (mid_tile_config). On an H200 that tile took 0.64-1.07x the 64-token decode tile's
# time from 47 to 63 tokens on the 16 Llama-70B / Granite-20B shards (Llama-70B 0.88-1.07x, Granite-20B 0.64-0.88x),
# at 40 tokens 0.70-1.12x, at 33 0.76-1.32x (Llama 1.12-1.32x): its time falls from 33 to 47 tokens, as the TMA's
# zero-fill of a part-filled tile's rows cost the prefill kernel time before (probe_mid_ms_f430ffa, bench/README.md)
TILED_WGMMA_MAX_M = 40
MID_TILE_MAX_M = 64
# ... and from 33 to 40 tokens that tile too where it reduces its split-K by a second launch (or has none), with x
# copied in boxes of this many rows (wgmma_prefill._load_x; since 6b700a6 a box reaching past x's last row is copied
# from x's last rows, box_rows): the TMA's zero-fill of rows past M cost it the time above. On the 22 such H200
# shard-M pairs at 33 / 40 tokens it took 0.81-1.01x the decode tile's time (median 0.84x); where the split-K is
# reduced in the launch (255 registers) the boxed tile took 1.14-1.22x the faster of the whole tile and the decode
# tile on all 20 pairs at 33-63 tokens, and the decode tile stays; at 48 / 63 tokens boxes gave the others nothing
# (0.93-1.08x, median 1.01; probe_mid_boxes_3dc0433)
MID_X_BOX = 8
# its programs per SM: 2 with the split-K reduced in the launch (255 registers), else 3 (152; bench/kernel_regs.py),
# and a program's fixed cost in rows of K (its start, first loads and partial; mid_tile_split)
MID_SERIAL_PROGRAMS_PER_SM = 2
MID_PROGRAMS_PER_SM = 3
MID_PROGRAM_ROWS = 1000
# from 65 to 128 tokens on tiled words the prefill kernel's 128 x 64 tile on one warpgroup (185 registers: 2 programs
# per SM), its split-K reduced by a second launch, x in 64-row boxes below 128 tokens: then the second box is copied
# from x's last 64 rows and the TMA zero-fills none (wgmma_prefill.box_rows). With the zero-fill the tile's fastest
# split took 1.04-1.51x the dispatch's time at 72 tokens (probe_mid_128x64_f04d7e6); with the boxes, on the 16
# Llama-70B / Granite-20B shards of an H200 run at 72-120 tokens, split by tile128_split, it took 0.86-0.99x the time
# of the two-warpgroup 128 x 128 tile dispatched before (median 0.89; probe_boxes_2bc9824), at 128 tokens 0.72-0.98x
# (f04d7e6)
TILE128_MAX_M = 128
TILE128_X_BOX = 64
TILE128_PROGRAMS_PER_SM = 2
PREFILL_ALWAYS_MAX_M = 256
PREFILL_MAX_M = 1024
# the time models of prefill_seconds and dequant_seconds, least-squares fits (relative error) to an H100 sweep of 20
# shard-M pairs at M = 512 / 1024 (sweep_pick_1676d68: the 256 x 128 tile at splits 1-5 and dequantize + cuBLAS;
# after x's reorder became one launch): one SM's multiply-add rate (x 2) on a 256 x 128 tile of the prefill kernel
# (the call's other launches folded in); the rate at which the fp32 split-K partials are written and read back,
# and at which the dequantize pass moves its 2.5 bytes per weight; cuBLAS's fp16 rate; the most splits swept
PREFILL_TILE_RATE = 5.0e12
PARTIALS_RATE = 2.7e12
DEQUANT_RATE = 2.6e12
CUBLAS_RATE = 7.0e14
PREFILL_MAX_SPLIT = 5
# the prefill kernel's stream-K form (wgmma_prefill._stream_kernel: whole tiles in waves, the last full wave and the
# rest shared out by pairs of K-steps) on tiled words from this many waves of 256-token tiles: on the 12 such
# Llama-70B / Granite-20B shard-M pairs of an H100 run at M = 256..1024 it took 0.88-1.07x the split-K kernel's time
# (median 0.95; Llama TP 1 up at 768 tokens 582 against 658 us), on the 68 others with fewer tiles median 1.07x (0.79
# to 1.59x: every tile streamed; stream_802a994, bench/README.md)
STREAM_MIN_WAVES = 2
# ... whose time on those 12 was 1.06-1.32x (median 1.15) the tiles' MMAs at PREFILL_TILE_RATE shared evenly
STREAM_SLOWDOWN = 1.15
DECODE_PROGRAMS_PER_SM = 6  # the wgmma kernel's 16-token tile: 80 registers x 128 threads (bench/kernel_regs.py)
# one token on tiled words (capped at 80 registers too): the split of these that fills the last wave most was the
# fastest on 11 of 13 Llama-70B / Granite-20B shapes of an H100 sweep, within 4% on the other two (4 or 8 alone:
# up to 10% slower; bench/README.md)
ONE_TOKEN_TILED_SPLITS = (4, 5, 6, 8)
# ... on tiled words from 2 tokens (no register cap: wgmma.ONE_TOKEN_TILED_REGISTERS): the split that fills the
# last wave of 5 programs per SM. Registers (80 since the layout holds the nibbles in MMA order) would fit 6, but
# at 6 the split was up to 1.18x the fastest on the 26 shape-M pairs of the H100 sweep at M = 4 / 16
# (sweep_parts_9155e9b), at 5 within 1.05x on all of them (bench/README.md)
TILED_PROGRAMS_PER_SM = 5
# ... and on small shards, where the largest of those splits leaves part of the first wave of programs empty, also
# these, wherever each program keeps SMALL_SHARD_MIN_ROWS rows of K (five 128-row steps) at one token, one step
# more from two tokens (a program's x tile and partial cost more there; small_shard_splits). In an H100 sweep of
# the TP 8 shards (sweep_small_m1_3e8b653, sweep_small_m16_splits_3e8b653) Llama-70B up took 9.8 us with 12 splits
# (6 steps each) against 10.6 with 8 at one token, 11.6 with 10 (7 steps) against 12.1 at 16 tokens; Granite-20B up
# 8.1 with 10 (5 steps) against 8.4 at one token; at 16 tokens 9.7 with 10 and with 8 (6 steps), 10.1 with 12 (4
# steps). On an H200 (ab_small_splits_e4a030b) 10 splits at 2-16 tokens took Granite-20B up 1.04-1.07x the time of 8
SMALL_SHARD_SPLITS = (10, 12)
SMALL_SHARD_MIN_ROWS = 640
# ... 128 columns as two 64-column parts on one x tile (wgmma.py, PARTS): 4 programs per SM under
# wgmma.TWO_PART_REGISTERS; taken on tiled words where its programs fill their last wave to WIDE_MIN_FILL and each
# reads at least WIDE_MIN_ROWS rows of K (tiled_wide_split)
WIDE_PROGRAMS_PER_SM = 4
WIDE_MIN_FILL = 0.7
WIDE_MIN_ROWS = 1536
# ... 64 tokens on tiled words: 255 registers, 2 programs per SM; sixty_four_token_split counts a program's fixed
# cost (its start, its first loads, its 64 x 64 fp32 partial) as this many more rows of K, fitted to an H100 sweep
SIXTY_FOUR_TOKEN_PROGRAMS_PER_SM = 2
SIXTY_FOUR_TOKEN_PROGRAM_ROWS = 1000
# tokens past the last whole 256-token prefill tile: up to this many run as a second launch on the config of their
# own M (the decode kernels, or a 128-token prefill tile) rather than padded to a 256-token tile (pick_config). On
# the 99 Llama-70B / Granite-20B shard-M pairs of an H100 run at M = 257..1100 that took median 0.86x the time of the
# one launch (0.56-1.21x; 10 pairs slower by over 2%, 8 of them on TP 4 / 8 shards, where padded tiles can share a
# wave); no rule by tile count, shard size or tail size did clearly better (head_tail_ef32a74, bench/README.md)
TAIL_MAX_M = 128
_SMS = {}
_CAPABILITY = {}

__all__ = ["gptq_mm_sorted", "gptq_swiglu_sorted", "gptq_mm_gidx", "dequantize_sorted", "pick_config",
           "launch_config", "gemv_rows_config", "wgmma_config", "small_shard_splits", "tiled_wide_split",
           "sixty_four_token_split", "mid_tile_config", "boxed_mid_tile", "mid_tile_split", "tile128_config",
           "tile128_split", "decode_split",
           "prefill_config", "prefill_split", "prefill_seconds", "dequant_seconds", "has_wgmma", "INTERPRET"]


def check_sorted_args(x, qweight, qzeros, scales, group_size, group_offset, zero_offset) -> None:
    """Raise ValueError unless the tensors form one contiguous-group GPTQ weight that x can multiply (qweight
    [K/8, N] N-major, or tiled: layout.py)."""
    if qweight.dtype != torch.int32 or qzeros.dtype != torch.int32 or not (qweight.dim() == 2 or is_tiled(qweight)):
        raise ValueError("qweight ([K/8, N], or tiled [N/64, K/128, 64, 16]) and qzeros must be int32 (GPTQ packing)")
    words, n = packed_shape(qweight)
    k = words * 8
    if x.dtype not in ACT_DTYPES or x.shape[-1] != k:
        raise ValueError(f"x: expected [..., {k}] in {ACT_DTYPES}, got {tuple(x.shape)} {x.dtype}")
    g = ceil_div(k + group_offset, group_size) if group_size > 0 else -1
    if n % 8 or tuple(scales.shape) != (g, n) or tuple(qzeros.shape) != (g, n // 8):
        raise ValueError(f"scales {tuple(scales.shape)} / qzeros {tuple(qzeros.shape)} do not fit K={k}, N={n}, "
                         f"group_size={group_size}, group_offset={group_offset}")
    if group_offset and is_tiled(qweight):
        raise ValueError(f"tiled words need group_offset 0 (their 32-row blocks start at row 0), got {group_offset}")
    if group_size % 8 or group_offset % 8 or not 0 <= group_offset < group_size or zero_offset not in (0, 1):
        raise ValueError(f"unsupported group_size={group_size} / group_offset={group_offset} "
                         f"(multiples of 8 needed) / zero_offset={zero_offset}")
    if not (qweight.is_contiguous() and qzeros.is_contiguous() and scales.is_contiguous()):
        raise ValueError("qweight, qzeros and scales must be contiguous")
    if not (x.device == qweight.device == qzeros.device == scales.device):
        raise ValueError("all tensors must be on one device")


def check_perm(perm: Optional[torch.Tensor], x: torch.Tensor) -> Optional[torch.Tensor]:
    """Raise ValueError unless perm is None or a 1-D integer [K] index on x's device; returns it contiguous. That
    it is a permutation of range(K) is the caller's promise (checking would cost a launch and a sync per call)."""
    if perm is None:
        return None
    k = x.shape[-1]
    if not isinstance(perm, torch.Tensor) or perm.dim() != 1 or perm.shape[0] != k or perm.dtype not in PERM_DTYPES:
        got = f"{tuple(perm.shape)} {perm.dtype}" if isinstance(perm, torch.Tensor) else type(perm).__name__
        raise ValueError(f"perm: expected a [{k}] tensor in {PERM_DTYPES} (a permutation of x's last dim), got {got}")
    if perm.device != x.device:
        raise ValueError(f"perm is on {perm.device}, x on {x.device}: they must be on one device")
    return perm.contiguous()


def _num_sms(device) -> int:
    if device.type != "cuda":
        return 132
    idx = cuda_index(device)
    if idx not in _SMS:
        _SMS[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SMS[idx]


def pick_config(m: int, k: int, n: int, group_size: int, device, wgmma: Optional[bool] = None,
                tiled: bool = False) -> dict:
    """Kernel and block sizes per shape (a table from the H100 sweeps in bench/README.md): launch_config's, or
    where the prefill kernel would run whole 256-token tiles followed by up to TAIL_MAX_M tokens, a "head_tail"
    config: HEAD_M rows (the whole tiles) on the HEAD config, the rest on the TAIL config (launch_config's for
    their M), both into one output. ``wgmma``: whether the Hopper kernel may run (default: on sm_90 devices;
    gptq_mm_sorted passes False for fp32 x); ``tiled``: qweight in the tiled layout (layout.py)."""
    head = m - m % 256
    if head and 0 < m - head <= TAIL_MAX_M:
        head_cfg = launch_config(head, k, n, group_size, device, wgmma, tiled)
        if head_cfg.get("PREFILL"):
            return dict(kind="head_tail", HEAD_M=head, HEAD=head_cfg,
                        TAIL=launch_config(m - head, k, n, group_size, device, wgmma, tiled))
    return launch_config(m, k, n, group_size, device, wgmma, tiled)


def launch_config(m: int, k: int, n: int, group_size: int, device, wgmma: Optional[bool] = None,
                  tiled: bool = False) -> dict:
    """The config of one launch over all M rows (pick_config's arguments)."""
    if INTERPRET:  # one config, large blocks: the interpreter costs ~ms per program and step
        kind = "gemv" if m <= GEMV_MAX_M else "dot"
        return dict(kind=kind, BLOCK_M=16, BLOCK_N=min(128, n), BLOCK_K=segment_rows(group_size, 128), SPLIT_K=2)
    wgmma = has_wgmma(device) if wgmma is None else wgmma
    if wgmma and m <= PREFILL_MAX_M and segment_rows(group_size, 128) % 32 == 0:
        if m <= (TILED_WGMMA_MAX_M if tiled else WGMMA_MAX_M):
            boxed = boxed_mid_tile(k, n, group_size, device) if tiled and m > WGMMA_MAX_M else None
            return boxed or wgmma_config(m, k, n, group_size, device, tiled)
        if tiled and m <= MID_TILE_MAX_M:
            return mid_tile_config(k, n, group_size, device)
        if tiled and m <= TILE128_MAX_M:
            return tile128_config(m, k, n, group_size, device)
        cfg = prefill_config(m, k, n, group_size, device, tiled)
        if m <= PREFILL_ALWAYS_MAX_M or dequant_seconds(m, k, n) > prefill_seconds(
                m, k, n, cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["SPLIT_K"], _num_sms(device), cfg.get("STREAM", False)):
            return cfg
    if m <= GEMV_MAX_M:
        return _gemv_config(k, n, group_size, device)
    if m <= ROWS_MAX_M:
        return gemv_rows_config(m, k, n, group_size, device)
    if m <= DOT_MAX_M:
        return _dot_config(m, k, n, group_size, device)
    return dict(kind="dequant")


def _gemv_config(k, n, group_size, device) -> dict:
    """Table from the H100 sweeps (bench/README.md): the x-prepared GEMV with 8-16 columns per thread on large
    shards, ~6 programs per SM; on small shards (TP 8) the plain GEMV, which saves the x-prep launch. Both reduce
    their split-K inside the launch (SERIAL: H100, 14.7 against 16.4 us on the TP 8 up shard, 59.5 against 61.0
    at TP 1; bench/README.md)."""
    sms = _num_sms(device)
    if k * n <= 32 * 2**20:
        tiles = ceil_div(n, 128)
        return dict(kind="gemv_plain", BLOCK_N=128, BLOCK_K=segment_rows(group_size, 128),
                    SPLIT_K=max(1, 2 * sms // tiles), num_warps=4, SERIAL=True)
    block_n, block_k = (512, 32) if n >= 16384 else (256, 64)
    tiles = ceil_div(n, block_n)
    return dict(kind="gemv", BLOCK_N=block_n, BLOCK_K=segment_rows(group_size, block_k),
                SPLIT_K=max(1, 6 * sms // tiles), num_warps=4, SERIAL=True)


def gemv_rows_config(m: int, k: int, n: int, group_size: int, device) -> dict:
    """The multi-row GEMV for 2 <= M <= 8 (gemv_prep.py, ROWS rows per program); pick_config takes it for M = 2
    only (ROWS_MAX_M: timed on an H100, bench/README.md). Per ROWS, the config with the fewest hot-loop
    instructions per weight among those without spills (bench/kernel_regs.py, compiled for sm_90a: 6.8 / 12.7 /
    30.0 instructions per weight at ROWS 2 / 4 / 8, against 4.4 for the one-row kernel)."""
    if not 2 <= m <= 8:
        raise ValueError(f"the multi-row GEMV takes 2 to 8 rows, got M = {m}")
    rows = 1 << (m - 1).bit_length()  # next power of two
    block_n, block_k, num_warps = {2: (256, 64, 4), 4: (512, 16, 8), 8: (256, 16, 8)}[rows]
    tiles = ceil_div(n, block_n)
    return dict(kind="gemv", ROWS=rows, BLOCK_N=block_n, BLOCK_K=segment_rows(group_size, block_k),
                SPLIT_K=max(1, 6 * _num_sms(device) // tiles), num_warps=num_warps, SERIAL=True)


def has_wgmma(device) -> bool:
    """Whether the Hopper kernel (wgmma.py: sm_90 instructions) can run on this device."""
    if device.type != "cuda" or INTERPRET:
        return False
    idx = cuda_index(device)
    if idx not in _CAPABILITY:
        _CAPABILITY[idx] = torch.cuda.get_device_capability(idx)
    return _CAPABILITY[idx] == (9, 0)


def wgmma_config(m: int, k: int, n: int, group_size: int, device, tiled: bool = False) -> dict:
    """The Hopper kernel for decode: 64 output columns by M rounded up to 16, 32 or 64 tokens per program, one
    group segment (up to 128 rows) per step, split-K for 4-8 programs per output tile (fewer for 64 tokens),
    reduced in the launch. From the H100 sweeps (bench/README.md), on the Llama-70B shapes at M = 1, 4, 16, 32
    and 64; dispatched up to WGMMA_MAX_M (TILED_WGMMA_MAX_M on tiled words). At one token the split is the one of 4
    and 8 that fills the last wave of programs most (decode_split); with more tokens the fp32 partials (M x N per
    split) weigh in, and 4 won on large shards (Llama TP 1 up, M = 16: 65.6 against 68.0 us with 8). One token on
    tiled words: the one of ONE_TOKEN_TILED_SPLITS that fills the last wave most. On tiled words from 2 to 16
    tokens (5 programs per SM) the split of 4, 5, 6 and 8 that fills the last wave most: in an H100 sweep of 11
    Llama-70B and Granite-20B shapes at M = 16 the fastest 64-column split, or within 7% of it; or 128 columns as
    two 64-column parts (PARTS 2) where tiled_wide_split takes them. On tiled words 10 and 12 splits join those on
    small shards (small_shard_splits). 64 tokens: 2 splits from 100 column tiles, else 4; on tiled words
    sixty_four_token_split."""
    block_m = max(16, 1 << (m - 1).bit_length())
    if block_m > 64:
        raise ValueError(f"the wgmma kernel takes up to 64 tokens per program, got M = {m}")
    block_n, tiles, sms = 64, ceil_div(n, 64), _num_sms(device)
    wide = tiled_wide_split(k, n, sms) if tiled and block_m == 16 and m > 1 else None
    block_k = segment_rows(group_size, 128)
    if m == 1 and not tiled:
        split_k = decode_split(tiles, sms, DECODE_PROGRAMS_PER_SM, (4, 8))
    elif m == 1:
        split_k = decode_split(tiles, sms, DECODE_PROGRAMS_PER_SM, small_shard_splits(
            k, block_k, tiles, DECODE_PROGRAMS_PER_SM * sms, ONE_TOKEN_TILED_SPLITS, SMALL_SHARD_MIN_ROWS))
    elif wide:
        block_n, split_k = 128, wide
    elif tiled and block_m == 16:
        split_k = decode_split(tiles, sms, TILED_PROGRAMS_PER_SM, small_shard_splits(
            k, block_k, tiles, TILED_PROGRAMS_PER_SM * sms, (4, 5, 6, 8), SMALL_SHARD_MIN_ROWS + 128))
    elif tiled and block_m == 64:
        split_k = sixty_four_token_split(k, tiles, sms)
    else:
        split_k = (4 if tiles >= 100 else 8) if block_m <= 32 else (2 if tiles >= 100 else 4)
    cfg = dict(kind="dot", WGMMA=True, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, SPLIT_K=split_k,
               SERIAL=True)
    return dict(cfg, PARTS=2) if wide else cfg


def small_shard_splits(k: int, block_k: int, tiles: int, places: int, splits: tuple, min_rows: int) -> tuple:
    """``splits`` for a decode tile over K = k in steps of block_k rows and ``tiles`` column tiles, plus those of
    SMALL_SHARD_SPLITS that leave each program ``min_rows`` rows of K (split_plan's steps per program), where
    tiles x the largest of ``splits`` programs fill less than one wave of ``places``."""
    if tiles * max(splits) >= places:
        return splits
    steps = ceil_div(k, block_k)
    return splits + tuple(s for s in SMALL_SHARD_SPLITS if ceil_div(steps, s) * block_k >= min_rows)


def tiled_wide_split(k: int, n: int, sms: int) -> Optional[int]:
    """Split-K (2, 4 or 8) for programs of 128 columns (two 64-column parts) of 16 tokens on tiled words, or None
    to keep 64 columns: of the splits that leave each program WIDE_MIN_ROWS rows of K, the one whose programs fill
    the last wave most, if it fills it to WIDE_MIN_FILL. Two parts read x once per 128 columns (at 16 tokens x's
    tile is as many bytes as a 64-column weight step) and keep twice the words in flight, but halve the programs.
    In an H100 sweep of 13 Llama-70B / Granite-20B shapes at M = 4 and 16 (sweep_parts) this takes them on 7:
    on 6 the fastest config or within 1.5% of it (Llama TP 1 up at M = 16: 52.5 against 59.5 us for the best
    64-column split), on Llama TP 2 down 4-5% slower than 64 columns (14 steps per program)."""
    if n % 128:
        return None
    places = WIDE_PROGRAMS_PER_SM * sms

    def fill(split):
        return (n // 128 * split % places or places) / places

    splits = [split for split in (2, 4, 8) if k // split >= WIDE_MIN_ROWS]
    best = max(splits, key=fill, default=None)
    return best if best is not None and fill(best) >= WIDE_MIN_FILL else None


def sixty_four_token_split(k: int, tiles: int, sms: int) -> int:
    """Split-K for the 64-token wgmma tile on tiled words: of 2, 4, 5 and 8, the one of the least predicted time,
    the waves of programs (SIXTY_FOUR_TOKEN_PROGRAMS_PER_SM per SM) times the rows of K a program reads plus
    SIXTY_FOUR_TOKEN_PROGRAM_ROWS. On the 13 shapes of the M = 64 sweep (sweep_m64_5e55bbf) it picks the fastest
    of the four each time (so does any fixed cost from 750 to 1000 rows; the rule before, last-wave fill among the
    splits leaving 1536 rows, took up to 1.07x on three Granite-20B shards; same-machine A/B at M = 33 / 48 / 64
    on those three: 0.94-0.99x, ab_split64model_e16ac50), and 2 for Llama-70B TP 1 up (448 column tiles), where 4
    took 1.05-1.07x the time (ab_split64_aaf51d6)."""
    places = SIXTY_FOUR_TOKEN_PROGRAMS_PER_SM * sms
    return min((2, 4, 5, 8), key=lambda split: waves_rows(k, tiles, split, places, SIXTY_FOUR_TOKEN_PROGRAM_ROWS))


def waves_rows(k: int, tiles: int, split: int, places: int, program_rows: int) -> float:
    """A split-K launch's predicted time in rows of K: the waves of its tiles x split programs, ``places`` at a
    time, times the rows of K a program reads plus its fixed cost in rows (``program_rows``)."""
    return ceil_div(tiles * split, places) * (k / split + program_rows)


def mid_tile_config(k: int, n: int, group_size: int, device) -> dict:
    """41-64 tokens on tiled words: the prefill kernel's 64 x 64 tile on one warpgroup (x by TMA as it lies), one
    group segment (up to 128 rows) per step, split as mid_tile_split says."""
    split_k, serial = mid_tile_split(k, ceil_div(n, 64), _num_sms(device))
    return one_warpgroup_tile(64, group_size, split_k, serial)


def one_warpgroup_tile(block_m: int, group_size: int, split_k: int, serial: bool) -> dict:
    """The prefill kernel on one warpgroup: block_m tokens by 64 output columns, one group segment (up to 128 rows)
    per step, 3 x slots (mid_tile_config's and tile128_config's tiles)."""
    return dict(kind="dot", WGMMA=True, PREFILL=True, BLOCK_M=block_m, BLOCK_N=64,
                BLOCK_K=segment_rows(group_size, 128), STAGES=3, num_warps=4, SPLIT_K=split_k, SERIAL=serial)


def boxed_mid_tile(k: int, n: int, group_size: int, device) -> Optional[dict]:
    """33-40 tokens on tiled words: mid_tile_config with x copied in MID_X_BOX-row boxes where it has no split-K or
    reduces it by a second launch; None where it reduces it in the launch (the decode tile runs there)."""
    cfg = mid_tile_config(k, n, group_size, device)
    return None if cfg["SERIAL"] else dict(cfg, X_BOX=MID_X_BOX)


def mid_tile_split(k: int, tiles: int, sms: int) -> tuple:
    """(split-K, whether the launch reduces it: SERIAL) for mid_tile_config's ``tiles`` column tiles: of 1 and 2 /
    4 / 8 with either reduction, the least predicted time, the waves of programs (MID_SERIAL_PROGRAMS_PER_SM per
    SM with the in-launch reduction, MID_PROGRAMS_PER_SM without) times the rows of K a program reads plus
    MID_PROGRAM_ROWS; at equal times the one launch. On the 32 shard-M pairs of the H200 probe it is fitted to
    (probe_mid_9f59ca5: 48 and 64 tokens) it took geometric mean 1.03x the time of the fastest of those options,
    1.13x at most (Llama-70B TP 1 down at 64 tokens: 8 splits and a second launch where 2 in the launch were
    fastest), and median 0.85x that of the decode kernel's 64-token tile (0.72-1.02x)."""
    def predicted(option):
        split, serial = option
        places = (MID_SERIAL_PROGRAMS_PER_SM if serial else MID_PROGRAMS_PER_SM) * sms
        return waves_rows(k, tiles, split, places, MID_PROGRAM_ROWS)

    options = [(1, False)] + [(split, True) for split in (2, 4, 8)] + [(split, False) for split in (2, 4, 8)]
    return min(options, key=predicted)


def tile128_config(m: int, k: int, n: int, group_size: int, device) -> dict:
    """65-128 tokens on tiled words: the prefill kernel's 128 x 64 tile on one warpgroup, one group segment (up to
    128 rows) per step, split by tile128_split and reduced by a second launch, x in TILE128_X_BOX-row boxes below
    128 tokens."""
    cfg = one_warpgroup_tile(128, group_size, tile128_split(k, ceil_div(n, 64), _num_sms(device)), False)
    return dict(cfg, X_BOX=TILE128_X_BOX) if m < 128 else cfg


def tile128_split(k: int, tiles: int, sms: int) -> int:
    """Split-K (1, 2 or 4) for tile128_config's ``tiles`` column tiles: the least predicted time, the waves of
    programs (TILE128_PROGRAMS_PER_SM per SM) times the rows of K a program reads plus MID_PROGRAM_ROWS. On the 112
    shard-M pairs of the H200 runs it is fitted to (probe_boxes_2bc9824 at 72-120 tokens, probe_mid_128x64_f04d7e6
    at 128) it took geometric mean 1.002x the time of the fastest of the three, 1.10x at most; 2 splits everywhere
    took 1.045x, up to 1.28x (Llama-70B TP 8 up at 80 tokens: 56 column tiles, where 4 splits were fastest)."""
    places = TILE128_PROGRAMS_PER_SM * sms
    return min((1, 2, 4), key=lambda split: waves_rows(k, tiles, split, places, MID_PROGRAM_ROWS))


def decode_split(tiles: int, sms: int, per_sm: int = DECODE_PROGRAMS_PER_SM, splits: tuple = (4, 8)) -> int:
    """Split-K (of ``splits``) for a wgmma decode tile: the one whose programs (tiles x split) fill the last
    wave of ``per_sm`` per SM most. At one token, 4 or 8 at DECODE_PROGRAMS_PER_SM: on the 8 Llama-70B TP 1-8
    shapes of an H100 sweep it picks the faster of the two each time (TP 2 up: 224 tiles, 896 programs against 792
    places, 34.4 us with 4, 31.6 with 8)."""
    places = per_sm * sms

    def last_wave_fill(split):
        return (tiles * split % places or places) / places

    return max(splits, key=last_wave_fill)


def prefill_config(m: int, k: int, n: int, group_size: int, device, tiled: bool = False) -> dict:
    """The Hopper prefill kernel (wgmma_prefill.py, two warpgroups) from 33 tokens: 64-token tiles up to M = 64,
    128 up to 128, 256 above; 128 output columns (256 at M = 65..128 where that still leaves 32 tiles); split-K
    where the output tiles are few (for 256-token tiles: prefill_split). From the H100 sweeps on the Llama-70B
    TP 1 and 8, Llama-2-13B and Granite-20B shapes at M = 64..1024 (bench/README.md). On tiled words (whose
    64-row steps read half of each of two 32-byte sectors, layout.py) 128 x 128 tiles up to 128 tokens and
    256 x 128 above, both in 128-row steps (253 registers at 256 tokens, no spills) and split by prefill_split:
    on 8 Llama-70B / Granite-20B shards at M = 128 / 256 / 1024 (sweep_steps_3c26359) that split was the fastest
    of 1-5 on all 24, and the 128-row steps 0.77-0.90x the time of the dispatched 128 x 256 x 64 tile at 128
    tokens, 0.95-1.05x (median 0.99) of 64-row steps at 256 and 0.82-1.03x (median 0.96) at 1024."""
    if m <= 64:  # memory-bound: short steps and 4 x slots on large shards, long steps on small ones
        block_m, block_n = 64, 128
        block_k, stages = (64, 4) if ceil_div(n, 128) >= 50 else (128, 3)
    elif tiled:
        block_m, block_n, block_k, stages = (128 if m <= 128 else 256), 128, 128, 3
    elif m <= 128:
        block_m, block_n = 128, (256 if ceil_div(n, 256) * ceil_div(m, 128) >= 32 else 128)
        block_k, stages = (64 if block_n == 256 else 128), 3
    else:
        block_m, block_n, block_k, stages = 256, 128, 64, 3
    block_k = segment_rows(group_size, block_k)
    tiles, sms = ceil_div(n, block_n) * ceil_div(m, block_m), _num_sms(device)
    if block_m == 64:  # memory-bound: keep every SM streaming (Llama TP 2 up: 112 tiles unsplit took 97 us)
        split_k = 1 if tiles >= 200 else 4
    elif block_m == 128 and not tiled:  # compute-bound: split only short of a wave of tiles
        split_k = 1 if tiles >= 100 else 4
    else:
        split_k = prefill_split(m, k, n, block_m, block_n, sms)
    cfg = dict(kind="dot", WGMMA=True, PREFILL=True, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
               STAGES=stages, num_warps=8, SPLIT_K=split_k)
    if tiled and block_m == 256 and tiles >= STREAM_MIN_WAVES * sms:
        cfg.update(STREAM=True, PROGRAMS=sms)  # one program per SM: 255 registers
    return cfg


def prefill_split(m: int, k: int, n: int, block_m: int, block_n: int, sms: int) -> int:
    """The split-K (1..PREFILL_MAX_SPLIT) of the least prefill_seconds (256-token tiles; on tiled words 128-token
    ones too, prefill_config). With few tiles a wave's worth of SMs idles (Llama-2-13B down at M = 256: 40 tiles
    on 132 SMs, 3 splits fill 120); with many the partials cost more than they save. It picks the fastest of 1..5
    on all 20 Llama-70B TP 2-8 and Granite-20B shard-M pairs at M = 512 / 1024 of the sweep its rates are fitted
    to, on all 8 pairs of an earlier sweep of the Llama-2-13B and Granite-20B TP 1 shapes at M = 256 / 512, and the
    fastest of 1, 2, 4 on the 12 Llama-70B TP 1 and 8 pairs at M = 256..1024 of an earlier one (H100,
    bench/README.md)."""
    return min(range(1, PREFILL_MAX_SPLIT + 1),
               key=lambda split: prefill_seconds(m, k, n, block_m, block_n, split, sms))


def prefill_seconds(m: int, k: int, n: int, block_m: int, block_n: int, split: int, sms: int,
                    stream: bool = False) -> float:
    """Predicted time of the prefill kernel (block_m-token tiles): the waves of programs (an SM runs one) times one
    program's MMAs over K / split rows, plus the fp32 partials' round trip through memory (H100 rates). One rate for
    64- and 128-row steps: a refit to the 128-row steps alone (5.55e12 against 5.0e12) moved 17 shard-M pairs, which
    then took median 1.02x the time (0.86-1.20x, ab_tilerate_465a8ae), so it was not kept. With ``stream`` (its
    stream-K form) the tiles' MMAs shared evenly between the SMs, times STREAM_SLOWDOWN."""
    tiles = ceil_div(n, block_n) * ceil_div(m, block_m)
    if stream:
        return tiles / sms * 2 * block_m * block_n * k / PREFILL_TILE_RATE * STREAM_SLOWDOWN
    waves = ceil_div(tiles * split, sms)
    mma = waves * 2 * block_m * block_n * k / split / PREFILL_TILE_RATE
    return mma + (split > 1) * split * m * n * 8 / PARTIALS_RATE


def dequant_seconds(m: int, k: int, n: int) -> float:
    """Predicted time of dequantize + cuBLAS (H100 rates): the dequantize pass (int4 read, fp16 written) and the
    fp16 matmul. Against prefill_seconds it picks the faster of the two on all 16 of the 20 shard-M pairs of the
    sweep its rates are fitted to (Llama-70B TP 2-8, Granite-20B, M = 512 / 1024) where one was faster by 4% or more
    (the other 4 were within 4%), and on the 11 such pairs of earlier sweeps and runs that test_kernels keeps (H100,
    bench/README.md)."""
    return k * n * 2.5 / DEQUANT_RATE + 2 * m * k * n / CUBLAS_RATE


def _dot_config(m, k, n, group_size, device) -> dict:
    if m <= 32:  # swapped: the weight tile is the MMA's 64+ side
        block_n, block_m = 64, (16 if m <= 16 else 32)
        tiles = ceil_div(n, block_n) * ceil_div(m, block_m)
        want = 4 if tiles >= 100 else 12
        return dict(kind="dot", BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=segment_rows(group_size, 128),
                    SPLIT_K=want, num_warps=4, num_stages=3, SERIAL=True)
    # un-swapped: the dequantized tile is the B operand straight from shared memory
    return dict(kind="dot", SWAP=False, BLOCK_M=64, BLOCK_N=128, BLOCK_K=segment_rows(group_size, 64), SPLIT_K=4,
                num_warps=4, num_stages=3, SERIAL=True)


def gptq_mm_sorted(
    x: torch.Tensor,  # [..., K] fp16 / bf16 / fp32
    qweight: torch.Tensor,  # [K/8, N] int32
    qzeros: torch.Tensor,  # [G, N/8] int32
    scales: torch.Tensor,  # [G, N]
    group_size: int,
    group_offset: int = 0,
    zero_offset: int = 0,
    config: Optional[dict] = None,
    perm: Optional[torch.Tensor] = None,  # [K] int32 / int64: compute x[..., perm] @ W
) -> torch.Tensor:  # [..., N] in x.dtype
    """x @ W (x[..., perm] @ W) for contiguous groups (g_idx None), on the fastest kernel for this M."""
    check_sorted_args(x, qweight, qzeros, scales, group_size, group_offset, zero_offset)
    perm = check_perm(perm, x)
    lead, k, n = x.shape[:-1], x.shape[-1], packed_shape(qweight)[1]
    x2 = x.reshape(-1, k)  # [M, K]
    if x2.shape[0] == 0:
        return x.new_empty(*lead, n)
    x2 = x2 if x2.stride(-1) == 1 else x2.contiguous()
    cfg = config or _picked(x2.shape[0], k, n, group_size, x.device, _wgmma_for(x2), is_tiled(qweight), INTERPRET)
    x2, perm = _gather_unless_prepared(x2, perm, cfg)
    xc, out_dtype = _interpreter_upcast(x2)
    args = (qweight, qzeros, scales, group_size, group_offset, zero_offset, out_dtype)

    def run(rows, rows_cfg, out=None):
        kind = rows_cfg["kind"]
        if kind == "gemv":
            return gemv_prep(rows, *args, rows_cfg, perm, out=out)
        if kind == "gemv_plain":
            return gemv(rows, *args, rows_cfg, out=out)
        if kind == "dot":
            return dot_mm(rows, *args, rows_cfg, out=out)
        if kind == "dequant":
            return dequant_mm(rows, *args, out=out)
        raise ValueError(f"unknown kernel kind {kind!r}")

    y = _run_config(run, xc, n, out_dtype, cfg, group_size)
    return y.to(x.dtype).reshape(*lead, n)


def gptq_swiglu_sorted(
    x: torch.Tensor,  # [..., K]
    gate: tuple,  # (qweight [K/8, N], qzeros [G, N/8], scales [G, N]) of gate_proj
    up: tuple,  # the same for up_proj: same shapes, same groups, same row order as gate
    group_size: int,
    group_offset: int = 0,
    zero_offset: int = 0,
    config: Optional[dict] = None,
    perm: Optional[torch.Tensor] = None,  # [K] int32 / int64: of x[..., perm]
) -> torch.Tensor:  # [..., N] in x.dtype
    """silu(x @ W_gate) * (x @ W_up), one epilogue kernel for both (fused.py); of x[..., perm] with perm."""
    for w in (gate, up):
        check_sorted_args(x, *w, group_size, group_offset, zero_offset)
    perm = check_perm(perm, x)
    if any(a.shape != b.shape for a, b in zip(gate, up)):
        raise ValueError("gate and up must have the same shapes")
    lead, k, n = x.shape[:-1], x.shape[-1], packed_shape(gate[0])[1]
    x2 = x.reshape(-1, k)
    if x2.shape[0] == 0:
        return x.new_empty(*lead, n)
    x2 = x2 if x2.stride(-1) == 1 else x2.contiguous()
    cfg = config or _picked(x2.shape[0], k, n, group_size, x.device, _wgmma_for(x2), is_tiled(gate[0]), INTERPRET)
    x2, perm = _gather_unless_prepared(x2, perm, cfg)
    xc, out_dtype = _interpreter_upcast(x2)

    def run(rows, rows_cfg, out=None):
        return swiglu(rows, gate, up, group_size, group_offset, zero_offset, out_dtype, rows_cfg, perm, out)

    y = _run_config(run, xc, n, out_dtype, cfg, group_size)
    return y.to(x.dtype).reshape(*lead, n)


@functools.lru_cache(maxsize=4096)
def _picked(m, k, n, group_size, device, wgmma, tiled, interpret) -> dict:
    """pick_config once per shape and device (a fifth of the host time of a one-token call): its result depends
    on nothing else but INTERPRET (``interpret``), which tests switch. Callers read configs, never write them."""
    return pick_config(m, k, n, group_size, device, wgmma, tiled)


def _run_config(run, x, n, out_dtype, cfg, group_size) -> torch.Tensor:
    """[M, N]: ``run(x, cfg)``, or for a "head_tail" config ``run(rows of x, their config, their rows of the
    output)`` on the first HEAD_M rows and on the rest (row slices of row-contiguous tensors: contiguous, so every
    kernel can write them). A config whose K-steps would straddle two groups is refused before anything runs."""
    for launch_cfg in (cfg["HEAD"], cfg["TAIL"]) if cfg["kind"] == "head_tail" else (cfg,):
        block_k = launch_cfg.get("BLOCK_K")
        if block_k and group_size > 0 and group_size % block_k:  # every kernel takes one scale row per K-step
            raise ValueError(f"BLOCK_K {block_k} must divide group_size {group_size} (common.segment_rows): {cfg}")
    if cfg["kind"] != "head_tail":
        return run(x, cfg)
    head = cfg["HEAD_M"]
    if not 0 < head < x.shape[0] or "head_tail" in (cfg["HEAD"]["kind"], cfg["TAIL"]["kind"]):
        raise ValueError(f"a head_tail config splits M = {x.shape[0]} rows once, at 0 < HEAD_M < M: got {cfg}")
    out = torch.empty((x.shape[0], n), dtype=out_dtype, device=x.device)
    run(x[:head], cfg["HEAD"], out[:head])
    run(x[head:], cfg["TAIL"], out[head:])
    return out


def _wgmma_for(x2) -> bool:
    """The wgmma kernel takes fp16 / bf16 x on sm_90 devices (fp32 x keeps the GEMV / tl.dot table)."""
    return x2.dtype in WGMMA_DTYPES and has_wgmma(x2.device)


def _gather_unless_prepared(x2, perm, cfg):
    """(x, perm) for the kernel kind cfg names: the x-prep GEMV reads x[:, perm] itself (free: it rewrites x once
    per call anyway; at TP 1, M = 1 on an H100, 61.3 us against 68.1 with a gather first). Every other kind gets
    x gathered first: a gather inside their x loads measured slower (tensor-core kernel, M = 16: 2.9x at TP 1;
    plain GEMV, TP 8, M = 1: 1.1 us more than the gather; bench/README.md)."""
    if perm is None or cfg["kind"] == "gemv":
        return x2, perm
    return x2.index_select(-1, perm), None


def _interpreter_upcast(x2):
    """(activations to compute with, output dtype): the interpreter's bf16 arithmetic and casts are wrong,
    so there bf16 runs as fp32 end to end and is cast back by torch."""
    if INTERPRET and x2.dtype == torch.bfloat16:
        return x2.float(), torch.float32
    return x2, x2.dtype


def gptq_mm_gidx(x, qweight, qzeros, scales, g_idx, zero_offset: int = 0, config: Optional[dict] = None):
    """x @ W with per-row groups g_idx [K] (act-order as stored): the baseline kernel, dequantize + cuBLAS above
    DOT_MAX_M tokens. qweight N-major [K/8, N] only (the tiled layout is for sorted groups)."""
    if qweight.dim() != 2:
        raise ValueError(f"gptq_mm_gidx reads qweight [K/8, N] as stored, got {tuple(qweight.shape)}")
    lead, k, n = x.shape[:-1], x.shape[-1], qweight.shape[1]
    x2 = x.reshape(-1, k).contiguous()
    if x2.shape[0] == 0:
        return x.new_empty(*lead, n)
    xc, out_dtype = _interpreter_upcast(x2)
    m = x2.shape[0]
    if m > DOT_MAX_M and not INTERPRET and config is None:
        y = gidx_dequant_mm(xc, qweight, qzeros, scales, g_idx, zero_offset, out_dtype)
    else:
        cfg = config or (dict(BLOCK_M=16, BLOCK_N=min(64, n), BLOCK_K=64, SPLIT_K=2, num_warps=4, num_stages=1)
                         if INTERPRET else gidx_config(m, n, _num_sms(x.device)))
        y = gidx_mm(xc, qweight, qzeros, scales, g_idx, zero_offset, out_dtype, cfg)
    return y.to(x.dtype).reshape(*lead, n)
