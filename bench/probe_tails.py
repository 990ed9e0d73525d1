"""What should the tokens past the last whole 256-token tile run on? At M between multiples of 256 the dispatch
(head_tail_ef32a74) took 1.2-2.0x cuBLAS's time: its second launch, the tail, re-reads and re-unpacks the weights.

Per model shard (tiled words) and token count: the dispatch (pick_config), one launch of 256-token tiles
(launch_config), one launch of 128-token tiles (split by prefill_split), and whole 256-token tiles followed by the
tail on the 128-token prefill tile; with --boxes, the dispatch and the one launch with x copied in boxes of fewer
rows (X_BOX). Graph-timed as bench_kernels.py, each timed config checked against the fp32 reference; cuBLAS in the
same run.

    python bench/probe_tails.py --ms 300,384,576 --out probe_tails.json
"""

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_kernels import GROUP, probe_shards  # noqa: E402
from timing import probe_header  # noqa: E402

from tpaware_compile.kernels import _num_sms, launch_config, pick_config, prefill_config, prefill_split  # noqa: E402


def with_box(cfg, box):
    """cfg with every prefill launch copying x in boxes of ``box`` rows (config X_BOX, wgmma_prefill._load_x)."""
    if cfg["kind"] == "head_tail":
        return dict(cfg, HEAD=with_box(cfg["HEAD"], box), TAIL=with_box(cfg["TAIL"], box))
    return dict(cfg, X_BOX=box) if cfg.get("PREFILL") and cfg["BLOCK_M"] % box == 0 else cfg


def variants(m, k, n, dev, boxes=()):
    """name -> config at M = m."""
    tiles_128 = dict(prefill_config(256, k, n, GROUP, dev, tiled=True), BLOCK_M=128,
                     SPLIT_K=prefill_split(m, k, n, 128, 128, _num_sms(dev)))
    for stream_key in ("STREAM", "PROGRAMS"):  # split-K, not the stream-K form
        tiles_128.pop(stream_key, None)
    out = dict(dispatch=pick_config(m, k, n, GROUP, dev, tiled=True),
               one_launch=launch_config(m, k, n, GROUP, dev, tiled=True), tiles_128=tiles_128)
    head = m - m % 256
    if head and m > head:
        out["tail_on_128"] = dict(kind="head_tail", HEAD_M=head, HEAD=launch_config(head, k, n, GROUP, dev, tiled=True),
                                  TAIL=prefill_config(128, k, n, GROUP, dev, tiled=True))
    for box in boxes:
        out[f"dispatch_box{box}"] = with_box(out["dispatch"], box)
        out[f"one_launch_box{box}"] = with_box(out["one_launch"], box)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ms", default="300,384,576")
    ap.add_argument("--boxes", default="", help="comma-separated X_BOX: the dispatch and the one launch with x "
                    "copied in boxes of these rows too")
    ap.add_argument("--out", default="probe_tails.json")
    args = ap.parse_args()
    dev = torch.device("cuda")
    boxes = [int(b) for b in args.boxes.split(",") if b]
    probe_shards(probe_header(__doc__), [int(v) for v in args.ms.split(",")],
                 lambda m, k, n: variants(m, k, n, dev, boxes), args.out)


if __name__ == "__main__":
    main()
