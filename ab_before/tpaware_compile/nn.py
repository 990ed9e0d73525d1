"""Eager modules: a GPTQ linear and tensor-parallel MLPs in the forms people deploy (DESIGN.md §2).

    form  down_proj rows on rank r                       before down_proj at run time      down scales
    N     sorted by the global P2, then sharded          AllGather, h[..., P2], own chunk  sharded
    L     sharded as stored, then sorted per rank        h_local[..., p_r]                 full
    U     sharded as stored (kernel reads scales[g_idx]) nothing                           full
    T     TP-aware target: as N, and gate/up (fc)        nothing                           sharded
          output columns permuted by P2 before sharding
          and rows sorted by their act-order P1, input
          x[..., P1] (``in_perm``; None: nothing folded)

The MLP is ``down(act(x @ A))`` with A = gate and up (SwiGLU: silu(gate) * up) or fc (GELU, with biases).
Every form computes the same function; only the layout of the weights and the run-time steps differ.

``presort=True`` gives forms N, L and U form T's first layers without its column permutation: rows sorted by
P1 at load, x[..., P1] at run time. That is how vLLM and exllama run a column-parallel act-order layer
(its input is replicated, so the permutation is local); the sorted-group kernels then serve those layers, and
what still separates the forms is the down projection and the AllGather, the part the rewrite removes.
"""

from typing import Dict

import torch
import torch.nn.functional as F
from torch import nn

from . import ops  # noqa: F401  registers torch.ops.tpaware.gptq_mm
from .collectives import STYLES, all_gather_last_dim, all_reduce_sum
from .gptq import GPTQWeight, dequantize
from .reorder import (cat_cols, permute_cols, permute_rows, shard_cols, shard_rows, sort_rows, sort_shared_rows,
                      stable_argsort)

FORMS = ("N", "L", "U", "T")
KINDS = ("swiglu", "gelu")
_TENSORS = ("qweight", "qzeros", "scales", "g_idx", "bias")
KERNEL_OPS = {"reference": "gptq_mm", "triton": "gptq_mm_triton"}


class GPTQLinear(nn.Module):
    """``y = x @ W (+ bias)`` for one GPTQ weight, held as buffers so Dynamo sees them as graph inputs.
    ``kernel``: "reference" (``tpaware::gptq_mm``, dequantize then fp32 matmul) or "triton"
    (``tpaware::gptq_mm_triton``: the Triton kernels on CUDA, sorted-group or per-row g_idx)."""

    def __init__(self, w: GPTQWeight, kernel: str = "reference"):
        super().__init__()
        _check_choice(kernel, tuple(KERNEL_OPS), "kernel")
        if kernel == "triton":
            from .kernels import op  # noqa: F401  registers tpaware::gptq_mm_triton (imports triton: only on demand)
        self.kernel = kernel
        self.load(w)

    def load(self, w: GPTQWeight) -> None:
        """Replace the weight in place (the backend converts layouts this way)."""
        for name in _TENSORS:
            self.register_buffer(name, getattr(w, name))
        self.group_size, self.group_offset, self.zero_offset = w.group_size, w.group_offset, w.zero_offset

    def weight(self) -> GPTQWeight:
        return GPTQWeight(*(getattr(self, n) for n in _TENSORS[:4]), self.group_size, self.zero_offset,
                          self.group_offset, self.bias)

    def forward(self, x: torch.Tensor, add_bias: bool = True) -> torch.Tensor:
        y = getattr(torch.ops.tpaware, KERNEL_OPS[self.kernel])(x, self.qweight, self.qzeros, self.scales, self.g_idx,
                                      self.group_size, self.group_offset, self.zero_offset)
        return y + self.bias.to(y.dtype) if add_bias and self.bias is not None else y


class TPMLP(nn.Module):
    """One rank's share of a tensor-parallel GPTQ MLP. Build it with ``TPMLP.from_full``."""

    def __init__(self, kind: str, form: str, rank: int, world: int, group=None, fused: bool = False,
                 collectives: str = "functional", gather_dim: int = 0, kernel: str = "reference",
                 presort: bool = False):
        super().__init__()
        _check_choice(kind, KINDS, "kind")
        _check_choice(form, FORMS, "form")
        _check_choice(collectives, STYLES, "collectives")
        _check_choice(gather_dim, (0, -1), "gather_dim")
        if fused and kind != "swiglu":
            raise ValueError("fused=True applies to kind='swiglu' (gate_up) only")
        self.kind, self.form, self.rank, self.world, self.group = kind, form, rank, world, group
        self.fused, self.collectives, self.gather_dim, self.kernel = fused, collectives, gather_dim, kernel
        self.presort = presort or form == "T"
        # form T and presort: the first layers' act-order P1, folded into their rows (their groups are contiguous)
        self.register_buffer("in_perm", None)

    @classmethod
    def from_full(cls, kind: str, weights: Dict[str, GPTQWeight], form: str, rank: int, world: int,
                  group=None, **options) -> "TPMLP":
        """``weights``: the unsharded layers, {gate, up, down} for swiglu or {fc, proj} for gelu."""
        first, out = _layer_names(kind)
        _check_weights(weights, first + (out,))
        w = weights[out]
        cols, rows, p2 = [weights[n] for n in first], w, None
        if form in ("N", "T"):  # down's rows sorted by their groups (P2) before sharding
            rows, p2 = sort_rows(w)
        if form == "T":  # the gate/up (fc) columns follow the order the down rows are sorted into
            cols = [permute_cols(c, p2) for c in cols]
        return cls.from_shards(kind, [shard_cols(c, rank, world) for c in cols], shard_rows(rows, rank, world),
                               w.bias, p2 if form == "N" else None, form, rank, world, group, **options)

    @classmethod
    def from_shards(cls, kind: str, cols, rows: GPTQWeight, out_bias, perm, form: str, rank: int, world: int,
                    group=None, **options) -> "TPMLP":
        """This rank's shards as ``from_full`` cuts them (the loader reads only these): ``cols`` its columns of the
        first layers (form T: of the layers permuted by P2), ``rows`` its rows of the out layer (N and T: of the
        layer sorted by group), ``out_bias`` the out layer's bias and ``perm`` form N's P2 (else None)."""
        if (perm is not None) != (form == "N"):
            raise ValueError(f"form {form}: perm (the down rows' P2) is needed by form N and only by it")
        mlp = cls(kind, form, rank, world, group, **options)
        mlp._set_first_layers(list(cols))
        mlp._set_out_layer(rows, out_bias, perm)
        return mlp

    def _set_first_layers(self, shards) -> None:
        if self.presort:  # sorting rows commutes with taking columns: the same P1 and rows as the whole layers'
            shards, self.in_perm, _ = sort_shared_rows(shards)
        if self.fused:
            self.gate_up = GPTQLinear(cat_cols(shards), self.kernel)
        else:
            for name, shard in zip(_layer_names(self.kind)[0], shards):
                setattr(self, name, GPTQLinear(shard, self.kernel))

    def _set_out_layer(self, shard: GPTQWeight, out_bias, perm) -> None:
        self.register_buffer("out_bias", out_bias)  # added once, after the AllReduce
        if self.form == "N":
            self.register_buffer("perm", perm)
        if self.form == "L":
            local_perm = stable_argsort(shard.group_index())
            self.register_buffer("local_perm", local_perm)
            shard = permute_rows(shard, local_perm)
        setattr(self, _layer_names(self.kind)[1], GPTQLinear(shard, self.kernel))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self._hidden(x)  # [..., I / world], this rank's columns of the intermediate
        h = self._to_out_layout(h)
        y = getattr(self, _layer_names(self.kind)[1])(h, add_bias=False)
        y = all_reduce_sum(y, self.world, self.group, self.collectives)
        return y + self.out_bias.to(y.dtype) if self.out_bias is not None else y

    def _hidden(self, x: torch.Tensor) -> torch.Tensor:
        if self.in_perm is not None:  # the first layers' rows are sorted by P1: x must follow (a local permute)
            x = x.index_select(-1, self.in_perm)
        if self.kind == "gelu":
            return F.gelu(self.fc(x), approximate="tanh")
        if self.fused:
            gate, up = self.gate_up(x).chunk(2, dim=-1)
        else:
            gate, up = self.gate(x), self.up(x)
        return F.silu(gate) * up

    def _to_out_layout(self, h: torch.Tensor) -> torch.Tensor:
        if self.form == "N":
            full = all_gather_last_dim(h, self.world, self.group, self.collectives, self.gather_dim)  # [..., I]
            return full[..., self.perm].chunk(self.world, dim=-1)[self.rank]
        if self.form == "L":
            return h[..., self.local_perm]
        return h


def reference_mlp(kind: str, weights: Dict[str, GPTQWeight], x: torch.Tensor) -> torch.Tensor:
    """The unsharded MLP from dequantized fp32 weights: what every form must compute."""
    first, out = _layer_names(kind)
    deq = {n: dequantize(weights[n], torch.float32) for n in first + (out,)}
    bias = {n: None if weights[n].bias is None else weights[n].bias.float() for n in deq}
    x = x.float()

    def lin(n: str, v: torch.Tensor) -> torch.Tensor:
        return v @ deq[n] + (bias[n] if bias[n] is not None else 0)

    h = F.gelu(lin("fc", x), approximate="tanh") if kind == "gelu" else F.silu(lin("gate", x)) * lin("up", x)
    return lin(out, h)


def _layer_names(kind: str):
    return (("fc",), "proj") if kind == "gelu" else (("gate", "up"), "down")


def _check_weights(weights: Dict[str, GPTQWeight], names) -> None:
    missing = [n for n in names if n not in weights]
    if missing:
        raise ValueError(f"weights: missing {missing}; expected {list(names)}")
    first = [weights[n] for n in names[:-1]]
    out = weights[names[-1]]
    for n, w in zip(names[:-1], first):
        if w.in_features != out.out_features or w.out_features != out.in_features:
            raise ValueError(f"{n}: shape [{w.in_features}, {w.out_features}] does not match {names[-1]}: "
                             f"[{out.in_features}, {out.out_features}] (expected [H, I] and [I, H])")


def _check_choice(value, choices, name: str) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
