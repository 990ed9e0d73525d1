"""The tiled layout of the packed words (layout.py): a lossless permutation, checked index by index."""

import pytest
import torch

from tpaware_compile.gptq import unpack_rows
from tpaware_compile.layout import (TILE_COLS, TILE_WORDS, can_tile, is_tiled, packed_shape, tile, untile, word_stride,
                                    words_of)


def test_tile_places_each_nibble_and_untile_restores_it():
    """Nibble 4e + 2h + c of tiled[p, s, j, 4t + b] is the weight in row 128s + 32b + 16h + 8c + 2t + e, column
    64p + j (the wgmma kernels' K order), for every index; untile gives qweight back bit for bit."""
    q = torch.randint(-2**31, 2**31 - 1, (48, 192), dtype=torch.int32)  # K = 384, N = 192
    t = tile(q)
    assert tuple(t.shape) == (3, 3, 64, 16) and is_tiled(t) and not is_tiled(q) and t.is_contiguous()
    rows = unpack_rows(q)  # [K, N]
    p, s, j, tt, b, e, h, c = torch.meshgrid(*(torch.arange(n) for n in (3, 3, 64, 4, 4, 2, 2, 2)), indexing="ij")
    nibbles = (t[p, s, j, 4 * tt + b] >> 4 * (4 * e + 2 * h + c)) & 0xF
    assert torch.equal(nibbles, rows[128 * s + 32 * b + 16 * h + 8 * c + 2 * tt + e, 64 * p + j])
    assert torch.equal(untile(t), q) and untile(q) is q
    assert packed_shape(t) == packed_shape(q) == (48, 192)
    assert word_stride(t) == 3 * 64 * 16 and word_stride(q) == 192  # words per 64-column tile / per row


@pytest.mark.parametrize("shape", [(8, 64), (16, 96), (24, 64), (16, 64, 1)])
def test_tile_refuses_shapes_it_cannot_hold(shape):
    """K must be a whole number of 128-row steps and N of 64-column tiles, qweight [K/8, N]."""
    assert len(shape) == 3 or not can_tile(shape[0] * 8, shape[1])
    with pytest.raises(ValueError, match="tiling needs"):
        tile(torch.zeros(shape, dtype=torch.int32))


def test_kernel_offsets_match_the_layout(monkeypatch):
    """The Triton kernels' view of tiled words (common.word_offsets: the address of word w of column n;
    common.word_rows: the row that nibble i of it holds) lands on what tile() put there; N-major is the identity."""
    from tpaware_compile.kernels import common
    from tpaware_compile.kernels.common import word_offsets, word_rows
    # called as plain Python: the tile's sizes as ints (in a kernel they are constexprs of the same values)
    monkeypatch.setattr(common, "_TILE_COLS", TILE_COLS)
    monkeypatch.setattr(common, "_TILE_WORDS", TILE_WORDS)
    monkeypatch.setattr(common, "tiled_offsets", common.tiled_offsets.fn)  # as word_offsets calls it
    q = torch.randint(-2**31, 2**31 - 1, (32, 128), dtype=torch.int32)  # K = 256
    t = tile(q).reshape(-1)
    words = torch.arange(32)[:, None, None]
    cols = torch.arange(128)[None, :, None]
    nibble = torch.arange(8)[None, None, :]
    got = (t[word_offsets.fn(words, cols, word_stride(tile(q)), True)] >> 4 * nibble) & 0xF  # the jit bodies
    assert torch.equal(got, unpack_rows(q)[word_rows.fn(8 * words + nibble, True), cols])
    assert torch.equal(word_rows.fn(torch.arange(256), True).sort().values, torch.arange(256))  # a permutation
    assert torch.equal(q.reshape(-1)[word_offsets.fn(words[..., 0], cols[..., 0], 128, False)], q)
    assert torch.equal(word_rows.fn(torch.arange(256), False), torch.arange(256))


def _sorted_weight(k=256, n=128, group_size=64):
    from tpaware_compile.quantize import quantize
    g = torch.Generator().manual_seed(4)
    return quantize(torch.randn(k, n, generator=g), group_size, act_order=False, generator=g).replace(g_idx=None)


def test_a_tiled_weight_is_the_same_matrix():
    """GPTQWeight.with_layout: the same shape and, dequantized, the same bits; the reference op on either layout
    gives the same bits too."""
    from tpaware_compile.gptq import dequantize
    from tpaware_compile.ops import gptq_linear

    w = _sorted_weight()
    t = w.with_layout(tiled=True)
    assert t.tiled and not w.tiled and t.with_layout(tiled=True) is t and w.with_layout(tiled=False) is w
    assert (t.in_features, t.out_features) == (w.in_features, w.out_features) == (256, 128)
    assert torch.equal(t.with_layout(tiled=False).qweight, w.qweight)
    assert torch.equal(dequantize(t), dequantize(w))
    x = torch.randn(3, 256)
    assert torch.equal(gptq_linear(x, t), gptq_linear(x, w))


def test_tiled_words_need_sorted_groups_and_whole_tiles():
    w = _sorted_weight()
    assert w.can_tile and not w.replace(g_idx=w.group_index()).can_tile
    assert not _sorted_weight(k=192).can_tile  # K = 192: one and a half 128-row steps
    with pytest.raises(ValueError, match="tiled words need contiguous groups"):
        w.with_layout(tiled=True).replace(g_idx=w.group_index())
    strided = tile(w.qweight).transpose(0, 1).contiguous().transpose(0, 1)  # same shape, not contiguous
    with pytest.raises(ValueError, match="tiled words must be contiguous"):
        w.replace(qweight=strided)


def test_tiled_words_need_group_offset_zero():
    """A shard cut inside a group (group offset 64) keeps N-major words: the kernels' 32-row blocks start at the
    group's start, tile()'s at row 0. Refused by the weight and by the kernels' argument check alike."""
    from tpaware_compile.gptq import GPTQWeight
    from tpaware_compile.kernels import check_sorted_args

    w = _sorted_weight(group_size=128)
    cut = GPTQWeight(w.qweight, w.qzeros[:1].repeat(3, 1), w.scales[:1].repeat(3, 1), None, 128, 0, 64)
    assert w.can_tile and not cut.can_tile
    with pytest.raises(ValueError, match="tiled words need group_offset 0"):
        cut.with_layout(tiled=True)
    with pytest.raises(ValueError, match="tiled words need group_offset 0"):
        check_sorted_args(torch.zeros(1, 256), tile(w.qweight), cut.qzeros, cut.scales, 128, 64, 0)


@pytest.mark.parametrize("transform", ["permute_rows", "permute_cols", "narrow_cols", "narrow_rows", "cat_cols"])
def test_reorder_refuses_tiled_words(transform):
    """reorder.py moves N-major words: on tiled ones it would move the wrong words, so it refuses them."""
    from tpaware_compile import reorder

    t = _sorted_weight().with_layout(tiled=True)
    call = {"permute_rows": lambda: reorder.permute_rows(t, torch.arange(256)),
            "permute_cols": lambda: reorder.permute_cols(t, torch.arange(128)),
            "narrow_cols": lambda: reorder.narrow_cols(t, 0, 64),
            "narrow_rows": lambda: reorder.narrow_rows(t, 0, 128),
            "cat_cols": lambda: reorder.cat_cols([t, t])}[transform]
    with pytest.raises(ValueError, match="qweight is tiled"):
        call()


def test_words_of_a_module():
    from tpaware_compile.nn import GPTQLinear

    w = _sorted_weight()
    assert words_of(GPTQLinear(w)) == "N-major" and words_of(GPTQLinear(w.with_layout(tiled=True))) == "tiled"


def test_fast_ops_on_cpu_read_tiled_words():
    """The fast ops' CPU path (the reference, without the interpreter) gives the same bits on tiled words."""
    from tpaware_compile.kernels import op  # noqa: F401  registers the fast ops

    gate = _sorted_weight(group_size=32)
    up = gate.replace(scales=gate.scales * 2)
    x = torch.randn(3, 256)
    fast, swiglu = torch.ops.tpaware.gptq_mm_fast, torch.ops.tpaware.gptq_swiglu_fast
    args = lambda w, tiled: (w.with_layout(tiled).qweight, w.qzeros, w.scales)  # noqa: E731
    assert torch.equal(fast(x, *args(gate, True), 32, 0, 0), fast(x, *args(gate, False), 32, 0, 0))
    assert torch.equal(swiglu(x, *args(gate, True), *args(up, True), 32, 0, 0),
                       swiglu(x, *args(gate, False), *args(up, False), 32, 0, 0))
