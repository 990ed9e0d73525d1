"""Benchmark the GPTQ int4 matmul kernels on the per-rank MLP shapes of Llama-70B and Granite-20B.

    PYTHONPATH=. python bench/bench_kernels.py [--quick] [--sweep] [--out bench/results/kernels_<device>.json]

Method (every provider the same way, in one run): per-call time of a CUDA graph of back-to-back calls that
rotate over weight copies totalling >= 400 MB (weights come from DRAM, as in a decode step; x stays hot; no
cache flush). Beside it: a same-run streaming floor (a kernel reading the same weight bytes with the same launch
count, no arithmetic), the roof (fewest bytes / measured copy bandwidth) and triton's do_bench median
(L2 flushed before every call), labelled do_bench_us.

The first layers' x[..., P1] (what the TP-aware rewrite leaves before gate/up) is timed on the Llama-70B up
shapes at TP 1 and 8, M = 1 and 16: ``tpaware_perm_folded`` (x and P1 passed to gptq_mm_sorted: read by the
x-prep kernel where it runs, gathered first otherwise) against ``tpaware_perm_gather`` (an index_select launch,
then the kernels), both checked like ``tpaware``. (Up to da6f933 every kernel gathered inside its x loads.)
"""

import argparse
import json
import os
import sys
import time

import torch
import triton
import triton.language as tl

from tpaware_compile.kernels import (PREFILL_MAX_M, common, dequantize_sorted, gemv_rows_config, gptq_mm_gidx,
                                    gptq_mm_sorted, launch_config, pick_config, prefill_config)
from tpaware_compile.layout import tile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import graph_us, header, record_rows  # noqa: E402

GROUP = 128
ROTATE_BYTES = 400e6
MODELS = {"llama70b": (8192, 28672), "granite20b": (6144, 24576)}
# providers that run tiled words on a config of their own (own_config; each described below), from 256 tokens only
# (PREFILL_FORCED) or where the dispatch splits M in two launches
PREFILL_FORCED = ("tpaware_tiled_stream", "tpaware_tiled_split", "tpaware_tiled_dequant")
TILED_FORCED = PREFILL_FORCED + ("tpaware_tiled_one_launch",)
PROVIDERS = ("tpaware", "tpaware_tiled", "torch_int4", "cublas_fp16", "gidx_triton", "tpaware_perm_folded",
             "tpaware_perm_gather", "tpaware_rows", "tpaware_tldot", "tpaware_reduce_launch") + TILED_FORCED
# tpaware_tiled: tpaware's dispatch on the same weights with qweight in the tiled layout (layout.py)
# tpaware_tldot: where tpaware runs the wgmma kernels (sm_90, M = 1..256 or 1024), the config it ran before them
# (the GEMVs at M = 1, the two-row GEMV at M = 2, tl.dot kernels up to 128, dequantize + cuBLAS above)
# x[..., P1] before the first layers (TP-aware rewrite): read inside the kernel, or an index_select launch first.
# Timed where the rewrite leaves it: the Llama-70B up projections (K = 8192) at TP 1 and 8, decode M.
PERM_PROVIDERS = ("tpaware_perm_folded", "tpaware_perm_gather")
PERM_SHAPES = {("llama70b", 1, "up"), ("llama70b", 8, "up")}
PERM_MS = (1, 16)
ROWS_MS = (2, 4, 8)  # tpaware_rows: the multi-row GEMV (gemv_rows_config) beside tpaware's dispatch at these M
# from 256 tokens on the tiled words, the dispatch's picks forced: tpaware_tiled_stream, the prefill kernel's config
# (prefill_config) with stream-K (STREAM), tpaware_tiled_split the same without (its split-K), and
# tpaware_tiled_dequant, dequantize + cuBLAS
# tpaware_tiled_one_launch: where tpaware_tiled runs whole 256-token tiles and the tokens past them as two launches
# (pick_config's head_tail), the one launch over all tokens that ran before (launch_config)
# tpaware_reduce_launch: tpaware's config with the split-K reduced by a second launch (SERIAL off: at M = 1 as up
# to 53b9390, at M >= 2 as up to 582eb33), its floor with one launch more; at M <= 16, only when asked for


def copy_bandwidth() -> float:
    """Bytes/s of a large device-to-device copy, counting read + write."""
    a = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    ms = triton.testing.do_bench(lambda: b.copy_(a), warmup=20, rep=100, return_mode="median")
    return 2 * a.numel() / (ms * 1e-3)


def roof_bytes(k, n, m) -> float:
    return k * n / 2 + (k / GROUP) * n * 2.5 + m * k * 2 + m * n * 2


def bench_us(fns) -> float:
    return triton.testing.do_bench(fns[0], warmup=5, rep=25, return_mode="median") * 1e3


def copies_for(nbytes) -> int:
    return max(2, int(-(-ROTATE_BYTES // nbytes)))


def make_gptq(k, n, copies):
    """Random sorted-group GPTQ tensors (asymmetric zeros, group 128), one set per copy."""
    g = k // GROUP
    out = []
    for _ in range(copies):
        qw = torch.randint(-2**31, 2**31 - 1, (k // 8, n), dtype=torch.int32, device="cuda")
        qz = torch.randint(-2**31, 2**31 - 1, (g, n // 8), dtype=torch.int32, device="cuda")
        sc = (torch.rand(g, n, device="cuda") * 0.01 + 1e-3).half()
        out.append((qw, qz, sc))
    return out


@triton.jit
def _stream_kernel(qw_ptr, sc_ptr, qz_ptr, out_ptr, N, K, G, words_per_split, groups_per_split,
                   BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr):
    """Reads this split's qweight, scales and qzeros once (16-byte loads along N), XORs, writes one word per
    column: the memory-side ceiling of the GEMV's access pattern, with no arithmetic."""
    pid_n, pid_k = tl.program_id(0), tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    acc = tl.zeros([BLOCK_W, BLOCK_N], dtype=tl.int32)
    w0 = pid_k * words_per_split
    w1 = tl.minimum(w0 + words_per_split, K // 8)
    for w in range(w0, w1, BLOCK_W):
        rows = w + tl.arange(0, BLOCK_W)
        acc ^= tl.load(qw_ptr + rows[:, None] * N + offs_n[None, :], mask=(rows < w1)[:, None] & n_mask[None, :])
    g0 = pid_k * groups_per_split
    for g in range(g0, tl.minimum(g0 + groups_per_split, G)):
        s = tl.load(sc_ptr + g * N + offs_n, mask=n_mask).to(tl.int16, bitcast=True).to(tl.int32)
        z = tl.load(qz_ptr + g * (N // 8) + offs_n // 8, mask=n_mask)
        acc ^= (s ^ z)[None, :]
    tl.store(out_ptr + pid_k * N + offs_n, tl.xor_sum(acc, axis=0), mask=n_mask)


def floor_fns(copies, k, n, split_k, launches):
    """Streaming floor: same weight bytes, same number of launches as tpaware (a second, tiny one if it has)."""
    g = k // GROUP
    sk = max(1, split_k)
    gps = -(-g // sk)
    wps = gps * GROUP // 8
    part = torch.empty((sk, n), dtype=torch.int32, device="cuda")
    red = torch.empty((2, n), dtype=torch.float32, device="cuda")
    red_out = torch.empty((1, n), dtype=torch.float16, device="cuda")

    def make(qw, qz, sc):
        def f():
            _stream_kernel[(triton.cdiv(n, 128), sk)](qw, sc, qz, part, n, k, g, wps, gps, BLOCK_N=128, BLOCK_W=32)
            for _ in range(launches - 1):  # tiny kernels standing for x prep / split-K reduction
                common.splitk_finish(red, red_out, 2)
        return f

    return [make(*c) for c in copies]


def check_tpaware(fn, copy, x) -> float:
    """Relative error of ``fn()``, a timed call of this repo's kernels on ``copy``, against fp32
    dequantize-then-matmul of x (x[..., P1] for the perm providers) on this very shape and M: every timed
    configuration is also a checked one."""
    qw, qz, sc = copy
    w = dequantize_sorted(qw, qz, sc, GROUP, 0, 0, torch.float32)
    ref = x.float() @ w
    y = fn().float()
    err = ((y - ref).norm() / ref.norm()).item()
    if not err < 2e-3:
        print(f"WRONG RESULT: rel err {err} for M={x.shape[0]} K={x.shape[1]} N={qw.shape[1]}", flush=True)
    return err


def floor_split(k, n) -> int:
    """The decode GEMV's split-K: its grid streams HBM best, so the floor uses it at every M."""
    cfg = dict(BLOCK_K=128, SPLIT_K=max(1, 1024 // (n // 128)))  # ~8 programs of 4 warps per SM
    return common.split_plan(k // cfg["BLOCK_K"], cfg["SPLIT_K"])[1]


def launch_count(cfg, k) -> int:
    """Kernels per tpaware call: dequant + cuBLAS; or [x prep +] matmul [+ split-K reduction, unless SERIAL]."""
    if cfg["kind"] == "dequant":
        return 2
    if cfg["kind"] == "head_tail":
        return launch_count(cfg["HEAD"], k) + launch_count(cfg["TAIL"], k)
    if cfg.get("STREAM"):  # tiled words: x as it lies; the kernel, then the sum of the tiles it cut
        return 2
    split = common.split_plan(k // cfg["BLOCK_K"], cfg["SPLIT_K"])[1] > 1
    return 1 + int(split and not cfg.get("SERIAL")) + int(cfg["kind"] == "gemv")


def tiled_copies(copies):
    """The same weight copies with qweight tiled (layout.py)."""
    return [(tile(qw), qz, sc) for qw, qz, sc in copies]


def tpaware_fns(copies, x, cfg=None):
    return [lambda qw=qw, qz=qz, sc=sc: gptq_mm_sorted(x, qw, qz, sc, GROUP, 0, 0, config=cfg) for qw, qz, sc in copies]


def probe_shards(head, ms, variants, out):
    """Per model shard (tiled words) and each M of ``ms``: cuBLAS and every config of ``variants(m, k, n)``
    (name -> config), graph-timed, each timed config checked against the fp32 reference; rows (with their time
    over cuBLAS's) appended to ``out`` shard by shard."""
    for model, tp, layer, k, n in shapes(False):
        copies = make_gptq(k, n, copies_for(roof_bytes(k, n, 0)))
        tiled = tiled_copies(copies)
        for m in ms:
            x = torch.randn(m, k, device="cuda", dtype=torch.half)
            base = dict(model=model, tp=tp, layer=layer, K=k, N=n, M=m)
            rows = [dict(base, variant="cublas_fp16", median_us=graph_us(cublas_fns(k, n, m)))]
            for name, cfg in variants(m, k, n).items():
                fns = tpaware_fns(tiled, x, cfg)
                rows.append(dict(base, variant=name, config=cfg, median_us=graph_us(fns),
                                 rel_err=check_tpaware(fns[0], copies[0], x)))
            for row in rows:
                row["vs_cublas"] = row["median_us"] / rows[0]["median_us"]
            record_rows(head, rows, out)
        del copies, tiled
        torch.cuda.empty_cache()


def perm_fns(copies, x, perm, folded: bool):
    """x[..., perm] @ W: x and perm passed to the op (folded), or index_select first, as the graph did."""
    if folded:
        return [lambda qw=qw, qz=qz, sc=sc: gptq_mm_sorted(x, qw, qz, sc, GROUP, 0, 0, perm=perm)
                for qw, qz, sc in copies]
    return [lambda qw=qw, qz=qz, sc=sc: gptq_mm_sorted(x.index_select(-1, perm), qw, qz, sc, GROUP, 0, 0)
            for qw, qz, sc in copies]


def cublas_fns(k, n, m):
    ws = [torch.randn(k, n, device="cuda", dtype=torch.half) * 0.02 for _ in range(copies_for(k * n * 2))]
    x = torch.randn(m, k, device="cuda", dtype=torch.half)
    return [lambda w=w: torch.mm(x, w) for w in ws]


def int4_fns(k, n, m):
    """torch._weight_int4pack_mm (tinygemm) with its own packing, bf16 activations (what it supports)."""
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    fns = []
    for _ in range(copies_for(roof_bytes(k, n, 0))):
        w = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, device="cuda")
        wp = torch._convert_weight_to_int4pack(w, 8)
        sz = (torch.rand(k // GROUP, n, 2, device="cuda") * 0.01).to(torch.bfloat16)
        fns.append(lambda wp=wp, sz=sz: torch._weight_int4pack_mm(x, wp, GROUP, sz))
    return fns


def gidx_fns(copies, x, k):
    g_idx = (torch.randperm(k, device="cuda") // GROUP).to(torch.int32)
    return [lambda qw=qw, qz=qz, sc=sc: gptq_mm_gidx(x, qw, qz, sc, g_idx, 0) for qw, qz, sc in copies]


def own_config(provider, k, n, m, device):
    """The config a provider of this repo runs at M (None for the other providers)."""
    cfg = pick_config(m, k, n, GROUP, device)
    if provider == "tpaware_rows":
        return gemv_rows_config(m, k, n, GROUP, device)
    if provider == "tpaware_tldot":
        return pick_config(m, k, n, GROUP, device, wgmma=False)
    if provider == "tpaware_reduce_launch":
        return dict(cfg, SERIAL=False)
    if provider == "tpaware_tiled":
        return pick_config(m, k, n, GROUP, device, tiled=True)
    if provider in ("tpaware_tiled_stream", "tpaware_tiled_split"):
        return dict(prefill_config(m, k, n, GROUP, device, tiled=True), STREAM=provider == "tpaware_tiled_stream")
    if provider == "tpaware_tiled_dequant":
        return dict(kind="dequant")
    if provider == "tpaware_tiled_one_launch":
        return launch_config(m, k, n, GROUP, device, tiled=True)
    return cfg if provider == "tpaware" or provider in PERM_PROVIDERS else None


def provider_fns(provider, copies, x, k, n, m, perm):
    if provider == "tpaware":
        return tpaware_fns(copies, x)
    if provider == "tpaware_tiled":
        return tpaware_fns(tiled_copies(copies), x)
    if provider in TILED_FORCED:
        return tpaware_fns(tiled_copies(copies), x, own_config(provider, k, n, m, x.device))
    if provider in ("tpaware_rows", "tpaware_reduce_launch", "tpaware_tldot"):
        return tpaware_fns(copies, x, own_config(provider, k, n, m, x.device))
    if provider in PERM_PROVIDERS:
        return perm_fns(copies, x, perm, folded=provider == "tpaware_perm_folded")
    if provider == "cublas_fp16":
        return cublas_fns(k, n, m)
    if provider == "torch_int4":
        return int4_fns(k, n, m)
    return gidx_fns(copies, x, k)


def shapes(quick):
    """Per-rank MLP shapes: up (column-parallel, hidden x inter/T) and down (row-parallel, inter/T x hidden)."""
    for model, (hidden, inter) in MODELS.items():
        for tp in (1, 2, 4, 8):
            if quick and (model != "llama70b" or tp not in (1, 8)):
                continue
            yield model, tp, "up", hidden, inter // tp
            yield model, tp, "down", inter // tp, hidden


def ms_for(model, tp, quick):
    ms = [1, *ROWS_MS, 16, 64, 256] if quick else [1, *ROWS_MS, 16, 32, 64, 256]
    if not quick and model == "llama70b" and tp in (1, 8):
        ms += [512, 1024, 2048, 4096]  # where does fp16 overtake?
    return ms


def skip(provider, model, tp, layer, k, n, m):
    """Baselines too slow to be worth graph time at large M; the perm rows only where the rewrite leaves x[P1];
    the multi-row GEMV only at its M, where tpaware's dispatch, torch int4 and cuBLAS run beside it."""
    if provider in PERM_PROVIDERS:
        return (model, tp, layer) not in PERM_SHAPES or m not in PERM_MS
    if provider == "tpaware_reduce_launch":
        return m > 16
    if provider in PREFILL_FORCED:
        return m < 256
    if provider == "tpaware_tiled_one_launch":
        return pick_config(m, k, n, GROUP, torch.device("cuda"), tiled=True)["kind"] != "head_tail"
    if provider == "tpaware_tldot":
        return m > PREFILL_MAX_M
    if m in ROWS_MS:
        return provider not in ("tpaware", "tpaware_tiled", "tpaware_rows", "torch_int4", "cublas_fp16",
                                "tpaware_tldot")
    # the per-row g_idx kernel is 100x slower than the rest: its M = 256 rows (65 ms a call at TP 1) are in the
    # full file of 5d21f9e
    return provider == "tpaware_rows" or (provider == "torch_int4" and m > 256) or (provider == "gidx_triton"
                                                                                    and m > 64)


def run_shape(model, tp, layer, k, n, ms, bw, providers, rows):
    copies = make_gptq(k, n, copies_for(roof_bytes(k, n, 0)))
    perm = torch.randperm(k, device="cuda")  # int64, as the rewrite's P1
    for m in ms:
        x = torch.randn(m, k, device="cuda", dtype=torch.half)
        floors = {}  # launches -> same-run streaming floor

        def floor_of(cfg):
            launches = launch_count(cfg, k)
            if launches not in floors:
                floors[launches] = graph_us(floor_fns(copies, k, n, floor_split(k, n), launches))
            return floors[launches]

        tp_floor = floor_of(pick_config(m, k, n, GROUP, x.device))
        roof = roof_bytes(k, n, m) / bw * 1e6
        for p in providers:
            if skip(p, model, tp, layer, k, n, m):
                continue
            own = own_config(p, k, n, m, x.device)
            floor = tp_floor if own is None else floor_of(own)
            try:
                fns = provider_fns(p, copies, x, k, n, m, perm)
                row = dict(model=model, tp=tp, layer=layer, K=k, N=n, M=m, provider=p, median_us=graph_us(fns),
                           do_bench_us=bench_us(fns), roof_us=roof, floor_us=floor)
            except Exception as e:  # a provider that cannot run this shape is a result, not a crash
                print(f"{p} failed at K={k} N={n} M={m}: {type(e).__name__}: {str(e)[:300]}", flush=True)
                continue
            row["pct_roof"] = 100 * roof / row["median_us"]
            if own is not None:  # fns[0] computes on copies[0]
                row["config"] = own
                x_used = x.index_select(-1, perm) if p in PERM_PROVIDERS else x
                row["rel_err"] = check_tpaware(fns[0], copies[0], x_used)
            rows.append(row)
            print(f"{model:10s} tp{tp} {layer:4s} K={k:5d} N={n:5d} M={m:4d} {p:12s} graph {row['median_us']:8.1f} "
                  f"do_bench {row['do_bench_us']:8.1f} roof {roof:6.1f} floor {floor:6.1f} "
                  f"({row['pct_roof']:.0f}% roof) {'err %.1e' % row.get('rel_err', 0)}", flush=True)
            del fns
        torch.cuda.empty_cache()


def sweep_configs():
    """(M, configs) tried per shape: the source of pick_config's table (bench/README.md has the rounds). Every
    config reduces its split-K inside the launch (SERIAL), as the dispatch does since 18ff6e7 / 2d5f932; at M = 1
    that changes which split-K and which GEMV (x-prep: 2 launches, plain: 1) win on small shards."""
    gemv = [dict(kind="gemv", BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=sk, num_warps=nw)
            for bn, bk, nw in ((256, 64, 4), (512, 32, 4), (128, 128, 4), (256, 128, 8)) for sk in (4, 8, 16)]
    gemv += [dict(kind="gemv_plain", BLOCK_N=bn, BLOCK_K=128, SPLIT_K=sk, num_warps=4)
             for bn in (64, 128) for sk in (4, 8, 16, 32)]
    swap = [dict(kind="dot", BLOCK_M=32, BLOCK_N=64, BLOCK_K=128, SPLIT_K=sk, num_warps=4, num_stages=3)
            for sk in (4, 8)]
    plain = [dict(kind="dot", SWAP=False, BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, SPLIT_K=sk, num_warps=4, num_stages=3)
             for sk in (2, 4)]
    # the multi-row GEMV: configs that fit in registers (bench/kernel_regs.py), ROWS = M and M / 2
    fits = {1: ((256, 64, 4), (512, 32, 4)), 2: ((256, 64, 4), (256, 32, 4), (512, 32, 8)),
            4: ((512, 16, 8), (128, 64, 4), (256, 16, 4)), 8: ((256, 16, 8), (128, 16, 4))}
    rows = [(m, [dict(kind="gemv", ROWS=r, BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=sk, num_warps=nw)
                 for r in (m // 2, m) for bn, bk, nw in fits[r] for sk in (4, 8)] + swap)
            for m in ROWS_MS]
    per_m = ((1, gemv), *rows, (32, swap + plain), (128, plain + [dict(kind="dequant")]))
    per_m = tuple((m, cfgs + wgmma_configs(m)) for m, cfgs in per_m) + tuple((m, swap + wgmma_configs(m))
                                                                             for m in (16, 64))
    per_m += tuple((m, [dict(kind="dequant")]) for m in PREFILL_MS)
    return tuple((m, [c if c["kind"] == "dequant" else dict(c, SERIAL=True) for c in cfgs]) for m, cfgs in per_m)


def _only(cfgs, only):
    if only == "pick":  # what the dispatch picks between from 257 tokens: the 256 x 128 prefill tile or dequantize
        return [c for c in cfgs if c["kind"] == "dequant" or c.get("PREFILL") and not c.get("SERIAL")
                and (c["BLOCK_M"], c["BLOCK_N"], c["STAGES"]) == (256, 128, 3)]
    if only == "steps":  # the prefill tiles of up to 3 x slots, a second launch reducing their split-K
        return [c for c in cfgs if c.get("PREFILL") and not c.get("SERIAL") and c["STAGES"] <= 3]
    if only == "splits":  # the wgmma kernel's 64-column tile of 128-row steps at every split
        return [c for c in cfgs if c.get("WGMMA") and not c.get("PREFILL") and c["BLOCK_N"] == 64
                and c["BLOCK_K"] == 128]
    if only == "parts":
        return parts_configs([c for c in cfgs if c.get("WGMMA") and not c.get("PREFILL")])
    if only == "decode":
        return [c for c in cfgs if c.get("WGMMA") and not c.get("PREFILL")]
    return [c for c in cfgs if c.get("PREFILL")] if only == "prefill" else cfgs


def parts_configs(decode):
    """The wgmma kernel's 16-token tiles of 128-row steps (64 and 128 columns) beside 128 columns as two 64-column
    parts on one x tile (config PARTS), uncapped and capped at 128 registers (4 programs per SM)."""
    base = [c for c in decode if c["BLOCK_K"] == 128 and c["BLOCK_M"] == 16 and c["SPLIT_K"] in (2, 4, 5, 6, 8)]
    two = [dict(base[0], BLOCK_N=128, SPLIT_K=sk, PARTS=2) for sk in (1, 2, 3, 4, 5, 6, 8)]
    return base + two + [dict(c, MAXNREG=128) for c in two]


PREFILL_MS = (256, 512, 1024)  # swept for the prefill kernel beside dequantize + cuBLAS (and M = 64, 128 above)


def wgmma_configs(m):
    """The Hopper kernel (wgmma.py) at M = 1..64: token tile = M rounded up to a power of two (16 at least)."""
    if not 1 <= m <= 64:
        return []
    bm = max(16, 1 << (m - 1).bit_length())
    tiles = [(64, 128, sk) for sk in (2, 4, 5, 6, 7, 8, 10, 12, 16)] + [(64, 64, sk) for sk in (4, 8, 16)]
    tiles += [(128, 64, sk) for sk in (4, 8)] if bm <= 32 else []  # larger tiles: 255 registers (kernel_regs.py)
    tiles += [(128, 128, sk) for sk in (2, 4, 8)] if bm <= 16 else []
    return [dict(kind="dot", WGMMA=True, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=sk) for bn, bk, sk in tiles]


def prefill_configs(m, n):
    """The Hopper prefill kernel (wgmma_prefill.py): (tokens, columns, rows per step, warps, x slots) tiles,
    split-K (1-5, reduced by a second launch or in the launch: SERIAL) only where the output tiles alone leave SMs
    idle; below 64 tokens the decode token tiles; from 256 tokens the tiles that won at 256 (sweep_prefill) and
    deeper x rings for the 256-token tile (a 256 x 64 tile on one warpgroup lost everywhere: sweep_w4_8b74c38)."""
    if m < 64:
        bm = max(16, 1 << (m - 1).bit_length())
        tiles = [(bm, 128, 128, 8, 3), (bm, 64, 128, 4, 3), (bm, 128, 64, 8, 4)]
    elif m >= 256:  # 256 x 128 with 4 and 5 x slots too (TMA issued further ahead; 131 / 164 KB, no spills), and
        # with 128-row steps (253 registers, no spills; 2 or 3 slots of 64 KB)
        tiles = [(128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (256, 128, 64, 8, 3), (256, 128, 64, 8, 4),
                 (256, 128, 64, 8, 5), (256, 128, 128, 8, 3), (256, 128, 128, 8, 2)]
    else:
        tiles = [(64, 128, 128, 8, 3), (64, 128, 64, 8, 4), (128, 128, 64, 8, 3), (128, 128, 64, 8, 4),
                 (128, 128, 128, 8, 3), (128, 256, 64, 8, 3), (256, 128, 64, 8, 3)]
    out = []
    for bm, bn, bk, warps, stages in tiles:
        output_tiles = -(-n // bn) * -(-m // bm)
        for sk in (1,) if output_tiles >= 264 else (1, 2, 3, 4, 5) if m >= 64 else (2, 4, 8):
            # in-launch reduction (SERIAL) from 64 tokens only below 256: 1.5x slower there (sweep_split_ffd820b)
            for serial in (m < 64, True) if 1 < sk and 64 <= m < 256 else (m < 64,):
                out.append(dict(kind="dot", WGMMA=True, PREFILL=True, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
                                STAGES=stages, num_warps=warps, SPLIT_K=sk, SERIAL=serial))
    return out


SWEEP_SHAPES = ((8192, 28672), (28672, 8192), (8192, 3584), (3584, 8192))  # Llama-70B TP 1 and TP 8 up / down


def sweep(bw, only_ms=None, sweep_shapes=SWEEP_SHAPES, only="", tiled=False):
    """Every config of sweep_configs and prefill_configs per shape and M (only: "decode" for the wgmma kernel's,
    "prefill" for the prefill kernel's; tiled: qweight in the tiled layout, checked against the same weights)."""
    res = []
    for k, n in sweep_shapes:
        copies = make_gptq(k, n, copies_for(roof_bytes(k, n, 0)))
        timed = tiled_copies(copies) if tiled else copies
        for m, cfgs in sweep_configs():
            if only_ms and m not in only_ms:
                continue
            x = torch.randn(m, k, device="cuda", dtype=torch.half)
            roof = roof_bytes(k, n, m) / bw * 1e6
            ref = graph_us(cublas_fns(k, n, m))
            print(f"sweep K={k} N={n} M={m} cublas_fp16 {ref:.1f} us", flush=True)
            for cfg in _only(cfgs + prefill_configs(m, n), only):
                try:
                    fns = tpaware_fns(timed, x, cfg)
                    us, err = graph_us(fns), check_tpaware(fns[0], copies[0], x)
                except Exception as e:  # a config out of resources is a result, not a crash
                    us = err = float("nan")
                    print("config failed", cfg, type(e).__name__, str(e)[:200])
                res.append(dict(K=k, N=n, M=m, cfg=cfg, graph_us=us, roof_us=roof, cublas_us=ref, rel_err=err))
                print(f"sweep K={k} N={n} M={m} {cfg} {us:.1f} us ({100 * roof / us:.0f}% roof) err {err:.1e}",
                      flush=True)
        del copies
        torch.cuda.empty_cache()
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--sweep-ms", default="", help="comma-separated M: sweep only these")
    ap.add_argument("--sweep-only", choices=("decode", "prefill", "parts", "pick", "steps", "splits"),
                    default=None,
                    help="sweep only the wgmma kernel's configs (decode), the prefill kernel's, its 16-token "
                    "tiles beside two-part programs (parts), the 256 x 128 prefill tile's splits beside "
                    "dequantize + cuBLAS (pick), the prefill tiles of up to 3 x slots at every split, 64- and "
                    "128-row steps (steps), or the wgmma kernel's 64 x 128-row tile at every split (splits)")
    ap.add_argument("--sweep-shapes", default="", help="comma-separated KxN: sweep these (default: Llama-70B TP 1 / 8)")
    ap.add_argument("--sweep-tiled", action="store_true", help="sweep on qweight in the tiled layout (layout.py)")
    ap.add_argument("--models", default="", help="comma-separated models (default: all, or Llama-70B with --quick)")
    ap.add_argument("--tps", default="", help="comma-separated TP degrees to run (default: all)")
    ap.add_argument("--ms", default="", help="comma-separated M to run (default: per --quick)")
    ap.add_argument("--providers", default=",".join(
        p for p in PROVIDERS if p not in ("tpaware_reduce_launch",) + TILED_FORCED))
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    head = header()
    print(head, flush=True)
    bw = copy_bandwidth()
    head["copy_TBps"] = bw / 1e12
    head["method"] = __doc__.split("\n\n")[2].replace("\n", " ")
    print(f"copy bandwidth {bw / 1e12:.2f} TB/s", flush=True)
    rows, t0 = [], time.time()
    dev = torch.cuda.get_device_name(0).replace(" ", "_")
    out = args.out or os.path.join(os.path.dirname(__file__), "results", f"kernels_{dev}.json")
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    head["rows"] = rows
    if args.sweep:
        kn_shapes = [tuple(int(d) for d in kn.split("x")) for kn in args.sweep_shapes.split(",") if kn] or SWEEP_SHAPES
        sweep_ms = [int(m) for m in args.sweep_ms.split(",") if m]
        head["sweep"] = []
        for kn in kn_shapes:  # saved after every shape, as the rows below
            head["sweep"] += sweep(bw, sweep_ms, [kn], args.sweep_only or "", args.sweep_tiled)
            save(head, out, t0)
    else:
        models, tps = args.models.split(",") if args.models else MODELS, [int(t) for t in args.tps.split(",") if t]
        for model, tp, layer, k, n in shapes(args.quick and not args.models):
            if model not in models or (tps and tp not in tps):
                continue
            ms = [int(m) for m in args.ms.split(",")] if args.ms else ms_for(model, tp, args.quick)
            run_shape(model, tp, layer, k, n, ms, bw, args.providers.split(","), rows)
            save(head, out, t0)  # after every shape: a run cut short still leaves its rows
    save(head, out, t0)
    print("wrote", out, f"in {head['seconds']:.0f} s")


def save(head, out, t0):
    head["seconds"] = time.time() - t0
    with open(out, "w") as f:
        json.dump(head, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
