"""Read one GPTQ linear layer from a safetensors checkpoint (GPTQModel / AutoGPTQ layout).

A layer ``prefix`` stores ``prefix.qweight [K/8, N]``, ``prefix.qzeros [G, N/8]``, ``prefix.scales [G, N]``,
optionally ``prefix.g_idx [K]`` (act-order) and ``prefix.bias [N]``; the quantization config (the
``quantize_config.json`` file, or ``config.json``'s ``quantization_config``) says bits, group size and the
zero-point convention:

    checkpoint_format "gptq"     (v1): every qzeros WORD holds zeros - 0x11111111, subtracted as one 32-bit
                                       integer, so a zero point of 0 borrows from the next nibble. Reading
                                       it back nibble by nibble (nibble + 1) is wrong there; adding
                                       0x11111111 to the word, as GPTQModel does on load, is exact.
    checkpoint_format "gptq_v2"  (v2): qzeros hold the zero points themselves.

Both are returned as v2 (``zero_offset=0``), so the rest of the project sees one convention.
"""

import json
import os
from typing import Any, Mapping, Optional

import torch

from .gptq import BITS, GPTQWeight

_V1_ZERO_BIAS = 0x11111111  # a 1 in every nibble of an int32 word
_FORMATS = ("gptq", "gptq_v2")


def load_quant_config(model_dir: str) -> dict:
    """The quantization config of a checkpoint directory: quantize_config.json, else config.json's."""
    path = os.path.join(model_dir, "quantize_config.json")
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    with open(os.path.join(model_dir, "config.json")) as f:
        cfg = json.load(f)
    if "quantization_config" not in cfg:
        raise ValueError(f"{model_dir}: neither quantize_config.json nor config.json's quantization_config found")
    return cfg["quantization_config"]


def checkpoint_format(quant_config: Mapping[str, Any]) -> str:
    """'gptq' (v1 zeros) or 'gptq_v2'. Older configs only say ``format``, or nothing (AutoGPTQ: v1)."""
    fmt = quant_config.get("checkpoint_format") or quant_config.get("format") or "gptq"
    if fmt not in _FORMATS:
        raise ValueError(f"quant_config: checkpoint_format {fmt!r} is not one of {_FORMATS}")
    return fmt


def v1_to_v2_qzeros(qzeros: torch.Tensor) -> torch.Tensor:
    """[G, N/8] int32: undo v1's word-wide ``- 0x11111111`` with a word-wide add, wrapping like int32."""
    words = (qzeros.to(torch.int64) + _V1_ZERO_BIAS) & 0xFFFFFFFF
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def read_gptq_linear(tensors: Any, prefix: str, quant_config: Mapping[str, Any]) -> GPTQWeight:
    """The GPTQWeight of layer ``prefix``. ``tensors`` is a dict of tensors or a ``safetensors.safe_open``
    handle; ``quant_config`` is the parsed quantization config (see load_quant_config)."""
    check_quant_config(quant_config)
    qweight = _tensor(tensors, f"{prefix}.qweight")
    qzeros = _tensor(tensors, f"{prefix}.qzeros")
    if checkpoint_format(quant_config) == "gptq":
        qzeros = v1_to_v2_qzeros(qzeros)
    group_size = int(quant_config["group_size"])
    if group_size == -1:  # per-channel: one group of all K rows
        group_size = qweight.shape[0] * (32 // BITS)
    return GPTQWeight(
        qweight=qweight,
        qzeros=qzeros,
        scales=_tensor(tensors, f"{prefix}.scales"),
        g_idx=_optional(tensors, f"{prefix}.g_idx"),
        group_size=group_size,
        zero_offset=0,
        bias=_optional(tensors, f"{prefix}.bias"),
    )


def check_quant_config(quant_config: Mapping[str, Any]) -> None:
    method = quant_config.get("quant_method", "gptq")
    if method != "gptq":
        raise ValueError(f"quant_config: quant_method {method!r} is not 'gptq'")
    if int(quant_config.get("bits", 0)) != BITS:
        raise ValueError(f"quant_config: bits={quant_config.get('bits')} unsupported, only {BITS}-bit GPTQ")
    if "group_size" not in quant_config:
        raise ValueError("quant_config: group_size missing")


def _tensor(tensors: Any, name: str) -> torch.Tensor:
    if name not in tensors.keys():
        raise KeyError(f"{name}: not in the checkpoint")
    return tensors.get_tensor(name) if hasattr(tensors, "get_tensor") else tensors[name]


def _optional(tensors: Any, name: str) -> Optional[torch.Tensor]:
    return _tensor(tensors, name) if name in tensors.keys() else None
