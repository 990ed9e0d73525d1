"""How fast can one launch read a weight shard's bytes? The ceiling under bench_kernels.py's floor.

Per Llama-70B / Granite-20B shard (the bytes of its int4 words, scales and zeros as one int32 buffer, rotated over
copies totalling >= 400 MB as bench_kernels.py does, per-call time of a CUDA graph): bench_kernels' streaming floor
kernel (its grid, two launches never), torch's int32 sum (a tuned reduction), and a persistent streaming kernel
(PROGRAMS_PER_SM programs per SM, each XOR-reading one contiguous chunk, UNROLL 16-byte loads per thread in
flight). Against the roof (the bytes over the copy bandwidth). A probe: no kernel of the package is timed here.

    python bench/probe_stream.py --out probe_stream.json
"""

import argparse
import json
import os
import sys

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_kernels import MODELS, copies_for, copy_bandwidth, floor_fns, floor_split, make_gptq, roof_bytes  # noqa: E402
from timing import graph_us, header  # noqa: E402

BLOCK = 512  # int32 words per load step of a 128-thread program: one 16-byte vector per thread


@triton.jit
def _persistent_stream(ptr, out_ptr, n_words, words_per_program, BLOCK: tl.constexpr, UNROLL: tl.constexpr):
    """XOR of words [pid * words_per_program, +words_per_program): UNROLL independent 16-byte loads per thread
    before any is used."""
    pid = tl.program_id(0)
    start = pid * words_per_program
    end = tl.minimum(start + words_per_program, n_words)
    acc = tl.zeros([BLOCK], tl.int32)
    for w in range(start, end, BLOCK * UNROLL):
        for u in tl.static_range(UNROLL):
            offs = w + u * BLOCK + tl.arange(0, BLOCK)
            acc ^= tl.load(ptr + offs, mask=offs < end, other=0)
    tl.store(out_ptr + pid * BLOCK + tl.arange(0, BLOCK), acc)


def persistent_fns(bufs, programs, unroll):
    n = bufs[0].numel()
    per = -(-n // programs // (BLOCK * unroll)) * BLOCK * unroll
    out = torch.empty(programs * BLOCK, dtype=torch.int32, device="cuda")
    return [lambda b=b: _persistent_stream[(programs,)](b, out, n, per, BLOCK=BLOCK, UNROLL=unroll, num_warps=4)
            for b in bufs]


def shards():
    for model, (hidden, inter) in MODELS.items():
        for tp in (1, 2, 4, 8):
            yield model, tp, "up", hidden, inter // tp
            yield model, tp, "down", inter // tp, hidden


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="probe_stream.json")
    args = ap.parse_args()
    head = header()
    bw = copy_bandwidth()
    head.update(copy_TBps=bw / 1e12, rows=[])
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    print(head, flush=True)
    for model, tp, layer, k, n in shards():
        nbytes = roof_bytes(k, n, 0)
        words = int(nbytes // 4) // BLOCK * BLOCK
        bufs = [torch.randint(-2**31, 2**31 - 1, (words,), dtype=torch.int32, device="cuda")
                for _ in range(copies_for(nbytes))]
        row = dict(model=model, tp=tp, layer=layer, K=k, N=n, MB=words * 4 / 1e6, roof_us=words * 4 / bw * 1e6)
        copies = make_gptq(k, n, copies_for(nbytes))
        row["floor_us"] = graph_us(floor_fns(copies, k, n, floor_split(k, n), 1))
        del copies
        row["torch_sum_us"] = graph_us([lambda b=b: b.sum() for b in bufs])
        for per_sm in (4, 8, 16):
            for unroll in (2, 4, 8):
                row[f"persistent_{per_sm}x{unroll}_us"] = graph_us(persistent_fns(bufs, per_sm * sms, unroll))
        best = min(v for key, v in row.items() if key.startswith("persistent"))
        print(f"{model} tp{tp} {layer} {row['MB']:.0f} MB roof {row['roof_us']:.1f} floor {row['floor_us']:.1f} "
              f"sum {row['torch_sum_us']:.1f} persistent best {best:.1f} ({100 * row['roof_us'] / best:.0f}% roof)",
              flush=True)
        head["rows"].append(row)
        del bufs
        torch.cuda.empty_cache()
    with open(args.out, "w") as f:
        json.dump(head, f, indent=1)


if __name__ == "__main__":
    main()
