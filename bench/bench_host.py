"""Host (CPU) time per call of the quantized matmuls beside their GPU time: what a caller without CUDA graphs
pays per call, and where it goes.

host_us: wall time of enqueuing ``--calls`` calls while the GPU is held busy by a sleep kernel (no call waits on
the GPU, so this is the Python + driver time alone); gpu_us: the same call replayed in a CUDA graph. A path whose
host_us exceeds its gpu_us is host-bound in plain calls. Paths: ``op`` (the custom op, as a compiled graph calls
it, default dispatch), ``library`` (the same through an op registered with torch.library.Library.impl),
``direct`` (the same kernels without an op layer), ``dequant`` (dequantize + cuBLAS, what ran at M > 128 before
the prefill kernel), ``cublas`` (fp16 matmul, for scale); and an empty op through each way of registering one.
With --cprofile the Python functions of the ``op`` path at the largest M, by own and by cumulative time; with
--tiled qweight in the tiled layout, as the backend holds it on sm_90. Under torch.no_grad, as the model benchmarks
run.

    python bench/bench_host.py [--model llama2-13b] [--ms 1,16,512] [--cprofile] [--tiled] --out host.json
"""

import argparse
import cProfile
import io
import json
import os
import pstats
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_kernels import make_gptq  # noqa: E402
from timing import graph_us, header  # noqa: E402

import tpaware_compile.kernels.op  # noqa: E402,F401  (registers the tpaware:: fast ops)
from tpaware_compile.kernels import gptq_mm_sorted, gptq_swiglu_sorted  # noqa: E402
from tpaware_compile.layout import tile  # noqa: E402

MODELS = {"llama2-13b": (5120, 13824), "llama2-7b": (4096, 11008), "llama70b-tp1": (8192, 28672)}
GROUP = 128  # bench_kernels.make_gptq's group size
DEQUANT = dict(kind="dequant")


def hold_gpu() -> None:
    """Queue a sleep kernel of ~0.1 s (H100 clocks), longer than a round of enqueueing: the calls queued behind
    it never wait on the GPU."""
    torch.cuda.synchronize()
    torch.cuda._sleep(200_000_000)


def host_us(fn, calls: int) -> float:
    """Per-call wall time of enqueuing ``calls`` calls behind hold_gpu (median of 5 rounds)."""
    times = []
    for _ in range(5):
        hold_gpu()
        t = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - t) / calls * 1e6)
        torch.cuda.synchronize()
    return sorted(times)[2]


def library_ops():
    """tpaware_host::swiglu / ::mm: the direct calls registered through torch.library.Library.impl (CUDA), beside
    the custom ops (torch.library.custom_op) of kernels/op.py."""
    lib = torch.library.Library("tpaware_host", "FRAGMENT")
    w = "Tensor qweight, Tensor qzeros, Tensor scales"
    lib.define(f"swiglu(Tensor x, {w}, Tensor uq, Tensor uz, Tensor us, int gs) -> Tensor")
    lib.define(f"mm(Tensor x, {w}, int gs) -> Tensor")
    lib.impl("swiglu", lambda x, q, z, s, uq, uz, us, gs: gptq_swiglu_sorted(x, (q, z, s), (uq, uz, us), gs), "CUDA")
    lib.impl("mm", lambda x, q, z, s, gs: gptq_mm_sorted(x, q, z, s, gs), "CUDA")
    return lib


def paths(kind, x, ws):
    """name -> zero-argument call of one path; kind "swiglu" (gate and up: ws[0], ws[1]) or "mm" (ws[0])."""
    (gq, gz, gs), up = ws[0], ws[1]
    w16 = torch.randn(x.shape[1], gq.shape[1], dtype=x.dtype, device=x.device)
    if kind == "swiglu":
        op = torch.ops.tpaware.gptq_swiglu_fast
        return dict(
            op=lambda: op(x, gq, gz, gs, *up, GROUP, 0, 0),
            library=lambda: torch.ops.tpaware_host.swiglu(x, gq, gz, gs, *up, GROUP),
            direct=lambda: gptq_swiglu_sorted(x, ws[0], up, GROUP),
            dequant=lambda: gptq_swiglu_sorted(x, ws[0], up, GROUP, config=DEQUANT),
            cublas=lambda: (torch.nn.functional.silu(x @ w16) * (x @ w16)),
        )
    op = torch.ops.tpaware.gptq_mm_fast
    return dict(op=lambda: op(x, gq, gz, gs, GROUP, 0, 0),
                library=lambda: torch.ops.tpaware_host.mm(x, gq, gz, gs, GROUP),
                direct=lambda: gptq_mm_sorted(x, gq, gz, gs, GROUP),
                dequant=lambda: gptq_mm_sorted(x, gq, gz, gs, GROUP, config=DEQUANT), cublas=lambda: x @ w16)


def dispatch_rows(calls: int):
    """Host time of an empty op (returns x.new_empty) called as a Python function, through an op registered with
    torch.library.Library.impl, and through one made with torch.library.custom_op (as kernels/op.py's are):
    the registration layer's own cost per call."""
    lib = torch.library.Library("tpaware_host", "FRAGMENT")
    lib.define("lib_noop(Tensor x) -> Tensor")
    lib.impl("lib_noop", lambda x: x.new_empty(x.shape), "CUDA")

    @torch.library.custom_op("tpaware_host::custom_noop", mutates_args=())
    def custom_noop(x: torch.Tensor) -> torch.Tensor:
        return x.new_empty(x.shape)

    x = torch.empty(1, device="cuda")
    fns = dict(python=lambda: x.new_empty(x.shape), library_impl=lambda: torch.ops.tpaware_host.lib_noop(x),
               custom_op=lambda: torch.ops.tpaware_host.custom_noop(x))
    rows = [dict(kind="noop", path=name, host_us=host_us(fn, calls)) for name, fn in fns.items()]
    for r in rows:
        print(f"noop {r['path']:>12}: host {r['host_us']:6.1f} us", flush=True)
    return rows


def layer_rows(model: str, calls: int):
    """Host time of each layer of one M = 1 call of the mm (down) shape on tiled words, innermost last: the whole
    gptq_mm_sorted, its config pick, its argument checks, split_k_matmul (buffers, counters, the launch),
    launch_wgmma (the launch with everything prepared), the bare JIT launch of the same kernel, and the same
    through kernels/launcher.py (the compiled kernel cached per specialization)."""
    from tpaware_compile.kernels import check_sorted_args, pick_config
    from tpaware_compile.kernels import wgmma
    from tpaware_compile.kernels.common import ceil_div, split_k_matmul, split_plan, tile_counters
    from tpaware_compile.kernels.launcher import launch_kernel
    hidden, inter = MODELS[model]
    q, z, sc = [(tile(q), z, s) for q, z, s in make_gptq(inter, hidden, 1)][0]
    x = torch.randn(1, inter, dtype=torch.float16, device="cuda")
    cfg = pick_config(1, inter, hidden, GROUP, x.device, tiled=True)
    part = torch.empty((cfg["SPLIT_K"], 1, hidden), dtype=torch.float32, device="cuda")
    out = torch.empty((1, hidden), dtype=torch.float16, device="cuda")
    counts = tile_counters(hidden // cfg["BLOCK_N"], x.device)
    per, _ = split_plan(ceil_div(inter, cfg["BLOCK_K"]), cfg["SPLIT_K"])
    grid = (hidden // cfg["BLOCK_N"], cfg["SPLIT_K"], 1)
    consts = dict(GROUP_SIZE=GROUP, BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, DTYPE=wgmma.tl_dtype(x.dtype), SERIAL=True,
                  SWIGLU=False, EVEN=True, TILED=True, WORDS=wgmma.word_layout(64, 128, wgmma.NUM_WARPS, True),
                  XL=wgmma.x_layout(16, 128), PARTS=1, num_warps=wgmma.NUM_WARPS,
                  maxnreg=wgmma.register_cap(1, (16, 64, 128), True))
    args = (x, q, z, sc, part, out, counts, None, 1, hidden, inter, x.stride(0), q.stride(0), 0, 0, per,
            wgmma.PAIR_BASE_BITS[x.dtype])  # the kernel's runtime arguments, as launch_wgmma passes them
    fns = dict(
        gptq_mm_sorted=lambda: gptq_mm_sorted(x, q, z, sc, GROUP),
        pick_config=lambda: pick_config(1, inter, hidden, GROUP, x.device, tiled=True),
        check_sorted_args=lambda: check_sorted_args(x, q, z, sc, GROUP, 0, 0),
        split_k_matmul=lambda: split_k_matmul(wgmma.launch_wgmma, x, q, z, sc, GROUP, 0, 0, x.dtype, cfg),
        launch_wgmma=lambda: wgmma.launch_wgmma(x, q, z, sc, GROUP, 0, 0, part, per, cfg, out, counts),
        jit_launch=lambda: wgmma._wgmma_kernel[grid](*args, **consts),
        launch_kernel=lambda: launch_kernel(wgmma._wgmma_kernel, grid, *args, **consts),
    )
    rows = []
    for name, fn in fns.items():
        fn()
        rows.append(dict(kind="layers", model=model, K=inter, N=hidden, M=1, path=name, host_us=host_us(fn, calls)))
        print(f"layers {name:>18}: host {rows[-1]['host_us']:7.1f} us", flush=True)
    return rows


def profile_text(fn, calls: int) -> str:
    """cProfile of ``calls`` calls behind hold_gpu: the top functions by own time, then by cumulative time."""
    hold_gpu()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(calls):
        fn()
    prof.disable()
    torch.cuda.synchronize()
    s = io.StringIO()
    pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(30)
    pstats.Stats(prof, stream=s).sort_stats("cumulative").print_stats(40)
    return s.getvalue()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="llama2-13b", choices=sorted(MODELS))
    p.add_argument("--ms", default="1,16,512")
    p.add_argument("--calls", type=int, default=40)
    p.add_argument("--cprofile", action="store_true")
    p.add_argument("--tiled", action="store_true", help="qweight tiled (layout.py), as the backend holds it on sm_90")
    p.add_argument("--out", required=True)
    a = p.parse_args()
    head = dict(header(), tiled=a.tiled)
    print(head, flush=True)
    hidden, inter = MODELS[a.model]
    ms = [int(s) for s in a.ms.split(",")]
    rows, profiles = dispatch_rows(a.calls) + layer_rows(a.model, a.calls), []
    _lib = library_ops()  # held: the tpaware_host ops live as long as their Library object
    for kind, k, n in (("swiglu", hidden, inter), ("mm", inter, hidden)):
        ws = make_gptq(k, n, 2)
        ws = [(tile(q), z, s) for q, z, s in ws] if a.tiled else ws
        for m in ms:
            x = torch.randn(m, k, dtype=torch.float16, device="cuda")
            fns = paths(kind, x, ws)
            for name, fn in fns.items():
                row = dict(model=a.model, kind=kind, K=k, N=n, M=m, path=name, host_us=host_us(fn, a.calls),
                           gpu_us=graph_us([fn], calls=20))
                rows.append(row)
                print(f"{kind:>6} K={k:5d} N={n:5d} M={m:4d} {name:>8}: host {row['host_us']:7.1f} us   "
                      f"gpu {row['gpu_us']:7.1f} us", flush=True)
            if a.cprofile and m == max(ms):
                text = profile_text(fns["op"], a.calls)
                profiles.append(f"== {kind} M={m} op, {a.calls} calls\n{text}")
                print(profiles[-1], flush=True)
    with open(a.out, "w") as f:
        json.dump(dict(head, method=__doc__.split("\n\n")[1], rows=rows, profiles=profiles), f, indent=1)
    print("wrote", a.out)


if __name__ == "__main__":
    with torch.no_grad():  # inference, as the model benchmarks run
        sys.exit(main())
