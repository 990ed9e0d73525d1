"""The demo: a small act-order GPTQ Llama under tensor parallelism, eager against ``backend="tpaware"``.

With no GPU it runs CPU ranks over gloo; with GPUs, one rank per GPU over NCCL. Rank 0 prints progress,
the rewrite report, the largest difference to eager and tokens per second of each.
"""

import time

import torch

from .launch import launch, use_cuda
from .models import Decoder, DecoderConfig, Parallel, random_weights

DEMO_CONFIG = DecoderConfig(vocab=512, hidden=256, inter=768, layers=4, heads=8, kv_heads=4, max_seq=128)


def main(world: int = 2, prompt_len: int = 16, new_tokens: int = 16, form: str = "N") -> None:
    _say(f"demo: {world} ranks over {'NCCL' if use_cuda(world) else 'gloo (CPU)'}, form {form} MLPs, "
         f"{DEMO_CONFIG.layers} layers, hidden {DEMO_CONFIG.hidden}, intermediate {DEMO_CONFIG.inter}")
    launch(world, _run, prompt_len, new_tokens, form)


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
