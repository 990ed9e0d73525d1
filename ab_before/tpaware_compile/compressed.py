"""Read llm-compressor checkpoints: compressed-tensors' ``pack-quantized`` format, W4A16 group quantization.

llm-compressor (0.13.0, GPTQModifier with ``actorder="group"``) stores, for a linear whose HF weight is ``[N, K]``
(out x in), these tensors; the facts below come from compressed-tensors 0.18.0 (the version llm-compressor
0.13.0 pins), its ``pack_to_int32`` / ``unpack_from_int32`` and its ``dequantize``:

    weight_packed      [N, K/8]  int32   packed along K (the HF weight's last dim): element k of a row sits in word
                                         k // 8 at bits 4 * (k % 8); each nibble holds the signed value q + 8
    weight_scale       [N, G]    the model dtype (fp16 / bf16)
    weight_zero_point  [N/8, G]  int32   asymmetric only; packed along N (dim 0) the same way, nibble = zp + 8
    weight_g_idx       [K]       int32   act-order "group" only: the group of every input column
    weight_shape       [2]       int64   (N, K)

    W[n, k] = (q[n, k] - zp[n, g]) * scale[n, g],   g = g_idx[k],   q, zp signed in [-8, 7]; zp = 0 when symmetric

The library computes that in the scales' dtype: ``(q - zp)`` is a small exact integer there, so one rounding of the
product, the same rounding as ``gptq.dequantize``.

Mapping to GPTQWeight (``[K, N]``, v2 zeros) is lossless and needs no repacking: ``qweight`` packs K at the same
bits in the same order, so it is ``weight_packed`` transposed; ``qzeros`` packs N the same way, so it is
``weight_zero_point`` transposed. The +8 stored in both nibbles cancels in ``q - zp``, so the stored nibbles are
used as they are with ``zero_offset=0``; a symmetric layer stores no zero point and becomes a stored zero of 8.

g_idx: the library does not index scales by g_idx. It sorts the columns by g_idx (``argsort``) and gives the j-th run
of ``group_size`` sorted columns the j-th scale column. That is ``scale[:, g_idx[k]]`` exactly when every group holds
``group_size`` columns, which GPTQ act-order always writes; a g_idx that breaks it is rejected rather than guessed. A
g_idx holding -1 means "column order" to the library (its placeholder before calibration): contiguous groups.
"""

from dataclasses import dataclass
from typing import Any, Mapping, Optional, Union

import torch

from .gptq import BITS, PACK, GPTQWeight

METHOD = "compressed-tensors"
FORMAT = "pack-quantized"
_GROUPED_ACTORDER = ("group", "dynamic")  # these store weight_g_idx; "weight"/"static" keep groups contiguous
_SYMMETRIC_ZERO_WORD = -0x77777778  # 0x88888888 as int32: a stored zero of 8 (signed 0) in every nibble


class CompressedFormatError(ValueError):
    """A compressed-tensors checkpoint (or config) this reader does not support, or a damaged one."""


@dataclass(frozen=True)
class CompressedScheme:
    """What the reader needs from a ``quantization_config``: every quantized linear shares it."""

    bits: int
    group_size: int  # -1: per-channel (one group of all K columns)
    actorder: Optional[str]  # "group" stores weight_g_idx; None / "weight" do not
    symmetric: bool


def is_compressed_config(config: Mapping[str, Any]) -> bool:
    """True for a compressed-tensors checkpoint. ``config`` is config.json's dict or its quantization_config."""
    quant = config.get("quantization_config", config)
    return isinstance(quant, Mapping) and quant.get("quant_method") == METHOD


def compressed_scheme(quant_config: Mapping[str, Any]) -> CompressedScheme:
    """The scheme of a compressed-tensors ``quantization_config``; CompressedFormatError for anything but
    pack-quantized, compressed, 4-bit int weight-only group (or channel) quantization without extras."""
    q = quant_config.get("quantization_config", quant_config)
    _check_top_level(q)
    schemes = [_group_scheme(name, group, q.get("format")) for name, group in q["config_groups"].items()]
    if len(set(schemes)) != 1:
        raise CompressedFormatError(f"quantization_config: config groups with different weight schemes {schemes} "
                                    "are not supported (one scheme for every quantized linear)")
    return schemes[0]


def _check_top_level(q: Mapping[str, Any]) -> None:
    if q.get("quant_method") != METHOD:
        raise CompressedFormatError(f"quantization_config: quant_method {q.get('quant_method')!r} is not {METHOD!r}")
    status = q.get("quantization_status", "compressed")
    if status != "compressed":  # "frozen" etc.: dense fake-quantized weights, nothing packed to read
        raise CompressedFormatError(f"quantization_config: quantization_status {status!r} is not 'compressed'")
    for extra in ("sparsity_config", "transform_config", "kv_cache_scheme"):
        if q.get(extra):  # each changes the math beyond W = (q - zp) * s
            raise CompressedFormatError(f"quantization_config: {extra} is not supported, got {q[extra]!r}")
    if not q.get("config_groups"):
        raise CompressedFormatError("quantization_config: config_groups missing or empty")


def _group_scheme(name: str, group: Mapping[str, Any], default_format: Optional[str]) -> CompressedScheme:
    where = f"quantization_config.config_groups.{name}"
    fmt = group.get("format") or default_format
    if fmt != FORMAT:
        raise CompressedFormatError(f"{where}: format {fmt!r} is not supported (only {FORMAT!r})")
    for act in ("input_activations", "output_activations"):
        if group.get(act):  # W4A16 only: quantized activations change the forward, not just the weights
            raise CompressedFormatError(f"{where}: {act} quantization is not supported (weight-only W4A16)")
    w = group.get("weights") or {}
    return _weight_scheme(where + ".weights", w)


def _weight_scheme(where: str, w: Mapping[str, Any]) -> CompressedScheme:
    if w.get("num_bits") != BITS or w.get("type", "int") != "int":
        raise CompressedFormatError(f"{where}: {w.get('num_bits')}-bit {w.get('type')!r} weights are not supported "
                                    f"(only {BITS}-bit int)")
    if w.get("dynamic"):
        raise CompressedFormatError(f"{where}: dynamic weight quantization is not supported")
    strategy = w.get("strategy")
    if strategy == "group":
        group_size = int(w.get("group_size") or 0)
        if group_size <= 0:
            raise CompressedFormatError(f"{where}: group strategy needs a positive group_size, got {group_size}")
    elif strategy == "channel":
        group_size = -1
    else:
        raise CompressedFormatError(f"{where}: strategy {strategy!r} is not supported (group or channel)")
    actorder = w.get("actorder")
    if actorder not in (None, "group", "dynamic", "weight", "static"):
        raise CompressedFormatError(f"{where}: actorder {actorder!r} is not supported")
    return CompressedScheme(BITS, group_size, actorder, bool(w.get("symmetric", True)))


def read_compressed_linear(tensors: Any, prefix: str,
                           quant_config: Union[Mapping[str, Any], CompressedScheme]) -> GPTQWeight:
    """The pack-quantized layer ``prefix`` (e.g. ``model.layers.0.mlp.down_proj``) as a v2 GPTQWeight, bit for bit.
    ``tensors``: a dict, a ``safe_open`` handle or ``models.loader.Tensors``; ``quant_config``: the checkpoint's
    quantization_config (or its CompressedScheme, parsed once)."""
    scheme = quant_config if isinstance(quant_config, CompressedScheme) else compressed_scheme(quant_config)
    n, k = _weight_shape(tensors, prefix)
    packed = _get(tensors, f"{prefix}.weight_packed")  # [N, K/8]
    scale = _get(tensors, f"{prefix}.weight_scale")  # [N, G]
    _expect_shape(prefix, "weight_packed", packed, (n, k // PACK), torch.int32)
    _expect_shape(prefix, "weight_scale", scale, (n, scale.shape[-1]), None)
    groups = scale.shape[1]
    try:
        return GPTQWeight(
            qweight=packed.t().contiguous(),  # [K/8, N]: same nibble order along K
            qzeros=_qzeros(tensors, prefix, scheme, n, groups),  # [G, N/8]
            scales=scale.t().contiguous(),  # [G, N]
            g_idx=_g_idx(tensors, prefix, scheme, k, groups),
            group_size=k if scheme.group_size == -1 else scheme.group_size,
            zero_offset=0,  # q and zp both carry +8: it cancels
            bias=_get(tensors, f"{prefix}.bias") if _has(tensors, f"{prefix}.bias") else None,
        )
    except ValueError as e:
        raise CompressedFormatError(f"{prefix}: {e}") from e


def _weight_shape(tensors: Any, prefix: str):
    shape = _get(tensors, f"{prefix}.weight_shape").tolist()  # (N, K) of the HF weight
    if len(shape) != 2:
        raise CompressedFormatError(f"{prefix}.weight_shape: expected (out, in), got {shape}")
    n, k = (int(s) for s in shape)
    if k % PACK or n % PACK:  # GPTQWeight packs K in qweight and N in qzeros, 8 per word, no padding
        raise CompressedFormatError(f"{prefix}: weight shape {(n, k)} needs both dims divisible by {PACK}")
    return n, k


def _qzeros(tensors: Any, prefix: str, scheme: CompressedScheme, n: int, groups: int) -> torch.Tensor:
    """[G, N/8] int32 stored zero nibbles (zp + 8)."""
    if scheme.symmetric:
        if _has(tensors, f"{prefix}.weight_zero_point"):  # the library would ignore it; a reader must not guess
            raise CompressedFormatError(f"{prefix}: symmetric scheme but the layer stores weight_zero_point")
        return torch.full((groups, n // PACK), _SYMMETRIC_ZERO_WORD, dtype=torch.int32)
    zp = _get(tensors, f"{prefix}.weight_zero_point")  # [N/8, G]
    _expect_shape(prefix, "weight_zero_point", zp, (n // PACK, groups), torch.int32)
    return zp.t().contiguous()


def _g_idx(tensors: Any, prefix: str, scheme: CompressedScheme, k: int, groups: int) -> Optional[torch.Tensor]:
    name = f"{prefix}.weight_g_idx"
    if not _has(tensors, name):
        if scheme.actorder in _GROUPED_ACTORDER:
            raise CompressedFormatError(f"{name}: missing, but actorder={scheme.actorder!r} stores it")
        return None
    g_idx = _get(tensors, name)
    _expect_shape(prefix, "weight_g_idx", g_idx, (k,), (torch.int32, torch.int64))
    if bool((g_idx == -1).any()):  # the library's "not calibrated" placeholder: it uses column order
        return None
    _check_full_groups(name, g_idx, groups, scheme.group_size)
    return g_idx.to(torch.int32)


def _check_full_groups(name: str, g_idx: torch.Tensor, groups: int, group_size: int) -> None:
    # The library assigns groups by position after sorting; that equals g_idx's own meaning only for full groups.
    if group_size == -1:
        return
    if int(g_idx.min()) < 0 or int(g_idx.max()) >= groups:
        raise CompressedFormatError(f"{name}: values must lie in [0, {groups}), got "
                                    f"[{int(g_idx.min())}, {int(g_idx.max())}]")
    counts = torch.bincount(g_idx.long(), minlength=groups)
    if not bool((counts == group_size).all()):
        raise CompressedFormatError(f"{name}: every group must hold group_size={group_size} columns, got counts "
                                    f"{sorted(set(counts.tolist()))}")


def _expect_shape(prefix: str, what: str, t: torch.Tensor, shape, dtypes) -> None:
    dtypes = (dtypes,) if isinstance(dtypes, torch.dtype) else dtypes
    if tuple(t.shape) != tuple(shape) or (dtypes and t.dtype not in dtypes):
        raise CompressedFormatError(f"{prefix}.{what}: expected shape {tuple(shape)}"
                                    f"{'' if not dtypes else ' ' + '/'.join(str(d) for d in dtypes)}, "
                                    f"got {tuple(t.shape)} {t.dtype}")


def _has(tensors: Any, name: str) -> bool:
    # safe_open handles answer keys() but not `in`; the loader's Tensors answers `in` but has no keys()
    return name in tensors.keys() if hasattr(tensors, "keys") else name in tensors


def _get(tensors: Any, name: str) -> torch.Tensor:
    if not _has(tensors, name):
        raise CompressedFormatError(f"{name}: not in the checkpoint")
    if hasattr(tensors, "get_tensor"):
        return tensors.get_tensor(name)
    return tensors[name] if isinstance(tensors, Mapping) else tensors.get(name)
