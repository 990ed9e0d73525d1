"""Where one matmul call's GPU time goes: the CUDA kernels of gptq_mm_sorted as dispatched (torch.profiler, mean
microseconds per call of each kernel over 10 calls after 3 warm-up calls), per shape. Tiled words, group 128.

    python bench/profile_calls.py 8192x3584x256 3584x8192x1024      # K x N x M ...
"""

import json
import os
import sys

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the package itself comes from PYTHONPATH or pip
from timing import header  # noqa: E402

from tpaware_compile.kernels import gptq_mm_sorted, pick_config  # noqa: E402
from tpaware_compile.layout import tile  # noqa: E402

CALLS = 10


def kernel_us(k, n, m):
    qw = tile(torch.randint(-2**31, 2**31 - 1, (k // 8, n), dtype=torch.int32, device="cuda"))
    qz = torch.randint(-2**31, 2**31 - 1, (k // 128, n // 8), dtype=torch.int32, device="cuda")
    sc = (torch.rand(k // 128, n, device="cuda") * 0.01 + 1e-3).half()
    x = torch.randn(m, k, device="cuda", dtype=torch.half)
    for _ in range(3):
        gptq_mm_sorted(x, qw, qz, sc, 128, 0, 0)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(CALLS):
            gptq_mm_sorted(x, qw, qz, sc, 128, 0, 0)
        torch.cuda.synchronize()
    return {e.key: e.device_time_total / CALLS for e in prof.key_averages() if e.device_time_total > 0}


def main():
    out = dict(header(), method=__doc__.split("\n\n")[0].replace("\n", " "), rows=[])
    print(json.dumps({k: v for k, v in out.items() if k != "rows"}))
    for shape in sys.argv[1:]:
        k, n, m = (int(d) for d in shape.split("x"))
        row = dict(K=k, N=n, M=m, config=pick_config(m, k, n, 128, torch.device("cuda")), kernels_us=kernel_us(k, n, m))
        out["rows"].append(row)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
