"""Registers and spills of the decode GEMV kernels per config, compiled for sm_90a here, no GPU needed: the
kernels are specialized as the JIT would specialize them at run time (16-byte aligned pointers, N, K and KPAD
multiples of 16) and the PTX is assembled by the ptxas that ships with triton (`ptxas -v`).

    python bench/kernel_regs.py            # the one-row GEMV's table configs and the multi-row GEMV's
"""

import importlib
import os
import re
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# the module itself: the package re-exports a function of the same name
gemv_prep = importlib.import_module("tpaware_compile.kernels.gemv_prep")

PTXAS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
ARGS = {"xp_ptr": "*fp32", "c_ptr": "*fp32", "xs_ptr": "*fp32", "qw_ptr": "*i32", "qz_ptr": "*i32", "sc_ptr": "*fp16",
        "out_ptr": "*fp32", "M": "i32", "N": "i32", "K": "i32", "KPAD": "i32", "group_offset": "i32",
        "zero_offset": "i32", "segs_per_split": "i32", "one_bits": "i32"}
# (ROWS, BLOCK_N, BLOCK_K, num_warps); ROWS 1 is the one-row kernel (pick_config's M = 1 configs)
CONFIGS = [(1, 256, 64, 4), (1, 512, 32, 4), (2, 256, 32, 4), (2, 512, 32, 8), (2, 256, 64, 4), (4, 256, 16, 4),
           (4, 512, 16, 8), (4, 256, 32, 8), (4, 128, 64, 4), (8, 128, 16, 4), (8, 256, 16, 8), (8, 128, 64, 4)]


def registers(rows, block_n, block_k, num_warps, group_size=128):
    """(registers per thread, spill store bytes, spill load bytes) of one config."""
    fn = gemv_prep._gemv_prep_kernel if rows == 1 else gemv_prep._gemv_prep_rows_kernel
    consts = dict(GROUP_SIZE=group_size, BLOCK_K=block_k, BLOCK_N=block_n, **({} if rows == 1 else {"ROWS": rows}))
    sig = dict(ARGS, **{k: "constexpr" for k in consts})
    aligned = {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a in sig
               if sig[a].startswith("*") or a in ("N", "K", "KPAD")}
    kernel = triton.compile(ASTSource(fn, sig, consts, aligned), target=GPUTarget("cuda", 90, 32),
                            options=dict(num_warps=num_warps, num_stages=1))
    with tempfile.TemporaryDirectory() as d:
        ptx = os.path.join(d, "k.ptx")
        with open(ptx, "w") as f:
            f.write(kernel.asm["ptx"])
        log = subprocess.run([PTXAS, "-v", "--gpu-name", "sm_90a", ptx, "-o", os.path.join(d, "k.cubin")],
                             capture_output=True, text=True, check=True).stderr
    regs = int(re.search(r"Used (\d+) registers", log).group(1))
    spill_st, spill_ld = map(int, re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log).groups())
    return regs, spill_st, spill_ld


def main():
    print(f"triton {triton.__version__}, sm_90a, group size 128")
    print("| ROWS | BLOCK_N | BLOCK_K | warps | registers | spill stores | spill loads |")
    print("|---|---|---|---|---|---|---|")
    for cfg in CONFIGS:
        print("| " + " | ".join(str(v) for v in (*cfg, *registers(*cfg))) + " |", flush=True)


if __name__ == "__main__":
    main()
