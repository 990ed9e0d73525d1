"""The tiled layout of the packed words (layout.py): a lossless permutation, checked index by index."""

import pytest
import torch

from tpaware_compile.layout import can_tile, is_tiled, packed_shape, tile, untile, word_stride


def test_tile_places_each_word_and_untile_restores_it():
    """tiled[c, s, j, i] == qweight[16 s + i, 64 c + j], and untile gives qweight back bit for bit."""
    q = torch.randint(-2**31, 2**31 - 1, (48, 192), dtype=torch.int32)  # K = 384, N = 192
    t = tile(q)
    assert tuple(t.shape) == (3, 3, 64, 16) and is_tiled(t) and not is_tiled(q) and t.is_contiguous()
    for c, s, j, i in ((0, 0, 0, 0), (2, 1, 63, 15), (1, 2, 5, 9), (2, 2, 17, 3)):
        assert t[c, s, j, i] == q[16 * s + i, 64 * c + j]
    assert torch.equal(untile(t), q) and untile(q) is q
    assert packed_shape(t) == packed_shape(q) == (48, 192)
    assert word_stride(t) == 3 * 64 * 16 and word_stride(q) == 192  # words per 64-column tile / per row


@pytest.mark.parametrize("shape", [(8, 64), (16, 96), (24, 64), (16, 64, 1)])
def test_tile_refuses_shapes_it_cannot_hold(shape):
    """K must be a whole number of 128-row steps and N of 64-column tiles, qweight [K/8, N]."""
    assert len(shape) == 3 or not can_tile(shape[0] * 8, shape[1])
    with pytest.raises(ValueError, match="tiling needs"):
        tile(torch.zeros(shape, dtype=torch.int32))


def test_kernel_offsets_match_the_layout():
    """common.word_offsets (the kernels' address of word w of column n) lands on the word tile() put there."""
    from tpaware_compile.kernels.common import word_offsets
    q = torch.randint(-2**31, 2**31 - 1, (32, 128), dtype=torch.int32)
    t = tile(q).reshape(-1)
    words = torch.arange(32)[:, None]
    cols = torch.arange(128)[None, :]
    off = word_offsets.fn(words, cols, word_stride(tile(q)), True)  # the jit function's Python body
    assert torch.equal(t[off], q)
    assert torch.equal(q.reshape(-1)[word_offsets.fn(words, cols, 128, False)], q)
