"""Does the prefill kernel pay for x rows the TMA reads out of bounds? Kernel time (profile_calls.kernel_us) of
the one-launch prefill config at token counts off a multiple of 64, with x as it lies (the TMA zero-fills the
rows past M) and with x copied into a zero-padded buffer of whole tiles (rows past M read as data; the kernel
still masks its stores at M). Tiled words, group 128.

    python bench/probe_tma_rows.py 7168x8192x300 7168x8192x257 ...   # K x N x M
"""

import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the package itself comes from PYTHONPATH or pip
from profile_calls import kernel_us  # noqa: E402
from timing import header  # noqa: E402

from tpaware_compile.kernels import launch_config, wgmma_prefill  # noqa: E402


def padded_rows(block_m):
    """A tma_ready that hands the TMA x in a zero-padded buffer of whole block_m-row tiles."""
    def ready(x):
        rows = -(-x.shape[0] // block_m) * block_m
        buf = torch.zeros(rows, x.shape[1], dtype=x.dtype, device=x.device)
        buf[:x.shape[0]] = x
        return buf
    return ready


def main():
    print(json.dumps(dict(header(), method=__doc__.split("\n\n")[0].replace("\n", " "))))
    as_is = wgmma_prefill.tma_ready
    for arg in sys.argv[1:]:
        k, n, m = (int(d) for d in arg.split("x"))
        cfg = launch_config(m, k, n, 128, torch.device("cuda"), tiled=True)
        row = dict(K=k, N=n, M=m, config=cfg, as_is_us=kernel_us(k, n, m, cfg))
        wgmma_prefill.tma_ready = padded_rows(cfg["BLOCK_M"])
        row["padded_us"] = kernel_us(k, n, m, cfg)
        wgmma_prefill.tma_ready = as_is
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
