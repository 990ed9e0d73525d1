import json
import os

import pytest
import torch
from safetensors.torch import save_file

from tpaware_compile.gptq import pack_cols, unpack_cols
from tpaware_compile.models import Decoder, DecoderConfig, Parallel, random_weights
from tpaware_compile.models.loader import CheckpointError, load_checkpoint

CFG = DecoderConfig(vocab=128, hidden=64, inter=128, layers=2, heads=4, kv_heads=2, max_seq=32)


def _write_checkpoint(path, weights, fmt="gptq_v2", bits=4):
    """Our random weights in the Hugging Face GPTQ layout (attention dense, MLPs quantized)."""
    t = {"model.embed_tokens.weight": weights["embed"], "model.norm.weight": torch.ones(CFG.hidden),
         "lm_head.weight": weights["lm_head"].t().contiguous()}
    for i, (attn, mlp) in enumerate(zip(weights["attn"], weights["mlp"])):
        p = f"model.layers.{i}"
        t[f"{p}.input_layernorm.weight"] = torch.ones(CFG.hidden)
        t[f"{p}.post_attention_layernorm.weight"] = torch.ones(CFG.hidden)
        for n in ("q", "k", "v", "o"):
            t[f"{p}.self_attn.{n}_proj.weight"] = attn[f"w{n}"].t().contiguous()
        for n, w in mlp.items():
            qzeros = w.qzeros if fmt == "gptq_v2" else pack_cols((unpack_cols(w.qzeros) - 1) % 16)
            t.update({f"{p}.mlp.{n}_proj.qweight": w.qweight, f"{p}.mlp.{n}_proj.qzeros": qzeros,
                      f"{p}.mlp.{n}_proj.scales": w.scales, f"{p}.mlp.{n}_proj.g_idx": w.g_idx.clone()})
    save_file(t, os.path.join(path, "model.safetensors"))
    config = {"model_type": "llama", "vocab_size": CFG.vocab, "hidden_size": CFG.hidden,
              "intermediate_size": CFG.inter, "num_hidden_layers": CFG.layers, "num_attention_heads": CFG.heads,
              "num_key_value_heads": CFG.kv_heads, "max_position_embeddings": CFG.max_seq, "rms_norm_eps": 1e-5,
              "quantization_config": {"quant_method": "gptq", "bits": bits, "group_size": 32, "desc_act": True,
                                      "sym": False, "checkpoint_format": fmt}}
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)


@pytest.mark.parametrize("fmt", ["gptq", "gptq_v2"])
def test_loaded_model_matches_the_weights_it_was_written_from(tmp_path, fmt):
    # v1 cannot hold a zero of 0 (zero - 1 borrows), so draw zeros >= 1 for it, as GPTQ v1 writers do
    weights = random_weights(CFG, torch.float32, seed=3, zero_offset=1 if fmt == "gptq" else 0)
    for mlp in weights["mlp"]:
        for n, w in mlp.items():
            mlp[n] = w.replace(qzeros=pack_cols(unpack_cols(w.qzeros) + w.zero_offset), zero_offset=0)
    _write_checkpoint(tmp_path, weights, fmt)
    tokens, pos = torch.randint(0, CFG.vocab, (1, 8)), torch.arange(8)
    want = Decoder(CFG, Parallel(), weights)(tokens, pos)
    got = load_checkpoint(str(tmp_path), dtype=torch.float32, max_seq=CFG.max_seq)(tokens, pos)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5)


BIGCODE = DecoderConfig(vocab=128, hidden=64, inter=128, layers=2, heads=4, kv_heads=1, family="gptbigcode",
                        max_seq=32)


def _gptq_tensors(prefix, w):
    return {f"{prefix}.qweight": w.qweight, f"{prefix}.qzeros": w.qzeros, f"{prefix}.scales": w.scales,
            f"{prefix}.g_idx": w.g_idx.clone(), f"{prefix}.bias": w.bias}


def _write_bigcode_checkpoint(path, weights):
    """GPTBigCode layout: fused multi-query c_attn (dense here), GELU MLP with biases, tied lm_head."""
    c = BIGCODE
    t = {"transformer.wte.weight": weights["embed"], "transformer.wpe.weight": weights["pos_embed"],
         "transformer.ln_f.weight": torch.ones(c.hidden), "transformer.ln_f.bias": torch.zeros(c.hidden)}
    for i, (attn, mlp) in enumerate(zip(weights["attn"], weights["mlp"])):
        p = f"transformer.h.{i}"
        for ln in ("ln_1", "ln_2"):
            t[f"{p}.{ln}.weight"], t[f"{p}.{ln}.bias"] = torch.ones(c.hidden), torch.zeros(c.hidden)
        t[f"{p}.attn.c_attn.weight"] = torch.cat([attn["wq"], attn["wk"], attn["wv"]], 1).t().contiguous()
        t[f"{p}.attn.c_attn.bias"] = torch.cat([attn["bq"], attn["bk"], attn["bv"]])
        t[f"{p}.attn.c_proj.weight"], t[f"{p}.attn.c_proj.bias"] = attn["wo"].t().contiguous(), attn["bo"]
        t.update(_gptq_tensors(f"{p}.mlp.c_fc", mlp["fc"]))
        t.update(_gptq_tensors(f"{p}.mlp.c_proj", mlp["proj"]))
    save_file(t, os.path.join(path, "model.safetensors"))
    config = {"model_type": "gpt_bigcode", "vocab_size": c.vocab, "n_embd": c.hidden, "n_inner": c.inter,
              "n_layer": c.layers, "n_head": c.heads, "multi_query": True, "n_positions": c.max_seq,
              "layer_norm_epsilon": 1e-5,
              "quantization_config": {"quant_method": "gptq", "bits": 4, "group_size": 32, "desc_act": True,
                                      "sym": False, "checkpoint_format": "gptq_v2"}}
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)


def test_gptbigcode_checkpoint(tmp_path):
    weights = random_weights(BIGCODE, torch.float32, seed=6)
    _write_bigcode_checkpoint(tmp_path, weights)
    tokens, pos = torch.randint(0, BIGCODE.vocab, (1, 8)), torch.arange(8)
    weights["lm_head"] = weights["embed"].t().contiguous()  # GPTBigCode ties lm_head to the embedding
    want = Decoder(BIGCODE, Parallel(), weights)(tokens, pos)
    got = load_checkpoint(str(tmp_path), dtype=torch.float32)(tokens, pos)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5)


def test_bad_checkpoints_raise_clear_errors(tmp_path):
    weights = random_weights(CFG, torch.float32, seed=4)
    _write_checkpoint(tmp_path, weights, bits=8)
    with pytest.raises(CheckpointError, match="bits=8 unsupported"):
        load_checkpoint(str(tmp_path))
    _write_checkpoint(tmp_path, weights)
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cannot read"):
        load_checkpoint(str(tmp_path))
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no .safetensors files"):
        load_checkpoint(str(tmp_path))
    with pytest.raises(CheckpointError, match="missing .*config.json"):
        load_checkpoint(str(tmp_path / "nowhere"))


def _logits_at(rank, world, path, form):
    torch.manual_seed(0)
    tokens, pos = torch.randint(0, CFG.vocab, (1, 8)), torch.arange(8)
    model = load_checkpoint(path, Parallel(rank, world, form=form), dtype=torch.float32, max_seq=CFG.max_seq)
    return model(tokens, pos)


@pytest.mark.parametrize("world,form", [(2, "N"), (4, "L"), (2, "U")])
def test_tensor_parallel_load_matches_tp1(ranks, tmp_path, world, form):
    _write_checkpoint(tmp_path, random_weights(CFG, torch.float32, seed=5))
    want = _logits_at(0, 1, str(tmp_path), "N")
    for got in ranks(world).run(_logits_at, str(tmp_path), form):
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-5)


def test_run_command_saves_logits(tmp_path):
    import subprocess
    import sys

    from safetensors.torch import load_file

    weights = random_weights(CFG, torch.float32, seed=8)
    _write_checkpoint(tmp_path, weights)
    out = tmp_path / "logits.safetensors"
    subprocess.run([sys.executable, "-m", "tpaware_compile", "run", str(tmp_path), "--tp", "2", "--tokens", "5,6,7",
                    "--out", str(out), "--backend", "eager"], check=True, timeout=300)
    want = Decoder(CFG, Parallel(), weights)(torch.tensor([[5, 6, 7]]), torch.arange(3))
    assert torch.allclose(load_file(out)["logits"], want, rtol=1e-4, atol=1e-5)
