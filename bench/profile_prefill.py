"""Where one prefill's time goes, per variant of bench_model.py: wall time per call and the top CUDA kernels of
a few prefill calls (torch.profiler), after a first call of ``--check`` tokens and three decode steps (8: the
benchmark's order when results/profile_prefill_*.log was made; it now checks at the prompt length).

    python bench/profile_prefill.py [--layers 8] [--prompt 512] [--check 8]
"""

import argparse
import dataclasses
import os
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_model as bm  # noqa: E402
from timing import header  # noqa: E402

from tpaware_compile.compat import raise_recompile_limit  # noqa: E402


@torch.no_grad()
def run(variant, cfg, a):
    model = bm.build(cfg, variant, bm.device_weights(cfg, torch.device("cuda"), torch.float16), torch.device("cuda"),
                     "triton")
    call = lambda s: model(torch.zeros(1, s, dtype=torch.long, device="cuda"), torch.arange(s, device="cuda"))  # noqa
    for s in (a.check, 1, 1, 1, a.prompt):  # the benchmark's order of shapes: each may compile
        call(s)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(3):
        call(a.prompt)
    torch.cuda.synchronize()
    print(f"== {variant}: {(time.perf_counter() - t) / 3 * 1e3:.2f} ms per prefill of {a.prompt} tokens", flush=True)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            call(a.prompt)
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=70), flush=True)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--prompt", type=int, default=512)
    p.add_argument("--check", type=int, default=8, help="length of the first call (the benchmark's check)")
    a = p.parse_args()
    raise_recompile_limit(64)
    print(header(), flush=True)
    cfg = dataclasses.replace(bm.SHAPES["llama2-7b"], layers=a.layers)
    for variant in bm.VARIANTS:
        run(variant, cfg, a)


if __name__ == "__main__":
    main()
