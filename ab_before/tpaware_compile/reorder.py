"""Permutations and tensor-parallel sharding of packed GPTQ weights. Every transform is bitwise exact.

How each tensor moves (W is [K, N]; rows = input features K, columns = output features N):

    transform        qweight [K/8, N]          qzeros [G, N/8]           scales [G, N]   g_idx [K]       bias [N]
    permute_rows     unpack, rows[p], repack   -                         -               g_idx[p]        -
    permute_cols     cols[p]                   unpack, cols[p], repack   cols[p]         -               bias[p]
    narrow_cols      cols[a:b]                 cols[a/8:b/8]             cols[a:b]       -               bias[a:b]
    narrow_rows,     rows[a/8:b/8]             groups touched by a:b     same            dropped; a      -
      sorted groups                                                                      group_offset
    narrow_rows,     rows[a/8:b/8]             full                      full            g_idx[a:b]      -
      with g_idx

sort_shared_rows folds the act-order of the first layer(s) of an MLP: their rows sorted by the P1 they
share, paired with a run-time ``x[..., P1]``.

Row-parallel shards keep no bias: it is added once, after the AllReduce. Every transform reads qweight
N-major; tiled words (layout.py, a kernel layout) are refused: ``w.with_layout(tiled=False)`` first.
"""

from typing import List, Optional, Sequence, Tuple

import torch

from .gptq import PACK, GPTQWeight, pack_cols, pack_rows, unpack_cols, unpack_rows


def stable_argsort(g_idx: torch.Tensor) -> torch.Tensor:
    """The sorting permutation P with g_idx[P] non-decreasing; ties keep their order (same P on every rank)."""
    return torch.sort(g_idx.long(), stable=True).indices


def permute_rows(w: GPTQWeight, perm: torch.Tensor) -> GPTQWeight:
    """The weight of ``x[:, perm] @ W[perm]``, which equals ``x @ W``."""
    _check_perm(perm, w.in_features, "row permutation")
    _check_n_major(w, "permute_rows")
    qweight = pack_rows(unpack_rows(w.qweight)[perm])
    return w.replace(qweight=qweight, g_idx=w.group_index()[perm], group_offset=0)


def sort_rows(w: GPTQWeight) -> Tuple[GPTQWeight, torch.Tensor]:
    """Rows reordered by a stable argsort of g_idx. Returns the sorted weight (g_idx dropped when groups are
    then contiguous runs of group_size rows, as act-order always gives) and the permutation P."""
    perm = stable_argsort(w.group_index())
    return drop_contiguous_g_idx(permute_rows(w, perm)), perm


def drop_contiguous_g_idx(w: GPTQWeight) -> GPTQWeight:
    """Drop g_idx where it equals ``row // group_size``; otherwise return ``w`` unchanged."""
    if w.g_idx is None:
        return w
    rows = torch.arange(w.in_features, device=w.g_idx.device)
    if not torch.equal(w.g_idx.long(), rows // w.group_size):
        return w
    return w.replace(g_idx=None, group_offset=0)


def sort_shared_rows(ws: Sequence[GPTQWeight]) -> Tuple[List[GPTQWeight], Optional[torch.Tensor], str]:
    """Fold the act-order of layers that read one input (gate and up, or fc): rows of each sorted by the one
    P1 = stable_argsort(g_idx) they share, so ``x[..., P1] @ W[P1]`` runs on contiguous groups (g_idx None).
    Returns (weights, P1, why): P1 is None when nothing is folded (why says so; an identity P1 only drops
    g_idx and needs no run-time permutation). Layers with different g_idx are left as they are: one x[P1]
    cannot serve two orders."""
    if all(w.g_idx is None for w in ws):
        return list(ws), None, "already contiguous groups"
    first = ws[0].group_index()
    if any(not torch.equal(w.group_index(), first) or w.group_size != ws[0].group_size for w in ws[1:]):
        return list(ws), None, "layers reading x have different g_idx"
    perm = stable_argsort(first)
    folded = [drop_contiguous_g_idx(permute_rows(w, perm)) for w in ws]
    if any(w.g_idx is not None for w in folded):  # groups of unequal sizes: sorting leaves no plain runs
        return list(ws), None, "sorted groups are not runs of group_size rows"
    identity = torch.equal(perm, torch.arange(perm.numel(), device=perm.device))
    return folded, None if identity else perm, ""


def permute_cols(w: GPTQWeight, perm: torch.Tensor) -> GPTQWeight:
    """The weight whose output is ``(x @ W)[:, perm]``."""
    _check_perm(perm, w.out_features, "column permutation")
    _check_n_major(w, "permute_cols")
    return w.replace(
        qweight=w.qweight[:, perm].contiguous(),
        qzeros=pack_cols(unpack_cols(w.qzeros)[:, perm]),
        scales=w.scales[:, perm].contiguous(),
        bias=None if w.bias is None else w.bias[perm].contiguous(),
    )


def narrow_cols(w: GPTQWeight, start: int, length: int) -> GPTQWeight:
    """Output columns [start, start + length); both must be multiples of 8 (qzeros pack along N)."""
    _check_range(start, length, w.out_features, "columns")
    _check_n_major(w, "narrow_cols")
    return w.replace(
        qweight=w.qweight[:, start : start + length].contiguous(),
        qzeros=w.qzeros[:, start // PACK : (start + length) // PACK].contiguous(),
        scales=w.scales[:, start : start + length].contiguous(),
        bias=None if w.bias is None else w.bias[start : start + length].contiguous(),
    )


def cat_cols(ws: Sequence[GPTQWeight]) -> GPTQWeight:
    """Concatenate along N (a fused gate_up from gate and up); rows must share their groups."""
    first = ws[0]
    for w in ws:
        _check_n_major(w, "cat_cols")
    for w in ws[1:]:
        same = (w.g_idx is None) == (first.g_idx is None) and (w.g_idx is None or torch.equal(w.g_idx, first.g_idx))
        groups = (w.group_size, w.group_offset, w.zero_offset)
        if not same or groups != (first.group_size, first.group_offset, first.zero_offset):
            raise ValueError("cat_cols: weights must share g_idx, group_size, group_offset and zero_offset")
    biases = [w.bias for w in ws]
    has_bias = [b is not None for b in biases]
    if any(has_bias) and not all(has_bias):
        raise ValueError("cat_cols: either every weight has a bias or none has")
    return first.replace(
        qweight=torch.cat([w.qweight for w in ws], dim=1),
        qzeros=torch.cat([w.qzeros for w in ws], dim=1),
        scales=torch.cat([w.scales for w in ws], dim=1),
        bias=torch.cat(biases) if all(has_bias) else None,
    )


def narrow_rows(w: GPTQWeight, start: int, length: int) -> GPTQWeight:
    """Input rows [start, start + length), multiples of 8 (qweight packs along K). With contiguous groups the
    shard keeps only the groups it touches and a group offset; with g_idx it keeps the full scales and zeros.
    The bias is dropped: a row-parallel layer adds it once after the reduction."""
    _check_range(start, length, w.in_features, "rows")
    _check_n_major(w, "narrow_rows")
    # clone, not contiguous(): a row slice is already contiguous, and a view would keep the whole parent alive
    qweight = w.qweight[start // PACK : (start + length) // PACK].clone()
    if w.g_idx is not None:
        return w.replace(qweight=qweight, g_idx=w.g_idx[start : start + length].clone(), bias=None)
    first = (start + w.group_offset) // w.group_size
    last = (start + length - 1 + w.group_offset) // w.group_size
    return w.replace(
        qweight=qweight,
        qzeros=w.qzeros[first : last + 1].clone(),
        scales=w.scales[first : last + 1].clone(),
        group_offset=(start + w.group_offset) % w.group_size,
        bias=None,
    )


def shard_cols(w: GPTQWeight, rank: int, world: int) -> GPTQWeight:
    return narrow_cols(w, *_shard_range(w.out_features, rank, world, "out_features"))


def shard_rows(w: GPTQWeight, rank: int, world: int) -> GPTQWeight:
    return narrow_rows(w, *_shard_range(w.in_features, rank, world, "in_features"))


def _shard_range(size: int, rank: int, world: int, what: str) -> Tuple[int, int]:
    if size % (world * PACK):
        raise ValueError(f"{what}={size} must be divisible by world_size * {PACK} = {world * PACK}")
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} out of range for world_size {world}")
    length = size // world
    return rank * length, length


def _check_range(start: int, length: int, size: int, what: str) -> None:
    if start % PACK or length % PACK or length <= 0 or start < 0 or start + length > size:
        raise ValueError(f"{what} [{start}, {start + length}) must be a non-empty range inside [0, {size}) "
                         f"with both ends multiples of {PACK}")


def _check_n_major(w: GPTQWeight, what: str) -> None:
    if w.tiled:
        raise ValueError(f"{what}: qweight is tiled (a kernel layout); untile it first: w.with_layout(tiled=False)")


def _check_perm(perm: torch.Tensor, size: int, what: str) -> None:
    if perm.dim() != 1 or perm.numel() != size:
        raise ValueError(f"{what}: expected shape ({size},), got {tuple(perm.shape)}")
    if not torch.equal(torch.sort(perm.long()).values, torch.arange(size, device=perm.device)):
        raise ValueError(f"{what}: not a permutation of range({size})")
