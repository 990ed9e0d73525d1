"""The modules behind a candidate's weights, and their in-place conversion to form T.

Dynamo names every parameter placeholder by its source (``L['self']._modules['mlp']._modules['gate']
._buffers['qweight']``); the frame being compiled holds the real root module. A candidate is ours when its
layers are project GPTQ linears (``load`` / ``weight``) whose buffers are the very tensors the graph reads,
under one parent that has a ``form``. Then the backend loads the target weights into those modules and sets
``form = "T"``: eager after compile stays right, and a recompile (decode vs prefill) traces form T and finds
nothing to permute again. Anything else keeps a private copy inside the compiled graph.
"""

import sys
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch
from torch import nn
from torch.fx import Node

from ..compat import frame_locals, parse_source, placeholder_source
from .exchange import Target
from .match import Candidate


@dataclass
class Owners:
    mlp: nn.Module
    cols: List[nn.Module]
    down: nn.Module
    bias_of: Dict[Node, int]  # per-column placeholder -> index of the column layer whose bias it is

    def applicable(self, target: Target) -> bool:
        has_bias = [m.weight().bias is not None for m in self.cols]
        if target.p1 is not None and not hasattr(self.mlp, "in_perm"):
            return False  # the module cannot apply the folded input permutation: keep a private copy
        return all(has == (j in self.bias_of.values()) for j, has in enumerate(has_bias))

    def convert(self, c: Candidate, t: Target) -> None:
        """Load the target tensors themselves (the graph's constants share them: memory stays eager's)."""
        if self.mlp.form == "T":
            return  # idempotent: never permute twice
        for j, (m, w) in enumerate(zip(self.cols, t.cols)):
            bias = next((t.aligned[ph] for ph, k in self.bias_of.items() if k == j), None)
            m.load(w.replace(bias=bias))
        if t.down_changed:  # form N's down is already the target shard (unless tiled)
            self.down.load(t.down.replace(bias=self.down.weight().bias))
        if t.p1 is not None:  # the cols' rows are now sorted by P1: x must follow
            self.mlp.in_perm = t.p1
        # else the cols kept their row order: a presorted module keeps its in_perm (the graph keeps its x[P1])
        self.mlp.form = "T"


def find_owners(c: Candidate, values: Dict[Node, torch.Tensor], scope=None) -> Optional[Owners]:
    """``scope``: the locals holding the root module (default: those of the frame Dynamo is compiling)."""
    scope = frame_locals() if scope is None else scope
    if scope is None:
        return None
    mods = [_linear(scope, lin.tensors["qweight"], values) for lin in (*c.cols, c.down)]
    if any(m is None for m in mods):
        return None
    parents = {tuple(path[:-1]) for _, path in mods}
    mlp = _resolve(scope, mods[-1][1][:-1], _root(c.down.tensors["qweight"]))
    if len(parents) != 1 or mlp is None or not hasattr(mlp, "form"):
        return None
    bias_of = _biases(scope, c, [m for m, _ in mods[:-1]])
    return None if bias_of is None else Owners(mlp, [m for m, _ in mods[:-1]], mods[-1][0], bias_of)


def caller_scope(placeholders: List[Node], args, indices: List[int], depth: int = 16) -> Optional[dict]:
    """At run time: the locals of the nearest calling frame whose modules hold the tensors ``args[i]`` at the
    placeholders' sources (a compiled graph is called from the frame of the code Dynamo compiled), or None."""
    frame = sys._getframe(1)
    for _ in range(depth):
        if frame is None:
            return None
        if _holds(frame.f_locals, placeholders, args, indices):
            return frame.f_locals
        frame = frame.f_back
    return None


def _holds(scope, placeholders: List[Node], args, indices: List[int]) -> bool:
    found = 0
    for i in indices:
        parsed = parse_source(placeholder_source(placeholders[i]))
        owner = None if parsed is None else _resolve(scope, parsed[1], parsed[0])
        if owner is None:
            continue
        if getattr(owner, parsed[2], None) is not args[i]:
            return False
        found += 1
    return found > 0


def _root(ph: Node) -> Optional[str]:
    parsed = parse_source(placeholder_source(ph))
    return None if parsed is None else parsed[0]


def _resolve(scope, path, root: Optional[str]):
    obj = scope.get(root) if root else None
    for name in path:
        obj = obj._modules.get(name) if isinstance(obj, nn.Module) else None
    return obj


def _linear(scope, ph: Node, values):
    parsed = parse_source(placeholder_source(ph))
    if parsed is None:
        return None
    m = _resolve(scope, parsed[1], parsed[0])
    if not (callable(getattr(m, "load", None)) and callable(getattr(m, "weight", None))):
        return None
    return (m, parsed[1]) if m.weight().qweight is values[ph] else None  # stale trace: not the live tensor


def _biases(scope, c: Candidate, cols: List[nn.Module]) -> Optional[Dict[Node, int]]:
    out = {}
    for ph in c.aligned:
        parsed = parse_source(placeholder_source(ph))
        owner = None if parsed is None or parsed[2] != "bias" else _resolve(scope, parsed[1], parsed[0])
        if not any(owner is m for m in cols):
            return None  # a per-column vector the modules do not know about: keep a private copy
        out[ph] = next(j for j, m in enumerate(cols) if m is owner)
    return out
