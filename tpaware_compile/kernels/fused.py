"""SwiGLU gate/up: ``silu(x @ W_gate) * (x @ W_up)`` with the activation applied in the split-K reduction.

Both matmuls write fp32 partials into one buffer [2, SPLIT_K, M, N] and a single epilogue kernel sums them and
applies silu(gate) * up, so the intermediate never round-trips through x's dtype and the separate elementwise
kernel disappears. With the one-launch split-K (config SERIAL; one-row GEMVs, wgmma kernel) up's launch does
that epilogue itself, in its last program per tile. For decode the activation is prepared once for both
(gemv_prep.py), through ``perm`` (x[..., perm] @ W) when given; the other kinds take x already gathered
(kernels.gptq_swiglu_sorted). Gate and up must share x's row order (the same act-order permutation, or none);
callers fall back to two gptq_mm calls otherwise. Large M (dequantize + cuBLAS) writes gate and up in x's dtype
straight into that buffer's one split, and the same epilogue applies the activation (one kernel, not five
elementwise passes).
"""

import torch
import triton
import triton.language as tl

from ..layout import is_tiled, packed_shape
from .common import ceil_div, serial_counters, split_plan
from .gemm import dequantize_sorted, launch_dot, runs_wgmma
from .gemv import launch_gemv
from .gemv_prep import launch_gemv_prep, prepare_x
from .launcher import launch_kernel
from .wgmma_prefill import prefill_x, stream_mm


@triton.jit
def _silu_mul_reduce_kernel(
    part_ptr,  # [2, SPLIT_K, M*N] partials (fp32; x's dtype on the dequantize path): gate, then up
    out_ptr,  # [M*N] in the output dtype
    MN,
    SPLIT_K: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < MN
    g = tl.zeros([BLOCK], dtype=tl.float32)
    u = tl.zeros([BLOCK], dtype=tl.float32)
    for i in tl.static_range(SPLIT_K):
        g += tl.load(part_ptr + i * MN + offs, mask=mask, other=0.0)
        u += tl.load(part_ptr + (SPLIT_K + i) * MN + offs, mask=mask, other=0.0)
    y = g / (1.0 + tl.exp(-g)) * u  # silu(g) * u in fp32
    tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


def swiglu(x, gate, up, group_size, group_offset, zero_offset, out_dtype, cfg, perm=None, out=None):
    """x [M, K] (row-contiguous); gate / up = (qweight, qzeros, scales) -> [M, N] in out_dtype (into ``out``,
    contiguous, where given); with perm [K] (kind "gemv" only), of x[:, perm]."""
    m, k = x.shape
    n = packed_shape(gate[0])[1]
    if perm is not None and cfg["kind"] != "gemv":
        raise ValueError(f"perm is read only by the x-prep GEMV; gather x first for kind {cfg['kind']!r}")
    if cfg["kind"] == "dequant":  # cuBLAS writes gate and up in x's dtype; the epilogue reads them as one split
        part = torch.empty((2, 1, m, n), dtype=x.dtype, device=x.device)
        for i, w in enumerate((gate, up)):
            torch.matmul(x, dequantize_sorted(*w, group_size, group_offset, zero_offset, x.dtype), out=part[i, 0])
        return _silu_mul(part, out_dtype, out)
    tiled = is_tiled(gate[0])  # so is up: gptq_swiglu_sorted checked their shapes
    if cfg.get("STREAM") and runs_wgmma(cfg, x):  # gate and up summed in fp32, one prepared x for both
        part = torch.empty((2, 1, m, n), dtype=torch.float32, device=x.device)
        px = prefill_x(x, group_offset, cfg, tiled)
        for i, w in enumerate((gate, up)):
            stream_mm(px, *w, group_size, group_offset, zero_offset, part[i, 0], cfg)
        return _silu_mul(part, out_dtype, out)
    per, split_k = split_plan(ceil_div(k + group_offset, cfg["BLOCK_K"]), cfg["SPLIT_K"])  # as each kernel does
    part = torch.empty((2, split_k, m, n), dtype=torch.float32, device=x.device)
    # the in-launch epilogue has run on a GPU for the one-row GEMVs and the wgmma decode kernel (fp16 / bf16 x); the
    # other kinds keep the epilogue kernel, the prefill kernel too where its config asks for the in-launch reduction
    # (mid_tile_config): it was slower there (1.5x, the median of 76 configs in an H100 sweep; on an H200 the 64 x 64
    # tile's SwiGLU took 1.02-1.17x the decode tile's time on the two shards where it reduced in up's launch,
    # probe_mid_swiglu_23de14e; bench/README.md)
    one_row_gemv = cfg["kind"] in ("gemv", "gemv_plain") and cfg.get("ROWS", 1) == 1
    in_launch = one_row_gemv or (runs_wgmma(cfg, x) and not cfg.get("PREFILL"))
    counts = serial_counters(cfg, m, n, split_k, x.device) if in_launch else None
    if counts is not None and out is None:
        out = torch.empty((m, n), dtype=out_dtype, device=x.device)
    prep = prepare_x(x, cfg["BLOCK_K"], group_offset, perm, tiled) if cfg["kind"] == "gemv" else None
    if cfg.get("PREFILL") and runs_wgmma(cfg, x):  # x's TMA descriptor (and reorder) once, for both launches
        x = prefill_x(x, group_offset, cfg, tiled)
    for i, w in enumerate((gate, up)):
        args = (*w, group_size, group_offset, zero_offset, part[i], per, cfg)
        # serial: up's launch ends with silu(gate) * up, gate's partials complete before it (stream order)
        serial = dict(out=out, counts=counts, gate=part[0]) if counts is not None and i == 1 else {}
        if prep is not None:
            launch_gemv_prep(prep, k, *args, **serial)
        elif cfg["kind"] == "gemv_plain":
            launch_gemv(x, *args, **serial)
        else:
            launch_dot(x, *args, **serial)
    return out if counts is not None else _silu_mul(part, out_dtype, out)


def _silu_mul(part, out_dtype, out=None):
    """silu(sum of gate partials) * (sum of up partials) from part [2, SPLIT_K, M, N] -> [M, N] in out_dtype (into
    ``out`` where given)."""
    _, split_k, m, n = part.shape
    out = torch.empty((m, n), dtype=out_dtype, device=part.device) if out is None else out
    block = 1024
    launch_kernel(_silu_mul_reduce_kernel, (ceil_div(m * n, block),), part, out, m * n, SPLIT_K=split_k, BLOCK=block)
    return out
