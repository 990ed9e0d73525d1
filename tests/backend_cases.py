"""Rank-side bodies of the backend tests (module-level, so the gloo rank pool can run them).

Each returns a small picklable summary; the assertions live in test_backend.py."""

import operator
import time

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.nn.functional as F
from torch import nn

from tpaware_compile import report as R
from tpaware_compile.backend import tpaware  # by function: the tests run without the package installed too
from tpaware_compile.layout import is_tiled
from tpaware_compile.models import Decoder, DecoderConfig, Parallel, random_weights
from tpaware_compile.nn import TPMLP
from tpaware_compile.quantize import quantize

GROUP = 32
INTER = 192  # 6 groups: 3 per rank at TP 2, 1.5 at TP 4 (shards share a boundary group)


def config(family: str = "llama", layers: int = 2, hidden: int = 64, inter: int = INTER) -> DecoderConfig:
    return DecoderConfig(vocab=64, hidden=hidden, inter=inter, layers=layers, heads=4, kv_heads=2, family=family)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return float((a - b).abs().max() / a.abs().max())


def compile_decoder(rank, world, family="llama", form="N", fused=False, collectives="functional",
                    hand_off="eager", zero_offset=0, dtype="float32", dynamic=None, presort=False, tileable=False,
                    **options):
    """Eager and compiled twins of one small decoder; returns a summary of prefill, decode and eager-after.
    ``tileable``: hidden 128 and intermediate 256, so that the shards of TP 1 and 2 can be tiled (layout.py)."""
    torch._dynamo.reset()
    R.clear_reports()
    cfg = config(family, hidden=128, inter=256) if tileable else config(family)
    w = random_weights(cfg, dtype=getattr(torch, dtype), group_size=GROUP, seed=0, zero_offset=zero_offset)
    par = Parallel(rank=rank, world=world, form=form, collectives=collectives, fused=fused, presort=presort)
    eager, model = Decoder(cfg, par, w), Decoder(cfg, par, w)
    opts = {"tpaware.hand_off": hand_off, "tpaware.keep_graph": True, **options}
    compiled = torch.compile(model, backend=tpaware, options=opts, dynamic=dynamic)
    steps = [(torch.tensor([[3, 14, 15, 9, 26]]), torch.arange(5)), (torch.tensor([[5]]), torch.tensor([5]))]
    out = {"equal": [], "err": []}
    for tokens, pos in steps:  # prefill (M=5) then decode (M=1): two graphs
        a, b = eager(tokens, pos), compiled(tokens, pos)
        out["equal"].append(torch.equal(a, b))
        out["err"].append(rel_err(a, b))
    a, b = eager(torch.tensor([[7]]), torch.tensor([6])), model(torch.tensor([[7]]), torch.tensor([6]))
    out.update(eager_after_err=rel_err(a, b), eager_after_equal=torch.equal(a, b))
    out["forms"] = [blk.mlp.form for blk in model.blocks]
    out["reports"] = [r.to_dict() for r in R.all_reports()]
    out["graph"] = graph_summary(R.all_reports()[0])
    out["g_idx_none"] = [gptq_g_idx(rep) for rep in R.all_reports()]  # rewritten graph, then the form-T retrace
    out["tiled"] = [qweights_tiled(rep) for rep in R.all_reports()]
    out["modules_tiled"] = [is_tiled(t) for name, t in model.named_buffers() if name.endswith("qweight")]
    out["in_perm"] = [blk.mlp.in_perm is not None for blk in model.blocks]
    out["memory"] = weight_bytes(model, R.all_reports()) / weight_bytes(eager, [])
    return out


def compile_decoder_kw(rank, world, family, form, kw: dict):
    return compile_decoder(rank, world, family, form, **kw)


def _tensors(rep):
    """node -> the tensor a kept graph reads there: a constant (get_attr) or a graph input's example value."""
    gm = rep.graph_module
    values = dict(zip([n for n in gm.graph.nodes if n.op == "placeholder"], rep.example_inputs))
    return lambda n: getattr(gm, n.target) if n.op == "get_attr" else values[n]


def graph_summary(rep) -> dict:
    """What the rewritten graph itself says about each MLP (not the report's claims)."""
    gm, tensor = rep.graph_module, _tensors(rep)
    mlps = []
    for down in [n for n in gm.graph.nodes if n.name in {r.down_node for r in rep.rows}]:
        path = _path_to_columns(down)
        cols = _columns(path)
        mlps.append({
            "g_idx_is_none": down.args[4] is None,
            "cols_g_idx_none": [c.args[4] is None for c in cols],
            # the folded act-order of the first layers: they read index_select(x, -1, P1), P1 a constant the
            # rewrite added (get_attr) or a presorted module's own in_perm (placeholder)
            "cols_read_permuted_x": all(c.args[0].target is torch.index_select for c in cols),
            "cols_p1_source": sorted({c.args[0].args[2].op for c in cols if c.args[0].target is torch.index_select}),
            "scales_groups": tensor(down.args[3]).shape[0],
            "group_offset": down.args[6],
            "collectives": [str(n.target) for n in path + list(down.users) if "c10d" in str(n.target)],
            "permutations": [n.name for n in path if _is_permutation(n)],
        })
    all_gathers = [n for n in gm.graph.nodes if "all_gather" in str(n.target)]
    return {"mlps": mlps, "all_gathers": len(all_gathers)}


def _is_permutation(n) -> bool:
    """index_select, or indexing with a tensor (``h[..., perm]``)."""
    if n.target is torch.index_select:
        return True
    return n.target is operator.getitem and any(isinstance(a, torch.fx.Node) for a in _flat(n.args[1:]))


def _flat(args):
    for a in args:
        if isinstance(a, (tuple, list)):
            yield from _flat(a)
        else:
            yield a


def _columns(path) -> list:
    """The column-parallel gptq_mm calls that feed the path to down."""
    found = {a for n in path for a in _flat(n.args) if isinstance(a, torch.fx.Node) and "gptq_mm" in str(a.target)}
    return sorted(found, key=lambda n: n.name)


def gptq_g_idx(rep) -> list:
    """g_idx is None, for every quantized matmul of a kept graph."""
    return [n.args[4] is None for n in rep.graph_module.graph.nodes if "gptq_mm" in str(n.target)]


def qweights_tiled(rep) -> list:
    """Whether each quantized matmul of a kept graph reads tiled words: a constant or a graph input's value."""
    tensor = _tensors(rep)
    calls = [n for n in rep.graph_module.graph.nodes if n.op == "call_function" and "gptq_mm" in str(n.target)]
    return [is_tiled(tensor(n.args[1])) for n in calls]


def _path_to_columns(down) -> list:
    """Nodes between the column-parallel gptq_mm calls and the down projection."""
    seen, stack = [], [down.args[0]]
    while stack:
        n = stack.pop()
        if not isinstance(n, torch.fx.Node) or n in seen or n.op in ("placeholder", "get_attr"):
            continue
        if "gptq_mm" in str(n.target):
            continue
        seen.append(n)
        stack.extend(a for a in _flat(n.args) if isinstance(a, torch.fx.Node))
    return seen


def weight_bytes(model: nn.Module, reports) -> int:
    """Bytes of distinct storages held by the model's buffers/parameters and by compiled graphs' constants."""
    tensors = list(model.buffers()) + list(model.parameters())
    for rep in reports:
        if rep.graph_module is not None:
            tensors += [b for name, b in rep.graph_module.named_buffers() if name.startswith("_tpaware_")]
    seen = {}
    for t in tensors:
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


def expected_groups(rank: int, world: int) -> int:
    rows = INTER // world
    start = rank * rows
    return (start + rows - 1) // GROUP - start // GROUP + 1


# ---- foreign modules and negative cases -------------------------------------------------------------------


class ForeignMLP(nn.Module):
    """Not a project module: raw buffers and its own forward, form N. Variants make it un-rewritable."""

    def __init__(self, mlp: TPMLP, variant: str = ""):
        super().__init__()
        for name in ("gate", "up", "down"):
            w = getattr(mlp, name).weight()
            for t in ("qweight", "qzeros", "scales", "g_idx"):
                self.register_buffer(f"{name}_{t}", getattr(w, t))
            self.gs, self.go, self.zo = w.group_size, w.group_offset, w.zero_offset
        self.register_buffer("perm", mlp.perm)
        self.rank, self.world, self.variant = mlp.rank, mlp.world, variant

    def _mm(self, x, name):
        t = [getattr(self, f"{name}_{k}") for k in ("qweight", "qzeros", "scales", "g_idx")]
        return torch.ops.tpaware.gptq_mm(x, *t, GROUP, 0 if name != "down" else self.go, 0)

    def _own_slice(self, full):
        width = full.shape[-1] // self.world
        if self.variant == "spelled":  # function spellings: index_select, narrow
            return torch.narrow(torch.index_select(full, -1, self.perm), -1, self.rank * width, width)
        if self.variant == "split":
            return full[..., self.perm].split(width, dim=-1)[self.rank]
        perm = torch.argsort(torch.argsort(self.perm)) if self.variant == "runtime_perm" else self.perm
        return full[..., perm].chunk(self.world, -1)[self.rank]

    def forward(self, x):
        h = F.silu(self._mm(x, "gate")) * self._mm(x, "up")
        full = h
        if self.world > 1:
            full = funcol.wait_tensor(funcol.all_gather_tensor(h.contiguous(), 0, dist.group.WORLD))
            full = torch.cat(full.chunk(self.world, 0), -1)
        if self.variant == "graph_break":
            torch._dynamo.graph_break()
        hp = self._own_slice(full)
        if self.variant == "break_before_down":
            torch._dynamo.graph_break()
        y = self._mm(hp, "down")
        if self.world > 1:
            y = funcol.wait_tensor(funcol.all_reduce(y, "sum", dist.group.WORLD))
        return y + full.sum(-1, keepdim=True) if self.variant == "other_user" else y


def mlp_weights(sorted_down: bool = False, hidden: int = 64, inter: int = INTER) -> dict:
    g = torch.Generator().manual_seed(3)
    q = lambda k, n, act=True: quantize(torch.randn(k, n, generator=g) / k**0.5, GROUP, act_order=act, generator=g)
    gate = q(hidden, inter)
    return {"gate": gate, "up": q(hidden, inter).replace(g_idx=gate.g_idx), "down": q(inter, hidden, not sorted_down)}


def compile_mlp(rank, world, module: nn.Module, hand_off="eager", shape=(1, 4, 64), options=None):
    """Compile one MLP module; returns outputs' agreement, report rows and whether the module was converted."""
    torch._dynamo.reset()
    R.clear_reports()
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(5))
    ref = module(x)
    before = {n: b.clone() for n, b in module.named_buffers()}
    options = {"tpaware.hand_off": hand_off, **(options or {})}
    out = torch.compile(module, backend=tpaware, options=options)(x)
    after = dict(module.named_buffers())
    out2 = torch.compile(module, backend=tpaware, options=options)(x)  # cached graph
    return {"equal": torch.equal(ref, out), "err": max(rel_err(ref, out), rel_err(ref, out2)),
            "hand_offs": [rep.hand_off for rep in R.all_reports()],
            "rows": [r.to_dict() for rep in R.all_reports() for r in rep.rows],
            "buffers_unchanged": all(n in after and torch.equal(b, after[n]) for n, b in before.items()),
            "eager_after_err": rel_err(ref, module(x))}


def foreign_case(rank, world, variant="", hand_off="eager"):
    mlp = TPMLP.from_full("swiglu", mlp_weights(), "N", rank, world, dist.group.WORLD if world > 1 else None)
    return compile_mlp(rank, world, ForeignMLP(mlp, variant), hand_off)


def foreign_tiled_case(rank, world):
    """A foreign module with tpaware.tile_weights: which quantized matmuls of its rewritten graph read tiled words."""
    mlp = TPMLP.from_full("swiglu", mlp_weights(hidden=128, inter=256), "N", rank, world,
                          dist.group.WORLD if world > 1 else None)
    options = {"tpaware.tile_weights": True, "tpaware.keep_graph": True}
    out = compile_mlp(rank, world, ForeignMLP(mlp), shape=(1, 4, 128), options=options)
    out["tiled"] = qweights_tiled(R.all_reports()[0])
    return out


def distinct_g_idx_case(rank, world, form):
    weights = mlp_weights()
    weights["up"] = quantize(torch.randn(64, INTER, generator=torch.Generator().manual_seed(8)) / 8, GROUP,
                             act_order=True, generator=torch.Generator().manual_seed(9))
    assert not torch.equal(weights["up"].g_idx, weights["gate"].g_idx)
    mlp = TPMLP.from_full("swiglu", weights, form, rank, world, dist.group.WORLD)
    out = compile_mlp(rank, world, mlp)
    out["in_perm"] = mlp.in_perm is not None
    return out


def identity_case(rank, world):
    return compile_mlp(rank, world, TPMLP.from_full("swiglu", mlp_weights(sorted_down=True), "N", rank, world))


class DenseMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate, self.up, self.down = nn.Linear(64, 96), nn.Linear(64, 96), nn.Linear(96, 64)

    def forward(self, x):
        return self.down(F.silu(self.gate(x)) * self.up(x))


def dense_case(rank, world):
    torch.manual_seed(0)
    return compile_mlp(rank, world, DenseMLP().requires_grad_(False))


def gather_last_dim_case(rank, world):
    mlp = TPMLP.from_full("swiglu", mlp_weights(), "N", rank, world, dist.group.WORLD, gather_dim=-1)
    # 2-D input: torch 2.13's eager all_gather_tensor(gather_dim=-1) fails on 3-D tensors (_maybe_view_chunk_cat)
    return compile_mlp(rank, world, mlp, shape=(4, 64))


def dynamic_m_case(rank, world):
    """Token counts 5, 1, 7, 9, 11: compiles for 5 (rewrite), 1 (form T) and one dynamic graph, no more."""
    torch._dynamo.reset()
    R.clear_reports()
    cfg = config(layers=1)
    model = Decoder(cfg, Parallel(rank=rank, world=world, form="N"), random_weights(cfg, group_size=GROUP))
    compiled = torch.compile(model, backend=tpaware, options={"tpaware.hand_off": "eager"})
    counts, start = [], 0
    for m in (5, 1, 7, 9, 11):
        compiled(torch.zeros(1, m, dtype=torch.long), torch.arange(start, start + m))
        start += m
        counts.append(len(R.all_reports()))
    return counts


def failure_case(rank, world):
    """Rank 1 dies in the middle of the exchange: every rank must raise, and soon."""
    t0 = time.monotonic()
    try:
        compile_decoder(rank, world, **{"tpaware.fail_rank": 1, "tpaware.timeout_s": 15})
    except Exception as e:  # noqa: BLE001  we report what each rank saw
        return {"raised": type(e).__name__, "message": str(e)[-300:], "seconds": time.monotonic() - t0}
    return {"raised": None, "seconds": time.monotonic() - t0}
