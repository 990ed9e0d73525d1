"""Is the split-K reduction launch (common._splitk_reduce_kernel) sized right, and what does launching it as a
dependent launch save? It runs after the prefill kernel wherever that splits K (the 64- to 1024-token shards of
TP 2-8); it read 2-5 fp32 partials of M x N and took 3.6-4.4 us beside a 27-50 us prefill kernel at M = 256
(profile_calls_945bca8).

For every model shard and M whose dispatched config (tiled words) ends in that launch: the whole call
(bench_kernels' graph timing, weights rotated, checked against the fp32 reference) for each variant, and with
--sizes the reduction alone on L2-resident partials. Two passes, the second in reverse order. --sizes: the
reduction's elements and warps per program; --dependent: common.DEPENDENT_LAUNCH off and on, for the matmul and,
on the up shards, the SwiGLU (gate and up, then the epilogue kernel that sums both).

    python bench/probe_reduce.py --sizes --out probe_reduce.json
    python bench/probe_reduce.py --dependent --out probe_dependent.json
"""

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_kernels import GROUP, check_tpaware, copies_for, make_gptq, roof_bytes, shapes, tiled_copies  # noqa: E402
from bench_kernels import tpaware_fns  # noqa: E402
from timing import graph_us, header  # noqa: E402

from tpaware_compile.kernels import common, gptq_swiglu_sorted, pick_config, wgmma_prefill  # noqa: E402

SIZES = tuple(dict(REDUCE_BLOCK=b, REDUCE_WARPS=w) for b, w in ((1024, 4), (2048, 4), (4096, 4), (4096, 8)))
DEPENDENT = (dict(DEPENDENT_LAUNCH=False, EARLY_DEPENDENTS=False), dict(DEPENDENT_LAUNCH=True, EARLY_DEPENDENTS=False),
             dict(DEPENDENT_LAUNCH=True, EARLY_DEPENDENTS=True))
MS = (128, 256, 512)
TP = (4, 8)  # --dependent: the shards where a launch gap is worth the most


def reduced_splits(cfg, k) -> int:
    """Partials the reduction launch sums for this config (1: no reduction launch)."""
    if cfg["kind"] != "dot" or cfg.get("SERIAL") or cfg.get("STREAM"):
        return 1
    return common.split_plan(common.ceil_div(k, cfg["BLOCK_K"]), cfg["SPLIT_K"])[1]


def swiglu_fns(tiled, x):
    """SwiGLU calls on consecutive pairs of weight copies (gate, up)."""
    pairs = list(zip(tiled[0::2], tiled[1::2]))
    return [lambda g=g, u=u: gptq_swiglu_sorted(x, g, u, GROUP) for g, u in pairs]


def time_pair(model, tp, layer, k, n, m, splits, order, run, alone):
    copies = make_gptq(k, n, max(4, copies_for(roof_bytes(k, n, 0))))
    tiled = tiled_copies(copies)
    x = torch.randn(m, k, device="cuda", dtype=torch.half)
    part = torch.randn(splits, m, n, device="cuda")
    out = torch.empty(m, n, device="cuda", dtype=torch.half)
    rows, defaults = [], {name: getattr(wgmma_prefill if name == "EARLY_DEPENDENTS" else common, name)
                          for name in order[0]}
    for settings in order:
        for name, value in settings.items():
            setattr(wgmma_prefill if name == "EARLY_DEPENDENTS" else common, name, value)
        fns = tpaware_fns(tiled, x)
        row = dict(model=model, tp=tp, layer=layer, K=k, N=n, M=m, splits=splits, run=run, **settings,
                   call_us=graph_us(fns), rel_err=check_tpaware(fns[0], copies[0], x))
        if alone:
            row["reduce_us"] = graph_us([lambda: common.splitk_finish(part, out, splits)])
        if layer == "up" and not alone:
            row["swiglu_us"] = graph_us(swiglu_fns(tiled, x))
        print(json.dumps(row), flush=True)
        rows.append(row)
    for name, value in defaults.items():
        setattr(wgmma_prefill if name == "EARLY_DEPENDENTS" else common, name, value)
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", action="store_true")
    ap.add_argument("--dependent", action="store_true")
    ap.add_argument("--out", default="probe_reduce.json")
    args = ap.parse_args()
    variants = SIZES if args.sizes else DEPENDENT
    head = dict(header(), method=__doc__.split("\n\n")[1].replace("\n", " "), rows=[])
    print(json.dumps({k: v for k, v in head.items() if k != "rows"}), flush=True)
    dev = torch.device("cuda")
    pairs = [(model, tp, layer, k, n, m) for model, tp, layer, k, n in shapes(False) for m in MS
             if args.sizes or tp in TP]
    pairs = [(p, reduced_splits(pick_config(p[5], p[3], p[4], GROUP, dev, tiled=True), p[3])) for p in pairs]
    for run, order in ((1, variants), (2, variants[::-1])):
        for pair, splits in pairs:
            if splits > 1:
                head["rows"] += time_pair(*pair, splits, order, run, alone=args.sizes)
                with open(args.out, "w") as f:
                    json.dump(head, f, indent=1)
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
