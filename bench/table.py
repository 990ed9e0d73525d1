"""Markdown tables from a bench_kernels.py result file.

    python bench/table.py bench/results/kernels_<device>.json
"""

import json
import sys
from collections import defaultdict

PROVIDERS = ("tpaware", "torch_int4", "cublas_fp16", "gidx_triton")


def main(path):
    d = json.load(open(path))
    print(f"{d['device']}, torch {d['torch']}, triton {d['triton']}, commit {d['commit']}, "
          f"copy bandwidth {d['copy_TBps']:.2f} TB/s. Times in us, CUDA-graph per-call "
          "(do_bench median in brackets).\n")
    cells = defaultdict(dict)
    for r in d["rows"]:
        cells[(r["model"], r["tp"], r["layer"], r["K"], r["N"], r["M"])][r["provider"]] = r
    print("| model | TP | layer | K x N | M | roof | floor | tpaware | % roof | x floor | torch_int4 | cublas_fp16 "
          "| gidx_triton | tpaware kernel |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for key, row in cells.items():
        model, tp, layer, k, n, m = key
        any_row = next(iter(row.values()))
        t = row.get("tpaware")
        cols = [model, tp, layer, f"{k}x{n}", m, f"{any_row['roof_us']:.1f}", f"{any_row['floor_us']:.1f}"]
        cols += [_cell(t), f"{t['pct_roof']:.0f}%" if t else "", f"{t['median_us'] / t['floor_us']:.2f}" if t else ""]
        cols += [_cell(row.get(p)) for p in PROVIDERS[1:]]
        cols.append(t["config"]["kind"] if t else "")
        print("| " + " | ".join(str(c) for c in cols) + " |")


def _cell(r):
    return f"{r['median_us']:.1f} ({r['do_bench_us']:.1f})" if r else "-"


if __name__ == "__main__":
    main(sys.argv[1])
