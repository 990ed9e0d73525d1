"""What every benchmark here shares: the header of a result file and CUDA-graph timing.

Per-call time = one CUDA graph of ``calls`` back-to-back calls rotating over ``fns`` (one per weight copy,
so the weights come from DRAM as in a decode step), replayed several times; the median replay / calls.
"""

import json
import os
import subprocess
import time

import torch


def git_commit() -> str:
    """HEAD (+dirty), or $TPAWARE_COMMIT where the checkout's metadata is not the code's (a copied tree)."""
    if os.environ.get("TPAWARE_COMMIT"):
        return os.environ["TPAWARE_COMMIT"]
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True).stdout.strip()
    except OSError:
        return "unknown"
    return (commit or "uncommitted") + ("+dirty" if dirty else "")


def header() -> dict:
    import triton

    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        device = f"{p.name} ({p.multi_processor_count} SMs) x{torch.cuda.device_count()}"
    else:
        device = "CPU"
    return dict(device=device, torch=torch.__version__, triton=triton.__version__, commit=git_commit(),
                date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))


def probe_header(doc: str) -> dict:
    """A probe's result head (header(), its method: the second paragraph of its module doc, rows to come),
    printed without the rows."""
    head = dict(header(), method=doc.split("\n\n")[1].replace("\n", " "), rows=[])
    print(json.dumps({k: v for k, v in head.items() if k != "rows"}), flush=True)
    return head


def record_rows(head: dict, rows: list, out: str) -> None:
    """Print each row (its config left out), add them to head["rows"] and rewrite ``out`` with head: a probe cut
    short by its time limit keeps what it measured."""
    for row in rows:
        print(json.dumps({key: v for key, v in row.items() if key != "config"}), flush=True)
    head["rows"] += rows
    with open(out, "w") as f:
        json.dump(head, f, indent=1)


def graph_us(fns, calls: int = 60, replays: int = 9) -> float:
    """Median per-call microseconds of a CUDA graph of ``calls`` calls cycling through ``fns``."""
    calls = max(calls, len(fns))
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up outside capture: allocator, autotuning, lazy init
        for f in fns:
            f()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            fns[i % len(fns)]()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / calls)
    return sorted(times)[len(times) // 2]


def wall_us(fns, calls: int = 20) -> float:
    """CPU fallback (validation runs only, never a performance claim): median wall time per call."""
    for f in fns:
        f()
    times = []
    for i in range(calls):
        t = time.perf_counter()
        fns[i % len(fns)]()
        times.append((time.perf_counter() - t) * 1e6)
    return sorted(times)[len(times) // 2]
