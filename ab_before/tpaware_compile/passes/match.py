"""Find every candidate TP MLP in a canonical graph before anything changes (see canonicalize.py).

A candidate is anchored at a down projection (a ``tpaware::gptq_mm`` node) and read backwards:

    x -> [index_select(-1, P1)]                                                        (form T, folded act-order)
      -> gptq_mm (gate, up | gate_up | fc) -> elementwise activation = h_local          (column-parallel)
      -> [all_gather -> wait -> narrow(dim 0) x world -> cat(-1)]                       (form N, TP > 1)
      -> [index_select(-1, perm)]                                                       (forms N, L)
      -> [narrow(-1, rank * I_r, I_r)]                                                  (form N)
      -> gptq_mm (down) -> [all_reduce -> wait]                                         (TP > 1)

A match that cannot be rewritten still becomes a Candidate, with ``reason`` set, so the report can say why.
"""

import operator
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Union

import torch
import torch.nn.functional as F
from torch.fx import GraphModule, Node

from .. import ops  # noqa: F401  (registers tpaware::gptq_mm)
from ..compat import functional_op, parse_source, placeholder_source, resolve_group
from ..gptq import GPTQWeight
from .canonicalize import shape_of

GPTQ_MM = torch.ops.tpaware.gptq_mm.default
WEIGHT_ARGS = ("qweight", "qzeros", "scales", "g_idx")
# Elementwise ops commute with a column permutation of their operands: the activation may hold any of them.
ELEMENTWISE = {F.silu, F.gelu, F.relu, torch.sigmoid, torch.tanh, torch.relu, torch.mul, torch.add,
               operator.mul, operator.add, operator.sub, operator.truediv, torch.ops.aten.silu.default,
               torch.ops.aten.gelu.default, torch.ops.aten.mul.Tensor, torch.ops.aten.add.Tensor}
ELEMENTWISE_METHODS = {"to", "float", "half", "bfloat16", "type", "contiguous", "mul", "add", "sigmoid", "tanh"}


@dataclass
class Linear:
    """One ``gptq_mm`` call: its node and the placeholders that hold its weight."""

    node: Node

    @property
    def tensors(self) -> Dict[str, Optional[Node]]:
        return dict(zip(WEIGHT_ARGS, self.node.args[1:5]))

    @property
    def ints(self):  # group_size, group_offset, zero_offset
        return tuple(self.node.args[5:8])

    def weight(self, values: Dict[Node, torch.Tensor], bias: Optional[torch.Tensor] = None) -> GPTQWeight:
        t = {k: (None if v is None else values[v]) for k, v in self.tensors.items()}
        group_size, group_offset, zero_offset = self.ints
        return GPTQWeight(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], group_size, zero_offset, group_offset,
                          bias)

    @property
    def path(self) -> Optional[str]:
        """Module path of the layer, e.g. ``layers.0.mlp.gate`` (from the qweight placeholder's source)."""
        parsed = parse_source(placeholder_source(self.tensors["qweight"]))
        return None if parsed is None else ".".join(parsed[1])


@dataclass
class Gather:
    """all_gather_into_tensor -> wait -> narrow(dim 0) per rank -> cat(dim -1): the full activation."""

    collective: Node
    wait: Node
    pieces: List[Node]
    cat: Node

    @property
    def world(self) -> int:
        return self.collective.args[1]

    @property
    def group(self) -> str:
        return self.collective.args[2]

    @property
    def nodes(self) -> List[Node]:  # users first, so they can be erased in this order
        return [self.cat, *self.pieces, self.wait, self.collective]


@dataclass
class Candidate:
    down: Linear
    cols: List[Linear] = field(default_factory=list)
    fused: bool = False
    h_local: Optional[Node] = None
    act_nodes: List[Node] = field(default_factory=list)
    aligned: List[Node] = field(default_factory=list)  # placeholders broadcast along the columns (biases)
    gather: Optional[Gather] = None
    perm: Optional[Node] = None  # index_select(h, -1, perm)
    slice: Optional[Node] = None  # narrow(h, -1, start, length)
    reduce: Optional[Node] = None  # all_reduce after down
    form: str = "?"
    kind: str = "?"
    world: int = 1
    rank: int = 0
    group: Optional[str] = None
    reason: Optional[str] = None

    @property
    def name(self) -> str:
        path = self.down.path
        return path.rsplit(".", 1)[0] if path and "." in path else (path or self.down.node.name)

    @property
    def layers(self) -> str:
        names = [c.path or c.node.name for c in self.cols] + [self.down.path or self.down.node.name]
        return ", ".join(n.rsplit(".", 1)[-1] for n in names)

    @property
    def dead_nodes(self) -> List[Node]:
        """What the rewrite erases, users first."""
        return [n for n in (self.slice, self.perm) if n is not None] + (self.gather.nodes if self.gather else [])

    def skip(self, reason: str) -> "Candidate":
        self.reason = self.reason or reason
        return self


def find_candidates(gm: GraphModule) -> List[Candidate]:
    found = [_match_down(n) for n in gm.graph.nodes if n.op == "call_function" and n.target is GPTQ_MM]
    found = [c for c in found if c is not None]
    # Form T's gate/up read x[..., P1] (the folded act-order of their rows): that index_select makes them look
    # like a down projection after a runtime permutation. A layer that another MLP uses as its column-parallel
    # layer is no down projection, so such a failed reading is dropped rather than reported.
    cols = {col.node for c in found for col in c.cols}
    return [c for c in found if c.reason is None or c.down.node not in cols]


@dataclass
class Orphan:
    """A runtime permutation of an activation by a module buffer with no down projection after it in this
    graph: the MLP was split by a graph break, so there is nothing this graph alone can rewrite."""

    perm: Node  # index_select(h, -1, perm)

    @property
    def name(self) -> str:
        parsed = parse_source(placeholder_source(self.perm.args[2]))
        return ".".join(parsed[1]) if parsed and parsed[1] else self.perm.name


def find_orphans(gm: GraphModule, cands: List[Candidate]) -> List[Orphan]:
    claimed = {c.perm for c in cands}
    return [Orphan(n) for n in gm.graph.nodes if _is(n, torch.index_select) and n not in claimed
            and _last_dim(n, n.args[1]) and n.args[2].op == "placeholder" and placeholder_source(n.args[2])
            and not _reaches_gptq_mm(n)]


def _reaches_gptq_mm(node: Node, depth: int = 4) -> bool:
    return depth > 0 and any(_is(u, GPTQ_MM) or _reaches_gptq_mm(u, depth - 1) for u in node.users)


def _is(node, target) -> bool:
    return isinstance(node, Node) and node.op == "call_function" and node.target is target


def _last_dim(node: Node, dim: int) -> bool:
    rank = len(shape_of(node))  # narrow, index_select and cat keep their input's rank
    return dim == -1 or (rank > 0 and dim == rank - 1)


def _match_down(down: Node) -> Optional[Candidate]:
    cand = Candidate(down=Linear(down))
    x = down.args[0]
    if _is(x, torch.narrow) and _last_dim(x, x.args[1]):
        cand.slice, x = x, x.args[0]
    if _is(x, torch.index_select) and _last_dim(x, x.args[1]):
        cand.perm, x = x, x.args[0]
    cand.gather = _match_gather(x)
    if cand.gather is not None:
        x = cand.gather.collective.args[0]
    tp_shaped = cand.slice is not None or cand.perm is not None or cand.gather is not None
    act = _trace_activation(x, cand)
    if isinstance(act, str):
        return cand.skip(act) if tp_shaped else None
    _classify(cand)
    return _check_users(cand)


def _match_gather(x) -> Optional[Gather]:
    if not _is(x, torch.cat) or not x.args[0]:
        return None
    pieces = list(x.args[0])
    dim = x.args[1] if len(x.args) > 1 else x.kwargs.get("dim", 0)
    if not all(_is(p, torch.narrow) and p.args[1] in (0, -len(shape_of(p.args[0]))) for p in pieces):
        return None
    wait = pieces[0].args[0]
    if not _is(wait, functional_op("wait_tensor")) or any(p.args[0] is not wait for p in pieces):
        return None
    coll = wait.args[0]
    if not _is(coll, functional_op("all_gather_into_tensor")) or coll.args[1] != len(pieces):
        return None
    if not _last_dim(x, dim):
        return None
    starts = [p.args[2] for p in pieces]
    return Gather(coll, wait, pieces, x) if starts == sorted(starts) else None


def _trace_activation(h, cand: Candidate) -> Union[str, None]:
    """Fill cand.cols / act_nodes / aligned / fused from the activation ``h``; return a skip reason on failure."""
    if not isinstance(h, Node):
        return "down projection input is not a tensor of the graph"
    if h.op == "placeholder":
        return "MLP split by a graph break: the activation is an input of this graph"
    width = shape_of(h)[-1] if shape_of(h) else None
    stack, seen = [h], set()
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if _is(n, GPTQ_MM):
            cand.cols.append(Linear(n))
        elif _is(n, torch.narrow) and _is(n.args[0], GPTQ_MM) and _last_dim(n, n.args[1]):
            cand.fused = True  # gate_up: each half is one block of columns
            cand.act_nodes.append(n)
            stack.append(n.args[0])
        elif n.op == "placeholder":
            if shape_of(n) != (width,):
                return f"activation reads graph input {n.name} that is not a per-column vector"
            cand.aligned.append(n)
        elif (n.op == "call_function" and n.target in ELEMENTWISE) or (
                n.op == "call_method" and n.target in ELEMENTWISE_METHODS):
            cand.act_nodes.append(n)
            stack.extend(a for a in (*n.args, *n.kwargs.values()) if isinstance(a, Node))
        else:
            name = getattr(n.target, "__name__", n.target)
            return f"{name} between the column-parallel layers and down is not elementwise"
    cand.h_local = h
    return _check_cols(cand)


def _check_cols(cand: Candidate) -> Optional[str]:
    if not cand.cols:
        return "no quantized column-parallel layer before down"
    cand.cols.sort(key=lambda c: list(c.node.graph.nodes).index(c.node))
    if len({c.node.args[0] for c in cand.cols}) != 1:
        return "column-parallel layers read different inputs"
    if cand.fused and (len(cand.cols) != 1 or cand.aligned):
        return "fused gate_up mixed with other column layers or per-column vectors"
    names = {getattr(n.target, "__name__", str(n.target)) for n in cand.act_nodes}
    cand.kind = "gelu" if any("gelu" in s for s in names) else "swiglu" if any("silu" in s for s in names) else "mlp"
    return None


def _classify(cand: Candidate) -> None:
    sorted_down = cand.down.tensors["g_idx"] is None
    if cand.gather is not None or cand.slice is not None:
        cand.form = "N"
    elif cand.perm is not None:
        cand.form = "N" if sorted_down else "L"
    else:
        cand.form = "T" if sorted_down else "U"
    users = list(cand.down.node.users)
    if len(users) == 1 and _is(users[0], functional_op("all_reduce")):
        cand.reduce = users[0]
    group = cand.gather.group if cand.gather else cand.reduce.args[2] if cand.reduce else None
    cand.group = group
    if group is not None:
        pg = resolve_group(group)
        cand.world, cand.rank = pg.size(), pg.rank()


def _check_users(cand: Candidate) -> Candidate:
    if cand.form == "T":
        return cand.skip("already TP-aware: down has sorted groups and no runtime permutation")
    inside = set(cand.act_nodes) | {c.node for c in cand.cols}
    for n in inside:
        if n is not cand.h_local and any(u not in inside for u in n.users):
            return cand.skip(f"activation value {n.name} has another user")
    chain = [cand.h_local, *reversed(cand.gather.nodes if cand.gather else []), cand.perm, cand.slice]
    chain = [n for n in chain if n is not None]
    allowed = set(chain[1:]) | {cand.down.node}
    for n in chain:
        if any(u not in allowed for u in n.users):
            what = "gathered activation" if cand.gather and n in cand.gather.nodes else "activation"
            return cand.skip(f"{what} ({n.name}) has another user")
    return _check_form(cand)


def _check_form(cand: Candidate) -> Candidate:
    if cand.perm is not None and cand.perm.args[2].op != "placeholder":
        return cand.skip("permutation computed at run time")
    if cand.gather is not None and cand.reduce is not None and cand.reduce.args[2] != cand.gather.group:
        return cand.skip("AllGather and AllReduce use different process groups")
    if cand.world > 1 and cand.reduce is None:
        return cand.skip("no AllReduce right after the down projection")
    if cand.form == "N" and cand.perm is None:
        return cand.skip("gather without a permutation: not an act-order MLP")
    if cand.form == "N" and cand.down.tensors["g_idx"] is not None:
        return cand.skip("form N with an unsorted down projection")
    return _check_slice(cand)


def _check_slice(cand: Candidate) -> Candidate:
    width = shape_of(cand.h_local)[-1]
    if cand.slice is None:
        return cand if cand.form != "N" or cand.world == 1 else cand.skip("no rank slice after the permutation")
    start, length = cand.slice.args[2], cand.slice.args[3]
    if (start, length) != (cand.rank * width, width):
        return cand.skip(f"rank slice [{start}, {start + length}) is not rank {cand.rank}'s own chunk")
    return cand
