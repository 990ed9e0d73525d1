"""Probe check before committing a rewrite: run the old and the new MLP on one random input on every rank.

The old MLP is the matched subgraph itself, interpreted node by node with the real weights (its AllGather
done by our timed collective), so the check also catches a matcher that misread the graph. Both outputs are
summed over ranks (the AllReduce that follows down), then compared; ranks then agree on the verdict.
"""

from typing import Dict

import torch
from torch.fx import Node

from ..compat import functional_op
from .exchange import Target
from .match import GPTQ_MM, Candidate
from .sync import Sync

def probe_error(cand: Candidate, values: Dict[Node, torch.Tensor], target: Target, sync: Sync, seed: int) -> float:
    """max |old - new| / max |old| over this rank's probe output (after the sum over ranks)."""
    x_node = cand.cols[0].node.args[0]
    x = _probe_input(values[cand.cols[0].tensors["qweight"]].device, x_node, seed)
    old = sync.all_reduce(_run_old(cand, values, x, sync), what="probe AllReduce (old)")
    new = sync.all_reduce(_run_new(cand, values, x, target), what="probe AllReduce (new)")
    return float((old.float() - new.float()).abs().max() / old.float().abs().max().clamp(min=1e-30))


def _probe_input(device: torch.device, x_node: Node, seed: int) -> torch.Tensor:
    like = x_node.meta.get("example_value", x_node.meta.get("val"))
    gen = torch.Generator().manual_seed(seed)  # same seed on every rank: the MLP input is replicated
    # The traced shape itself: the gather's per-rank narrows along dim 0 are baked into the graph.
    shape = [d if isinstance(d, int) else d.node.hint for d in like.shape]
    x = torch.randn(*shape, generator=gen)
    return x.to(dtype=like.dtype, device=device)


def _nodes_in_order(cand: Candidate, extra=()):
    inside = {c.node for c in cand.cols} | set(cand.act_nodes) | set(extra)
    return [n for n in cand.down.node.graph.nodes if n in inside]


def _run_old(cand: Candidate, values, x: torch.Tensor, sync: Sync) -> torch.Tensor:
    env = dict(values)
    env[cand.cols[0].node.args[0]] = x
    for n in _nodes_in_order(cand, [*cand.dead_nodes, cand.down.node]):
        env[n] = _call(n, env, sync)
    return env[cand.down.node]


def _run_new(cand: Candidate, values, x: torch.Tensor, target: Target) -> torch.Tensor:
    env = dict(values)
    env.update(target.aligned)
    cols = {c.node for c in cand.cols}
    x = x if target.p1 is None else x.index_select(-1, target.p1)  # what the new graph feeds the sorted rows
    for col, w in zip(cand.cols, target.cols):
        env[col.node] = mm(x, w)
    for n in _nodes_in_order(cand):
        if n not in cols:
            env[n] = _call(n, env, None)
    return mm(env[cand.h_local], target.down)


def mm(x: torch.Tensor, w) -> torch.Tensor:
    return GPTQ_MM(x, w.qweight, w.qzeros, w.scales, w.g_idx, w.group_size, w.group_offset, w.zero_offset)


def _call(n: Node, env, sync):
    args = torch.fx.node.map_arg(n.args, lambda a: env[a])
    kwargs = torch.fx.node.map_arg(n.kwargs, lambda a: env[a])
    if n.target is functional_op("all_gather_into_tensor"):
        return torch.cat(sync.all_gather(args[0], "probe AllGather"), 0)
    if n.target is functional_op("wait_tensor"):
        return args[0]
    if n.op == "call_method":
        return getattr(args[0], n.target)(*args[1:], **kwargs)
    return n.target(*args, **kwargs)
