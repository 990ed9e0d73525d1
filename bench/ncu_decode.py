"""Three dispatched calls on one shape, for a profiler (nothing timed here): what the backend runs on sm_90 for M
tokens (tiled words, group 128, fp16), as bench_kernels.py times it.

    ncu --clock-control none -k regex:_wgmma_kernel -s 2 -c 1 --section SpeedOfLight --section WarpStateStats \
        --section SchedulerStats python bench/ncu_decode.py 8192 14336 1     # K N M
"""
import sys

import torch

sys.path.append(".")  # after PYTHONPATH, so that an A/B's PYTHONPATH=before:. reaches the package
from tpaware_compile.kernels import gptq_mm_sorted  # noqa: E402
from tpaware_compile.layout import tile  # noqa: E402


def main():
    k, n, m = (int(a) for a in sys.argv[1:4])
    qw = tile(torch.randint(-2**31, 2**31 - 1, (k // 8, n), dtype=torch.int32, device="cuda"))
    qz = torch.randint(-2**31, 2**31 - 1, (k // 128, n // 8), dtype=torch.int32, device="cuda")
    sc = (torch.rand(k // 128, n, device="cuda") * 0.01 + 1e-3).half()
    x = torch.randn(m, k, device="cuda", dtype=torch.half)
    for _ in range(3):
        gptq_mm_sorted(x, qw, qz, sc, 128)
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
