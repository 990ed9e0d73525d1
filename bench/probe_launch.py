"""Where the host time of one Triton launch goes (GPU machine): each launch of one call of gptq_mm_sorted (Llama-2-13B
MLP shards, tiled words) is recorded, then enqueued again alone (GPU held busy, as bench_host.py times) through
Triton's JIT launcher (``kernel[grid](...)``), through its parts (the binder that specializes the arguments, the
cache key, the current stream), and straight through the compiled kernel's launcher with the arguments bound once
(``CompiledKernel.run``: what a launch costs once the specialization is known), and through the package's
launcher (kernels/launcher.py, which caches the compiled kernel per specialization). The whole call with and
without that cache (``TPAWARE_JIT_LAUNCH``), alternated. With a cProfile of the JIT path.

    PYTHONPATH=. python bench/probe_launch.py --out probe_launch.json
"""

import argparse
import json
import os
import sys

import torch
from triton.runtime import driver
from triton.runtime.jit import JITFunction, compute_cache_key

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_host import MODELS, host_us, profile_text  # noqa: E402
from bench_kernels import make_gptq  # noqa: E402
from timing import header  # noqa: E402

import tpaware_compile.kernels.op  # noqa: E402,F401
from tpaware_compile.kernels import gptq_mm_sorted, launcher  # noqa: E402
from tpaware_compile.layout import tile  # noqa: E402

GROUP = 128


def recorded_launches(fn):
    """[(kernel, args, kwargs, grid)] of the launches one call of fn makes (all through Triton's JIT launcher)."""
    seen, run, jit_only = [], JITFunction.run, launcher.JIT_ONLY

    def record(self, *args, grid, warmup, **kwargs):
        seen.append((self, args, dict(kwargs), grid))
        return run(self, *args, grid=grid, warmup=warmup, **kwargs)

    JITFunction.run, launcher.JIT_ONLY = record, True
    try:
        fn()
    finally:
        JITFunction.run, launcher.JIT_ONLY = run, jit_only
    return seen


def launch_paths(kernel, args, kwargs, grid):
    """name -> zero-argument call: the JIT launch and its parts, and the compiled kernel's launcher alone."""
    device = driver.active.get_current_device()
    compiled = kernel[grid](*args, **kwargs)
    _, key_cache, _, _, binder = kernel.device_caches[device]
    values = tuple(binder(*args, **kwargs)[0].values())
    stream = driver.active.get_current_stream(device)
    g = tuple(grid) + (1,) * (3 - len(grid))

    def compiled_run():
        compiled.run(*g, driver.active.get_current_stream(device), compiled.function, compiled.packed_metadata, None,
                     None, None, *values)

    def binder_and_key():  # with Triton's own (warm) key cache, as a JIT launch builds its key
        _, spec, opts = binder(*args, **kwargs)
        return compute_cache_key(key_cache, spec, opts)

    return dict(
        jit=lambda: kernel[grid](*args, **kwargs),
        launch_kernel=lambda: launcher.launch_kernel(kernel, grid, *args, **kwargs),
        binder=lambda: binder(*args, **kwargs),
        binder_and_key=binder_and_key,
        stream=lambda: driver.active.get_current_stream(driver.active.get_current_device()),
        compiled_run=compiled_run,
        compiled_run_fixed_stream=lambda: compiled.run(*g, stream, compiled.function, compiled.packed_metadata,
                                                       None, None, None, *values),
    )


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ms", default="1,512")
    ap.add_argument("--calls", type=int, default=200)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    head = header()
    print(head, flush=True)
    hidden, inter = MODELS["llama2-13b"]
    q, z, s = [(tile(q), z, s) for q, z, s in make_gptq(inter, hidden, 1)][0]
    rows, profiles = [], []
    for m in (int(v) for v in a.ms.split(",")):
        x = torch.randn(m, inter, dtype=torch.float16, device="cuda")
        call = lambda: gptq_mm_sorted(x, q, z, s, GROUP)  # noqa: E731
        call()
        for rep in range(2):  # the whole call through Triton's launcher and through the package's, alternated
            for jit_only in (True, False):
                launcher.JIT_ONLY = jit_only
                rows.append(dict(M=m, launch="-", path="gptq_mm_sorted" + ("_jit" if jit_only else ""), rep=rep,
                                 host_us=host_us(call, a.calls)))
        launcher.JIT_ONLY = False
        for i, (kernel, args, kwargs, grid) in enumerate(recorded_launches(call)):
            name = f"{i}:{kernel.__name__}"
            for path, fn in launch_paths(kernel, args, kwargs, grid).items():
                fn()
                rows.append(dict(M=m, launch=name, path=path, host_us=host_us(fn, a.calls)))
            profiles.append(f"== M={m} {name} jit, {a.calls} calls\n" +
                            profile_text(lambda: kernel[grid](*args, **kwargs), a.calls))
        for r in rows:
            if r["M"] == m:
                print(f"M={m:4d} {r['launch']:>28} {r['path']:>26}: host {r['host_us']:7.2f} us", flush=True)
    print("\n".join(profiles), flush=True)
    with open(a.out, "w") as f:
        json.dump(dict(head, method=__doc__.split("\n\n")[0], rows=rows, profiles=profiles), f, indent=1)
    print("wrote", a.out)


if __name__ == "__main__":
    with torch.no_grad():
        sys.exit(main())
