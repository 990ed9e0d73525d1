"""Where one matmul call's GPU time goes: the CUDA kernels of gptq_mm_sorted as dispatched (torch.profiler, mean
microseconds per call of each kernel over 10 calls after 3 warm-up calls), per shape. Tiled words, group 128.

    python bench/profile_calls.py 8192x3584x256 3584x8192x1024      # K x N x M ...
    python bench/profile_calls.py 8192x28672x512:stream 8192x28672x512:split   # the prefill config forced, with
                                                                          # and without stream-K
"""

import json
import os
import sys

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the package itself comes from PYTHONPATH or pip
from timing import header  # noqa: E402

from tpaware_compile.kernels import gptq_mm_sorted, pick_config, prefill_config  # noqa: E402
from tpaware_compile.layout import tile  # noqa: E402

CALLS = 10


def kernel_us(k, n, m, config=None):
    qw = tile(torch.randint(-2**31, 2**31 - 1, (k // 8, n), dtype=torch.int32, device="cuda"))
    qz = torch.randint(-2**31, 2**31 - 1, (k // 128, n // 8), dtype=torch.int32, device="cuda")
    sc = (torch.rand(k // 128, n, device="cuda") * 0.01 + 1e-3).half()
    x = torch.randn(m, k, device="cuda", dtype=torch.half)
    for _ in range(3):
        gptq_mm_sorted(x, qw, qz, sc, 128, 0, 0, config=config)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(CALLS):
            gptq_mm_sorted(x, qw, qz, sc, 128, 0, 0, config=config)
        torch.cuda.synchronize()
    return {e.key: e.device_time_total / CALLS for e in prof.key_averages() if e.device_time_total > 0}


def main():
    out = dict(header(), method=__doc__.split("\n\n")[0].replace("\n", " "), rows=[])
    print(json.dumps({k: v for k, v in out.items() if k != "rows"}))
    for arg in sys.argv[1:]:
        shape, _, form = arg.partition(":")
        k, n, m = (int(d) for d in shape.split("x"))
        dev = torch.device("cuda")
        forced = dict(prefill_config(m, k, n, 128, dev, tiled=True), STREAM=form == "stream") if form else None
        config = forced or pick_config(m, k, n, 128, dev, tiled=True)
        row = dict(K=k, N=n, M=m, config=config, kernels_us=kernel_us(k, n, m, forced))
        out["rows"].append(row)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
