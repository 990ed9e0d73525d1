"""Load a Hugging Face-format GPTQ Llama checkpoint into a tensor-parallel ``Decoder`` on the calling rank.

Reads ``config.json`` (its ``quantization_config``, or ``quantize_config.json`` beside it) and memory-mapped
safetensors (one file or an index of shards; never pickle). GPTQ v1 checkpoints (``checkpoint_format``
"gptq", zero - 1 stored) are converted to v2 on load the way the format defines it: one wrapping int32 add
of 0x11111111 per qzeros word, which also undoes the borrow that a stored zero of -1 leaves in the next
nibble. Attention projections are dequantized to dense weights (the backend rewrites only the MLPs).
"""

import json
import os
from dataclasses import dataclass
from typing import Dict, Optional

import torch
from safetensors import safe_open

from ..gptq import GPTQWeight, dequantize
from .decoder import Decoder, DecoderConfig, Parallel

V1_TO_V2 = 0x11111111  # +1 in each of the 8 nibbles of a qzeros word


class CheckpointError(ValueError):
    pass


@dataclass(frozen=True)
class QuantConfig:
    bits: int
    group_size: int
    desc_act: bool
    sym: bool
    checkpoint_format: str  # "gptq" (v1) or "gptq_v2"


def read_quant_config(path: str) -> QuantConfig:
    cfg = _read_json(os.path.join(path, "config.json"))
    q = cfg.get("quantization_config")
    if q is None and os.path.exists(os.path.join(path, "quantize_config.json")):
        q = _read_json(os.path.join(path, "quantize_config.json"))
    if q is None:
        raise CheckpointError(f"{path}: no quantization_config in config.json and no quantize_config.json")
    if q.get("quant_method", "gptq") != "gptq":
        raise CheckpointError(f"{path}: quant_method {q.get('quant_method')!r} is not supported (gptq only)")
    if q.get("bits") != 4:
        raise CheckpointError(f"{path}: bits={q.get('bits')} is not supported (4-bit only)")
    fmt = q.get("checkpoint_format", "gptq")
    if fmt not in ("gptq", "gptq_v2"):
        raise CheckpointError(f"{path}: checkpoint_format {fmt!r} is not supported (gptq or gptq_v2)")
    return QuantConfig(4, int(q["group_size"]), bool(q.get("desc_act", False)), bool(q.get("sym", True)), fmt)


class Tensors:
    """Tensor names -> memory-mapped safetensors files, from ``model.safetensors`` or its index."""

    def __init__(self, path: str):
        index = os.path.join(path, "model.safetensors.index.json")
        if os.path.exists(index):
            files = sorted(set(_read_json(index)["weight_map"].values()))
        else:
            files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
        if not files:
            raise CheckpointError(f"{path}: no .safetensors files")
        self._where: Dict[str, object] = {}
        for f in files:
            try:
                handle = safe_open(os.path.join(path, f), framework="pt")
            except Exception as e:  # corrupt or truncated header
                raise CheckpointError(f"{os.path.join(path, f)}: cannot read safetensors file: {e}") from e
            self._where.update((k, handle) for k in handle.keys())

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def get(self, name: str) -> torch.Tensor:
        if name not in self._where:
            raise CheckpointError(f"missing tensor {name!r}")
        try:
            return self._where[name].get_tensor(name)
        except Exception as e:  # data cut short
            raise CheckpointError(f"tensor {name!r}: cannot read its data: {e}") from e


def read_gptq_linear(t: Tensors, prefix: str, qc: QuantConfig) -> GPTQWeight:
    """The GPTQ layer at ``prefix`` (e.g. ``model.layers.0.mlp.down_proj``) as a v2 GPTQWeight."""
    qzeros = t.get(f"{prefix}.qzeros")
    if qc.checkpoint_format == "gptq":
        qzeros = _add_int32_wrapping(qzeros, V1_TO_V2)
    qweight = t.get(f"{prefix}.qweight")
    k = qweight.shape[0] * 8
    g_idx = t.get(f"{prefix}.g_idx").to(torch.int32) if f"{prefix}.g_idx" in t else None
    group_size = k if qc.group_size == -1 else qc.group_size
    if g_idx is None:
        g_idx = torch.arange(k, dtype=torch.int32) // group_size
    bias = t.get(f"{prefix}.bias") if f"{prefix}.bias" in t else None
    try:
        return GPTQWeight(qweight, qzeros, t.get(f"{prefix}.scales"), g_idx, group_size, bias=bias)
    except ValueError as e:
        raise CheckpointError(f"{prefix}: {e}") from e


def _add_int32_wrapping(words: torch.Tensor, value: int) -> torch.Tensor:
    v = (words.to(torch.int64) + value) % 2**32
    return torch.where(v >= 2**31, v - 2**32, v).to(torch.int32)


def llama_config(path: str, max_seq: Optional[int] = None) -> DecoderConfig:
    c = _read_json(os.path.join(path, "config.json"))
    if c.get("model_type") != "llama":
        raise CheckpointError(f"{path}: model_type {c.get('model_type')!r} is not supported yet (llama)")
    return DecoderConfig(
        vocab=c["vocab_size"], hidden=c["hidden_size"], inter=c["intermediate_size"], layers=c["num_hidden_layers"],
        heads=c["num_attention_heads"], kv_heads=c.get("num_key_value_heads", c["num_attention_heads"]),
        family="llama", max_seq=max_seq or min(c.get("max_position_embeddings", 2048), 4096),
        rope_theta=c.get("rope_theta", (c.get("rope_parameters") or {}).get("rope_theta", 10000.0)),
        norm_eps=c.get("rms_norm_eps", 1e-6),
    )


def load_llama(path: str, par: Parallel = Parallel(), dtype: torch.dtype = torch.float16,
               batch: int = 1, max_seq: Optional[int] = None) -> Decoder:
    """Build this rank's share of the checkpoint's Llama, its MLPs in ``par.form``."""
    cfg, qc, t = llama_config(path, max_seq), read_quant_config(path), Tensors(path)
    tied = _read_json(os.path.join(path, "config.json")).get("tie_word_embeddings", False)
    embed = t.get("model.embed_tokens.weight").to(dtype)
    weights = {
        "embed": embed,
        "attn": [_attention(t, f"model.layers.{i}.self_attn", qc, dtype) for i in range(cfg.layers)],
        "mlp": [{n: read_gptq_linear(t, f"model.layers.{i}.mlp.{n}_proj", qc) for n in ("gate", "up", "down")}
                for i in range(cfg.layers)],
        "lm_head": (embed if tied else t.get("lm_head.weight").to(dtype)).t().contiguous(),
    }
    model = Decoder(cfg, par, weights, batch)
    for i, block in enumerate(model.blocks):
        block.attn_norm.weight.copy_(t.get(f"model.layers.{i}.input_layernorm.weight"))
        block.mlp_norm.weight.copy_(t.get(f"model.layers.{i}.post_attention_layernorm.weight"))
    model.norm.weight.copy_(t.get("model.norm.weight"))
    return model


def _attention(t: Tensors, prefix: str, qc: QuantConfig, dtype) -> Dict[str, torch.Tensor]:
    def dense(name: str) -> torch.Tensor:  # [in, out]
        p = f"{prefix}.{name}_proj"
        if f"{p}.qweight" in t:
            return dequantize(read_gptq_linear(t, p, qc), torch.float32).to(dtype)
        return t.get(f"{p}.weight").t().to(dtype).contiguous()

    return {"wq": dense("q"), "wk": dense("k"), "wv": dense("v"), "wo": dense("o")}


def _read_json(path: str) -> dict:
    if not os.path.exists(path):
        raise CheckpointError(f"missing {path}")
    with open(path) as f:
        return json.load(f)
