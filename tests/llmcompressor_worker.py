"""Runs inside the llm-compressor venv (see test_llmcompressor_checkpoint.py), never imported by the test suite.

Quantizes a tiny random Llama with llm-compressor 0.13.0's GPTQModifier (W4A16, group quantization, act-order
"group", which is what stores ``weight_g_idx``), saves it in compressed-tensors' ``pack-quantized`` format, then
loads it back through transformers + compressed-tensors, decompressed, and writes what the library itself makes
of the checkpoint: every quantized linear's dequantized weight and the model's logits for fixed token ids, so the
main environment can compare them with ours. Everything is made here from random numbers: nothing comes from a hub.

usage: python llmcompressor_worker.py OUT_DIR CASE...   with CASE = {sym,asym}-GROUP_SIZE, e.g. asym-32
writes, per CASE, OUT_DIR/CASE/quantized/ (the checkpoint), OUT_DIR/CASE/library_dequant.safetensors
({module name: [K, N]}) and OUT_DIR/CASE/library_logits.safetensors ({"tokens": [B, T], "logits": [B, T, V]}).
One process for all cases: importing llm-compressor costs about ten seconds.
"""

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # fail fast rather than reach for a hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from tiny_tokenizer import make_tokenizer  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

VOCAB = 256
HIDDEN, INTERMEDIATE, LAYERS = 128, 256, 2
DTYPE = torch.float16  # the checkpoint's scales dtype; our reader must reproduce the library's fp16 bits


def make_source_model(sym: bool) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE,
                      num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=128, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                      tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).to(DTYPE)
    if not sym:
        _skew_some_columns(model)
    return model


def _skew_some_columns(model) -> None:
    # Make a few output features all non-negative and a few all non-positive: their asymmetric zero points land on
    # the two ends of the range (stored nibbles 0 and 15), where an off-by-eight or a sign mix-up cannot hide.
    with torch.no_grad():
        for layer in model.model.layers:
            for mod in (layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj):
                mod.weight[:5].abs_()  # HF Linear weight is [out, in]
                mod.weight[5:10] = -mod.weight[5:10].abs()


def calibration(n: int = 32, length: int = 64):
    """Random token ids, already tokenized: GPTQ needs a non-degenerate Hessian, not meaningful text."""
    from datasets import Dataset

    ids = torch.randint(4, VOCAB, (n, length), generator=torch.Generator().manual_seed(1))
    return Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": [[1] * length] * n})


def recipe(sym: bool, group_size: int):
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from llmcompressor.modifiers.quantization import GPTQModifier

    weights = QuantizationArgs(num_bits=4, type="int", symmetric=sym, strategy="group", group_size=group_size)
    scheme = QuantizationScheme(targets=["Linear"], weights=weights)
    # actorder "group" is the ordering that stores weight_g_idx ("static"/"weight" keep groups contiguous).
    return GPTQModifier(config_groups={"group_0": scheme}, ignore=["lm_head"], actorder="group")


def quantize(dst: str, sym: bool, group_size: int) -> None:
    from llmcompressor import oneshot

    model, tok = make_source_model(sym), make_tokenizer(VOCAB)
    data = calibration()
    oneshot(model=model, tokenizer=tok, dataset=data, recipe=recipe(sym, group_size),
            num_calibration_samples=len(data), max_seq_length=64, output_dir=dst)


def load_decompressed(dst: str):
    """The checkpoint as the library itself reads it: transformers' compressed-tensors path, decompressed."""
    from transformers import AutoModelForCausalLM
    from transformers.utils.quantization_config import CompressedTensorsConfig

    model = AutoModelForCausalLM.from_pretrained(dst, dtype=DTYPE,
                                                 quantization_config=CompressedTensorsConfig(run_compressed=False))
    return model.eval()


def dump_dequantized(model, names, out_file: str) -> None:
    """[K, N] (our layout) of every quantized linear, exactly as the library decompressed it."""
    found = {}
    for name in names:
        weight = model.get_submodule(name).weight.detach()  # [N, K]
        if weight.dtype != DTYPE:  # casting here could hide a rounding difference
            raise RuntimeError(f"{name}: decompressed to {weight.dtype}, expected {DTYPE}")
        found[name] = weight.t().contiguous()
    save_file(found, out_file)


def dump_logits(model, out_file: str) -> None:
    tokens = torch.randint(4, VOCAB, (2, 16), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        logits = model(input_ids=tokens).logits  # [B, T, V]
    save_file({"tokens": tokens, "logits": logits.float().contiguous()}, out_file)


def quantized_names(dst: str) -> list:
    """Module names that the checkpoint stores packed: the prefixes of its weight_packed tensors."""
    from safetensors import safe_open

    names = set()
    for f in os.listdir(dst):
        if f.endswith(".safetensors"):
            with safe_open(os.path.join(dst, f), framework="pt") as h:
                names.update(k[: -len(".weight_packed")] for k in h.keys() if k.endswith(".weight_packed"))
    if not names:
        raise RuntimeError(f"{dst}: no weight_packed tensors: not a pack-quantized checkpoint")
    return sorted(names)


def run_case(out_dir: str, sym: bool, group_size: int) -> None:
    dst = os.path.join(out_dir, "quantized")
    quantize(dst, sym, group_size)
    model = load_decompressed(dst)
    dump_dequantized(model, quantized_names(dst), os.path.join(out_dir, "library_dequant.safetensors"))
    dump_logits(model, os.path.join(out_dir, "library_logits.safetensors"))


def main(out_dir: str, cases: list) -> None:
    for case in cases:
        mode, group_size = case.split("-")
        run_case(os.path.join(out_dir, case), mode == "sym", int(group_size))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
