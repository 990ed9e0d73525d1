"""Does the prefill kernel gain from x's TMA copies never reaching past x's last row? A tile copied in boxes of
X_BOX < BLOCK_M rows copies a box that would from x's last X_BOX rows instead (wgmma_prefill.box_rows), so with
M >= X_BOX the TMA zero-fills no row.

Per model shard (tiled words) and token count: cuBLAS, the dispatch (pick_config), the same configs with x in
whole-tile boxes (X_BOX = BLOCK_M: below BLOCK_M tokens the TMA zero-fills the rows past M) and, with --pow2, in
boxes of the largest power of two under M (no X_BOX at 2bc9824, whose x_box made that the default: there the
dispatch ran those boxes where its config set none, and the x_box variant too), and from 65 tokens a 128 x 64
tile on one warpgroup at splits 1 / 2 / 4, reduced by a second launch, x in 64-row boxes where M is not a multiple
of 128 (tile128_config's tile; above 128 tokens two or more tiles along M). Graph-timed as bench_kernels.py, each
timed config checked against the fp32 reference.

    python bench/probe_boxes.py --ms 33,48,72,96,200 --out probe_boxes.json
"""

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_kernels import GROUP, probe_shards  # noqa: E402
from timing import probe_header  # noqa: E402

from tpaware_compile.kernels import pick_config  # noqa: E402

TILE_128X64 = dict(kind="dot", WGMMA=True, PREFILL=True, BLOCK_M=128, BLOCK_N=64, BLOCK_K=128, STAGES=3, num_warps=4,
                   SERIAL=False)


def boxed(cfg, box):
    """cfg with every prefill launch's X_BOX set to box(launch config)."""
    if cfg["kind"] == "head_tail":
        return dict(cfg, HEAD=boxed(cfg["HEAD"], box), TAIL=boxed(cfg["TAIL"], box))
    return dict(cfg, X_BOX=box(cfg)) if cfg.get("PREFILL") else cfg


def variants(m, k, n, dev, splits, pow2):
    """name -> config at M = m."""
    dispatch = pick_config(m, k, n, GROUP, dev, tiled=True)
    out = dict(dispatch=dispatch)
    boxes = dict(whole_box=lambda c: c["BLOCK_M"])
    if pow2:
        boxes["pow2_box"] = lambda c: c["BLOCK_M"] if m >= c["BLOCK_M"] else max(8, 1 << (m.bit_length() - 1))
    for name, box in boxes.items():
        if boxed(dispatch, box) != boxed(dispatch, lambda c: c.get("X_BOX", c["BLOCK_M"])):  # not the dispatch again
            out[name] = boxed(dispatch, box)
    if m > 64:
        tile = dict(TILE_128X64, **({"X_BOX": 64} if m % 128 else {}))
        out.update({f"t128x64_s{split}": dict(tile, SPLIT_K=split) for split in splits
                    if dict(tile, SPLIT_K=split) != dispatch})
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ms", default="33,48,72,96,200")
    ap.add_argument("--splits", default="1,2,4", help="of the 128 x 64 tile")
    ap.add_argument("--pow2", action="store_true", help="x in boxes of the largest power of two under M too")
    ap.add_argument("--out", default="probe_boxes.json")
    args = ap.parse_args()
    dev = torch.device("cuda")
    splits = [int(s) for s in args.splits.split(",") if s]
    probe_shards(probe_header(__doc__), [int(v) for v in args.ms.split(",")],
                 lambda m, k, n: variants(m, k, n, dev, splits, args.pow2), args.out)


if __name__ == "__main__":
    main()
