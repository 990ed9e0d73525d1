"""The packed format and the numeric reference (tpaware_compile/gptq.py).

Every check compares with an independent formula written here, not with the code under test."""

import numpy as np
import pytest
import torch

from tpaware_compile.gptq import (GPTQWeight, dequantize, pack_cols, pack_rows, reference_matmul, unpack_cols,
                                  unpack_rows)
from tpaware_compile.quantize import quantize

GROUP_SIZES = [32, 64, 128, -1]
SCALE_DTYPES = [torch.float16, torch.bfloat16, torch.float32]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _nibbles(shape, gen) -> torch.Tensor:
    return torch.randint(0, 16, shape, generator=gen, dtype=torch.int32)


def _act_order_g_idx(k: int, group_size: int, gen) -> torch.Tensor:
    """[K] int32: groups of group_size rows assigned in a random row order, as act-order GPTQ does."""
    g_idx = torch.empty(k, dtype=torch.int32)
    g_idx[torch.randperm(k, generator=gen)] = torch.arange(k, dtype=torch.int32) // group_size
    return g_idx


def _random_weight(k, n, group_size, seed, scale_dtype=torch.float16, zero_offset=0, act_order=True):
    """A GPTQWeight with every nibble random (zeros included), not just what quantize() would produce."""
    gen = _gen(seed)
    group_size = k if group_size == -1 else group_size
    groups = k // group_size
    g_idx = _act_order_g_idx(k, group_size, gen) if act_order else None
    scales = (torch.rand(groups, n, generator=gen) * 0.1 + 1e-3).to(scale_dtype)  # [G, N]
    return GPTQWeight(pack_rows(_nibbles((k, n), gen)), pack_cols(_nibbles((groups, n), gen)), scales, g_idx,
                      group_size, zero_offset)


# An independent reading of the format: numpy, per-element shifts, no reshapes of nibble blocks.
def _np_words(nibbles: np.ndarray, axis: int) -> np.ndarray:
    """Pack 8 nibbles along ``axis`` with explicit shifts in uint32, then reinterpret as int32."""
    parts = np.split(nibbles.astype(np.uint32), nibbles.shape[axis] // 8, axis=axis)
    words = [sum(np.take(p, j, axis=axis) << np.uint32(4 * j) for j in range(8)) for p in parts]
    return np.stack(words, axis=axis).astype(np.uint32).view(np.int32)


def _formula_dequantize(w: GPTQWeight, dtype: torch.dtype) -> torch.Tensor:
    """W[k, n] = (nibble k%8 of qweight[k//8, n] - (nibble n%8 of qzeros[g, n//8] + zero_offset)) * scales[g, n],
    evaluated in float64, where the product of a 5-bit integer and any scale is exact: one rounding to dtype."""
    k, n = w.in_features, w.out_features
    rows, cols = torch.arange(k), torch.arange(n)
    q = (w.qweight.long()[rows // 8] >> (4 * (rows % 8))[:, None]) & 15  # [K, N]
    g = w.g_idx.long() if w.g_idx is not None else (rows + w.group_offset) // w.group_size  # [K]
    z = (w.qzeros.long()[:, cols // 8] >> (4 * (cols % 8))[None, :]) & 15  # [G, N]
    return ((q - z[g] - w.zero_offset).double() * w.scales.double()[g]).to(dtype)


@pytest.mark.parametrize("k,n", [(8, 8), (64, 24), (256, 40)])
def test_pack_rows_round_trip_and_layout(k, n):
    q = _nibbles((k, n), _gen(k + n))
    packed = pack_rows(q)
    assert packed.shape == (k // 8, n) and packed.dtype == torch.int32
    assert np.array_equal(packed.numpy(), _np_words(q.numpy(), axis=0))
    assert torch.equal(unpack_rows(packed), q)


@pytest.mark.parametrize("g,n", [(1, 8), (3, 64), (16, 40)])
def test_pack_cols_round_trip_and_layout(g, n):
    z = _nibbles((g, n), _gen(g * n))
    packed = pack_cols(z)
    assert packed.shape == (g, n // 8) and packed.dtype == torch.int32
    assert np.array_equal(packed.numpy(), _np_words(z.numpy(), axis=1))
    assert torch.equal(unpack_cols(packed), z)


def test_pack_sign_bit_words():
    # Nibble 15 in the top position sets bit 31: the word must be negative int32, and read back intact.
    q = torch.full((8, 8), 15, dtype=torch.int32)
    assert torch.equal(pack_rows(q), torch.full((1, 8), -1, dtype=torch.int32))
    assert torch.equal(unpack_cols(pack_cols(q)), q)


def test_unpack_known_word():
    # 0x76543210: nibble j holds j, lowest bits first.
    word = torch.tensor([[0x76543210]], dtype=torch.int32)
    assert unpack_rows(word).flatten().tolist() == list(range(8))
    assert unpack_cols(word).flatten().tolist() == list(range(8))


@pytest.mark.parametrize("group_size", GROUP_SIZES)
@pytest.mark.parametrize("scale_dtype", SCALE_DTYPES)
@pytest.mark.parametrize("zero_offset", [0, 1])
def test_dequantize_matches_formula(group_size, scale_dtype, zero_offset):
    w = _random_weight(256, 48, group_size, seed=group_size + zero_offset, scale_dtype=scale_dtype,
                       zero_offset=zero_offset)
    out = dequantize(w)
    assert out.dtype == scale_dtype
    assert torch.equal(out, _formula_dequantize(w, scale_dtype))
    assert torch.equal(dequantize(w, torch.float32), _formula_dequantize(w, torch.float32))


@pytest.mark.parametrize("group_size", [32, 128])
def test_dequantize_contiguous_groups_with_offset(group_size):
    k, offset = 160, 24  # group 0 starts 24 rows before row 0 (a shard cut inside a group)
    gen = _gen(group_size)
    groups = -(-(k + offset) // group_size)
    w = GPTQWeight(pack_rows(_nibbles((k, 16), gen)), pack_cols(_nibbles((groups, 16), gen)),
                   torch.rand(groups, 16, generator=gen).half(), None, group_size, 1, offset)
    assert torch.equal(w.group_index(), ((torch.arange(k) + offset) // group_size).int())
    assert torch.equal(dequantize(w), _formula_dequantize(w, torch.float16))


def test_zero_conventions_known_values():
    # One column: q = 3, scale 0.5. v2 stores zero 8 itself; v1 stores zero - 1 = 7. Both mean 0.5 * (3 - 8).
    q = torch.full((8, 8), 3, dtype=torch.int32)
    scales = torch.full((1, 8), 0.5, dtype=torch.float16)
    v2 = GPTQWeight(pack_rows(q), pack_cols(torch.full((1, 8), 8)), scales, None, 8, zero_offset=0)
    v1 = GPTQWeight(pack_rows(q), pack_cols(torch.full((1, 8), 7)), scales, None, 8, zero_offset=1)
    assert torch.equal(dequantize(v2), torch.full((8, 8), -2.5, dtype=torch.float16))
    assert torch.equal(dequantize(v1), dequantize(v2))


@pytest.mark.parametrize("group_size", GROUP_SIZES)
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("zero_offset", [0, 1])
def test_quantize_round_trip_error(group_size, sym, zero_offset):
    gen = _gen(7 * group_size + sym)
    w = torch.randn(256, 32, generator=gen)
    qw = quantize(w, group_size, act_order=True, sym=sym, zero_offset=zero_offset, generator=gen)
    g = qw.g_idx.long()
    err = (dequantize(qw, torch.float32) - w).abs()  # [K, N]
    # Half a step, plus the fp16 rounding of the scale at the clipped ends (|w/s| up to 7.5).
    assert bool((err <= qw.scales.float()[g] * 0.51).all()), "round-to-nearest error exceeds half a step"
    if qw.num_groups > 1:
        assert not bool((g[1:] >= g[:-1]).all()), "act-order g_idx should not be monotone"
    if sym:  # every zero is 8, stored as 8 - zero_offset
        assert bool((unpack_cols(qw.qzeros) == 8 - zero_offset).all())
    assert torch.equal(dequantize(qw), _formula_dequantize(qw, torch.float16))


@pytest.mark.parametrize("scale_dtype", SCALE_DTYPES)
def test_reference_matmul(scale_dtype):
    gen = _gen(3)
    w = _random_weight(128, 32, 32, seed=3, scale_dtype=scale_dtype, zero_offset=1)
    w = w.replace(bias=torch.randn(32, generator=gen).to(scale_dtype))
    x = torch.randn(5, 128, generator=gen)
    want = x.double() @ _formula_dequantize(w, torch.float64) + w.bias.double()
    torch.testing.assert_close(reference_matmul(x, w).double(), want, rtol=1e-5, atol=1e-5)
    assert reference_matmul(x.half(), w).dtype == torch.float16


# ---- bad inputs: every error names the offending tensor ----

def _good_parts(k=64, n=16, group_size=32):
    gen = _gen(11)
    g = k // group_size
    return dict(qweight=pack_rows(_nibbles((k, n), gen)), qzeros=pack_cols(_nibbles((g, n), gen)),
                scales=torch.rand(g, n, generator=gen).half(), g_idx=_act_order_g_idx(k, group_size, gen),
                group_size=group_size)


def test_good_parts_are_valid():
    w = GPTQWeight(**_good_parts())
    assert (w.in_features, w.out_features, w.num_groups) == (64, 16, 2)


@pytest.mark.parametrize("change,match", [
    (dict(scales=torch.rand(3, 16).half()), r"qzeros: expected shape \(3, 2\)"),
    (dict(scales=torch.rand(2, 8).half()), r"scales: expected shape \(2, 16\)"),
    (dict(qzeros=torch.zeros(2, 1, dtype=torch.int32)), r"qzeros: expected shape \(2, 2\)"),
    (dict(qzeros=torch.zeros(2, dtype=torch.int32)), r"qzeros: expected a 2-D tensor"),
    (dict(g_idx=torch.zeros(32, dtype=torch.int32)), r"g_idx: expected shape \(64,\)"),
    (dict(bias=torch.zeros(8).half()), r"bias: expected shape \(16,\)"),
    (dict(qweight=torch.zeros(8, dtype=torch.int32)), r"qweight: expected a 2-D tensor"),
])
def test_shape_mismatch(change, match):
    with pytest.raises(ValueError, match=match):
        GPTQWeight(**{**_good_parts(), **change})


@pytest.mark.parametrize("name,bad", [
    ("qweight", lambda t: t.float()), ("qweight", lambda t: t.long()), ("qzeros", lambda t: t.long()),
    ("scales", lambda t: t.double()), ("scales", lambda t: t.int()), ("g_idx", lambda t: t.float()),
])
def test_dtype_mismatch(name, bad):
    parts = _good_parts()
    parts[name] = bad(parts[name])
    with pytest.raises(ValueError, match=rf"{name}: expected dtype"):
        GPTQWeight(**parts)


def test_bias_dtype_mismatch():
    with pytest.raises(ValueError, match=r"bias: expected dtype"):
        GPTQWeight(**_good_parts(), bias=torch.zeros(16, dtype=torch.int32))


@pytest.mark.parametrize("bad_value", [-1, 2, 100])
def test_g_idx_out_of_range(bad_value):
    parts = _good_parts()
    parts["g_idx"][5] = bad_value
    with pytest.raises(ValueError, match=r"g_idx: values must lie in \[0, 2\)"):
        GPTQWeight(**parts)


def test_g_idx_group_too_large():
    parts = _good_parts()  # 2 groups of 32 rows; give group 0 a 33rd row
    parts["g_idx"][torch.nonzero(parts["g_idx"] == 1)[0]] = 0
    with pytest.raises(ValueError, match=r"g_idx: some group holds more than group_size=32 rows"):
        GPTQWeight(**parts)


def test_n_not_divisible():
    parts = _good_parts(n=16)
    parts.update(qweight=parts["qweight"][:, :12], scales=parts["scales"][:, :12])
    with pytest.raises(ValueError, match=r"qweight: out_features N=12 must be divisible by 8"):
        GPTQWeight(**parts)


@pytest.mark.parametrize("fn,shape,match", [
    (pack_rows, (12, 8), r"q: expected a 2-D tensor with dim 0 divisible by 8, got \(12, 8\)"),
    (pack_cols, (8, 12), r"z: expected a 2-D tensor with dim 1 divisible by 8, got \(8, 12\)"),
    (pack_rows, (8,), r"q: expected a 2-D tensor"),
])
def test_pack_not_divisible(fn, shape, match):
    with pytest.raises(ValueError, match=match):
        fn(torch.zeros(shape, dtype=torch.int32))


@pytest.mark.parametrize("fn,name", [(pack_rows, "q"), (pack_cols, "z")])
@pytest.mark.parametrize("bad", [-1, 16])
def test_pack_value_out_of_range(fn, name, bad):
    t = torch.zeros(8, 8, dtype=torch.int32)
    t[3, 4] = bad
    with pytest.raises(ValueError, match=rf"{name}: values must lie in \[0, 15\]"):
        fn(t)


def test_k_not_divisible_by_group_size():
    with pytest.raises(ValueError, match=r"w: K=96 must be divisible by group_size=64"):
        quantize(torch.randn(96, 8), group_size=64)


def test_contiguous_group_count_mismatch():
    parts = _good_parts()
    parts["g_idx"] = None
    parts["group_size"] = 16  # 64 rows need 4 groups of 16, scales has 2
    with pytest.raises(ValueError, match=r"scales: expected 4 groups for K=64, group_size=16"):
        GPTQWeight(**parts)


@pytest.mark.parametrize("change,match", [
    (dict(zero_offset=2), r"zero_offset must be 0 \(GPTQ v2\) or 1 \(GPTQ v1\)"),
    (dict(group_size=0), r"group_size must be positive"),
    (dict(group_offset=3), r"group_offset applies only to contiguous groups"),
    (dict(g_idx=None, group_offset=32), r"group_offset must lie in \[0, group_size=32\)"),
])
def test_bad_parameters(change, match):
    with pytest.raises(ValueError, match=match):
        GPTQWeight(**{**_good_parts(), **change})
