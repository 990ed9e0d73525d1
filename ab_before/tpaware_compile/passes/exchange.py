"""The one-time weight exchange: from this rank's shards in form N / L / U to its TP-aware target shards.

Rank r holds the column shard R_r of gate/up (fc) but needs columns P2[R_r]; for L and U it also needs the
down rows P2[R_r]. We all-gather the shards of one layer (transient: one full layer at a time), then cut the
target with the exact transforms of reorder.py:

    cols  full -> permute_cols(P2) -> shard_cols(r)           (fused gate_up: each half on its own)
          -> rows sorted by their shared act-order P1, locally (column-parallel shards hold all K rows);
             the graph then reads x[..., P1], so every matmul of the MLP has contiguous groups
    down  full -> permute_rows(P2) -> drop g_idx -> shard_rows(r)   (sharded scales/zeros, maybe a group offset)

P2 = stable argsort of the full down g_idx: the graph's perm buffer for form N (checked to be a permutation),
computed from the gathered g_idx shards for L and U. Down scales/zeros are full on every rank in L and U, so
only down qweight rows and g_idx travel.
"""

from dataclasses import dataclass
from typing import Dict, List, Optional

import torch
from torch.fx import Node

from .. import reorder
from ..gptq import GPTQWeight
from .match import Candidate
from .sync import RewriteAborted, Sync, digest


@dataclass
class Target:
    p2: torch.Tensor  # [I] the global permutation
    cols: List[GPTQWeight]  # new weights of cand.cols, in order
    aligned: Dict[Node, torch.Tensor]  # new per-column vectors (biases), by their placeholder
    down: GPTQWeight  # new down shard (form N: the graph's own, unless tiled later)
    down_changed: bool  # whether the graph must read ``down`` instead of its own down weight
    p1: Optional[torch.Tensor] = None  # [H] permutation of x folded into the cols' rows (None: not folded)
    p1_note: str = ""  # why the cols keep their g_idx, when they do


def exchange(cand: Candidate, values: Dict[Node, torch.Tensor], sync: Sync, fail: bool = False) -> Target:
    if fail:  # failure injection (tests): this rank dies in the middle of the exchange
        raise RuntimeError(f"tpaware: injected failure on rank {cand.rank} during the exchange of {cand.name}")
    down = cand.down.weight(values)
    if cand.form == "N":
        p2 = values[cand.perm.args[2]].long()
    else:
        down = gather_rows(_unsorted_down(cand, down, values), sync)
        p2 = reorder.stable_argsort(down.g_idx)
        if not sync.same(digest(p2), "agreement on the global permutation"):
            raise RewriteAborted(f"tpaware: ranks computed different global permutations for {cand.name}")
        down = reorder.shard_rows(reorder.drop_contiguous_g_idx(reorder.permute_rows(down, p2)), cand.rank, cand.world)
        down = own_storage(down)
    # reorder.py moves N-major words only (presorted first layers, g_idx None, may hold tiled ones)
    cols = [own_storage(_target_cols(c.weight(values).with_layout(tiled=False), p2, cand, sync)) for c in cand.cols]
    cols, p1, note = reorder.sort_shared_rows(cols)
    aligned = {ph: _target_vector(values[ph], p2, cand, sync) for ph in cand.aligned}
    return Target(p2, cols, aligned, down, cand.form != "N", p1, note)


def own_storage(w: GPTQWeight) -> GPTQWeight:
    """A row shard of a contiguous tensor is a view that keeps the whole gathered layer alive: copy it out."""
    def own(t):
        return t if t is None or t.untyped_storage().nbytes() == t.numel() * t.element_size() else t.clone()

    return w.replace(qweight=own(w.qweight), qzeros=own(w.qzeros), scales=own(w.scales), g_idx=own(w.g_idx),
                     bias=own(w.bias))


def _unsorted_down(cand: Candidate, down: GPTQWeight, values) -> GPTQWeight:
    """Form L holds its rows sorted per rank (down = shard[local_perm]): undo that to the stored row order."""
    if cand.form != "L":
        return down
    inverse = torch.argsort(values[cand.perm.args[2]].long())
    return reorder.permute_rows(down, inverse)


def gather_rows(w: GPTQWeight, sync: Sync) -> GPTQWeight:
    """The full [I, H] down from row shards that carry g_idx and full scales/zeros."""
    qweight = torch.cat(sync.all_gather(w.qweight, "exchange of down qweight rows"), 0)
    g_idx = torch.cat(sync.all_gather(w.g_idx, "exchange of down g_idx"), 0)
    return w.replace(qweight=qweight, g_idx=g_idx)


def gather_cols(w: GPTQWeight, sync: Sync) -> GPTQWeight:
    """The full [H, I] weight from column shards (shard widths are multiples of 8, so packed qzeros concatenate)."""
    cat = lambda t, dim, what: torch.cat(sync.all_gather(t, f"exchange of {what}"), dim)
    return w.replace(qweight=cat(w.qweight, 1, "qweight columns"), qzeros=cat(w.qzeros, 1, "qzeros columns"),
                     scales=cat(w.scales, 1, "scales columns"), bias=None if w.bias is None else cat(w.bias, 0, "bias"))


def _target_cols(w: GPTQWeight, p2: torch.Tensor, cand: Candidate, sync: Sync) -> GPTQWeight:
    if not cand.fused:
        return _permuted_shard(w, p2, cand, sync)
    half = w.out_features // 2  # per rank [gate_r | up_r]: permute each half on its own
    halves = [reorder.narrow_cols(w, start, half) for start in (0, half)]
    return reorder.cat_cols([_permuted_shard(h, p2, cand, sync) for h in halves])


def _permuted_shard(w: GPTQWeight, p2: torch.Tensor, cand: Candidate, sync: Sync) -> GPTQWeight:
    full = gather_cols(w, sync)
    return reorder.shard_cols(reorder.permute_cols(full, p2), cand.rank, cand.world)


def _target_vector(v: torch.Tensor, p2: torch.Tensor, cand: Candidate, sync: Sync) -> torch.Tensor:
    full = torch.cat(sync.all_gather(v, "exchange of per-column vectors"), 0)  # [I]
    width = v.shape[0]
    return full[p2][cand.rank * width:(cand.rank + 1) * width].contiguous()
