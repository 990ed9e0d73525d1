"""Random decoder weights with act-order GPTQ MLPs, identical on every rank that uses the same seed."""

import torch

from ..quantize import quantize, random_gptq
from .decoder import DecoderConfig


def random_weights(cfg: DecoderConfig, dtype=torch.float32, group_size: int = 32, seed: int = 0,
                   sym: bool = False, zero_offset: int = 0, fast: bool = False) -> dict:
    """``fast``: draw the packed MLP tensors directly (``random_gptq``) instead of rounding float weights,
    for benchmark-sized models."""
    g = torch.Generator().manual_seed(seed)
    d, hd = cfg.hidden, cfg.head_dim

    def dense(k: int, n: int) -> torch.Tensor:
        return (torch.randn(k, n, generator=g) / k**0.5).to(dtype)

    def gptq(k: int, n: int, bias: bool):
        if fast:
            return random_gptq(k, n, group_size, torch.float16 if dtype == torch.float32 else dtype, bias, g)
        b = torch.randn(n, generator=g) * 0.1 if bias else None
        return quantize(torch.randn(k, n, generator=g) / k**0.5, group_size, sym=sym, zero_offset=zero_offset,
                        scale_dtype=torch.float16 if dtype == torch.float32 else dtype, bias=b, generator=g)

    def mlp():
        if cfg.mlp_kind == "gelu":
            return {"fc": gptq(d, cfg.inter, True), "proj": gptq(cfg.inter, d, True)}
        gate = gptq(d, cfg.inter, False)
        up = gptq(d, cfg.inter, False).replace(g_idx=gate.g_idx)  # gate and up share their input's act-order
        return {"gate": gate, "up": up, "down": gptq(cfg.inter, d, False)}

    def attn():
        w = {"wq": dense(d, cfg.heads * hd), "wk": dense(d, cfg.kv_heads * hd),
             "wv": dense(d, cfg.kv_heads * hd), "wo": dense(cfg.heads * hd, d)}
        if cfg.family == "gptbigcode":
            w.update({f"b{n}": (torch.randn(t.shape[1], generator=g) * 0.1).to(dtype) for n, t in
                      (("q", w["wq"]), ("k", w["wk"]), ("v", w["wv"]), ("o", w["wo"]))})
        return w

    return {
        "embed": torch.randn(cfg.vocab, d, generator=g).to(dtype),
        "pos_embed": (torch.randn(cfg.max_seq, d, generator=g) * 0.1).to(dtype),
        "attn": [attn() for _ in range(cfg.layers)],
        "mlp": [mlp() for _ in range(cfg.layers)],
        "lm_head": dense(d, cfg.vocab),
    }
