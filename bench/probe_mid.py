"""The prefill kernel's 64 x 64 tile on one warpgroup (x by TMA) beside the decode kernel's 64-token tile (255
registers, 2 programs per SM, x staged through registers), which the dispatch ran from 33 to 64 tokens on tiled
words before 855d303. The tile's one-launch split-K (SERIAL) compiles to 255 registers too, 168 without spills under
a cap (3 programs per SM), and 152 without SERIAL.

Per model shard (tiled words) and token count: the dispatch (pick_config), the decode kernel's tile (wgmma_config;
not in probe_mid_9f59ca5, whose dispatch ran it), cuBLAS, and the 64 x 64 tile at splits 1-8 with SERIAL uncapped,
SERIAL capped at 168 registers (MAXNREG), and the split-K reduced by a second launch. Graph-timed as
bench_kernels.py, each timed config checked against the fp32 reference. With --swiglu: on the up shards, the fused
SwiGLU (gptq_swiglu_sorted: gate's and up's launches, one epilogue) on the dispatch's config, the decode tile's and
the 64 x 64 tile at each split (reduced by the epilogue kernel, as the SwiGLU on it always is). With --padded, below
64 tokens: the 64 x 64 tile at mid_tile_config's split on x as it lies (the TMA zero-fills the rows past M) and on
x copied beforehand into a zero-padded buffer of 64 rows (no row out of bounds; the copy not timed), and with
--boxes with x copied in boxes of fewer rows (X_BOX: no box wholly out of bounds). With --tile, another
one-warpgroup tile in place of the 64 x 64 one (128 x 64: from 65 tokens), with --x-box in boxes of x's rows.

    python bench/probe_mid.py --ms 48,64 --out probe_mid.json
    python bench/probe_mid.py --ms 41,64 --swiglu --out probe_mid_swiglu.json
    python bench/probe_mid.py --ms 33,40,44 --splits "" --padded --out probe_mid_padded.json
"""

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_kernels import (GROUP, check_tpaware, copies_for, cublas_fns, make_gptq, roof_bytes, shapes,  # noqa: E402
                           tiled_copies, tpaware_fns)
from timing import graph_us, probe_header, record_rows  # noqa: E402

from tpaware_compile.kernels import (dequantize_sorted, gptq_swiglu_sorted, mid_tile_config, pick_config,  # noqa: E402
                                    wgmma_config)

TILE = dict(kind="dot", WGMMA=True, PREFILL=True, BLOCK_M=64, BLOCK_N=64, BLOCK_K=128, STAGES=3, num_warps=4)
FORMS = dict(serial=dict(SERIAL=True), serial_168=dict(SERIAL=True, MAXNREG=168), reduce_launch=dict(SERIAL=False))


def variants(m, k, n, dev, splits, forms=FORMS, tile=TILE):
    """name -> config at M = m (the decode tile up to its 64 tokens)."""
    out = dict(dispatch=pick_config(m, k, n, GROUP, dev, tiled=True))
    if m <= 64:
        out["decode_tile"] = wgmma_config(m, k, n, GROUP, dev, tiled=True)
    name = f"p{tile['BLOCK_M']}x{tile['BLOCK_N']}"
    for split in splits:
        for form, extra in forms.items():
            out[f"{name}_{form}_s{split}"] = dict(tile, SPLIT_K=split, **extra)
    return out


def padded_rows(x, rows):
    """x [M, K] copied into a zero buffer of ``rows`` rows."""
    buf = x.new_zeros(rows, x.shape[1])
    buf[:x.shape[0]] = x
    return buf


def swiglu_fns(copies, x, cfg):
    """The fused SwiGLU on consecutive copies as gate and up, rotating as tpaware_fns does."""
    return [lambda g=g, u=u: gptq_swiglu_sorted(x, g, u, GROUP, 0, 0, config=cfg)
            for g, u in zip(copies, copies[1:] + copies[:1])]


def check_swiglu(fn, gate, up, x) -> float:
    """Relative error of fn() (on gate, up as its first pair) against silu(x @ W_gate) * (x @ W_up) in fp32."""
    wg, wu = (dequantize_sorted(*w, GROUP, 0, 0, torch.float32) for w in (gate, up))
    ref = F.silu(x.float() @ wg) * (x.float() @ wu)
    err = ((fn().float() - ref).norm() / ref.norm()).item()
    if not err < 2e-3:
        print(f"WRONG RESULT: rel err {err} for the SwiGLU at M={x.shape[0]}", flush=True)
    return err


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ms", default="48,64")
    ap.add_argument("--splits", default="1,2,4,8")
    ap.add_argument("--swiglu", action="store_true", help="the fused SwiGLU on the up shards")
    ap.add_argument("--padded", action="store_true", help="the 64 x 64 tile on x as it lies and zero-padded")
    ap.add_argument("--boxes", default="", type=lambda v: [int(b) for b in v.split(",") if b],
                    help="with --padded, the 64 x 64 tile with x copied in boxes of these rows too (X_BOX)")
    ap.add_argument("--tile", default="64x64", help="BLOCK_M x BLOCK_N of the one-warpgroup tile timed at each split")
    ap.add_argument("--x-box", type=int, default=0, help="that tile with x in boxes of this many rows (X_BOX), its "
                    "split-K reduced by a second launch")
    ap.add_argument("--out", default="probe_mid.json")
    args = ap.parse_args()
    head = probe_header(__doc__)
    dev = torch.device("cuda")
    splits = [int(s) for s in args.splits.split(",") if s]
    forms = dict(reduce_launch=FORMS["reduce_launch"]) if args.swiglu else FORMS
    block_m, block_n = (int(v) for v in args.tile.split("x"))
    tile = dict(TILE, BLOCK_M=block_m, BLOCK_N=block_n, **({"X_BOX": args.x_box} if args.x_box else {}))
    if args.x_box:  # boxes lost where the split-K is reduced in the launch (probe_mid_boxes_3dc0433)
        forms = dict(reduce_launch=FORMS["reduce_launch"])
    for model, tp, layer, k, n in shapes(False):
        if args.swiglu and layer != "up":
            continue
        copies = make_gptq(k, n, copies_for(roof_bytes(k, n, 0)))
        tiled = tiled_copies(copies)
        for m in (int(v) for v in args.ms.split(",")):
            x = torch.randn(m, k, device="cuda", dtype=torch.half)
            base = dict(model=model, tp=tp, layer=layer, K=k, N=n, M=m)
            rows = [] if args.swiglu else [dict(base, variant="cublas_fp16", median_us=graph_us(cublas_fns(k, n, m)))]
            runs = [(name, cfg, x) for name, cfg in variants(m, k, n, dev, splits, forms, tile).items()]
            if args.padded and m < 64:
                mid = mid_tile_config(k, n, GROUP, dev)
                runs += [("mid_tile", mid, x), ("mid_tile_padded", mid, padded_rows(x, 64))]
                runs += [(f"mid_tile_box{box}", dict(mid, X_BOX=box), x) for box in args.boxes]
            for name, cfg, xs in runs:
                if args.swiglu:
                    fns = swiglu_fns(tiled, xs, cfg)
                    err = check_swiglu(fns[0], copies[0], copies[1], xs)
                else:
                    fns = tpaware_fns(tiled, xs, cfg)
                    err = check_tpaware(fns[0], copies[0], xs)
                rows.append(dict(base, variant=name, config=cfg, median_us=graph_us(fns), rel_err=err,
                                 swiglu=args.swiglu))
            for row in rows:
                row["vs_cublas"] = None if args.swiglu else row["median_us"] / rows[0]["median_us"]
            record_rows(head, rows, args.out)
        del copies, tiled
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
