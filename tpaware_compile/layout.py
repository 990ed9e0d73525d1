"""The tiled layout of GPTQ's packed words: what the Hopper kernels read fastest. The one place that knows it.

GPTQ stores ``qweight [K/8, N]`` int32 N-major: row w holds packed word w (nibble i: K row 8w + i) of every
output column. The tiled layout holds the same nibbles in tiles of 64 columns by 16 words (128 rows of K), each
column's 16 words of a step contiguous, and the nibbles of each 32-row block in the wgmma kernels' K order::

    tiled [N/64, K/128, 64, 16]:  nibble 4e + 2h + c of tiled[p, s, j, 4t + b] is the weight in row
                                  128 s + 32 b + 16 h + 8 c + 2 t + e, column 64 p + j        (t, b < 4; e, h, c < 2)

Why that order: wgmma's A fragment gives thread t of a quad rows {2t, 2t + 1} + {0, 8, 16, 24} of each 32-row
block, K-adjacent pairs in one register (wgmma.py). Here those 8 rows are the 8 nibbles of one word, nibbles j and
j + 4 the adjacent pair, so the kernels unpack a word straight into the fragment and the MMA's K order is x's
own: the prefill kernel's TMA reads x as it lies (with GPTQ's words x had to be rewritten in that order first,
one launch per call: wgmma_prefill.x_in_mma_order). A thread's words of a 128-row step (b = 0..3) are
contiguous: one 16-byte load per column. A 64-row step reads half of each of two 32-byte sectors (8 bytes per
thread, 16 apart), so the prefill kernel runs 128-row steps on tiled words (kernels.prefill_config; slots
8r + 2t + a for 64-row halves r cost the decode kernel 257 loop instructions per step instead of 229, not
kept). Measured on an H100 (bench/README.md, "The tiled layout"): the one-token kernel 0.91-0.99x the time on
N-major words over 16 Llama-70B / Granite-20B shapes. Words read down each column instead (qweight.t()
contiguous: 64 bytes of a column per step) took 1.11-1.27x on the larger shards, so a tile keeps 64 columns of a
step together.

The repack is a permutation of nibbles (``untile(tile(q))`` is q bit for bit). It needs K a multiple of 128 and
N of 64 (``can_tile``), and a weight whose first group starts at row 0 (group offset 0: the kernels' 32-row
blocks are the layout's); every kernel of ``kernels`` reads both layouts (the Triton ones through word_rows /
word_offsets), and so does the reference (it untiles). ``GPTQWeight.with_layout`` repacks a weight; the
backend's ``tpaware.tile_weights`` holds the rewritten MLPs' weights tiled, in place of their N-major words (by
default where ``pays_on``).
"""

import torch

TILE_COLS = 64  # output columns per tile
TILE_WORDS = 16  # packed words (8 rows of K each) per column of a tile


def is_tiled(qweight: torch.Tensor) -> bool:
    shape = qweight.shape  # read once: it runs several times per kernel call (host time: bench/probe_host_python.py)
    return len(shape) == 4 and shape[2] == TILE_COLS and shape[3] == TILE_WORDS


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
    """N-major [K/8, N] -> tiled [N/64, K/128, 64, 16] (a new tensor; the same nibbles, moved)."""
    if qweight.dim() != 2 or not can_tile(qweight.shape[0] * 8, qweight.shape[1]):
        raise ValueError(f"tiling needs qweight [K/8, N] with K a multiple of {8 * TILE_WORDS} and N of {TILE_COLS}, "
                         f"got {tuple(qweight.shape)}")
    words, n = qweight.shape
    mma = _to_mma_order(qweight.reshape(words // 4, 4, n))  # [K/32 blocks, 4 threads, N]
    # [step, b, t, tile, column] -> [tile, step, column, 4 t + b]
    mma = mma.reshape(words // TILE_WORDS, 4, 4, n // TILE_COLS, TILE_COLS).permute(3, 0, 4, 2, 1)
    return mma.reshape(n // TILE_COLS, words // TILE_WORDS, TILE_COLS, TILE_WORDS).contiguous()


def untile(qweight: torch.Tensor) -> torch.Tensor:
    """qweight in either layout -> N-major [K/8, N] (tiled: a new tensor; N-major: qweight itself)."""
    if not is_tiled(qweight):
        return qweight
    words, n = packed_shape(qweight)
    mma = qweight.reshape(n // TILE_COLS, words // TILE_WORDS, TILE_COLS, 4, 4).permute(1, 4, 3, 0, 2)
    return _from_mma_order(mma.reshape(words // 4, 4, n)).reshape(words, n)


# nibble i of GPTQ word u of a 32-row block (row 8u + i) -> nibble j of word t in MMA order (nibble 4e + 2h + c of
# word t: row 16h + 8c + 2t + e), with u = 2h + c, i = 2t + e, j = 4e + u
_MMA_NIBBLES = [((u, 2 * t + e), (t, 4 * e + u)) for t in range(4) for e in range(2) for u in range(4)]


def _to_mma_order(blocks: torch.Tensor) -> torch.Tensor:
    """[B, 4, N] GPTQ words of 32-row blocks -> [B, 4, N] words in MMA order (_MMA_NIBBLES)."""
    return _move_nibbles(blocks, _MMA_NIBBLES)


def _from_mma_order(blocks: torch.Tensor) -> torch.Tensor:
    """The inverse of _to_mma_order."""
    return _move_nibbles(blocks, [(dst, src) for src, dst in _MMA_NIBBLES])


def _move_nibbles(blocks: torch.Tensor, moves) -> torch.Tensor:
    """[B, 4, N] words -> new [B, 4, N] words: nibble i of word u goes to nibble j of word t for each ((u, i), (t, j))
    of ``moves`` (all 32 nibbles of a block, once each)."""
    out = torch.zeros_like(blocks)
    for (u, i), (t, j) in moves:
        out[:, t] |= ((blocks[:, u] >> 4 * i) & 0xF) << 4 * j
    return out


def words_of(module: torch.nn.Module) -> str:
    """"tiled" when every qweight buffer of ``module`` is tiled, else "N-major" (for reports and benchmarks)."""
    qweights = [b for name, b in module.named_buffers() if name.endswith("qweight")]
    return "tiled" if qweights and all(is_tiled(q) for q in qweights) else "N-major"


def word_stride(qweight: torch.Tensor) -> int:
    """The kernels' ``stride_q``: words from one row of qweight to the next (N-major: N) or from one 64-column
    tile to the next (tiled: 64 K / 8); qweight contiguous."""
    return qweight.stride(0)
