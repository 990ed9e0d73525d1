"""``python -m tpaware_compile run CHECKPOINT --tp N --tokens ...``: the logits of a GPTQ checkpoint for
given token ids, computed over N tensor-parallel ranks (eager, or compiled with a backend), saved by rank 0
as a safetensors file {"logits": [1, S, vocab] fp32}."""

import time

import torch
from safetensors.torch import save_file

from .launch import launch, use_cuda
from .models import Parallel
from .models.loader import load_checkpoint


def main(path: str, tp: int, tokens, out: str, form: str = "N", backend: str = "tpaware",
         dtype: str = "auto") -> None:
    print(f"[run] {path}: {len(tokens)} tokens over {tp} ranks "
          f"({'NCCL' if use_cuda(tp) else 'gloo (CPU)'}), form {form}, backend {backend}", flush=True)
    launch(tp, _run, path, list(tokens), out, form, backend, dtype)


def _run(rank, world, device, path, tokens, out, form, backend, dtype):
    dt = {"auto": torch.float16 if device.type == "cuda" else torch.float32,
          "fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    start = time.perf_counter()
    model = load_checkpoint(path, Parallel(rank, world, form=form), dtype=dt, max_seq=max(len(tokens), 16)).to(device)
    if rank == 0:
        print(f"[run] loaded in {time.perf_counter() - start:.1f} s", flush=True)
    if backend != "eager":
        model = torch.compile(model, backend=backend)
    ids = torch.tensor([tokens], device=device)
    with torch.no_grad():
        logits = model(ids, torch.arange(len(tokens), device=device))
    if rank == 0:
        save_file({"logits": logits.float().cpu().contiguous()}, out)
        print(f"[run] logits {tuple(logits.shape)} saved to {out}", flush=True)
