"""Markdown tables from a result file of bench_kernels.py (rows by provider), bench_mlp.py (rows by variant) or
bench_model.py (rows by model and variant).

    python bench/table.py bench/results/kernels_<device>.json
    python bench/table.py bench/results/mlp_<...>.json
    python bench/table.py bench/results/model_<device>.json
"""

import json
import re
import sys
from collections import defaultdict

PROVIDERS = ("tpaware", "torch_int4", "cublas_fp16", "gidx_triton")
PERM_PROVIDERS = ("tpaware_perm_gather", "tpaware_perm_folded")  # x[..., P1]: index_select + kernel, or perm


def main(path):
    d = json.load(open(path))
    first = d["rows"][0]
    (model_table if "decode_us_per_token" in first else mlp_table if "variant" in first else kernel_table)(d)


def kernel_table(d):
    print(f"{d['device']}, torch {d['torch']}, triton {d['triton']}, commit {d['commit']}, "
          f"copy bandwidth {d['copy_TBps']:.2f} TB/s. Times in us, CUDA-graph per-call "
          "(do_bench median in brackets).\n")
    if d.get("note"):
        print(d["note"] + "\n")
    cells = defaultdict(dict)
    for r in d["rows"]:
        cells[(r["model"], r["tp"], r["layer"], r["K"], r["N"], r["M"])][r["provider"]] = r
    # the backend's weights on sm_90 are tiled: where a file has those rows they are its main column
    ours = "tpaware_tiled" if any(r["provider"] == "tpaware_tiled" for r in d["rows"]) else "tpaware"
    print(f"| model | TP | layer | K x N | M | roof | floor | {ours} | % roof | x floor | torch_int4 | cublas_fp16 "
          f"| gidx_triton | {ours} kernel |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for key, row in cells.items():
        model, tp, layer, k, n, m = key
        t = row.get(ours)
        any_row = t or next(iter(row.values()))
        cols = [model, tp, layer, f"{k}x{n}", m, f"{any_row['roof_us']:.1f}", f"{any_row['floor_us']:.1f}"]
        cols += [_cell(t), f"{t['pct_roof']:.0f}%" if t else "", f"{t['median_us'] / t['floor_us']:.2f}" if t else ""]
        cols += [_cell(row.get(p)) for p in PROVIDERS[1:]]
        cols.append(kernel_name(t["config"]) if t else "")
        print("| " + " | ".join(str(c) for c in cols) + " |")
    tiled_table(cells)
    perm_table(cells)
    before_table(cells, d.get("before_commit"))
    wgmma_table(cells)
    rows_table(cells)
    serial_table(cells)


def tiled_table(cells):
    """tpaware on qweight as stored (N-major) against the same weights tiled (tpaware_tiled, layout.py)."""
    rows = [(key, row) for key, row in cells.items() if "tpaware" in row and "tpaware_tiled" in row]
    if not rows:
        return
    print("\nqweight N-major (tpaware) against tiled (tpaware_tiled), same call (us, CUDA-graph per-call):\n")
    print("| model | TP | layer | K x N | M | N-major | tiled | tiled / N-major | tiled % roof | tiled x floor "
          "| torch_int4 | cublas_fp16 |")
    print("|---" * 12 + "|")
    for (model, tp, layer, k, n, m), row in rows:
        t, g = row["tpaware"], row["tpaware_tiled"]
        cols = [model, tp, layer, f"{k}x{n}", m, f"{t['median_us']:.1f}", f"{g['median_us']:.1f}",
                f"{g['median_us'] / t['median_us']:.3f}", f"{g['pct_roof']:.0f}%",
                f"{g['median_us'] / g['floor_us']:.2f}"]
        cols += [f"{row[p]['median_us']:.1f}" if p in row else "" for p in ("torch_int4", "cublas_fp16")]
        print("| " + " | ".join(str(c) for c in cols) + " |")


def before_table(cells, before_commit):
    """tpaware against the same rows at an earlier commit run in the same call (tpaware_before, and any
    tpaware_<commit>); both runs where a row has runs_us."""
    others = sorted({p for row in cells.values() for p in row
                     if p == "tpaware_before" or re.fullmatch(r"tpaware_[0-9a-f]{7}", p)})
    rows = [(key, row) for key, row in cells.items() if "tpaware" in row and any(p in row for p in others)]
    if not rows:
        return
    names = [f"{p} ({before_commit})" if p == "tpaware_before" else p for p in others]
    print("\ntpaware against earlier commits, same call (us, CUDA-graph per-call; a / b: two runs):\n")
    print("| model | TP | layer | K x N | M | tpaware | % roof | x floor | " + " | ".join(names)
          + " | tpaware / " + " | tpaware / ".join(names) + " |")
    print("|---" * (8 + 2 * len(others)) + "|")
    for (model, tp, layer, k, n, m), row in rows:
        t = row["tpaware"]
        cols = [model, tp, layer, f"{k}x{n}", m, _runs(t), f"{t['pct_roof']:.0f}%",
                f"{t['median_us'] / t['floor_us']:.2f}"]
        cols += [_runs(row.get(p)) for p in others]
        cols += [f"{_best(t) / _best(row[p]):.3f}" if p in row else "" for p in others]
        print("| " + " | ".join(str(c) for c in cols) + " |")


def _runs(r):
    return "" if r is None else " / ".join(f"{v:.1f}" for v in r.get("runs_us", [r["median_us"]]))


def _best(r):
    return min(r.get("runs_us", [r["median_us"]]))


def serial_table(cells):
    """The split-K reduced inside the kernel's one launch (tpaware; tpaware_serial, M = 1 only, in the file of
    53b9390) against a reduction launch after it (tpaware_reduce_launch; tpaware in that file)."""
    pairs = (("tpaware", "tpaware_reduce_launch"), ("tpaware_serial", "tpaware"))
    rows = [(key, row, one, two) for key, row in cells.items() for one, two in pairs if one in row and two in row]
    if not rows:
        return
    print("\nOne-launch split-K (us, CUDA-graph per-call; each with its same-launch-count floor):\n")
    print("| model | TP | layer | K x N | M | reduction launch | its floor | one launch | its floor "
          "| one / two launches | one launch x floor | rel err | torch_int4 |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for (model, tp, layer, k, n, m), row, one, two in rows:
        s, t = row[one], row[two]
        cols = [model, tp, layer, f"{k}x{n}", m, _cell(t), f"{t['floor_us']:.1f}", _cell(s), f"{s['floor_us']:.1f}",
                f"{s['median_us'] / t['median_us']:.2f}", f"{s['median_us'] / s['floor_us']:.2f}",
                f"{s['rel_err']:.1e}", _cell(row.get("torch_int4"))]
        print("| " + " | ".join(str(c) for c in cols) + " |")


def kernel_name(cfg):
    if cfg.get("WGMMA"):
        return "wgmma prefill" if cfg.get("PREFILL") else "wgmma"
    return cfg["kind"] + (f" x{cfg['ROWS']}" if cfg.get("ROWS", 1) > 1 else "")


def wgmma_table(cells):
    """The wgmma kernels (tpaware on sm_90: wgmma.py, and wgmma_prefill.py from 33 tokens since 42b4865) against
    what ran without them (tpaware_tldot: the GEMVs at M = 1 and 2, the tl.dot kernels to 128, dequantize + cuBLAS
    above). In the file of 72ead6a the wgmma kernel at M = 1 is tpaware_wgmma."""
    rows = []
    for key, row in cells.items():
        if "tpaware_tldot" in row and "tpaware" in row:
            rows.append((key, row["tpaware"], row["tpaware_tldot"]))
        if "tpaware_wgmma" in row and "tpaware" in row:
            rows.append((key, row["tpaware_wgmma"], row["tpaware"]))
    if not rows:
        return
    print("\nwgmma kernel against the kernel it replaces or competes with (us, CUDA-graph per-call):\n")
    print("| model | TP | layer | K x N | M | roof | floor | wgmma | % roof | x floor | other | other kernel "
          "| other / wgmma | wgmma rel err | torch_int4 |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for key, w, o in rows:
        model, tp, layer, k, n, m = key
        cols = [model, tp, layer, f"{k}x{n}", m, f"{w['roof_us']:.1f}", f"{w['floor_us']:.1f}", _cell(w),
                f"{w['pct_roof']:.0f}%", f"{w['median_us'] / w['floor_us']:.2f}", _cell(o), kernel_name(o["config"]),
                f"{o['median_us'] / w['median_us']:.2f}", f"{w['rel_err']:.1e}", _cell(cells[key].get("torch_int4"))]
        print("| " + " | ".join(str(c) for c in cols) + " |")


def rows_table(cells):
    """M = 2..8: the multi-row GEMV (one weight read for every row) against the dispatch's kernel at that M."""
    rows = [(key, row) for key, row in cells.items() if "tpaware_rows" in row and "tpaware" in row]
    if not rows:
        return
    print("\nMulti-row GEMV at small M (us, CUDA-graph per-call; tpaware: the dispatch table's kernel):\n")
    print("| model | TP | layer | K x N | M | roof | tpaware | tpaware_rows | rows / tpaware | % roof | rel err | "
          "torch_int4 | cublas_fp16 |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for (model, tp, layer, k, n, m), row in rows:
        t, r = row["tpaware"], row["tpaware_rows"]
        cols = [model, tp, layer, f"{k}x{n}", m, f"{r['roof_us']:.1f}", _cell(t), _cell(r),
                f"{r['median_us'] / t['median_us']:.2f}", f"{r['pct_roof']:.0f}%", f"{r['rel_err']:.1e}",
                _cell(row.get("torch_int4")), _cell(row.get("cublas_fp16"))]
        print("| " + " | ".join(str(c) for c in cols) + " |")


def perm_table(cells):
    """The first layers' x[..., P1]: index_select then the kernel, against the kernel reading x through P1."""
    rows = [(key, row) for key, row in cells.items() if all(p in row for p in PERM_PROVIDERS)]
    if not rows:
        return
    print("\nx[..., P1] before the first layers (us, CUDA-graph per-call; tpaware: the kernel on x as it is):\n")
    print("| model | TP | layer | K x N | M | tpaware | gather + kernel | folded | saved | folded rel err |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for (model, tp, layer, k, n, m), row in rows:
        gather, folded = (row[p]["median_us"] for p in PERM_PROVIDERS)
        cols = [model, tp, layer, f"{k}x{n}", m, _cell(row.get("tpaware")), _cell(row[PERM_PROVIDERS[0]]),
                _cell(row[PERM_PROVIDERS[1]]), f"{gather - folded:.1f}", f"{row[PERM_PROVIDERS[1]]['rel_err']:.1e}"]
        print("| " + " | ".join(str(c) for c in cols) + " |")


def _cell(r):
    return f"{r['median_us']:.1f} ({r['do_bench_us']:.1f})" if r else "-"


MLP_VARIANTS = ("formN_eager", "formN_inductor", "formL", "tpaware", "tpaware_nmajor", "tpaware_fold_perm",
                "allgather_perm", "allreduce")


def mlp_table(d):
    """One row per model, TP and M; the headline (b)/(d) and the gain (b) - (d) beside AllGather + permutation."""
    print(f"{d['device']}, torch {d['torch']}, triton {d['triton']}, commit {d['commit']}"
          f"{', ' + d['mode'] if 'mode' in d else ''}. Median us per MLP call, CUDA graphs.\n")
    cells = defaultdict(dict)
    for r in d["rows"]:
        cells[(r["model"], r["tp"], r["M"])][r["variant"]] = r["median_us"]
    print("| model | TP | M | " + " | ".join(MLP_VARIANTS) + " | (b)/(d) | (b)-(d) | (b)-(d) / allgather_perm |")
    print("|---" * (len(MLP_VARIANTS) + 6) + "|")
    for (model, tp, m), row in cells.items():
        b, dd, ag = row.get("formN_inductor"), row.get("tpaware"), row.get("allgather_perm")
        cols = [model, tp, m] + [f"{row[v]:.1f}" if v in row else "-" for v in MLP_VARIANTS]
        cols += [f"{b / dd:.2f}x", f"{b - dd:.1f}", f"{(b - dd) / ag:.2f}"] if b and dd and ag else ["-"] * 3
        print("| " + " | ".join(str(c) for c in cols) + " |")


def model_table(d):
    print(f"{d['device']}, torch {d['torch']}, triton {d['triton']}, commit {d['commit']}, prompt {d['prompt']} "
          "tokens. Decode: one step replayed as a CUDA graph. Prefill: plain calls (host launch overhead included) "
          "and the same call as a CUDA graph.\n")
    print("| model | variant | decode us/token | prefill tokens/s | prefill tokens/s (graph) | kernel |")
    print("|---|---|---|---|---|---|")
    for r in d["rows"]:
        graphed = r.get("prefill_graph_tokens_per_s")
        print(f"| {r['model']} | {r['variant']} | {r['decode_us_per_token']:.0f} | {r['prefill_tokens_per_s']:.0f} | "
              f"{f'{graphed:.0f}' if graphed else '-'} | {r['kernel']} |")


if __name__ == "__main__":
    main(sys.argv[1])
