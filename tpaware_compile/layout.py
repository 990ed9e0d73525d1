"""The tiled layout of GPTQ's packed words: what the Hopper kernels read fastest. The one place that knows it.

GPTQ stores ``qweight [K/8, N]`` int32 N-major: row w holds packed word w (K rows 8w..8w+7) of every output
column. The tiled layout holds the same words in tiles of 64 columns by 16 words (128 rows of K), each column's
16 words contiguous::

    tiled [N/64, K/128, 64, 16]:    tiled[c, s, j, i] == qweight[16 s + i, 64 c + j]

One 128-row step of a 64-column tile is then 4 KB in one piece, and a thread of the wgmma kernels, which holds
words (BLOCK_K / 32) t + b of its columns (wgmma.word_layout), loads a column's words of a step as one 16-byte
vector. Measured on an H100 (bench/README.md, "The tiled layout"): the one-token kernel 0.91-0.99x the time on
N-major words over 16 Llama-70B / Granite-20B shapes. Words read down each column instead (qweight.t()
contiguous: 64 bytes of a column per step) took 1.11-1.27x on the larger shards, so a tile keeps 64 columns of
a step together.

The repack is a permutation of int32 words (``untile(tile(q))`` is q bit for bit). It needs K a multiple of 128
and N of 64 (``can_tile``); every kernel of ``kernels`` reads both layouts, and so does the reference (it untiles).
``GPTQWeight.with_layout`` repacks a weight; the backend's ``tpaware.tile_weights`` holds the rewritten MLPs'
weights tiled, in place of their N-major words (by default where ``pays_on``).
"""

import torch

TILE_COLS = 64  # output columns per tile
TILE_WORDS = 16  # packed words (8 rows of K each) per column of a tile


def is_tiled(qweight: torch.Tensor) -> bool:
    return qweight.dim() == 4 and tuple(qweight.shape[2:]) == (TILE_COLS, TILE_WORDS)


def packed_shape(qweight: torch.Tensor) -> tuple:
    """(K / 8, N) of qweight in either layout."""
    if is_tiled(qweight):
        return qweight.shape[1] * TILE_WORDS, qweight.shape[0] * TILE_COLS
    return tuple(qweight.shape)


def pays_on(device: torch.device) -> bool:
    """Whether the kernels read tiled words faster there: on Hopper (sm_90), where the wgmma kernels were
    measured (above). Elsewhere nothing was measured, so the backend leaves the words N-major by default."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) == (9, 0)


def can_tile(k: int, n: int) -> bool:
    return k % (8 * TILE_WORDS) == 0 and n % TILE_COLS == 0


def tile(qweight: torch.Tensor) -> torch.Tensor:
    """N-major [K/8, N] -> tiled [N/64, K/128, 64, 16] (a new tensor; the words are not changed)."""
    if qweight.dim() != 2 or not can_tile(qweight.shape[0] * 8, qweight.shape[1]):
        raise ValueError(f"tiling needs qweight [K/8, N] with K a multiple of {8 * TILE_WORDS} and N of {TILE_COLS}, "
                         f"got {tuple(qweight.shape)}")
    steps, tiles = qweight.shape[0] // TILE_WORDS, qweight.shape[1] // TILE_COLS
    return qweight.reshape(steps, TILE_WORDS, tiles, TILE_COLS).permute(2, 0, 3, 1).contiguous()


def untile(qweight: torch.Tensor) -> torch.Tensor:
    """qweight in either layout -> N-major [K/8, N] (tiled: a new tensor; N-major: qweight itself)."""
    if not is_tiled(qweight):
        return qweight
    return qweight.permute(1, 3, 0, 2).reshape(packed_shape(qweight))


def words_of(module: torch.nn.Module) -> str:
    """"tiled" when every qweight buffer of ``module`` is tiled, else "N-major" (for reports and benchmarks)."""
    qweights = [b for name, b in module.named_buffers() if name.endswith("qweight")]
    return "tiled" if qweights and all(is_tiled(q) for q in qweights) else "N-major"


def word_stride(qweight: torch.Tensor) -> int:
    """The kernels' ``stride_q``: words from one row of qweight to the next (N-major: N) or from one 64-column
    tile to the next (tiled: 64 K / 8); qweight contiguous."""
    return qweight.stride(0)
