"""Make act-order GPTQ weights from float weights (round-to-nearest), for tests, the demo and benchmarks.

A real GPTQ pass visits input rows in order of decreasing Hessian diagonal and assigns groups in that
order, so ``g_idx[perm[i]] = i // group_size`` for a data-dependent permutation ``perm``. We draw ``perm``
at random (as non-monotone as real checkpoints), then round each group to nearest. The numbers differ from
GPTQ's error-compensated ones, but the format and every index are exactly those of a real checkpoint.
"""

from typing import Optional

import torch

from .gptq import MAXQ, GPTQWeight, pack_cols, pack_rows


def quantize(
    w: torch.Tensor,  # [K, N] float, in x out
    group_size: int = 128,
    act_order: bool = True,
    sym: bool = False,
    zero_offset: int = 0,
    scale_dtype: torch.dtype = torch.float16,
    bias: Optional[torch.Tensor] = None,
    generator: Optional[torch.Generator] = None,
) -> GPTQWeight:
    """Quantize ``w`` to 4-bit GPTQ. ``group_size=-1`` means per-channel (one group of K rows).
    ``zero_offset=1`` writes a GPTQ v1 checkpoint (zero - 1 stored)."""
    k, n = w.shape
    group_size = k if group_size == -1 else group_size
    if k % group_size:
        raise ValueError(f"w: K={k} must be divisible by group_size={group_size}")
    perm = torch.randperm(k, generator=generator) if act_order else torch.arange(k)
    g_idx = torch.empty(k, dtype=torch.int32)
    g_idx[perm] = torch.arange(k, dtype=torch.int32) // group_size
    scales, zeros = _group_params(w.float()[perm].reshape(-1, group_size, n), sym, scale_dtype)  # [G, N]
    zeros = zeros.clamp(min=zero_offset)  # v1 cannot store zero 0: zero - 1 = -1 reads back as 15 + 1
    s_rows, z_rows = scales.float()[g_idx.long()], zeros[g_idx.long()]  # [K, N]
    q = torch.clamp(torch.round(w.float() / s_rows) + z_rows, 0, MAXQ).to(torch.int32)
    return GPTQWeight(
        qweight=pack_rows(q),
        qzeros=pack_cols(zeros - zero_offset),
        scales=scales,
        g_idx=g_idx,
        group_size=group_size,
        zero_offset=zero_offset,
        bias=None if bias is None else bias.to(scale_dtype),
    )


def _group_params(groups: torch.Tensor, sym: bool, scale_dtype: torch.dtype):
    """groups [G, group_size, N] -> scales [G, N] (scale_dtype), zeros [G, N] int32."""
    lo = groups.amin(dim=1).clamp(max=0)
    hi = groups.amax(dim=1).clamp(min=0)
    if sym:
        hi = torch.maximum(hi.abs(), lo.abs())
        lo = -hi
    scales = ((hi - lo) / MAXQ).clamp(min=1e-6).to(scale_dtype)
    if sym:
        zeros = torch.full_like(scales, (MAXQ + 1) // 2, dtype=torch.int32)
    else:
        zeros = torch.clamp(torch.round(-lo / scales.float()), 0, MAXQ).to(torch.int32)
    return scales, zeros


def random_gptq(k: int, n: int, group_size: int = 128, scale_dtype: torch.dtype = torch.float16,
                bias: bool = False, generator: Optional[torch.Generator] = None) -> GPTQWeight:
    """Random act-order GPTQ tensors of any size, fast (no float weights to round): for benchmarks, where
    the numbers need only be realistic in range, not come from a real layer."""
    g = k // group_size
    g_idx = torch.empty(k, dtype=torch.int32)
    g_idx[torch.randperm(k, generator=generator)] = torch.arange(k, dtype=torch.int32) // group_size
    return GPTQWeight(
        qweight=torch.randint(-(2**31), 2**31 - 1, (k // 8, n), dtype=torch.int32, generator=generator),
        qzeros=torch.randint(-(2**31), 2**31 - 1, (g, n // 8), dtype=torch.int32, generator=generator),
        scales=((torch.rand(g, n, generator=generator) + 0.5) / (8 * k**0.5)).to(scale_dtype),  # W ~ 1/sqrt(K)
        g_idx=g_idx,
        group_size=group_size,
        bias=(torch.randn(n, generator=generator) * 0.01).to(scale_dtype) if bias else None,
    )
