"""The GPTQ 4-bit packed format and the project's one numeric reference.

A GPTQ linear computes ``y = x @ W (+ bias)`` with ``W`` of shape ``[K, N]`` (in x out) stored as:

    qweight [K/8, N]  int32   8 nibbles per word, packed along K: row k lives in word k // 8, bits 4 * (k % 8)
    qzeros  [G, N/8]  int32   8 nibbles per word, packed along N
    scales  [G, N]    fp16 / bf16 / fp32
    g_idx   [K]       int32   quantization group of every input row (act-order: not monotone)

    W[k, n] = (q[k, n] - (z[g, n] + zero_offset)) * scales[g, n],   g = g_idx[k]

Zero points: GPTQ v2 stores the zero itself (``zero_offset = 0``). GPTQ v1 (AutoGPTQ, GPTQModel's saved
format) stores ``zero - 1``, subtracting 0x11111111 from each whole qzeros word, so a zero of 0 borrows from
the next nibble: ``checkpoint.py`` converts v1 words back exactly on load, and everything downstream sees v2.
``zero_offset = 1`` reads v1 nibble by nibble (zero = nibble + 1), as old v1 kernels did: exact only where no
zero is 0, which ``quantize(zero_offset=1)`` guarantees; it exists so kernels can serve such weights as stored.
"""

from dataclasses import dataclass, replace
from typing import Optional

import torch

from .layout import can_tile, is_tiled, packed_shape, tile, untile

BITS = 4
PACK = 32 // BITS  # nibbles per int32 word
MAXQ = (1 << BITS) - 1
SCALE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_SHIFTS = torch.arange(0, 32, BITS, dtype=torch.int32)  # [8]


def pack_rows(q: torch.Tensor) -> torch.Tensor:
    """[K, N] ints in [0, 15] -> [K/8, N] int32, packed along K."""
    _check_packable(q, 0, "q")
    q = q.to(torch.int32).reshape(q.shape[0] // PACK, PACK, q.shape[1])  # [K/8, 8, N]
    return _or_nibbles(q << _SHIFTS.to(q.device)[None, :, None], dim=1)


def unpack_rows(qweight: torch.Tensor) -> torch.Tensor:
    """[K/8, N] int32 -> [K, N] int32 in [0, 15]."""
    if qweight.dim() != 2:
        raise ValueError(f"unpack_rows: expected N-major qweight [K/8, N], got {tuple(qweight.shape)} (untile first)")
    nib = (qweight[:, None, :] >> _SHIFTS.to(qweight.device)[None, :, None]) & MAXQ  # [K/8, 8, N]
    return nib.reshape(-1, qweight.shape[1])


def pack_cols(z: torch.Tensor) -> torch.Tensor:
    """[G, N] ints in [0, 15] -> [G, N/8] int32, packed along N."""
    _check_packable(z, 1, "z")
    z = z.to(torch.int32).reshape(z.shape[0], z.shape[1] // PACK, PACK)  # [G, N/8, 8]
    return _or_nibbles(z << _SHIFTS.to(z.device), dim=2)


def unpack_cols(qzeros: torch.Tensor) -> torch.Tensor:
    """[G, N/8] int32 -> [G, N] int32 in [0, 15]."""
    nib = (qzeros[:, :, None] >> _SHIFTS.to(qzeros.device)) & MAXQ  # [G, N/8, 8]
    return nib.reshape(qzeros.shape[0], -1)


def _or_nibbles(shifted: torch.Tensor, dim: int) -> torch.Tensor:
    # Nibbles occupy disjoint bits, so their sum is their bitwise OR; int64 avoids the sign bit overflowing.
    packed = shifted.to(torch.int64).sum(dim=dim)
    return torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)


def _check_packable(t: torch.Tensor, dim: int, name: str) -> None:
    if t.dim() != 2 or t.shape[dim] % PACK:
        raise ValueError(f"{name}: expected a 2-D tensor with dim {dim} divisible by {PACK}, got {tuple(t.shape)}")
    if t.numel() and (int(t.min()) < 0 or int(t.max()) > MAXQ):
        raise ValueError(f"{name}: values must lie in [0, {MAXQ}], got [{int(t.min())}, {int(t.max())}]")


@dataclass(frozen=True)
class GPTQWeight:
    """One GPTQ linear's tensors. ``g_idx`` may be None when groups are contiguous runs of ``group_size``
    rows, the first one starting ``group_offset`` rows into group 0 (a shard cut inside a group). With
    contiguous groups qweight may also be tiled (layout.py: what the Hopper kernels read fastest)."""

    qweight: torch.Tensor  # [K/8, N] int32, or tiled [N/64, K/128, 64, 16] (g_idx None only)
    qzeros: torch.Tensor  # [G, N/8] int32
    scales: torch.Tensor  # [G, N]
    g_idx: Optional[torch.Tensor]  # [K] int32, or None for contiguous groups
    group_size: int  # rows per group; K for per-channel
    zero_offset: int = 0  # 1 for GPTQ v1 checkpoints (zero - 1 stored), 0 for v2
    group_offset: int = 0  # only with g_idx None: rows of group 0 that precede row 0
    bias: Optional[torch.Tensor] = None  # [N]

    def __post_init__(self):
        validate(self)

    @property
    def in_features(self) -> int:
        return packed_shape(self.qweight)[0] * PACK

    @property
    def out_features(self) -> int:
        return packed_shape(self.qweight)[1]

    @property
    def tiled(self) -> bool:
        return is_tiled(self.qweight)

    @property
    def can_tile(self) -> bool:
        return self.g_idx is None and self.group_offset == 0 and can_tile(self.in_features, self.out_features)

    @property
    def num_groups(self) -> int:
        return self.scales.shape[0]

    def group_index(self) -> torch.Tensor:
        """[K] int32: every row's group, whether stored (g_idx) or implied (contiguous groups)."""
        if self.g_idx is not None:
            return self.g_idx
        return contiguous_group_index(self.in_features, self.group_size, self.group_offset, self.qweight.device)

    def replace(self, **changes) -> "GPTQWeight":
        return replace(self, **changes)

    def with_layout(self, tiled: bool) -> "GPTQWeight":
        """The same weight with its words tiled or N-major (a repack of its nibbles: the matrix is unchanged)."""
        if tiled == self.tiled:
            return self
        return self.replace(qweight=tile(self.qweight) if tiled else untile(self.qweight).contiguous())

    def nbytes(self) -> int:
        tensors = (self.qweight, self.qzeros, self.scales, self.g_idx, self.bias)
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def validate(w: GPTQWeight) -> None:
    """Raise ValueError naming the tensor and the expected shape on any inconsistency."""
    if is_tiled(w.qweight):
        _validate_tiled(w)
    else:
        _expect(w.qweight, "qweight", 2, torch.int32)
    k, n = w.in_features, w.out_features
    if n % PACK:
        raise ValueError(f"qweight: out_features N={n} must be divisible by {PACK} (qzeros pack along N)")
    if w.group_size <= 0:
        raise ValueError(f"group_size must be positive, got {w.group_size}")
    g = w.scales.shape[0] if w.scales.dim() == 2 else -1
    _expect(w.scales, "scales", 2, SCALE_DTYPES, (g, n))
    _expect(w.qzeros, "qzeros", 2, torch.int32, (g, n // PACK))
    if w.zero_offset not in (0, 1):
        raise ValueError(f"zero_offset must be 0 (GPTQ v2) or 1 (GPTQ v1), got {w.zero_offset}")
    if w.bias is not None:
        _expect(w.bias, "bias", 1, SCALE_DTYPES, (n,))
    if w.g_idx is None:
        _validate_contiguous(w, k, g)
    else:
        _validate_g_idx(w, k, g)


def _validate_tiled(w: GPTQWeight) -> None:
    _expect(w.qweight, "qweight", 4, torch.int32)
    if w.g_idx is not None:
        raise ValueError("qweight: tiled words need contiguous groups (g_idx None); sort the rows first")
    if w.group_offset:
        raise ValueError(f"qweight: tiled words need group_offset 0 (their 32-row blocks start at row 0), "
                         f"got {w.group_offset}")
    if not w.qweight.is_contiguous():
        raise ValueError("qweight: tiled words must be contiguous (the kernels read whole tiles)")


def _validate_contiguous(w: GPTQWeight, k: int, g: int) -> None:
    if not 0 <= w.group_offset < w.group_size:
        raise ValueError(f"group_offset must lie in [0, group_size={w.group_size}), got {w.group_offset}")
    need = -(-(k + w.group_offset) // w.group_size)
    if g != need:
        raise ValueError(
            f"scales: expected {need} groups for K={k}, group_size={w.group_size}, "
            f"group_offset={w.group_offset}, got shape {tuple(w.scales.shape)}"
        )


def _validate_g_idx(w: GPTQWeight, k: int, g: int) -> None:
    if w.group_offset:
        raise ValueError("group_offset applies only to contiguous groups (g_idx None)")
    _expect(w.g_idx, "g_idx", 1, (torch.int32, torch.int64), (k,))
    if k and (int(w.g_idx.min()) < 0 or int(w.g_idx.max()) >= g):
        raise ValueError(f"g_idx: values must lie in [0, {g}) (scales has {g} groups), "
                         f"got [{int(w.g_idx.min())}, {int(w.g_idx.max())}]")
    if k and int(torch.bincount(w.g_idx.long(), minlength=g).max()) > w.group_size:
        raise ValueError(f"g_idx: some group holds more than group_size={w.group_size} rows")


def _expect(t, name, ndim, dtypes, shape=None) -> None:
    dtypes = dtypes if isinstance(dtypes, tuple) else (dtypes,)
    if not isinstance(t, torch.Tensor) or t.dim() != ndim:
        got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
        of_shape = "" if shape is None else f" of shape {shape}"
        raise ValueError(f"{name}: expected a {ndim}-D tensor{of_shape}, got {got}")
    if t.dtype not in dtypes:
        raise ValueError(f"{name}: expected dtype in {[str(d) for d in dtypes]}, got {t.dtype}")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)}, got {tuple(t.shape)}")


def dequantize(w: GPTQWeight, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """[K, N] weights in ``dtype`` (default: the scales' dtype). (q - z) is a small integer, so one rounding of
    the exact fp32 product gives the same bits as a product computed in fp16 or bf16."""
    return dequantize_unchecked(w.qweight, w.qzeros, w.scales, w.group_index(), w.zero_offset, dtype)


def dequantize_unchecked(qweight, qzeros, scales, group_index, zero_offset: int = 0, dtype=None) -> torch.Tensor:
    """``dequantize`` on raw tensors that the caller vouches for (the custom op's hot path skips validation)."""
    g = group_index.long()
    q = unpack_rows(untile(qweight))  # [K, N]
    z = unpack_cols(qzeros)[g] + zero_offset  # [K, N]
    out = (q - z).to(torch.float32) * scales[g].to(torch.float32)
    return out.to(dtype or scales.dtype)


def contiguous_group_index(k: int, group_size: int, group_offset: int, device=None) -> torch.Tensor:
    """[K] int32: the group of every row when groups are contiguous runs of group_size rows."""
    return (torch.arange(k, device=device, dtype=torch.int32) + group_offset) // group_size


def reference_matmul(x: torch.Tensor, w: GPTQWeight) -> torch.Tensor:
    """The one reference: dequantize, then matmul in fp32; result in x's dtype. Bias included."""
    y = x.to(torch.float32) @ dequantize(w, torch.float32)
    if w.bias is not None:
        y = y + w.bias.to(torch.float32)
    return y.to(x.dtype)
