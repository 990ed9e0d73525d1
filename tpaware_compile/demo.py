"""The demo: a small act-order GPTQ Llama under tensor parallelism, eager against ``backend="tpaware"``.

With no GPU it runs CPU ranks over gloo; with GPUs, one rank per GPU over NCCL. Rank 0 prints progress,
the rewrite report, the largest difference to eager and tokens per second of each.
"""

import datetime
import os
import socket
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from .models import Decoder, DecoderConfig, Parallel, random_weights

DEMO_CONFIG = DecoderConfig(vocab=512, hidden=256, inter=768, layers=4, heads=8, kv_heads=4, max_seq=128)


def main(world: int = 2, prompt_len: int = 16, new_tokens: int = 16, form: str = "N") -> None:
    cuda = torch.cuda.is_available() and torch.cuda.device_count() >= world
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    _say(f"demo: {world} ranks over {'NCCL' if cuda else 'gloo (CPU)'}, form {form} MLPs, "
         f"{DEMO_CONFIG.layers} layers, hidden {DEMO_CONFIG.hidden}, intermediate {DEMO_CONFIG.inter}")
    mp.spawn(_rank_main, args=(world, port, cuda, prompt_len, new_tokens, form), nprocs=world, join=True)


def _rank_main(rank, world, port, cuda, prompt_len, new_tokens, form):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=300))
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    try:
        _run(rank, world, device, prompt_len, new_tokens, form)
    finally:
        dist.destroy_process_group()


def _run(rank, world, device, prompt_len, new_tokens, form):
    log = _say if rank == 0 else (lambda *_: None)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    log("building the model: random weights, act-order GPTQ quantization of every MLP ...")
    weights = random_weights(DEMO_CONFIG, dtype=dtype, seed=0)
    prompt = torch.randint(0, DEMO_CONFIG.vocab, (1, prompt_len), generator=torch.Generator().manual_seed(1))
    par = Parallel(rank=rank, world=world, form=form)
    eager = Decoder(DEMO_CONFIG, par, weights).to(device)
    log("eager: generating ...")
    ref_tokens, ref_logits, eager_tps = _generate(eager, prompt.to(device), new_tokens)
    model = Decoder(DEMO_CONFIG, par, weights).to(device)
    compiled = torch.compile(model, backend="tpaware")
    log("tpaware: compiling (prefill and decode graphs) and generating ...")
    _generate(compiled, prompt.to(device), 2)  # compile both graphs outside the timing
    tokens, logits, tps = _generate(compiled, prompt.to(device), new_tokens)
    from .report import last_reports

    log(last_reports().render())
    diff = max(float((a.float() - b.float()).abs().max()) for a, b in zip(logits, ref_logits))
    log(f"largest |logit difference| to eager: {diff:.3g}; same tokens: {torch.equal(tokens, ref_tokens)}")
    log(f"tokens/s: eager {eager_tps:.1f}, tpaware {tps:.1f} ({device.type}, {world} ranks)")


@torch.no_grad()
def _generate(model, prompt, new_tokens):
    """Greedy decoding; returns the generated tokens, each step's logits and decode tokens per second."""
    pos = torch.arange(prompt.shape[1], device=prompt.device)
    logits = [model(prompt, pos)[:, -1]]
    tokens = [logits[-1].argmax(-1, keepdim=True)]
    start = time.perf_counter()
    for i in range(new_tokens - 1):
        pos = torch.tensor([prompt.shape[1] + i], device=prompt.device)
        logits.append(model(tokens[-1], pos)[:, -1])
        tokens.append(logits[-1].argmax(-1, keepdim=True))
    _sync(prompt.device)
    return torch.cat(tokens, 1), logits, (new_tokens - 1) / max(time.perf_counter() - start, 1e-9)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)
