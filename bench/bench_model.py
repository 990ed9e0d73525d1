"""Per-token decode latency and prefill throughput of a Llama-shaped act-order GPTQ model on one GPU (TP 1):
eager, ``backend="inductor"`` and ``backend="tpaware"``.

    python bench/bench_model.py [--quick] --out bench/results/model_<device>.json
    python bench/bench_model.py --cpu-check     # a tiny model on CPU: every variant runs and agrees

Decode steps run as a CUDA graph of one step (static token, position and KV cache), replayed many times.
Prefill is timed twice: plain calls (wall clock, so the host's launch overhead counts: what a caller without
CUDA graphs sees) and the same call replayed as a CUDA graph (GPU throughput). Eager and Inductor use the
Triton kernels through ``kernel="triton"`` with ``presort=True`` (act-order gate/up rows sorted at load and x
permuted at run time, as vLLM runs them; down is sorted in form N at TP 1), never the fp32 reference; each row
names its kernel. Weights are random packed tensors (``random_weights(fast=True)``): speed does not depend on
values.
"""

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import graph_us, header  # noqa: E402

from tpaware_compile.backend import tpaware  # the function: the bench needs no installed entry point  # noqa: E402
from tpaware_compile.compat import raise_recompile_limit  # noqa: E402
from tpaware_compile.gptq import GPTQWeight  # noqa: E402
from tpaware_compile.layout import words_of  # noqa: E402
from tpaware_compile.models import Decoder, DecoderConfig, Parallel, random_weights  # noqa: E402

SHAPES = {
    "llama2-7b": DecoderConfig(vocab=32000, hidden=4096, inter=11008, layers=32, heads=32, kv_heads=32, max_seq=1024),
    "llama2-13b": DecoderConfig(vocab=32000, hidden=5120, inter=13824, layers=40, heads=40, kv_heads=40, max_seq=1024),
}
TINY = {"tiny": DecoderConfig(vocab=256, hidden=128, inter=384, layers=2, heads=4, kv_heads=2, max_seq=64)}
# name -> (backend, options); the backend's default tiles the packed words on sm_90 (layout.py), and
# tpaware_nmajor keeps them N-major: the same rewrite and lowering, so the pair shows what the layout is worth
VARIANTS = {"eager": (None, None), "inductor": ("inductor", None), "tpaware": (tpaware, None),
            "tpaware_nmajor": (tpaware, {"tpaware.tile_weights": False})}


def device_weights(cfg, device, dtype):
    """Random weights drawn once per shape on the CPU (seeded) and moved to the device, where every variant's
    model is built from them (sorting and sharding a 13B model's layers on the CPU took minutes per variant)."""
    return _to(random_weights(cfg, dtype, group_size=128, fast=True), device)


def _to(obj, device):
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_to(v, device) for v in obj]
    if isinstance(obj, GPTQWeight):
        return obj.replace(**{f: getattr(obj, f).to(device) for f in ("qweight", "qzeros", "scales", "g_idx", "bias")
                              if getattr(obj, f) is not None})
    return obj.to(device)


def build(cfg, variant, weights, device, kernel):
    """One variant's model from shared, read-only weights (each variant converts only its own MLP modules)."""
    # presort: act-order gate/up run as vLLM runs them (rows sorted at load, x[..., P1]): the best eager path
    model = Decoder(cfg, Parallel(kernel=kernel, presort=True), weights).to(device)
    backend, options = VARIANTS[variant]
    return model if backend is None else torch.compile(model, backend=backend, options=options)


@torch.no_grad()
def decode_step_us(model, device, prompt_len, steps):
    """Median per-token latency of one decode step replayed as a CUDA graph (wall time on CPU)."""
    token = torch.zeros(1, 1, dtype=torch.long, device=device)
    pos = torch.tensor([prompt_len], device=device)
    step = lambda: model(token, pos)  # noqa: E731
    for _ in range(3):
        step()  # compile and warm up
    if device.type != "cuda":
        t = time.perf_counter()
        for _ in range(steps):
            step()
        return (time.perf_counter() - t) * 1e6 / steps
    graph = _capture(step)
    times = []
    for i in range(steps):
        pos.fill_(prompt_len + i % 64)
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3)
    return sorted(times)[len(times) // 2]


def _capture(step):
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph


@torch.no_grad()
def prefill_tokens_per_s(model, device, prompt_len, vocab, reps):
    """(tokens/s of plain calls, which include the host's launch overhead; tokens/s of the same call replayed
    as a CUDA graph, None on CPU)."""
    tokens = torch.randint(0, vocab, (1, prompt_len), device=device)
    pos = torch.arange(prompt_len, device=device)
    step = lambda: model(tokens, pos)  # noqa: E731
    step()  # compile
    times = []
    for _ in range(reps):
        _sync(device)
        t = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - t)
    plain = prompt_len / sorted(times)[len(times) // 2]
    if device.type != "cuda":
        return plain, None
    return plain, prompt_len * 1e6 / graph_us([step], calls=1, replays=reps)  # a graph of one prefill


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def check_agreement(models, cfg, device, prompt_len, tol):
    """At the prefill length, so that this call is also each variant's prefill compile."""
    tokens = torch.randint(0, cfg.vocab, (1, prompt_len), device=device)
    pos = torch.arange(prompt_len, device=device)
    ref = models["eager"](tokens, pos).float()
    for name, m in models.items():
        err = float((m(tokens, pos).float() - ref).abs().max() / ref.abs().max())
        if not err < tol:
            raise RuntimeError(f"{name} disagrees with eager: relative error {err:.3g}")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true", help="Llama-2-7B shapes only")
    p.add_argument("--models", nargs="+", choices=sorted(SHAPES), default=sorted(SHAPES))
    p.add_argument("--cpu-check", action="store_true", help="tiny model on CPU: validation only, no claims")
    p.add_argument("--prompt", type=int, default=512)
    p.add_argument("--variants", default=",".join(VARIANTS),
                   help="comma-separated, timed in this order (eager always runs: the others are checked against it)")
    p.add_argument("--out", default=None)
    a = p.parse_args()
    raise_recompile_limit(64)  # four variants, two graphs each (prefill, decode), plus the retraces
    cuda = not a.cpu_check
    device, dtype = (torch.device("cuda"), torch.float16) if cuda else (torch.device("cpu"), torch.float32)
    names = ["llama2-7b"] if a.quick else a.models
    shapes = TINY if a.cpu_check else {n: SHAPES[n] for n in names}
    kernel = "triton" if cuda else "reference"
    prompt = min(a.prompt, 32) if a.cpu_check else a.prompt
    rows = []
    for name, cfg in shapes.items():
        weights = device_weights(cfg, device, dtype)
        models = {v: build(cfg, v, weights, device, kernel) for v in _variants(a.variants)}
        check_agreement(models, cfg, device, prompt, 2e-2 if cuda else 1e-4)
        for variant, model in models.items():
            decode = decode_step_us(model, device, prompt, 50 if cuda else 3)
            plain, graphed = prefill_tokens_per_s(model, device, prompt, cfg.vocab, 10 if cuda else 1)
            row = dict(model=name, tp=1, variant=variant, kernel=_kernel_name(variant, kernel, model),
                       decode_us_per_token=decode, prefill_tokens_per_s=plain, prefill_graph_tokens_per_s=graphed)
            rows.append(row)
            graph_col = f"{graphed:8.0f}" if graphed else "       -"
            print(f"{name:>11} {variant:<9} decode {decode:9.1f} us/token   prefill {plain:8.0f} tokens/s (graph "
                  f"{graph_col})   {row['kernel']}", flush=True)
            if a.out:  # after every row: a run cut short keeps what it measured
                with open(a.out, "w") as f:
                    json.dump(dict(header(), prompt=prompt, rows=rows), f, indent=1)
        del models


def _variants(spec: str) -> list:
    names = spec.split(",")
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    return names if "eager" in names else names + ["eager"]


def _kernel_name(variant, kernel, model):
    if variant.startswith("tpaware"):
        return f"tpaware rewrite + lowering (see the rewrite report), {words_of(model)} words"
    return f"{kernel}: gate/up sorted via x[P1] (presort), down sorted (form N at TP 1)"


if __name__ == "__main__":
    main()
