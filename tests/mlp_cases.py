"""Random act-order GPTQ MLP weights shared by the eager, backend and benchmark tests: every rank draws the
same full weights from the same seed, then takes its own shard."""

import torch

from tpaware_compile.quantize import quantize


def mlp_weights(kind: str, hidden: int = 64, inter: int = 192, group_size: int = 32, seed: int = 0,
                sym: bool = False, zero_offset: int = 0, scale_dtype=torch.float16):
    g = torch.Generator().manual_seed(seed)

    def layer(k: int, n: int, bias: bool):
        w = torch.randn(k, n, generator=g) / k**0.5
        b = torch.randn(n, generator=g) * 0.1 if bias else None
        return quantize(w, group_size, sym=sym, zero_offset=zero_offset, scale_dtype=scale_dtype, bias=b, generator=g)

    if kind == "gelu":
        return {"fc": layer(hidden, inter, True), "proj": layer(inter, hidden, True)}
    gate = layer(hidden, inter, False)
    up = layer(hidden, inter, False)
    # gate and up of one checkpoint share the act-order of their common input
    up = up.replace(g_idx=gate.g_idx) if gate.g_idx is not None else up
    return {"gate": gate, "up": up, "down": layer(inter, hidden, False)}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-30))
