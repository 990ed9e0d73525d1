"""The prefill kernel's 64 x 64 tile on one warpgroup (x by TMA) beside the decode kernel's 64-token tile (255
registers, 2 programs per SM, x staged through registers), which the dispatch ran from 33 to 64 tokens on tiled
words before 855d303. The tile's one-launch split-K (SERIAL) compiles to 255 registers too, 168 without spills under
a cap (3 programs per SM), and 152 without SERIAL.

Per model shard (tiled words) and token count: the dispatch (pick_config), the decode kernel's tile (wgmma_config;
not in probe_mid_9f59ca5, whose dispatch ran it), cuBLAS, and the 64 x 64 tile at splits 1-8 with SERIAL uncapped,
SERIAL capped at 168 registers (MAXNREG), and the split-K reduced by a second launch. Graph-timed as
bench_kernels.py, each timed config checked against the fp32 reference.

    python bench/probe_mid.py --ms 48,64 --out probe_mid.json
"""

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_kernels import (GROUP, check_tpaware, copies_for, cublas_fns, make_gptq, roof_bytes, shapes,  # noqa: E402
                           tiled_copies, tpaware_fns)
from timing import graph_us, header  # noqa: E402

from tpaware_compile.kernels import pick_config, wgmma_config  # noqa: E402

TILE = dict(kind="dot", WGMMA=True, PREFILL=True, BLOCK_M=64, BLOCK_N=64, BLOCK_K=128, STAGES=3, num_warps=4)
FORMS = dict(serial=dict(SERIAL=True), serial_168=dict(SERIAL=True, MAXNREG=168), reduce_launch=dict(SERIAL=False))


def variants(m, k, n, dev, splits):
    """name -> config at M = m."""
    out = dict(dispatch=pick_config(m, k, n, GROUP, dev, tiled=True),
               decode_tile=wgmma_config(m, k, n, GROUP, dev, tiled=True))
    for split in splits:
        for form, extra in FORMS.items():
            out[f"p64x64_{form}_s{split}"] = dict(TILE, SPLIT_K=split, **extra)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ms", default="48,64")
    ap.add_argument("--splits", default="1,2,4,8")
    ap.add_argument("--out", default="probe_mid.json")
    args = ap.parse_args()
    head = dict(header(), method=__doc__.split("\n\n")[1].replace("\n", " "), rows=[])
    print(json.dumps({k: v for k, v in head.items() if k != "rows"}), flush=True)
    dev = torch.device("cuda")
    splits = [int(s) for s in args.splits.split(",") if s]
    for model, tp, layer, k, n in shapes(False):
        copies = make_gptq(k, n, copies_for(roof_bytes(k, n, 0)))
        tiled = tiled_copies(copies)
        for m in (int(v) for v in args.ms.split(",")):
            x = torch.randn(m, k, device="cuda", dtype=torch.half)
            base = dict(model=model, tp=tp, layer=layer, K=k, N=n, M=m)
            rows = [dict(base, variant="cublas_fp16", median_us=graph_us(cublas_fns(k, n, m)))]
            for name, cfg in variants(m, k, n, dev, splits).items():
                fns = tpaware_fns(tiled, x, cfg)
                rows.append(dict(base, variant=name, config=cfg, median_us=graph_us(fns),
                                 rel_err=check_tpaware(fns[0], copies[0], x)))
            for row in rows:
                row["vs_cublas"] = row["median_us"] / rows[0]["median_us"]
                print(json.dumps({key: v for key, v in row.items() if key != "config"}), flush=True)
            head["rows"] += rows
            with open(args.out, "w") as f:
                json.dump(head, f, indent=1)
        del copies, tiled
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
