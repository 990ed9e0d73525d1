"""A compact tensor-parallel decoder in the spirit of gpt-fast: Llama (RMSNorm, rotary attention,
grouped-query attention, SwiGLU) and GPTBigCode / Granite (LayerNorm, learned positions, multi-query
attention, GELU MLP with biases) from one config. Attention heads are sharded over ranks (o_proj is
row-parallel with an AllReduce); the MLPs are GPTQ act-order ``TPMLP``s in any deployment form.
"""

from dataclasses import dataclass
from typing import Dict, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..collectives import all_reduce_sum
from ..gptq import GPTQWeight
from ..nn import TPMLP


@dataclass(frozen=True)
class DecoderConfig:
    vocab: int = 256
    hidden: int = 64
    inter: int = 192
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2  # 1 = multi-query
    family: str = "llama"  # or "gptbigcode"
    max_seq: int = 64
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def mlp_kind(self) -> str:
        return "swiglu" if self.family == "llama" else "gelu"


@dataclass
class Parallel:
    """Where this rank sits: its index, the world size, the process group and how the MLPs are laid out."""

    rank: int = 0
    world: int = 1
    group: Optional[object] = None
    form: str = "N"
    collectives: str = "functional"
    fused: bool = False
    kernel: str = "reference"  # GPTQ matmul kernel of the eager MLPs: "reference" or "triton"
    presort: bool = False  # first MLP layers' rows sorted by their act-order, x permuted (see nn.py)


class Attention(nn.Module):
    def __init__(self, cfg: DecoderConfig, par: Parallel, w: Dict[str, torch.Tensor], batch: int):
        super().__init__()
        if cfg.heads % par.world or (cfg.kv_heads % par.world and par.world % cfg.kv_heads):
            raise ValueError(f"heads={cfg.heads} must divide by world size {par.world}, and kv_heads={cfg.kv_heads} "
                             "divide it or be divided by it")
        self.cfg, self.par = cfg, par
        self.n_heads = cfg.heads // par.world
        # fewer kv heads than ranks: each rank keeps the one kv head its query heads share (replicated)
        self.n_kv = max(cfg.kv_heads // par.world, 1)
        hd, r = cfg.head_dim, par.rank
        kv_rank = r if cfg.kv_heads >= par.world else r * self.n_heads // (cfg.heads // cfg.kv_heads)
        q_cols = slice(r * self.n_heads * hd, (r + 1) * self.n_heads * hd)
        kv_cols = slice(kv_rank * self.n_kv * hd, (kv_rank + 1) * self.n_kv * hd)
        self.wq = nn.Parameter(w["wq"][:, q_cols].contiguous())
        self.wkv = nn.Parameter(torch.cat([w["wk"][:, kv_cols], w["wv"][:, kv_cols]], dim=1))
        self.wo = nn.Parameter(w["wo"][q_cols].contiguous())
        has_bias = "bq" in w  # GPTBigCode: biases on every projection; o's is added once, after the AllReduce
        self.bq = nn.Parameter(w["bq"][q_cols].contiguous()) if has_bias else None
        self.bkv = nn.Parameter(torch.cat([w["bk"][kv_cols], w["bv"][kv_cols]])) if has_bias else None
        self.bo = nn.Parameter(w["bo"]) if has_bias else None
        self.register_buffer("k_cache", torch.zeros(batch, self.n_kv, cfg.max_seq, hd, dtype=w["wq"].dtype))
        self.register_buffer("v_cache", torch.zeros_like(self.k_cache))

    def forward(self, x, pos, rope, mask):  # x [B, S, D], pos [S], mask [S, max_seq]
        b, s, _ = x.shape
        hd = self.cfg.head_dim
        q, kv = x @ self.wq, x @ self.wkv
        if self.bq is not None:
            q, kv = q + self.bq, kv + self.bkv
        q = q.view(b, s, self.n_heads, hd)
        k, v = kv.view(b, s, 2 * self.n_kv, hd).split(self.n_kv, dim=2)
        if rope is not None:
            q, k = _rotate(q, rope), _rotate(k, rope)
        self.k_cache[:b, :, pos] = k.transpose(1, 2)
        self.v_cache[:b, :, pos] = v.transpose(1, 2)
        rep = self.n_heads // self.n_kv
        keys = self.k_cache[:b].repeat_interleave(rep, dim=1)  # [B, heads, max_seq, hd]
        values = self.v_cache[:b].repeat_interleave(rep, dim=1)
        o = F.scaled_dot_product_attention(q.transpose(1, 2), keys, values, attn_mask=mask)  # [B, heads, S, hd]
        y = o.transpose(1, 2).reshape(b, s, -1) @ self.wo
        y = all_reduce_sum(y, self.par.world, self.par.group, self.par.collectives)
        return y + self.bo if self.bo is not None else y


def _rotate(x, rope):  # x [B, S, H, hd]; rope (cos, sin) [S, hd/2]
    cos, sin = (t[None, :, None, :] for t in rope)
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


class Block(nn.Module):
    def __init__(self, cfg: DecoderConfig, par: Parallel, attn_w, mlp_w: Union[Dict[str, GPTQWeight], TPMLP],
                 batch: int):
        super().__init__()
        self.attn_norm, self.mlp_norm = _norm(cfg, attn_w["wq"].dtype), _norm(cfg, attn_w["wq"].dtype)
        self.attn = Attention(cfg, par, attn_w, batch)
        self.mlp = mlp_w if isinstance(mlp_w, TPMLP) else TPMLP.from_full(
            cfg.mlp_kind, mlp_w, par.form, par.rank, par.world, par.group, fused=par.fused,
            collectives=par.collectives, kernel=par.kernel, presort=par.presort)

    def forward(self, x, pos, rope, mask):
        x = x + self.attn(self.attn_norm(x), pos, rope, mask)
        return x + self.mlp(self.mlp_norm(x))


def _rope_angles(cfg: DecoderConfig) -> torch.Tensor:
    hd = cfg.head_dim
    inv = 1.0 / cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd)
    return torch.outer(torch.arange(cfg.max_seq, dtype=torch.float32), inv)


def _norm(cfg: DecoderConfig, dtype):
    if cfg.family == "llama":
        return nn.RMSNorm(cfg.hidden, eps=cfg.norm_eps, dtype=dtype)
    return nn.LayerNorm(cfg.hidden, eps=cfg.norm_eps, dtype=dtype)


class Decoder(nn.Module):
    """``forward(tokens [B, S], pos [S]) -> logits [B, S, vocab]``, filling the KV cache at ``pos``."""

    def __init__(self, cfg: DecoderConfig, par: Parallel, weights: dict, batch: int = 1):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Parameter(weights["embed"])
        self.pos_embed = nn.Parameter(weights["pos_embed"]) if cfg.family == "gptbigcode" else None
        self.blocks = nn.ModuleList(Block(cfg, par, a, m, batch) for a, m in zip(weights["attn"], weights["mlp"]))
        self.norm = _norm(cfg, weights["embed"].dtype)
        self.lm_head = nn.Parameter(weights["lm_head"])
        self.register_buffer("causal", torch.ones(cfg.max_seq, cfg.max_seq, dtype=torch.bool).tril())
        angles = _rope_angles(cfg)  # [max_seq, hd/2]
        self.register_buffer("rope_cos", angles.cos())
        self.register_buffer("rope_sin", angles.sin())
        self.requires_grad_(False)  # an inference model: no autograd graph through the custom ops

    def forward(self, tokens: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        x = self.embed[tokens]
        if self.pos_embed is not None:
            x = x + self.pos_embed[pos]
        rope = (self.rope_cos[pos], self.rope_sin[pos]) if self.cfg.family == "llama" else None
        mask = self.causal[pos]  # [S, max_seq]
        for block in self.blocks:
            x = block(x, pos, rope, mask)
        return self.norm(x) @ self.lm_head
