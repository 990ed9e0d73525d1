"""Three calls per prefill config on one shape, for a profiler (the kernels alone, nothing timed here):

    ncu -k regex:_prefill_kernel -s 1 -c 1 --section WarpStateStats --section SourceCounters \
        python bench/ncu_prefill.py 3584 8192 256          # K N M [BLOCK_N ...], default 128
    ncu --clock-control none -k regex:_wgmma_kernel -s 2 -c 1 --section SpeedOfLight --section WarpStateStats \
        python bench/ncu_prefill.py 8192 14336 1 dispatch  # the dispatched config (a decode call here)

Tiled words, group 128, 256-token tiles, one split (the profile is of one launch's steps, not of a dispatch), or
with ``dispatch`` what the backend runs for M tokens on sm_90.
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
    configs = [None] if sys.argv[4:] == ["dispatch"] else [
        dict(kind="dot", WGMMA=True, PREFILL=True, BLOCK_M=256, BLOCK_N=bn, BLOCK_K=64, STAGES=3, num_warps=8,
             SPLIT_K=1) for bn in [int(a) for a in sys.argv[4:]] or [128]]
    for cfg in configs:
        for _ in range(3):
            gptq_mm_sorted(x, qw, qz, sc, 128, 0, 0, config=cfg)
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
