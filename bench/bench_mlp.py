"""Per-layer latency of a tensor-parallel GPTQ act-order MLP: form N eager and with Inductor, form L, and
``backend="tpaware"`` (its default; and on N-major words, ``tpaware_nmajor``: the default tiles them on sm_90),
beside the AllGather + permutation and the AllReduce alone.

    torchrun --nproc-per-node T bench/bench_mlp.py [--quick] --out bench/results/mlp_<device>.json   # NCCL
    python bench/bench_mlp.py --single-gpu --out ...   # one rank's compute path at TP 2/4/8 shard shapes
    python bench/bench_mlp.py --cpu-check              # 2 gloo ranks, tiny shapes: every variant runs and agrees

Every variant runs under CUDA graphs (bench/timing.py), rotating over MLP copies whose weights total at
least 400 MB per rank, and names the matmul kernel it uses. Before timing, every variant's output is checked
against form N eager on the same input. Rank 0 writes the results.
"""

import argparse
import json
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import graph_us, header, wall_us  # noqa: E402

from tpaware_compile.backend import tpaware  # the function: the bench needs no installed entry point  # noqa: E402
from tpaware_compile.collectives import all_gather_last_dim, all_reduce_sum  # noqa: E402
from tpaware_compile.compat import raise_recompile_limit  # noqa: E402
from tpaware_compile.layout import words_of  # noqa: E402
from tpaware_compile.nn import TPMLP  # noqa: E402
from tpaware_compile.quantize import random_gptq  # noqa: E402

MODELS = {"llama70b": ("swiglu", 8192, 28672), "granite20b": ("gelu", 6144, 24576)}
TINY = {"tiny_swiglu": ("swiglu", 64, 256), "tiny_gelu": ("gelu", 64, 256)}
M_ALL = (1, 2, 4, 8, 16, 32, 64, 128)
ROTATE_BYTES = 400e6


def full_weights(kind, hidden, inter, seed, dtype):
    g = torch.Generator().manual_seed(seed)
    gs = 128 if hidden >= 1024 else 32  # tiny validation shapes need groups that fit

    def layer(k, n, bias=False):
        return random_gptq(k, n, gs, scale_dtype=dtype, bias=bias, generator=g)

    if kind == "gelu":
        return {"fc": layer(hidden, inter, True), "proj": layer(inter, hidden, True)}
    gate = layer(hidden, inter)
    return {"gate": gate, "up": layer(hidden, inter).replace(g_idx=gate.g_idx), "down": layer(inter, hidden)}


def build(kind, hidden, inter, form, rank, world, device, dtype, kernel, copies, presort):
    """``copies`` MLPs with different weights, on ``device``."""
    mlps = []
    for c in range(copies):
        w = {n: _to(v, device) for n, v in full_weights(kind, hidden, inter, 100 + c, dtype).items()}
        mlps.append(TPMLP.from_full(kind, w, form, rank, world, kernel=kernel, presort=presort).to(device))
    return mlps


def _to(w, device):
    return w.replace(**{f: getattr(w, f).to(device) for f in ("qweight", "qzeros", "scales", "g_idx", "bias")
                        if getattr(w, f) is not None})


def copies_for(hidden, inter, world) -> int:
    per_rank = 3 * hidden * inter / world / 2  # int4 bytes of gate + up + down (fc + proj is less)
    return max(2, int(-(-ROTATE_BYTES // per_rank)))


def variants(kind, hidden, inter, rank, world, device, dtype, kernel, copies, presort, fuse=True):
    """name -> (list of callables on x, matmul kernel description). ``presort``: the first layers run as vLLM
    runs act-order column-parallel layers (rows sorted at load, x[..., P1]); else on the per-row g_idx kernel."""
    def make(form):
        return build(kind, hidden, inter, form, rank, world, device, dtype, kernel, copies, presort)

    first = "gate/up sorted via x[P1]" if presort else "gate/up per-row g_idx"
    eager_n = make("N")
    out = {"formN_eager": (eager_n, f"{kernel}: {first}, down sorted")}
    out["formN_inductor"] = ([torch.compile(m, backend="inductor") for m in eager_n],
                             f"{kernel} (opaque custom op under Inductor): {first}, down sorted")
    out["formL"] = (make("L"), f"{kernel}: {first}, down per-row g_idx (rank-local act-order)")
    rewritten = convert_each(make("N"), hidden, device, dtype, {"tpaware.fuse_swiglu": fuse})
    unfused = "" if fuse else ", SwiGLU unfused"
    out["tpaware"] = (rewritten, f"tpaware lowering{unfused}, {words_of(rewritten[0])} words")
    # the backend's default tiles the words on sm_90 only (layout.py): the same lowering on N-major words beside it
    out["tpaware_nmajor"] = (convert_each(make("N"), hidden, device, dtype,
                                          {"tpaware.fuse_swiglu": fuse, "tpaware.tile_weights": False}),
                             f"tpaware lowering{unfused}, N-major words")
    # x here is the compiled graph's input: with tpaware.fold_perm the first layers take x and P1 (their op gathers,
    # or the decode x-prep kernel reads x[..., P1]); without it Inductor runs the gather
    out["tpaware_fold_perm"] = (convert_each(make("N"), hidden, device, dtype,
                                             {"tpaware.fuse_swiglu": fuse, "tpaware.fold_perm": True}),
                                "tpaware lowering, x[P1] folded into the first layers' call")
    return out


def convert_each(mlps, hidden, device, dtype, options=None):
    """Compile and run each copy once: each is rewritten in place with its own weights on its first call (the
    later copies through the per-instance rewrite of the graph Dynamo shares); converted copies then share one
    retraced form-T graph."""
    x = torch.zeros(1, hidden, device=device, dtype=dtype)
    compiled = []
    for m in mlps:
        compiled.append(torch.compile(m, backend=tpaware, options=options))
        compiled[-1](x)
    return compiled


def comm_fns(mlp, hidden, inter, world, m, device, dtype):
    h = torch.randn(m, inter // world, device=device, dtype=dtype)
    y = torch.randn(m, hidden, device=device, dtype=dtype)

    def gather_perm():
        return all_gather_last_dim(h, world)[..., mlp.perm].chunk(world, dim=-1)[mlp.rank]

    def reduce():
        return all_reduce_sum(y.clone(), world).clone()  # the clone waits for the collective, as a user would

    return {"allgather_perm": [gather_perm], "allreduce": [reduce]}


def check(fns_by_variant, x, tol):
    """Relative error of every variant's first copy against form N eager's first copy, on one input."""
    ref = fns_by_variant["formN_eager"][0][0](x).float()
    errors = {}
    for name, (mlps, _) in fns_by_variant.items():
        for i, mlp in enumerate(mlps):
            want = fns_by_variant["formN_eager"][0][i](x).float() if i else ref
            err = float((mlp(x).float() - want).abs().max() / want.abs().max())
            errors[name] = max(errors.get(name, 0.0), err)
    bad = {k: e for k, e in errors.items() if not e < tol}
    if bad:
        raise RuntimeError(f"variants disagree with form N eager: {bad}")
    return errors


def _check_rewritten(mlps):
    """Every tpaware copy was converted by the backend (a silent eager fallback would time the wrong thing)."""
    unconverted = [i for i, m in enumerate(mlps) if m._orig_mod.form != "T"]
    if unconverted:
        raise RuntimeError(f"tpaware did not rewrite copies {unconverted}: see the rewrite report")


def run(rank, world, device, models, ms, kernel, out_path, timer, rows=None, meta=None, presort=True, fuse=True):
    """Time every variant; rank 0 rewrites ``out_path`` after each row (a run cut short keeps what it measured).
    ``rows`` and ``meta`` let several runs share one result file."""
    raise_recompile_limit(1024)  # one compile per weight copy, or Dynamo falls back to eager unseen
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    rows = [] if rows is None else rows
    for model, (kind, hidden, inter) in models.items():
        copies = copies_for(hidden, inter, world) if device.type == "cuda" else 2  # 2: rotation runs on CPU too
        found = variants(kind, hidden, inter, rank, world, device, dtype, kernel, copies, presort, fuse)
        for m in ms:
            # the input of a TP MLP is replicated: every rank draws the same x
            x = torch.randn(m, hidden, generator=torch.Generator().manual_seed(m)).to(device, dtype)
            errors = check(found, x, 2e-2 if dtype == torch.float16 else 1e-4)
            _check_rewritten(found["tpaware"][0])
            timed = {name: ([lambda f=f: f(x) for f in mlps], desc) for name, (mlps, desc) in found.items()}
            timed.update({k: (v, "-") for k, v in comm_fns(found["formN_eager"][0][0], hidden, inter, world, m,
                                                           device, dtype).items()})
            for name, (fns, desc) in timed.items():
                rows.append(dict(model=model, tp=world, M=m, variant=name, median_us=timer(fns), kernel=desc,
                                 max_rel_err=errors.get(name)))
                _log(rank, rows[-1])
                if rank == 0 and out_path:
                    _write(out_path, rows, meta)
    return rows


def _write(path, rows, meta):
    with open(path, "w") as f:
        json.dump(dict(header(), **(meta or {}), rows=rows), f, indent=1)


def _log(rank, row):
    if rank == 0:
        print(f"{row['model']:>12} tp{row['tp']} M={row['M']:<4} {row['variant']:<15} {row['median_us']:9.1f} us"
              f"  {row['kernel']}", flush=True)


def _cpu_check_rank(rank, world, device, out_path):
    run(rank, world, device, TINY, (1, 3), "reference", out_path, wall_us)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true", help="Llama-70B only, M in {1, 16}")
    p.add_argument("--single-gpu", action="store_true", help="one rank's compute path at TP 2/4/8 shard shapes")
    p.add_argument("--cpu-check", action="store_true", help="2 gloo ranks on tiny shapes: validation only")
    p.add_argument("--kernel", default="triton", choices=["triton", "reference"])
    p.add_argument("--per-row-first", action="store_true",
                   help="eager forms run gate/up (fc) on the per-row g_idx kernel instead of presorted rows")
    p.add_argument("--no-fuse-swiglu", action="store_true", help="tpaware lowers gate and up to separate kernels")
    p.add_argument("--models", default=None, help="comma-separated subset of " + ",".join(MODELS))
    p.add_argument("--ms", default=None, help="comma-separated token counts (default: 1, 16 with --quick, else all)")
    p.add_argument("--out", default=None)
    a = p.parse_args()
    if a.cpu_check:
        from tpaware_compile.launch import launch

        launch(2, _cpu_check_rank, a.out)
        return
    names = a.models.split(",") if a.models else ["llama70b"] if a.quick else list(MODELS)
    models = {n: MODELS[n] for n in names}
    ms = tuple(int(m) for m in a.ms.split(",")) if a.ms else (1, 16) if a.quick else M_ALL
    if a.single_gpu:
        return single_gpu(models, ms, a.kernel, a.out, not a.per_row_first, not a.no_fuse_swiglu)
    dist.init_process_group("nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.cuda.set_device(rank)
    try:
        opts = dict(presort=not a.per_row_first, fuse=not a.no_fuse_swiglu)
        run(rank, world, torch.device("cuda", rank), models, ms, a.kernel, a.out, graph_us, meta=opts, **opts)
    finally:
        dist.destroy_process_group()


def single_gpu(models, ms, kernel, out_path, presort, fuse):
    """No collectives: at TP t one rank computes an MLP of intermediate size I/t; time that at world 1."""
    rows, meta = [], dict(mode="single-gpu compute path (no collectives)", presort=presort, fuse=fuse)
    for tp in (2, 4, 8):
        shard = {f"{k}_tp{tp}": (kind, h, i // tp) for k, (kind, h, i) in models.items()}
        run(0, 1, torch.device("cuda"), shard, ms, kernel, out_path, graph_us, rows, meta, presort, fuse)


if __name__ == "__main__":
    main()
