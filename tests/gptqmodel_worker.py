"""Runs inside the GPTQModel venv (see test_gptqmodel_checkpoint.py), never imported by the test suite.

Quantizes a tiny random Llama with GPTQModel on CPU (act-order), saves the checkpoint, reloads it with
GPTQModel's torch kernel and writes GPTQModel's own dequantized weights, so the main environment can
compare them with ours. Everything is made here from random numbers: nothing comes from a hub.

usage: python gptqmodel_worker.py OUT_DIR CASE...   with CASE = {sym,asym}-GROUP_SIZE-{gptq,gptq_v2}, e.g. asym-32-gptq
writes, per CASE, OUT_DIR/CASE/quantized/ (the checkpoint) and OUT_DIR/CASE/gptqmodel_dequant.safetensors
({module name: [K, N] fp16}) and gptqmodel_logits.safetensors ({"tokens", "logits"}: GPTQModel's own
forward). One process for all cases: importing GPTQModel costs several seconds.
"""

import os
import sys

os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")  # the CI machine has 2 cores
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # fail fast rather than reach for a hub

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from tiny_tokenizer import make_tokenizer  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

VOCAB = 256
LOGIT_TOKENS = [1, 17, 42, 99, 5, 230, 64, 128, 7, 200, 33, 150]
HIDDEN, INTERMEDIATE = 128, 256


def make_source_model(path: str, sym: bool) -> None:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model = LlamaForCausalLM(cfg).to(torch.float16)
    if not sym:
        _force_zero_zero_points(model)
    model.save_pretrained(path)
    make_tokenizer(VOCAB).save_pretrained(path)


def _force_zero_zero_points(model) -> None:
    # A column whose weights are all >= 0 gets zero point 0, which the v1 format cannot store in a nibble
    # (it writes zero - 1 with a borrow into the next nibble): make some, so a reader that gets it wrong fails.
    with torch.no_grad():
        mlp = model.model.layers[0].mlp
        for mod in (mlp.gate_proj, mlp.up_proj, mlp.down_proj):
            mod.weight[:5].abs_()  # HF Linear weight is [out, in]: output features 0..4 become non-negative


def calibration(n: int = 32, length: int = 64) -> list:
    """Random token ids: GPTQ only needs activations with a non-degenerate Hessian, not meaningful text."""
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(4, VOCAB, (n, length), generator=gen)
    return [{"input_ids": row.tolist(), "attention_mask": [1] * length} for row in ids]


def quantize(src: str, dst: str, sym: bool, group_size: int, fmt: str) -> None:
    from gptqmodel import GPTQModel, QuantizeConfig

    cfg = QuantizeConfig(bits=4, group_size=group_size, desc_act=True, act_group_aware=False, sym=sym, format=fmt)
    model = GPTQModel.load(src, cfg, device="cpu", dtype=torch.float16)  # CPU would default to bf16
    model.quantize(calibration(), batch_size=8)
    model.save(dst)


def dump_dequantized(dst: str, out_file: str, logits_file: str) -> None:
    """GPTQModel's own dequantization (its torch kernel's dequantize_weight) of every quantized linear, and
    its own forward logits for LOGIT_TOKENS."""
    from gptqmodel import BACKEND, GPTQModel
    from gptqmodel.nn_modules.qlinear.torch import TorchLinear

    model = GPTQModel.load(dst, device="cpu", backend=BACKEND.TORCH, dtype=torch.float16)
    found = {}
    for name, mod in model.model.named_modules():
        if isinstance(mod, TorchLinear):
            mod.eval()
            with torch.no_grad():
                weight = mod.dequantize_weight()  # [K, N]
            if weight.dtype != torch.float16:  # casting here could hide a rounding difference
                raise RuntimeError(f"{name}: GPTQModel dequantized to {weight.dtype}, expected float16")
            found[name] = weight.contiguous()
    if not found:
        raise RuntimeError("no TorchLinear found in the reloaded model")
    save_file(found, out_file)
    tokens = torch.tensor([LOGIT_TOKENS])
    with torch.no_grad():
        logits = model.model(input_ids=tokens).logits  # [1, S, vocab]
    save_file({"tokens": tokens, "logits": logits.float().contiguous()}, logits_file)


def run_case(out_dir: str, mode: str, group_size: int, fmt: str) -> None:
    src, dst = os.path.join(out_dir, "source"), os.path.join(out_dir, "quantized")
    make_source_model(src, sym=mode == "sym")
    quantize(src, dst, sym=mode == "sym", group_size=group_size, fmt=fmt)
    dump_dequantized(dst, os.path.join(out_dir, "gptqmodel_dequant.safetensors"),
                     os.path.join(out_dir, "gptqmodel_logits.safetensors"))


def main(out_dir: str, cases: list) -> None:
    for case in cases:
        mode, group_size, fmt = case.split("-")
        run_case(os.path.join(out_dir, case), mode, int(group_size), fmt)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
