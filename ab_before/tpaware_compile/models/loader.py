"""Load a Hugging Face-format quantized checkpoint (Llama or GPTBigCode; GPTQ, or llm-compressor's
compressed-tensors pack-quantized) into a tensor-parallel ``Decoder``.

Reads ``config.json`` (its ``quantization_config``, or ``quantize_config.json`` beside it) and memory-mapped
safetensors (one file or an index of shards; never pickle). Layers are read by ``checkpoint.py`` (GPTQ, v1
zeros converted to v2) or ``compressed.py`` (pack-quantized). Attention projections are dequantized to dense
weights: the backend rewrites only the MLPs.

Each rank reads only its slices of the MLP weights where the form allows (``safe_open(...).get_slice``), and builds
the same MLP, bit for bit, as ``TPMLP.from_full`` builds from the whole layers:

    layer                          forms N, L, U                      form T
    gate, up, c_fc (columns)       the rank's columns                 whole: P2 scatters a rank's columns
    down, c_proj (rows)            N: whole (sorted by P2 first);     whole
                                   L, U: the rank's rows of the
                                   packed weight, the rest whole
"""

import json
import os
from contextlib import contextmanager
from typing import Dict, List, Optional, Tuple

import torch
from safetensors import safe_open

from ..checkpoint import check_quant_config, load_quant_config, read_gptq_linear
from ..compressed import CompressedScheme, compressed_scheme, is_compressed_config, read_compressed_linear
from ..gptq import PACK, GPTQWeight, dequantize
from ..nn import TPMLP
from ..reorder import _shard_range, permute_cols, shard_cols, shard_rows, sort_rows
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
        with self._reading(name) as handle:
            return handle.get_tensor(name)

    def read(self, name: str, index: tuple) -> torch.Tensor:
        """``tensor[index]`` (slices only), reading just that part of the file."""
        with self._reading(name) as handle:
            # get_slice may return a view into the memory map: copy it out, so the model holds no mapped pages
            return handle.get_slice(name)[index].clone(memory_format=torch.contiguous_format)

    def shape(self, name: str) -> List[int]:
        """The stored shape, from the file's header."""
        with self._reading(name) as handle:
            return list(handle.get_slice(name).get_shape())

    def shape_only(self, name: str) -> torch.Tensor:
        """A meta tensor with the stored shape and dtype: it holds no data, and nothing of the tensor is read."""
        dtype = self.read(name, (slice(0, 0),)).dtype  # an empty slice: the dtype, in torch's terms
        return torch.empty(self.shape(name), dtype=dtype, device="meta")

    @contextmanager
    def _reading(self, name: str):
        if name not in self._where:
            raise CheckpointError(f"missing tensor {name!r}")
        try:
            yield self._where[name]
        except Exception as e:  # data cut short
            raise CheckpointError(f"tensor {name!r}: cannot read its data: {e}") from e


def read_linear(t, prefix: str, qc) -> GPTQWeight:
    """The quantized layer at ``prefix`` as a v2 GPTQWeight, errors naming the layer. ``t``: Tensors or a view."""
    with _naming(prefix):
        return _read(t, prefix, qc)


def _read(t, prefix: str, qc) -> GPTQWeight:
    if isinstance(qc, CompressedScheme):
        return read_compressed_linear(t, prefix, qc)
    return read_gptq_linear(t, prefix, qc)


@contextmanager
def _naming(prefix: str):
    try:
        yield
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"{prefix}: {e.args[0] if e.args else e}") from e


# ---- one rank's slices of a layer ----

class ColumnBlock:
    """A column-parallel layer as one rank holds it, for read_gptq_linear / read_compressed_linear: a linear of its own
    whose output columns are [start, start + length) of the stored one. Tensors along N are read with get_slice, just
    the block (qzeros / weight_zero_point: the words that pack it); g_idx runs along K and is read whole."""

    # tensor -> (its dim along N, output columns per element: PACK where nibbles pack N)
    ALONG_N = {"qweight": (1, 1), "qzeros": (1, PACK), "scales": (1, 1), "bias": (0, 1),  # GPTQ, [K/8, N] ...
               "weight_packed": (0, 1), "weight_zero_point": (0, PACK), "weight_scale": (0, 1)}  # compressed, [N, ...]

    def __init__(self, t: Tensors, prefix: str, qc, rank: int, world: int):
        self.t = t
        self.n = _out_features(t, prefix, qc)
        self.start, self.length = _shard_range(self.n, rank, world, "out_features")

    def keys(self):
        return self.t.keys()

    def get_tensor(self, name: str) -> torch.Tensor:
        kind = name.rsplit(".", 1)[-1]
        if kind == "weight_shape":  # compressed-tensors' (N, K): this view's N is the block's
            shape = self.t.get(name).clone()
            shape[0] = self.length
            return shape
        if kind not in self.ALONG_N:
            return self.t.get(name)
        dim, per = self.ALONG_N[kind]
        stored = self.t.shape(name)
        if len(stored) <= dim or stored[dim] * per != self.n:  # a whole read would fail the reader's shape checks
            raise ValueError(f"{name}: expected {self.n // per} along dim {dim} (out_features={self.n}), "
                             f"got shape {tuple(stored)}")
        cut = slice(self.start // per, (self.start + self.length) // per)
        return self.t.read(name, (slice(None),) * dim + (cut,))


class PackedShapeOnly:
    """A layer's tensors as the readers see them, but the packed weight (qweight, weight_packed) is a shape-only meta
    tensor: the reader checks and converts everything else for real and reads nothing of the big one."""

    def __init__(self, t: Tensors):
        self.t = t

    def keys(self):
        return self.t.keys()

    def get_tensor(self, name: str) -> torch.Tensor:
        return self.t.shape_only(name) if name.endswith((".qweight", ".weight_packed")) else self.t.get(name)


def read_columns(t: Tensors, prefix: str, qc, rank: int, world: int) -> GPTQWeight:
    """``shard_cols(read_linear(t, prefix, qc), rank, world)``, reading only the rank's columns."""
    with _naming(prefix):
        return _read(ColumnBlock(t, prefix, qc, rank, world), prefix, qc)


def read_rows(t: Tensors, prefix: str, qc, rank: int, world: int) -> Tuple[GPTQWeight, Optional[torch.Tensor]]:
    """``shard_rows(read_linear(t, prefix, qc), rank, world)`` and the layer's bias, reading of the packed weight only
    the rank's rows. The rest is read whole: it is small (scales and zeros are 1/group_size of the weight, g_idx 8/N),
    the readers check it whole (compressed-tensors' full groups), and shard_rows then cuts it exactly as before
    (g_idx: the rank's rows, scales and zeros whole; no g_idx: the groups its rows touch, and the group offset)."""
    with _naming(prefix):
        whole = _read(PackedShapeOnly(t), prefix, qc)
        shard = shard_rows(whole, rank, world)
        start, length = rank * shard.in_features, shard.in_features
        return shard.replace(qweight=_packed_rows(t, prefix, qc, start, length)), whole.bias


def _packed_rows(t: Tensors, prefix: str, qc, start: int, length: int) -> torch.Tensor:
    """Rows [start, start + length) of the layer's qweight (GPTQ layout [K/8, N]), read from the file."""
    words = slice(start // PACK, (start + length) // PACK)
    if isinstance(qc, CompressedScheme):
        # weight_packed [N, K/8] is qweight transposed: the rows are a run of K/(8 world) words in each of its N rows,
        # exact as any slice (whole words), if less page-friendly than GPTQ's one contiguous block
        return t.read(f"{prefix}.weight_packed", (slice(None), words)).t().contiguous()
    return t.read(f"{prefix}.qweight", (words,))


def _out_features(t: Tensors, prefix: str, qc) -> int:
    if isinstance(qc, CompressedScheme):
        return int(t.get(f"{prefix}.weight_shape")[0])  # (N, K)
    return t.shape(f"{prefix}.qweight")[-1]  # [K/8, N]


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
    """Build this rank's share of the checkpoint's model, its MLPs in ``par.form`` (read as ``load_mlp`` says)."""
    cfg, qc, t = decoder_config(path, max_seq), read_quant_config(path), Tensors(path)
    tied = _read_json(os.path.join(path, "config.json")).get("tie_word_embeddings", cfg.family == "gptbigcode")
    names = _NAMES[cfg.family]
    embed = t.get(names["embed"]).to(dtype)
    weights = {
        "embed": embed,
        "attn": [_attention(t, names["layer"].format(i), cfg, qc, dtype) for i in range(cfg.layers)],
        "mlp": [load_mlp(t, {ours: names["layer"].format(i) + theirs for ours, theirs in names["mlp"].items()}, qc,
                         cfg.mlp_kind, par) for i in range(cfg.layers)],
        "lm_head": (embed if tied else t.get("lm_head.weight").to(dtype)).t().contiguous(),
    }
    if cfg.family == "gptbigcode":
        weights["pos_embed"] = t.get("transformer.wpe.weight")[: cfg.max_seq].to(dtype)
    model = Decoder(cfg, par, weights, batch)
    for i, block in enumerate(model.blocks):
        layer = names["layer"].format(i)
        _load_norm(t, layer + names["attn_norm"], block.attn_norm)
        _load_norm(t, layer + names["mlp_norm"], block.mlp_norm)
    _load_norm(t, names["final_norm"], model.norm)
    return model


# ---- one block's MLP on this rank ----

def load_mlp(t: Tensors, prefixes: Dict[str, str], qc, kind: str, par: Parallel) -> TPMLP:
    """This rank's MLP, bit for bit what ``TPMLP.from_full`` builds from the whole layers, reading only this rank's
    slices where the form allows. ``prefixes``: ours (gate, up, down / fc, proj; the out layer last) -> the
    checkpoint's layer names."""
    *first, out = prefixes
    out_shard, out_bias, p2 = _read_out_layer(t, prefixes[out], qc, par)
    shards = {n: _read_first_layer(t, prefixes[n], qc, par, p2) for n in first}
    shards[out] = out_shard
    _check_shards(prefixes, shards)
    return TPMLP.from_shards(kind, [shards[n] for n in first], out_shard, out_bias, p2 if par.form == "N" else None,
                             par.form, par.rank, par.world, par.group, fused=par.fused, collectives=par.collectives,
                             kernel=par.kernel, presort=par.presort)


def _check_shards(prefixes: Dict[str, str], shards: Dict[str, GPTQWeight]) -> None:
    *first, out = shards
    o = shards[out]
    for n in first:
        w = shards[n]
        if w.in_features != o.out_features or w.out_features != o.in_features:
            raise CheckpointError(f"{prefixes[n]}: this rank's shard [{w.in_features}, {w.out_features}] does not "
                                  f"match {prefixes[out]}'s [{o.in_features}, {o.out_features}] "
                                  "(expected [H, I / world] and [I / world, H])")


def _read_out_layer(t: Tensors, prefix: str, qc, par: Parallel):
    """This rank's rows of the row-parallel layer (down, c_proj), the layer's bias (added once, after the AllReduce)
    and P2, the stable sort of its rows by group (only N and T use it)."""
    if par.form in ("N", "T"):
        # N and T shard the rows after sorting them by group: under act-order a rank's rows are scattered over
        # (nearly) every packed word, so the whole qweight is read.
        with _naming(prefix):
            w = _read(t, prefix, qc)
            rows, p2 = sort_rows(w)
            return shard_rows(rows, par.rank, par.world), w.bias, p2
    return (*read_rows(t, prefix, qc, par.rank, par.world), None)


def _read_first_layer(t: Tensors, prefix: str, qc, par: Parallel, p2: Optional[torch.Tensor]) -> GPTQWeight:
    """This rank's columns of a column-parallel layer (gate, up, c_fc)."""
    if par.form == "T":
        # T permutes these columns by the out layer's P2 before sharding: under act-order a rank's columns are
        # spread over the whole width (reading them one by one would still touch every page), so read whole.
        with _naming(prefix):
            return shard_cols(permute_cols(_read(t, prefix, qc), p2), par.rank, par.world)
    return read_columns(t, prefix, qc, par.rank, par.world)


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
