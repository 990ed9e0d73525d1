"""Is the split-K reduction launch (common._splitk_reduce_kernel) sized right? It runs after the prefill kernel
wherever that splits K (the 64- to 1024-token shards of TP 2-8); it read 2-5 fp32 partials of M x N and took
3.6-4.4 us beside a 27-50 us prefill kernel at M = 256 (profile_calls_945bca8).

For every model shard and M whose dispatched config (tiled words) ends in that launch, each reduction size
(elements and warps per program): the whole call (bench_kernels' graph timing, weights rotated, checked against
the fp32 reference) and the reduction alone on L2-resident partials. Two passes, the second in reverse order.

    python bench/probe_reduce.py --out probe_reduce.json
"""

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_kernels import GROUP, check_tpaware, copies_for, make_gptq, roof_bytes, shapes, tiled_copies  # noqa: E402
from bench_kernels import tpaware_fns  # noqa: E402
from timing import graph_us, probe_header  # noqa: E402

from tpaware_compile.kernels import common, pick_config  # noqa: E402

SIZES = ((1024, 4), (2048, 4), (4096, 4), (4096, 8))  # (REDUCE_BLOCK, REDUCE_WARPS); the first is the dispatch's
MS = (128, 256, 512)


def reduced_splits(cfg, k) -> int:
    """Partials the reduction launch sums for this config (1: no reduction launch)."""
    if cfg["kind"] != "dot" or cfg.get("SERIAL") or cfg.get("STREAM"):
        return 1
    return common.split_plan(common.ceil_div(k, cfg["BLOCK_K"]), cfg["SPLIT_K"])[1]


def time_pair(model, tp, layer, k, n, m, splits, order, run):
    copies = make_gptq(k, n, copies_for(roof_bytes(k, n, 0)))
    tiled = tiled_copies(copies)
    x = torch.randn(m, k, device="cuda", dtype=torch.half)
    part = torch.randn(splits, m, n, device="cuda")
    out = torch.empty(m, n, device="cuda", dtype=torch.half)
    rows = []
    for block, warps in order:
        common.REDUCE_BLOCK, common.REDUCE_WARPS = block, warps
        fns = tpaware_fns(tiled, x)
        row = dict(model=model, tp=tp, layer=layer, K=k, N=n, M=m, splits=splits, block=block, warps=warps, run=run,
                   call_us=graph_us(fns), reduce_us=graph_us([lambda: common.splitk_finish(part, out, splits)]),
                   rel_err=check_tpaware(fns[0], copies[0], x))
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="probe_reduce.json")
    args = ap.parse_args()
    head = probe_header(__doc__)
    dev = torch.device("cuda")
    pairs = [(model, tp, layer, k, n, m) for model, tp, layer, k, n in shapes(False) for m in MS]
    pairs = [(p, reduced_splits(pick_config(p[5], p[3], p[4], GROUP, dev, tiled=True), p[3])) for p in pairs]
    for run, order in ((1, SIZES), (2, SIZES[::-1])):
        for pair, splits in pairs:
            if splits > 1:
                head["rows"] += time_pair(*pair, splits, order, run)
                with open(args.out, "w") as f:
                    json.dump(head, f, indent=1)
            torch.cuda.empty_cache()
    common.REDUCE_BLOCK, common.REDUCE_WARPS = SIZES[0]


if __name__ == "__main__":
    main()
