"""Does an L2 prefetch ahead of the register loads pay (wgmma.py, ``L2_AHEAD``: on tiled words each K-step of a
tile is 4 KB in one run; every step asks the one L2_AHEAD past its next register load into L2 by one
cp.async.bulk.prefetch.L2)? The decode kernel at one token reached 64% of DRAM bandwidth on Llama-70B TP 2 up with
~1 eligible warp per scheduler and 43% of issue slots busy (ncu, `ncu_decode_*`): waiting on loads, not issuing.
Prefetching a program's whole K-range at its start was slower everywhere (`probe_prefetch_b363698`).

For every model shard and M whose dispatched config (tiled words) is the one-part wgmma decode kernel: that config
without the prefetch and at each distance, graph-timed as bench_kernels.py (weights rotated), each checked against the fp32 reference.
Two passes, the second in reverse order.

    PYTHONPATH=. python bench/probe_prefetch.py --out probe_prefetch.json
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

from tpaware_compile.kernels import pick_config  # noqa: E402

MS = (1, 16)
AHEAD = (0, 1, 2)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ms", default=",".join(map(str, MS)))
    ap.add_argument("--out", default="probe_prefetch.json")
    args = ap.parse_args()
    head = dict(header(), method=__doc__.split("\n\n")[1].replace("\n", " "), rows=[])
    print(json.dumps({k: v for k, v in head.items() if k != "rows"}), flush=True)
    dev = torch.device("cuda")
    ms = [int(m) for m in args.ms.split(",")]
    for run, variants in ((1, AHEAD), (2, AHEAD[::-1])):
        for model, tp, layer, k, n in shapes(False):
            copies = tiled_copies(make_gptq(k, n, copies_for(roof_bytes(k, n, 0))))
            for m in ms:
                cfg = pick_config(m, k, n, GROUP, dev, tiled=True)
                if not cfg.get("WGMMA") or cfg.get("PREFILL") or cfg.get("PARTS", 1) != 1:
                    continue
                x = torch.randn(m, k, device="cuda", dtype=torch.half)
                for ahead in variants:
                    fns = tpaware_fns(copies, x, dict(cfg, L2_AHEAD=ahead))
                    row = dict(model=model, tp=tp, layer=layer, K=k, N=n, M=m, ahead=ahead, run=run,
                               split_k=cfg["SPLIT_K"], median_us=graph_us(fns),
                               rel_err=check_tpaware(fns[0], copies[0], x))
                    print(json.dumps(row), flush=True)
                    head["rows"].append(row)
            with open(args.out, "w") as f:
                json.dump(head, f, indent=1)
            del copies
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
