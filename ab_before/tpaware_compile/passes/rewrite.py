"""One guarded rewrite per matched MLP: forms N / L / U -> the TP-aware target (DESIGN.md §1-2).

Order of work, in the style of micro_pipeline_tp: canonicalize, find every candidate, run local guards
(early returns with a reason), let the ranks of each process group agree on a hash of the whole plan, then
per candidate: exchange weights, probe old against new, agree on the verdict, and only then touch the graph
(and the project's own modules, converted in place so eager after compile stays right and a recompile
finds form T with nothing left to do).
"""

from dataclasses import dataclass, replace
from typing import Callable, Dict, List, Optional

import torch
from torch.fx import GraphModule, Node

from ..compat import resolve_group
from ..report import M, RewriteReport, RewriteRow
from .canonicalize import canonicalize
from .exchange import Target, exchange
from .match import Candidate, Linear, Orphan, find_candidates, find_orphans
from .owners import find_owners
from .probe import probe_error
from .sync import RewriteAborted, Sync, digest


@dataclass
class RewriteOptions:
    timeout_s: float = 300.0  # bound on every collective the backend issues at compile time
    probe_rtol: float = 1e-4  # max |old - new| / max |old| accepted by the probe check
    probe_seed: int = 0
    allow_group_offset: bool = True  # shards may share a boundary group (the kernel takes a group offset)
    fail_rank: Optional[int] = None  # failure injection for tests: this rank raises during the exchange
    tile_weights: bool = False  # hold the target's sorted-group weights tiled (layout.py), where shapes allow


def rewrite_graph(gm: GraphModule, example_inputs, opts: RewriteOptions, report: RewriteReport,
                  scope: Optional[dict] = None) -> List[Callable]:
    """Rewrite every MLP that passes its guards; fill one report row per candidate. Returns the pending in-place
    module conversions (empty: graph unchanged); the backend runs them on the compiled graph's first call,
    after Dynamo has built its guards from the modules as traced. ``scope``: the locals that hold the modules
    (default: the frame Dynamo is compiling)."""
    canonicalize(gm)
    values = placeholder_values(gm, example_inputs)
    cands = find_candidates(gm)
    for c in cands:
        _local_guards(c, values, opts)
    _agree_on_plans(cands, values, opts)
    rows = [_row(c) for c in cands]
    report.rows.extend(rows)
    report.rows.extend(_orphan_row(o) for o in find_orphans(gm, cands))
    done = [_rewrite_one(gm, c, values, opts, row, scope) for c, row in zip(cands, rows) if c.reason is None]
    done = [d for d in done if d is not None]
    if done:
        gm.graph.lint()
        gm.recompile()
    return done


def placeholder_values(gm: GraphModule, example_inputs) -> Dict[Node, torch.Tensor]:
    # Dynamo hands parameters and buffers to the backend as inputs whose examples are the real tensors.
    phs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    return {n: v for n, v in zip(phs, example_inputs) if isinstance(v, torch.Tensor)}


def _local_guards(c: Candidate, values, opts: RewriteOptions) -> None:
    if c.reason:
        return
    linears: List[Linear] = [*c.cols, c.down]
    if any(t is not None and t not in values for lin in linears for t in lin.tensors.values()):
        return c.skip("weights computed at run time (not module buffers)")
    if any(not isinstance(i, int) for lin in linears for i in lin.ints):
        return c.skip("group arguments of a gptq_mm are not constants")
    width = c.h_local.meta["example_value"].shape[-1]
    if not isinstance(width, int) or width % 8:
        return c.skip(f"dims not divisible: intermediate size per rank {width} is not a multiple of 8")
    if c.perm is not None:
        _perm_guards(c, values[c.perm.args[2]], width)
    if not c.reason and c.form in ("L", "U") and not opts.allow_group_offset:
        groups = width * c.world // c.down.ints[0]
        if groups % c.world or (width % c.down.ints[0]):
            c.skip(f"dims not divisible: {groups} groups over {c.world} ranks (allow_group_offset is off)")


def _perm_guards(c: Candidate, perm: torch.Tensor, width: int) -> None:
    size = width * c.world if c.form == "N" else width
    rows = torch.arange(size, device=perm.device)
    if perm.dim() != 1 or perm.numel() != size or not torch.equal(torch.sort(perm.long()).values, rows):
        return c.skip(f"permutation buffer is not a permutation of range({size})")
    if c.world == 1 and torch.equal(perm.long(), rows):
        c.skip("identity permutation: nothing to fold")


def _agree_on_plans(cands: List[Candidate], values, opts: RewriteOptions) -> None:
    """Before any exchange, the ranks of each group agree on a hash of their whole plan (rank-independent parts)."""
    groups = sorted({c.group for c in cands if c.group is not None})
    for name in groups:
        mine = [c for c in cands if c.group == name]
        sync = Sync(resolve_group(name), opts.timeout_s)
        if not sync.same(digest(*[p for c in mine for p in _plan_parts(c, values)]), "rewrite plan agreement"):
            for c in mine:
                c.skip("ranks disagree on the rewrite plan")


def _plan_parts(c: Candidate, values) -> list:
    shapes = [tuple(values[q].shape) for q in (col.tensors["qweight"] for col in c.cols) if q in values]
    parts = [c.name, c.form, c.kind, c.world, c.reason, c.fused, shapes]
    if c.reason is None and c.perm is not None and c.form == "N":
        parts.append(values[c.perm.args[2]])
    if c.reason is None and c.form in ("L", "U"):
        parts += [values[c.down.tensors["scales"]], values[c.down.tensors["qzeros"]]]
    return parts


def _row(c: Candidate) -> RewriteRow:
    return RewriteRow(mlp=c.name, layers=c.layers, kind=c.kind, form=c.form, tp=c.world, reason=c.reason or "",
                      down_node=c.down.node.name, col_nodes=tuple(col.node.name for col in c.cols))


def _orphan_row(o: Orphan) -> RewriteRow:
    reason = "MLP split by a graph break: no down projection after the runtime permutation in this graph"
    return RewriteRow(mlp=o.name, layers="?", kind="?", form="N/L", tp=0, reason=reason)


def _rewrite_one(gm: GraphModule, c: Candidate, values, opts: RewriteOptions, row: RewriteRow, scope
                 ) -> Optional[Callable]:
    sync = Sync(None if c.group is None else resolve_group(c.group), opts.timeout_s)
    target = exchange(c, values, sync, fail=opts.fail_rank == c.rank)
    try:
        err, why = probe_error(c, values, target, sync, opts.probe_seed), ""
    except RewriteAborted:
        raise
    except Exception as e:  # e.g. symbolic sizes the interpreter cannot replay; same graph, same error on every rank
        err, why = float("inf"), f"probe check could not run ({type(e).__name__}: {e})"
    if not sync.all_ok(err <= opts.probe_rtol, "probe verdict"):
        row.reason = why or f"probe check failed: old and new MLP differ (max rel err {err:.2e} on this rank)"
        return None
    owners = find_owners(c, values, scope)
    in_place = owners is not None and owners.applicable(target)
    if opts.tile_weights:
        target = _tiled(target, down_too=c.form != "N" or in_place)
    if in_place:
        row.weights, convert = "in place", (lambda: owners.convert(c, target))
    else:
        row.weights, row.private_bytes, convert = "private copy", _private_bytes(target), (lambda: None)
    _commit_graph(gm, c, target)
    _fill_row(row, c, target)
    return convert


def _tiled(t: Target, down_too: bool) -> Target:
    """t with the words of each weight that has contiguous groups tiled (layout.py), where its shape allows. The
    down only with ``down_too``: form N's is the graph's own, and a tiled private copy would hold it twice."""
    def tile(w):
        return w.with_layout(tiled=True) if w.can_tile else w

    down = tile(t.down) if down_too else t.down
    return replace(t, cols=[tile(w) for w in t.cols], down=down, down_changed=t.down_changed or down is not t.down)


def _private_bytes(t: Target) -> int:
    down = t.down.nbytes() if t.down_changed else 0
    p1 = 0 if t.p1 is None else t.p1.numel() * t.p1.element_size()
    return sum(w.nbytes() for w in t.cols) + sum(v.numel() * v.element_size() for v in t.aligned.values()) + down + p1


def _fill_row(row: RewriteRow, c: Candidate, t: Target) -> None:
    h = c.h_local.meta["example_value"]
    row.applied = True
    row.collectives_removed = 1 if c.gather is not None else 0
    # The removed AllGather brought (world - 1) ranks' [M, I / world] activations to this rank on every call.
    row.comm_removed = (c.world - 1) * h.shape[-1] * h.element_size() * M if c.gather is not None else 0 * M
    down = "down: gptq_mm, sorted groups, no g_idx" + ("" if c.form == "N" else f" (was g_idx, form {c.form})")
    row.kernels = f"{_first_layers_kernel(row, t)}; {down}"


def _first_layers_kernel(row: RewriteRow, t: Target) -> str:
    names = "/".join(row.layers.split(", ")[:-1])  # named before the commit: new weights have no module path
    if t.p1 is not None:
        return f"{names}: sorted via x[P1]"
    if all(w.g_idx is None for w in t.cols):
        return f"{names}: sorted groups"
    return f"{names}: per-row g_idx kept ({t.p1_note})"


def _commit_graph(gm: GraphModule, c: Candidate, t: Target) -> None:
    for col, w in zip(c.cols, t.cols):  # a g_idx left on the target is the unchanged one the graph already reads
        _set_weight(gm, col, w, f"{c.name}.{col.path or col.node.name}", keep_g_idx=w.g_idx is not None)
    if t.p1 is not None:
        _permute_input(gm, c, t.p1)
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    for ph, v in t.aligned.items():
        with gm.graph.inserting_before(min((u for u in ph.users if u in c.act_nodes), key=order.get)):
            const = _constant(gm, f"{c.name}.{ph.name}", v)
        for n in c.act_nodes:
            n.replace_input_with(ph, const)
    if t.down_changed:
        _set_weight(gm, c.down, t.down, f"{c.name}.{c.down.path or c.down.node.name}", keep_g_idx=False)
    c.down.node.update_arg(0, c.h_local)
    for n in c.dead_nodes:  # users first; DCE would keep the collectives, so erase them by hand
        gm.graph.erase_node(n)


def _permute_input(gm: GraphModule, c: Candidate, p1: torch.Tensor) -> None:
    """One ``index_select(x, -1, P1)`` read by every column layer (their rows are sorted by P1); x's other
    readers (the residual) keep the original order."""
    x = c.cols[0].node.args[0]
    with gm.graph.inserting_before(c.cols[0].node):
        perm = _constant(gm, f"{c.name}.in_perm", p1)
        xp = gm.graph.call_function(torch.index_select, (x, -1, perm))
    for key in ("example_value", "val"):  # same shape, dtype and device as x: later passes read them
        if key in x.meta:
            xp.meta[key] = x.meta[key]
    for col in c.cols:
        col.node.update_arg(0, xp)


def _set_weight(gm: GraphModule, lin: Linear, w, prefix: str, keep_g_idx: bool) -> None:
    with gm.graph.inserting_before(lin.node):
        qweight, qzeros, scales = (_constant(gm, f"{prefix}.{k}", getattr(w, k))
                                   for k in ("qweight", "qzeros", "scales"))
    g_idx = lin.node.args[4] if keep_g_idx else None
    lin.node.args = (lin.node.args[0], qweight, qzeros, scales, g_idx, w.group_size, w.group_offset, w.zero_offset)


def _constant(gm: GraphModule, name: str, value: torch.Tensor) -> Node:
    name = "_tpaware_" + "".join(ch if ch.isalnum() else "_" for ch in name)
    gm.register_buffer(name, value, persistent=False)
    return gm.graph.get_attr(name)
