"""Host time of this package's own Python per call, without a GPU: gptq_mm_sorted and gptq_swiglu_sorted at M = 1
on tiled Llama-2-13B MLP shards, with the wgmma kernel's launch replaced by a no-op (so what is timed is the config
pick, the checks, the buffers and the launch's arguments, not Triton's launcher or the driver). Best of 7 rounds of
2000 calls. What bench_host.py times on a GPU machine includes the launch; its host is noisier.

    python bench/probe_host_python.py --label "$(git rev-parse --short HEAD)" --out probe_host_python.json
"""

import argparse
import json
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import tpaware_compile.kernels as K  # noqa: E402
from tpaware_compile.kernels import wgmma  # noqa: E402
from tpaware_compile.layout import tile  # noqa: E402

HIDDEN, INTER, GROUP = 5120, 13824, 128  # Llama-2-13B


class NoLaunch:
    """Stands for the Gluon kernel: kernel[grid](...) does nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def weight(k, n):
    return (tile(torch.zeros(k // 8, n, dtype=torch.int32)), torch.zeros(k // GROUP, n // 8, dtype=torch.int32),
            torch.zeros(k // GROUP, n, dtype=torch.float16))


def best_us(fn, rounds=7, calls=2000) -> float:
    for _ in range(200):
        fn()
    best = float("inf")
    for _ in range(rounds):
        t = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - t) / calls * 1e6)
    return best


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--label", required=True, help="which code this is (a commit)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    wgmma._wgmma_kernel = NoLaunch()
    K.has_wgmma = lambda device: True  # the sm_90 dispatch, as on an H100
    down, gate = weight(INTER, HIDDEN), weight(HIDDEN, INTER)
    x_down, x_up = torch.randn(1, INTER).half(), torch.randn(1, HIDDEN).half()
    rows = [dict(label=args.label, op=name, K=k, N=n, M=1, python_us=best_us(fn)) for name, k, n, fn in (
        ("gptq_mm_sorted", INTER, HIDDEN, lambda: K.gptq_mm_sorted(x_down, *down, GROUP)),
        ("gptq_swiglu_sorted", HIDDEN, INTER, lambda: K.gptq_swiglu_sorted(x_up, gate, gate, GROUP)))]
    for r in rows:
        print(r, flush=True)
    head = dict(host=platform.processor() or platform.machine(), python=platform.python_version(),
                torch=torch.__version__, method=__doc__.split("\n\n")[0], rows=rows)
    if os.path.exists(args.out):  # runs of other code append to the same file
        old = json.load(open(args.out))
        head["rows"] = old["rows"] + rows
    with open(args.out, "w") as f:
        json.dump(head, f, indent=1)


if __name__ == "__main__":
    main()
