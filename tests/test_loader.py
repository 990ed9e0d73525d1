import json
import os

import pytest
import torch
from safetensors.torch import save_file

from tpaware_compile.gptq import pack_cols, unpack_cols
from tpaware_compile.models import Decoder, DecoderConfig, Parallel, random_weights
from tpaware_compile.models.loader import CheckpointError, load_llama

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
    got = load_llama(str(tmp_path), dtype=torch.float32, max_seq=CFG.max_seq)(tokens, pos)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5)


def test_bad_checkpoints_raise_clear_errors(tmp_path):
    weights = random_weights(CFG, torch.float32, seed=4)
    _write_checkpoint(tmp_path, weights, bits=8)
    with pytest.raises(CheckpointError, match="bits=8 is not supported"):
        load_llama(str(tmp_path))
    _write_checkpoint(tmp_path, weights)
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cannot read"):
        load_llama(str(tmp_path))
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no .safetensors files"):
        load_llama(str(tmp_path))
    with pytest.raises(CheckpointError, match="missing .*config.json"):
        load_llama(str(tmp_path / "nowhere"))


def _logits_at(rank, world, path, form):
    torch.manual_seed(0)
    tokens, pos = torch.randint(0, CFG.vocab, (1, 8)), torch.arange(8)
    model = load_llama(path, Parallel(rank, world, form=form), dtype=torch.float32, max_seq=CFG.max_seq)
    return model(tokens, pos)


@pytest.mark.parametrize("world,form", [(2, "N"), (4, "L"), (2, "U")])
def test_tensor_parallel_load_matches_tp1(ranks, tmp_path, world, form):
    _write_checkpoint(tmp_path, random_weights(CFG, torch.float32, seed=5))
    want = _logits_at(0, 1, str(tmp_path), "N")
    for got in ranks(world).run(_logits_at, str(tmp_path), form):
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-5)
