"""Permutations and TP sharding of packed weights (tpaware_compile/reorder.py): every transform is bitwise
exact, so each test compares dequantized tensors with torch.equal against the same operation done on the
dense matrix."""

import pytest
import torch

from tpaware_compile.gptq import GPTQWeight, dequantize, reference_matmul
from tpaware_compile.quantize import quantize
from tpaware_compile.reorder import (cat_cols, drop_contiguous_g_idx, narrow_cols, narrow_rows, permute_cols,
                                     permute_rows, shard_cols, shard_rows, sort_rows, sort_shared_rows,
                                     stable_argsort)

F32 = torch.float32


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _weight(k=256, n=64, group_size=32, seed=0, sym=False, zero_offset=0, bias=False, scale_dtype=torch.float16):
    """A random act-order GPTQ weight (random row order of groups, as real checkpoints have)."""
    gen = _gen(seed)
    b = torch.randn(n, generator=gen) if bias else None
    return quantize(torch.randn(k, n, generator=gen), group_size, act_order=True, sym=sym,
                    zero_offset=zero_offset, scale_dtype=scale_dtype, bias=b, generator=gen)


def _deq(w: GPTQWeight) -> torch.Tensor:
    return dequantize(w, F32)


# ---- permutations ----

def test_stable_argsort_keeps_tie_order():
    g_idx = torch.tensor([2, 0, 1, 0, 2, 1, 0], dtype=torch.int32)
    assert stable_argsort(g_idx).tolist() == [1, 3, 6, 2, 5, 0, 4]


@pytest.mark.parametrize("group_size", [32, 64, 128, -1])
def test_permute_rows_exact(group_size):
    w = _weight(group_size=group_size, seed=1)
    perm = torch.randperm(w.in_features, generator=_gen(2))
    pw = permute_rows(w, perm)
    assert torch.equal(_deq(pw), _deq(w)[perm])
    assert torch.equal(pw.g_idx, w.g_idx[perm])


@pytest.mark.parametrize("group_size", [32, 64, 128, -1])
@pytest.mark.parametrize("zero_offset", [0, 1])
def test_sort_rows_drops_g_idx_and_is_exact(group_size, zero_offset):
    w = _weight(group_size=group_size, seed=3, zero_offset=zero_offset)
    sw, perm = sort_rows(w)
    assert sw.g_idx is None and sw.group_offset == 0  # act-order groups become contiguous runs once sorted
    assert torch.equal(perm, stable_argsort(w.g_idx))
    assert torch.equal(_deq(sw), _deq(w)[perm])
    assert torch.equal(sw.scales, w.scales) and torch.equal(sw.qzeros, w.qzeros)


@pytest.mark.parametrize("scale_dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_activation_permutation_matmul(scale_dtype):
    # The single-GPU act-order fix: x[:, P] @ W[P] == x @ W (equal up to fp32 summation order).
    w = _weight(seed=4, scale_dtype=scale_dtype, bias=True)
    sw, perm = sort_rows(w)
    x = torch.randn(5, w.in_features, generator=_gen(5))
    torch.testing.assert_close(reference_matmul(x[:, perm], sw), reference_matmul(x, w), rtol=1e-5, atol=1e-5)


def test_drop_contiguous_g_idx_only_when_contiguous():
    w = _weight(seed=6)
    assert drop_contiguous_g_idx(w) is w  # act-order g_idx is not contiguous: kept
    contiguous = w.replace(g_idx=(torch.arange(w.in_features) // w.group_size).int())
    dropped = drop_contiguous_g_idx(contiguous)
    assert dropped.g_idx is None and torch.equal(_deq(dropped), _deq(contiguous))


@pytest.mark.parametrize("group_size", [32, 64, 128])  # per-channel (-1): one group, P1 is the identity
def test_sort_shared_rows_folds_one_act_order(group_size):
    """gate and up share g_idx: both rows sorted by the one P1, g_idx dropped, bitwise the rows of the originals."""
    gate = _weight(group_size=group_size, seed=9)
    up = _weight(group_size=group_size, seed=10).replace(g_idx=gate.g_idx)
    (sg, su), p1, why = sort_shared_rows([gate, up])
    assert why == "" and torch.equal(p1, stable_argsort(gate.g_idx))
    assert sg.g_idx is None and su.g_idx is None and sg.group_offset == 0
    assert torch.equal(_deq(sg), _deq(gate)[p1]) and torch.equal(_deq(su), _deq(up)[p1])


def test_sort_shared_rows_leaves_what_it_cannot_fold():
    gate, up = _weight(seed=11), _weight(seed=12)  # two act-orders: one x[P1] cannot serve both
    ws, p1, why = sort_shared_rows([gate, up])
    assert p1 is None and ws[0] is gate and ws[1] is up and "different g_idx" in why
    sorted_gate = sort_rows(gate)[0]
    assert sort_shared_rows([sorted_gate])[1:] == (None, "already contiguous groups")
    contiguous = gate.replace(g_idx=(torch.arange(gate.in_features) // gate.group_size).int())
    (dropped,), p1, why = sort_shared_rows([contiguous])  # identity P1: g_idx dropped, no run-time permute
    assert p1 is None and why == "" and dropped.g_idx is None


@pytest.mark.parametrize("zero_offset", [0, 1])
def test_permute_cols_exact(zero_offset):
    w = _weight(seed=7, zero_offset=zero_offset, bias=True)
    perm = torch.randperm(w.out_features, generator=_gen(8))
    pw = permute_cols(w, perm)
    assert torch.equal(_deq(pw), _deq(w)[:, perm])
    assert torch.equal(pw.bias, w.bias[perm]) and torch.equal(pw.g_idx, w.g_idx)


def test_gate_up_column_permutation_commutes_with_silu():
    # The TP-aware identity: permuting the gate/up output columns by P2 and the down rows by P2 leaves the
    # MLP unchanged, because SiLU(gate) * up is elementwise.
    gate, up, down = _weight(128, 256, seed=9), _weight(128, 256, seed=10), _weight(256, 64, seed=11)
    down_sorted, p2 = sort_rows(down)
    x = torch.randn(4, 128, generator=_gen(12))

    def mlp(g, u, d):
        return reference_matmul(torch.nn.functional.silu(reference_matmul(x, g)) * reference_matmul(x, u), d)

    got = mlp(permute_cols(gate, p2), permute_cols(up, p2), down_sorted)
    torch.testing.assert_close(got, mlp(gate, up, down), rtol=1e-4, atol=1e-4)


# ---- columns: narrow, shard, concatenate ----

@pytest.mark.parametrize("start,length", [(0, 8), (16, 24), (56, 8), (0, 64)])
def test_narrow_cols_exact(start, length):
    w = _weight(seed=13, bias=True)
    nw = narrow_cols(w, start, length)
    assert torch.equal(_deq(nw), _deq(w)[:, start:start + length])
    assert torch.equal(nw.bias, w.bias[start:start + length])


@pytest.mark.parametrize("world", [1, 2, 4, 8])
def test_shard_cols_tile_the_weight(world):
    w = _weight(seed=14, bias=True)
    shards = [shard_cols(w, r, world) for r in range(world)]
    assert torch.equal(torch.cat([_deq(s) for s in shards], dim=1), _deq(w))
    assert torch.equal(cat_cols(shards).qzeros, w.qzeros)


def test_cat_cols_exact():
    gate = _weight(seed=15, bias=True)
    up = _weight(seed=16, bias=True).replace(g_idx=gate.g_idx)  # fused gate_up: the rows share their groups
    fused = cat_cols([gate, up])
    assert torch.equal(_deq(fused), torch.cat([_deq(gate), _deq(up)], dim=1))
    assert torch.equal(fused.bias, torch.cat([gate.bias, up.bias]))


def test_fused_gate_up_permutes_each_half():
    # Per rank [gate_r | up_r]: permute each half by P2 on its own, then fuse.
    gate, up = _weight(seed=17), _weight(seed=18)
    up = up.replace(g_idx=gate.g_idx)
    p2 = torch.randperm(gate.out_features, generator=_gen(19))
    fused = cat_cols([permute_cols(gate, p2), permute_cols(up, p2)])
    assert torch.equal(_deq(fused), torch.cat([_deq(gate)[:, p2], _deq(up)[:, p2]], dim=1))


# ---- rows: narrow and shard, sorted (group offset) and with g_idx ----

@pytest.mark.parametrize("start,length", [(0, 32), (8, 16), (24, 48), (40, 200), (248, 8), (0, 256)])
@pytest.mark.parametrize("zero_offset", [0, 1])
def test_narrow_rows_sorted_inside_groups(start, length, zero_offset):
    sw, _ = sort_rows(_weight(seed=20, zero_offset=zero_offset))  # group_size 32
    nw = narrow_rows(sw, start, length)
    assert nw.g_idx is None and nw.group_offset == start % 32
    assert nw.num_groups == (start + length - 1) // 32 - start // 32 + 1  # only the groups it touches
    assert torch.equal(_deq(nw), _deq(sw)[start:start + length])


def test_narrow_rows_of_a_narrowed_shard():
    # A shard that already starts inside a group, narrowed again: offsets compose.
    sw, _ = sort_rows(_weight(seed=21, group_size=64))
    inner = narrow_rows(narrow_rows(sw, 40, 160), 16, 104)
    assert inner.group_offset == (40 + 16) % 64
    assert torch.equal(_deq(inner), _deq(sw)[56:160])


def test_narrow_rows_with_g_idx_keeps_full_groups():
    w = _weight(seed=22)
    nw = narrow_rows(w, 24, 72)
    assert torch.equal(nw.scales, w.scales) and torch.equal(nw.qzeros, w.qzeros)
    assert torch.equal(nw.g_idx, w.g_idx[24:96])
    assert torch.equal(_deq(nw), _deq(w)[24:96])


def test_row_shards_drop_bias():
    assert narrow_rows(_weight(seed=23, bias=True), 0, 64).bias is None  # added once, after the AllReduce


@pytest.mark.parametrize("k,group_size,world", [(256, 32, 2), (256, 32, 4), (384, 128, 4), (384, 64, 8),
                                                 (512, -1, 4)])
def test_shard_rows_of_sorted_weight(k, group_size, world):
    # (384, 128, 4): 3 groups over 4 ranks, 96 rows each, so shards start inside groups (group_offset).
    w = _weight(k=k, group_size=group_size, seed=k + world)
    sw, perm = sort_rows(w)
    full, rows = _deq(sw), k // world
    for r in range(world):
        shard = shard_rows(sw, r, world)
        assert shard.g_idx is None and shard.group_offset == (r * rows) % sw.group_size
        assert torch.equal(_deq(shard), full[r * rows:(r + 1) * rows])
    assert torch.equal(full, _deq(w)[perm])


def test_row_parallel_matmul_sums_to_full():
    # Row-parallel down_proj on sorted shards: per-rank partial products sum (AllReduce) to x @ W.
    w = _weight(k=384, group_size=128, seed=24)
    sw, perm = sort_rows(w)
    x, world = torch.randn(3, 384, generator=_gen(25)), 4
    xp, rows = x[:, perm], 384 // world
    parts = [reference_matmul(xp[:, r * rows:(r + 1) * rows], shard_rows(sw, r, world)) for r in range(world)]
    torch.testing.assert_close(sum(parts), reference_matmul(x, w), rtol=1e-5, atol=1e-5)


# ---- bad inputs ----

@pytest.mark.parametrize("fn,perm,match", [
    (permute_rows, torch.arange(255), r"row permutation: expected shape \(256,\)"),
    (permute_rows, torch.zeros(256, dtype=torch.long), r"row permutation: not a permutation of range\(256\)"),
    (permute_rows, torch.arange(1, 257), r"row permutation: not a permutation"),
    (permute_rows, torch.arange(256).reshape(16, 16), r"row permutation: expected shape"),
    (permute_cols, torch.arange(65), r"column permutation: expected shape \(64,\)"),
    (permute_cols, torch.arange(64).flip(0).clamp(max=62), r"column permutation: not a permutation of range\(64\)"),
])
def test_not_a_permutation(fn, perm, match):
    with pytest.raises(ValueError, match=match):
        fn(_weight(seed=26), perm)


@pytest.mark.parametrize("fn,start,length,match", [
    (narrow_rows, 4, 8, r"rows \[4, 12\) must be a non-empty range inside \[0, 256\)"),
    (narrow_rows, 0, 12, r"rows \[0, 12\)"),
    (narrow_rows, 248, 16, r"rows \[248, 264\)"),
    (narrow_rows, -8, 16, r"rows \[-8, 8\)"),
    (narrow_rows, 8, 0, r"rows \[8, 8\)"),
    (narrow_cols, 4, 8, r"columns \[4, 12\) must be a non-empty range inside \[0, 64\)"),
    (narrow_cols, 56, 16, r"columns \[56, 72\)"),
])
def test_bad_narrow_ranges(fn, start, length, match):
    with pytest.raises(ValueError, match=match):
        fn(_weight(seed=27), start, length)


@pytest.mark.parametrize("fn,rank,world,match", [
    (shard_rows, 0, 3, r"in_features=256 must be divisible by world_size \* 8 = 24"),
    (shard_rows, 0, 64, r"in_features=256 must be divisible by world_size \* 8 = 512"),
    (shard_cols, 0, 16, r"out_features=64 must be divisible by world_size \* 8 = 128"),
    (shard_rows, 4, 4, r"rank 4 out of range for world_size 4"),
    (shard_cols, -1, 2, r"rank -1 out of range for world_size 2"),
])
def test_bad_shards(fn, rank, world, match):
    with pytest.raises(ValueError, match=match):
        fn(_weight(seed=28), rank, world)


def test_cat_cols_rejects_mismatched_layers():
    a, b = _weight(seed=29, bias=True), _weight(seed=30, bias=True)
    with pytest.raises(ValueError, match=r"cat_cols: weights must share g_idx"):
        cat_cols([a, b])  # different act-order g_idx
    with pytest.raises(ValueError, match=r"cat_cols: weights must share .*zero_offset"):
        cat_cols([a, _weight(seed=29, zero_offset=1, bias=True)])
    with pytest.raises(ValueError, match=r"cat_cols: either every weight has a bias or none has"):
        cat_cols([a, b.replace(g_idx=a.g_idx, bias=None)])
