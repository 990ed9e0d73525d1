"""Registers, spills and hot-loop instructions per weight of the decode kernels per config, compiled for sm_90a
here, no GPU needed: the kernels are specialized as the JIT would specialize them at run time (16-byte aligned
pointers, N, K and KPAD multiples of 16), the PTX is assembled by the ptxas that ships with triton (`ptxas -v`),
and the SASS of the longest backward branch's body (the K-step loop) is counted with its cuobjdump.
Instructions per weight predict the issue-bound time (the one-row GEMV reaches 61-68% of the copy roof on an
H100 at 4.4; the wgmma kernel at one token 73-74% at 4.1 on N-major words, 77-79% at 3.8 on tiled ones under its
register cap); a prediction, not a measurement. The wgmma kernel is Gluon,
compiled through triton's GluonASTSource (triton 3.6).

    python bench/kernel_regs.py            # the GEMVs' configs, then the wgmma kernel's
"""

import importlib
import os
import re
import subprocess
import sys
import tempfile

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# the module itself: the package re-exports a function of the same name
gemv_prep = importlib.import_module("tpaware_compile.kernels.gemv_prep")
wgmma = importlib.import_module("tpaware_compile.kernels.wgmma")
prefill = importlib.import_module("tpaware_compile.kernels.wgmma_prefill")
from tpaware_compile.kernels.common import tl_dtype  # noqa: E402

PTXAS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
CUOBJDUMP = os.path.join(os.path.dirname(PTXAS), "cuobjdump")
ARGS = {"xp_ptr": "*fp32", "c_ptr": "*fp32", "xs_ptr": "*fp32", "qw_ptr": "*i32", "qz_ptr": "*i32", "sc_ptr": "*fp16",
        "out_ptr": "*fp32", "M": "i32", "N": "i32", "K": "i32", "KPAD": "i32", "stride_q": "i32",
        "group_offset": "i32", "zero_offset": "i32", "segs_per_split": "i32", "one_bits": "i32"}
# (ROWS, BLOCK_N, BLOCK_K, num_warps); ROWS 1 is the one-row kernel (pick_config's M = 1 configs)
CONFIGS = [(1, 256, 64, 4), (1, 512, 32, 4), (2, 256, 32, 4), (2, 512, 32, 8), (2, 256, 64, 4), (4, 256, 16, 4),
           (4, 512, 16, 8), (4, 256, 32, 8), (4, 128, 64, 4), (8, 128, 16, 4), (8, 256, 16, 8), (8, 128, 64, 4)]
PREFILL_CONFIGS = [(64, 128, 64, 4), (64, 128, 128, 3), (128, 128, 128, 3), (128, 256, 64, 3), (256, 128, 64, 3),
                   (256, 128, 128, 3)]
WGMMA_CONFIGS = [(16, 64, 128), (16, 64, 64), (16, 128, 128), (32, 64, 128), (32, 64, 64), (64, 64, 128), (64, 64, 64)]
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def compile_gemv(rows, block_n, block_k, num_warps, group_size=128):
    """The one-row (rows 1) or multi-row GEMV on prepared x, compiled for sm_90a as the JIT would specialize it."""
    fn = gemv_prep._gemv_prep_kernel if rows == 1 else gemv_prep._gemv_prep_rows_kernel
    # as pick_config runs them: the split-K reduced inside the launch (SERIAL), not a SwiGLU's up launch
    consts = dict(GROUP_SIZE=group_size, BLOCK_K=block_k, BLOCK_N=block_n, SERIAL=True, SWIGLU=False, TILED=False,
                  **({} if rows == 1 else {"ROWS": rows}))
    serial_args = {"final_ptr": "*fp16", "count_ptr": "*i32", "gate_ptr": "*fp32"}
    sig = dict(ARGS, **serial_args, **{k: "constexpr" for k in consts})
    aligned = {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a in sig
               if sig[a].startswith("*") or a in ("N", "K", "KPAD", "stride_q")}
    return triton.compile(ASTSource(fn, sig, consts, aligned), target=GPUTarget("cuda", 90, 32),
                          options=dict(num_warps=num_warps, num_stages=1))


def compile_wgmma(block_m, block_n, block_k, dtype="fp16", serial=True, swiglu=False, group_size=128, even=True,
                  tiled=False, maxnreg=None, parts=1):
    """The Hopper kernel (wgmma.py) compiled for sm_90a: compiling checks that the unpacked weights reach the MMA
    operand layout without data movement (its convert_layout asserts it). even: the loads without masks that the
    launch picks where wgmma.even_shape holds (the TP shards), else the masked ones; tiled: qweight in the tiled
    layout (layout.py), else N-major; maxnreg: a register cap, as the launch sets one (wgmma.register_cap); parts:
    2 for two block_n-column parts per program (config PARTS)."""
    from triton.experimental.gluon._runtime import GluonASTSource
    fn = wgmma._wgmma_kernel
    consts = dict(GROUP_SIZE=group_size, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
                  DTYPE=tl_dtype(DTYPES[dtype]), SERIAL=serial, SWIGLU=swiglu, EVEN=even, TILED=tiled,
                  WORDS=wgmma.word_layout(block_n, block_k, wgmma.NUM_WARPS, tiled),
                  XL=wgmma.x_layout(block_m, block_k), PARTS=parts)
    sig = {"x_ptr": f"*{dtype}", "qw_ptr": "*i32", "qz_ptr": "*i32", "sc_ptr": f"*{dtype}", "out_ptr": "*fp32",
           "final_ptr": f"*{dtype}", "count_ptr": "*i32", "gate_ptr": "*fp32", "M": "i32", "N": "i32", "K": "i32",
           "stride_xm": "i32", "stride_q": "i32", "group_offset": "i32", "zero_offset": "i32", "segs_per_split": "i32",
           "base_bits": "i32", **{k: "constexpr" for k in consts}}
    aligned = {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a in sig
               if sig[a].startswith("*") or a in ("N", "K", "stride_xm", "stride_q")}
    return triton.compile(GluonASTSource(fn, sig, consts, aligned), target=GPUTarget("cuda", 90, 32),
                          options=dict(num_warps=wgmma.NUM_WARPS, maxnreg=maxnreg))


def compile_prefill(block_m, block_n, block_k, stages=3, warps=4, dtype="fp16", serial=False, swiglu=False,
                    group_size=128, out="fp32", tiled=False, maxnreg=None, x_box=None):
    """The Hopper prefill kernel (wgmma_prefill.py, x through TMA) compiled for sm_90a; out: the dtype it stores
    (fp32 partials, or x's dtype without split-K); maxnreg: a register cap (config MAXNREG); x_box: rows of x per
    TMA copy (config X_BOX; default the tile's)."""
    from triton.experimental.gluon._runtime import GluonASTSource
    fn = prefill._prefill_kernel
    tl_type = tl_dtype(DTYPES[dtype])
    consts = dict(GROUP_SIZE=group_size, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, STAGES=stages,
                  DTYPE=tl_type, SERIAL=serial, SWIGLU=swiglu, WARPS=warps, TILED=tiled,
                  WORDS=wgmma.word_layout(block_n, block_k, warps, tiled))
    layout = prefill.x_smem_layout(block_m, block_k, tl_type)
    sig = {"x_desc": f"tensordesc<{dtype}[{x_box or block_m}, {block_k}],{layout!r}>", "qw_ptr": "*i32",
           "qz_ptr": "*i32", "sc_ptr": f"*{dtype}", "out_ptr": f"*{out}", "final_ptr": f"*{dtype}", "count_ptr": "*i32",
           "gate_ptr": "*fp32", "M": "i32", "N": "i32", "K": "i32", "stride_q": "i32", "group_offset": "i32",
           "zero_offset": "i32", "segs_per_split": "i32", "base_bits": "i32", **{k: "constexpr" for k in consts}}
    aligned = {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a in sig
               if sig[a].startswith("*") or a in ("N", "K", "stride_q")}
    return triton.compile(GluonASTSource(fn, sig, consts, aligned), target=GPUTarget("cuda", 90, 32),
                          options=dict(num_warps=warps, maxnreg=maxnreg))


def compile_stream(block_m=256, block_n=128, block_k=128, stages=3, warps=8, dtype="fp16", group_size=128,
                   out="fp16", tiled=True):
    """The prefill kernel's stream-K form (wgmma_prefill._stream_kernel) compiled for sm_90a."""
    from triton.experimental.gluon._runtime import GluonASTSource
    fn = prefill._stream_kernel
    tl_type = tl_dtype(DTYPES[dtype])
    consts = dict(GROUP_SIZE=group_size, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, STAGES=stages,
                  DTYPE=tl_type, WARPS=warps, TILED=tiled, WORDS=wgmma.word_layout(block_n, block_k, warps, tiled))
    layout = prefill.x_smem_layout(block_m, block_k, tl_type)
    sig = {"x_desc": f"tensordesc<{dtype}[{block_m}, {block_k}],{layout!r}>", "qw_ptr": "*i32", "qz_ptr": "*i32",
           "sc_ptr": f"*{dtype}", "ws_ptr": "*fp32", "out_ptr": f"*{out}", "M": "i32", "N": "i32", "K": "i32",
           "stride_q": "i32", "group_offset": "i32", "zero_offset": "i32", "base_bits": "i32", "tiles_m": "i32",
           "whole": "i32", "pairs": "i32", "units": "i32", **{k: "constexpr" for k in consts}}
    aligned = {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a in sig
               if sig[a].startswith("*") or a in ("N", "K", "stride_q")}
    return triton.compile(GluonASTSource(fn, sig, consts, aligned), target=GPUTarget("cuda", 90, 32),
                          options=dict(num_warps=warps))


def ptxas_usage(kernel):
    """(registers per thread, spill store bytes, spill load bytes) of a compiled kernel."""
    with tempfile.TemporaryDirectory() as d:
        ptx = os.path.join(d, "k.ptx")
        with open(ptx, "w") as f:
            f.write(kernel.asm["ptx"])
        log = subprocess.run([PTXAS, "-v", "--gpu-name", "sm_90a", ptx, "-o", os.path.join(d, "k.cubin")],
                             capture_output=True, text=True, check=True).stderr
    regs = int(re.search(r"Used (\d+) registers", log).group(1))
    spill_st, spill_ld = map(int, re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log).groups())
    return regs, spill_st, spill_ld


def registers(rows, block_n, block_k, num_warps, group_size=128):
    """(registers per thread, spill store bytes, spill load bytes) of one GEMV config."""
    return ptxas_usage(compile_gemv(rows, block_n, block_k, num_warps, group_size))


def sass(kernel) -> str:
    with tempfile.TemporaryDirectory() as d:
        with open(os.path.join(d, "k.cubin"), "wb") as f:
            f.write(kernel.asm["cubin"])
        return subprocess.run([CUOBJDUMP, "-sass", os.path.join(d, "k.cubin")], capture_output=True, text=True,
                              check=True).stdout


def loop_body(code: str) -> list:
    """The SASS lines of the longest backward branch's body (the K-step loop)."""
    at = [(int(m.group(1), 16), line) for line in code.splitlines() if (m := re.match(r"\s+/\*([0-9a-f]{4})\*/", line))]
    body = []
    for addr, line in at:
        target = re.search(r"BRA.*?0x([0-9a-f]+)", line)
        if target and int(target.group(1), 16) < addr:
            lines = [text for a, text in at if int(target.group(1), 16) <= a <= addr]
            body = lines if len(lines) > len(body) else body
    return body


def loop_length(code: str) -> int:
    """SASS instructions in the body of the longest backward branch (the K-step loop)."""
    return len(loop_body(code))


def loop_instructions_per_weight(rows, block_n, block_k, num_warps, group_size=128) -> float:
    """SASS instructions in the K-step loop over the weights one thread handles per step."""
    weights = block_k * block_n / (32 * num_warps)  # 4-bit weights per thread per step
    return loop_length(sass(compile_gemv(rows, block_n, block_k, num_warps, group_size))) / weights


def main():
    print(f"triton {triton.__version__}, sm_90a, group size 128")
    print("| ROWS | BLOCK_N | BLOCK_K | warps | registers | spill stores | spill loads | loop instructions per weight "
          "| per weight and row |")
    print("|---|---|---|---|---|---|---|---|---|")
    for cfg in CONFIGS:
        per_weight = loop_instructions_per_weight(*cfg)
        cols = (*cfg, *registers(*cfg), f"{per_weight:.2f}", f"{per_weight / cfg[0]:.2f}")
        print("| " + " | ".join(str(v) for v in cols) + " |", flush=True)
    print("\nHopper kernel (wgmma.py), fp16, SERIAL; qweight N-major, tiled (layout.py), and tiled under the one-token "
          "register cap (wgmma.register_cap)")
    print("| words | BLOCK_M | BLOCK_N | BLOCK_K | registers | spill stores | spill loads | loop instructions per "
          "weight |")
    print("|---|---|---|---|---|---|---|---|")
    for bm, bn, bk in WGMMA_CONFIGS:
        for words, tiled, cap in (("N-major", False, None), ("tiled", True, None),
                                  ("tiled, capped", True, wgmma.register_cap(1, (bm, bn, bk), True))):
            if words.endswith("capped") and cap is None:
                continue
            kernel = compile_wgmma(bm, bn, bk, tiled=tiled, maxnreg=cap)
            per_weight = loop_length(sass(kernel)) / (bk * bn / (32 * wgmma.NUM_WARPS))
            cols = (words, bm, bn, bk, *ptxas_usage(kernel), f"{per_weight:.2f}")
            print("| " + " | ".join(str(v) for v in cols) + " |", flush=True)
    print("\nHopper prefill kernel (wgmma_prefill.py), fp16 output without split-K, 8 warps: the dispatched tiles")
    print("| BLOCK_M | BLOCK_N | BLOCK_K | x slots | registers | spill stores | spill loads | shared bytes |")
    print("|---|---|---|---|---|---|---|---|")
    for bm, bn, bk, stages in PREFILL_CONFIGS:
        kernel = compile_prefill(bm, bn, bk, stages, 8, out="fp16")
        print("| " + " | ".join(str(v) for v in (bm, bn, bk, stages, *ptxas_usage(kernel), kernel.metadata.shared))
              + " |", flush=True)


if __name__ == "__main__":
    main()
