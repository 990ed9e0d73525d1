"""Load a Hugging Face-format quantized checkpoint (Llama or GPTBigCode; GPTQ, or llm-compressor's
compressed-tensors pack-quantized) into a tensor-parallel ``Decoder``.

Reads ``config.json`` (its ``quantization_config``, or ``quantize_config.json`` beside it) and memory-mapped
safetensors (one file or an index of shards; never pickle). Layers are read by ``checkpoint.py`` (GPTQ, v1
zeros converted to v2) or ``compressed.py`` (pack-quantized). Attention projections are dequantized to dense weights: the backend rewrites only the MLPs.
"""

import json
import os
from typing import Dict, Optional, Tuple

import torch
from safetensors import safe_open

from ..checkpoint import check_quant_config, load_quant_config, read_gptq_linear
from ..compressed import CompressedScheme, compressed_scheme, is_compressed_config, read_compressed_linear
from ..gptq import GPTQWeight, dequantize
from .decoder import Decoder, DecoderConfig, Parallel

class CheckpointError(ValueError):
    pass


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

    def keys(self):
        return self._where.keys()

    def get_tensor(self, name: str) -> torch.Tensor:
        return self.get(name)

    def get(self, name: str) -> torch.Tensor:
        if name not in self._where:
            raise CheckpointError(f"missing tensor {name!r}")
        try:
            return self._where[name].get_tensor(name)
        except Exception as e:  # data cut short
            raise CheckpointError(f"tensor {name!r}: cannot read its data: {e}") from e


def read_linear(t: "Tensors", prefix: str, qc) -> GPTQWeight:
    """The quantized layer at ``prefix`` as a v2 GPTQWeight, errors naming the layer."""
    try:
        if isinstance(qc, CompressedScheme):
            return read_compressed_linear(t, prefix, qc)
        return read_gptq_linear(t, prefix, qc)
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"{prefix}: {e.args[0] if e.args else e}") from e


def is_quantized(t: "Tensors", prefix: str) -> bool:
    return f"{prefix}.qweight" in t or f"{prefix}.weight_packed" in t


def read_quant_config(path: str):
    """GPTQ: the quantization config dict; llm-compressor pack-quantized: its CompressedScheme."""
    try:
        qc = load_quant_config(path)
        if is_compressed_config(qc):
            return compressed_scheme(qc)
        check_quant_config(qc)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: {e}") from e
    return qc


def decoder_config(path: str, max_seq: Optional[int] = None) -> DecoderConfig:
    c = _read_json(os.path.join(path, "config.json"))
    kind = c.get("model_type")
    if kind == "llama":
        return DecoderConfig(
            vocab=c["vocab_size"], hidden=c["hidden_size"], inter=c["intermediate_size"],
            layers=c["num_hidden_layers"], heads=c["num_attention_heads"],
            kv_heads=c.get("num_key_value_heads", c["num_attention_heads"]), family="llama",
            max_seq=max_seq or min(c.get("max_position_embeddings", 2048), 4096),
            rope_theta=c.get("rope_theta", (c.get("rope_parameters") or {}).get("rope_theta", 10000.0)),
            norm_eps=c.get("rms_norm_eps", 1e-6))
    if kind == "gpt_bigcode":
        return DecoderConfig(
            vocab=c["vocab_size"], hidden=c["n_embd"], inter=c.get("n_inner") or 4 * c["n_embd"],
            layers=c["n_layer"], heads=c["n_head"], kv_heads=1 if c.get("multi_query", True) else c["n_head"],
            family="gptbigcode", max_seq=max_seq or c.get("n_positions", 2048),
            norm_eps=c.get("layer_norm_epsilon", 1e-5))
    raise CheckpointError(f"{path}: model_type {kind!r} is not supported (llama, gpt_bigcode)")


def load_checkpoint(path: str, par: Parallel = Parallel(), dtype: torch.dtype = torch.float16,
                    batch: int = 1, max_seq: Optional[int] = None) -> Decoder:
    """Build this rank's share of the checkpoint's model, its MLPs in ``par.form``."""
    cfg, qc, t = decoder_config(path, max_seq), read_quant_config(path), Tensors(path)
    tied = _read_json(os.path.join(path, "config.json")).get("tie_word_embeddings", cfg.family == "gptbigcode")
    names = _NAMES[cfg.family]
    embed = t.get(names["embed"]).to(dtype)
    weights = {
        "embed": embed,
        "attn": [_attention(t, names["layer"].format(i), cfg, qc, dtype) for i in range(cfg.layers)],
        "mlp": [{ours: read_linear(t, names["layer"].format(i) + theirs, qc)
                 for ours, theirs in names["mlp"].items()} for i in range(cfg.layers)],
        "lm_head": (embed if tied else t.get("lm_head.weight").to(dtype)).t().contiguous(),
    }
    if cfg.family == "gptbigcode":
        weights["pos_embed"] = t.get("transformer.wpe.weight")[: cfg.max_seq].to(dtype)
    model = Decoder(cfg, par, weights, batch)
    for i, block in enumerate(model.blocks):
        _load_norm(t, names["layer"].format(i) + names["attn_norm"], block.attn_norm)
        _load_norm(t, names["layer"].format(i) + names["mlp_norm"], block.mlp_norm)
    _load_norm(t, names["final_norm"], model.norm)
    return model


_NAMES = {
    "llama": dict(embed="model.embed_tokens.weight", layer="model.layers.{}.", final_norm="model.norm",
                  attn_norm="input_layernorm", mlp_norm="post_attention_layernorm",
                  mlp={"gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}),
    "gptbigcode": dict(embed="transformer.wte.weight", layer="transformer.h.{}.", final_norm="transformer.ln_f",
                       attn_norm="ln_1", mlp_norm="ln_2", mlp={"fc": "mlp.c_fc", "proj": "mlp.c_proj"}),
}


def _load_norm(t: Tensors, prefix: str, norm) -> None:
    norm.weight.copy_(t.get(f"{prefix}.weight"))
    if getattr(norm, "bias", None) is not None:
        norm.bias.copy_(t.get(f"{prefix}.bias"))


def _dense(t: Tensors, prefix: str, qc, dtype) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """[in, out] weight (dequantized when quantized) and bias of the linear at ``prefix``."""
    bias = t.get(f"{prefix}.bias").to(dtype) if f"{prefix}.bias" in t else None
    if is_quantized(t, prefix):
        return dequantize(read_linear(t, prefix, qc), torch.float32).to(dtype), bias
    return t.get(f"{prefix}.weight").t().to(dtype).contiguous(), bias


def _attention(t: Tensors, prefix: str, cfg: DecoderConfig, qc, dtype) -> Dict[str, torch.Tensor]:
    if cfg.family == "llama":
        return {f"w{n}": _dense(t, f"{prefix}self_attn.{n}_proj", qc, dtype)[0] for n in "qkvo"}
    qkv, qkv_bias = _dense(t, f"{prefix}attn.c_attn", qc, dtype)  # fused [D, D + 2 * kv_heads * hd]
    split = [cfg.hidden, cfg.kv_heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim]
    wo, bo = _dense(t, f"{prefix}attn.c_proj", qc, dtype)
    w = dict(zip(("wq", "wk", "wv"), (c.contiguous() for c in qkv.split(split, dim=1))), wo=wo, bo=bo)
    w.update(zip(("bq", "bk", "bv"), qkv_bias.split(split)))
    return w


def _read_json(path: str) -> dict:
    if not os.path.exists(path):
        raise CheckpointError(f"missing {path}")
    with open(path) as f:
        return json.load(f)
