import itertools
import json
import os
from collections import Counter

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from tpaware_compile.gptq import pack_cols, unpack_cols
from tpaware_compile.models import Decoder, DecoderConfig, Parallel, loader, random_weights
from tpaware_compile.models.loader import CheckpointError, load_checkpoint
from tpaware_compile.nn import GPTQLinear, TPMLP
from tpaware_compile.quantize import quantize

CFG = DecoderConfig(vocab=128, hidden=64, inter=128, layers=2, heads=4, kv_heads=2, max_seq=32)


def _write_checkpoint(path, weights, fmt="gptq_v2", bits=4):
    """Our random weights in the Hugging Face GPTQ layout (attention dense, MLPs quantized)."""
    _write_llama(path, CFG, weights, dict(_gptq_config(32, fmt), bits=bits), lambda p, w: _gptq_layer(p, w, fmt))


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


# ---- each rank reads only its slices: the same MLPs as reading whole layers and sharding them, bit for bit ----

def _gptq_layer(prefix, w, fmt="gptq_v2", g_idx=True):
    qzeros = w.qzeros if fmt == "gptq_v2" else pack_cols((unpack_cols(w.qzeros) - 1) % 16)
    t = {f"{prefix}.qweight": w.qweight, f"{prefix}.qzeros": qzeros, f"{prefix}.scales": w.scales}
    if g_idx:
        t[f"{prefix}.g_idx"] = w.g_idx.clone()
    if w.bias is not None:
        t[f"{prefix}.bias"] = w.bias
    return t


def _compressed_layer(prefix, w, sym, g_idx):
    """compressed-tensors pack-quantized: HF [out, in] layout, so the GPTQ tensors transposed (the +8 of both stored
    nibbles cancels; the slicing tests need only a layer the reader accepts)."""
    t = {f"{prefix}.weight_packed": w.qweight.t().contiguous(), f"{prefix}.weight_scale": w.scales.t().contiguous(),
         f"{prefix}.weight_shape": torch.tensor([w.out_features, w.in_features])}
    if not sym:
        t[f"{prefix}.weight_zero_point"] = w.qzeros.t().contiguous()
    if g_idx:
        t[f"{prefix}.weight_g_idx"] = w.g_idx.clone()
    return t


def _compressed_config(sym, group_size, actorder):
    w = {"num_bits": 4, "type": "int", "symmetric": sym, "dynamic": False, "actorder": actorder,
         "strategy": "channel" if group_size == -1 else "group", "group_size": None if group_size == -1 else group_size}
    return {"quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": w, "format": "pack-quantized"}}}


def _contiguous_mlps(cfg, group_size, seed):
    """MLPs without act-order (g_idx = row // group_size), so a checkpoint can leave g_idx out."""
    g = torch.Generator().manual_seed(seed)

    def q(k, n):
        return quantize(torch.randn(k, n, generator=g) / k**0.5, group_size, act_order=False, generator=g)

    return [{"gate": q(cfg.hidden, cfg.inter), "up": q(cfg.hidden, cfg.inter), "down": q(cfg.inter, cfg.hidden)}
            for _ in range(cfg.layers)]


def _write_llama(path, cfg, weights, quant, layer):
    """A Llama checkpoint: dense attention, MLPs as ``layer(prefix, GPTQWeight)`` writes them."""
    t = {"model.embed_tokens.weight": weights["embed"], "model.norm.weight": torch.ones(cfg.hidden),
         "lm_head.weight": weights["lm_head"].t().contiguous()}
    for i, (attn, mlp) in enumerate(zip(weights["attn"], weights["mlp"])):
        p = f"model.layers.{i}"
        t[f"{p}.input_layernorm.weight"] = torch.ones(cfg.hidden)
        t[f"{p}.post_attention_layernorm.weight"] = torch.ones(cfg.hidden)
        for n in ("q", "k", "v", "o"):
            t[f"{p}.self_attn.{n}_proj.weight"] = attn[f"w{n}"].t().contiguous()
        for n, w in mlp.items():
            t.update(layer(f"{p}.mlp.{n}_proj", w))
    save_file(t, os.path.join(path, "model.safetensors"))
    config = {"model_type": "llama", "vocab_size": cfg.vocab, "hidden_size": cfg.hidden,
              "intermediate_size": cfg.inter, "num_hidden_layers": cfg.layers, "num_attention_heads": cfg.heads,
              "num_key_value_heads": cfg.kv_heads, "max_position_embeddings": cfg.max_seq, "rms_norm_eps": 1e-5,
              "quantization_config": quant}
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)


def _gptq_config(group_size, fmt="gptq_v2"):
    return {"quant_method": "gptq", "bits": 4, "group_size": group_size, "desc_act": True, "sym": False,
            "checkpoint_format": fmt}


def _write_variant(path, variant, cfg=CFG):
    """Checkpoints covering every reading path: act-order g_idx, v1 zeros, per-channel, contiguous groups without
    g_idx (group_size 64: shards of 32 rows start inside a group), compressed-tensors, GPTBigCode (biases)."""
    if variant == "gptbigcode":
        return _write_bigcode_checkpoint(path, random_weights(BIGCODE, torch.float32, seed=12))
    group_size = {"per_channel": -1, "no_g_idx": 64, "compressed_sym_no_g_idx": 64,
                  "compressed_channel": -1}.get(variant, 32)
    weights = random_weights(cfg, torch.float32, group_size=group_size, seed=11)
    if variant in ("no_g_idx", "compressed_sym_no_g_idx", "compressed_channel"):
        weights["mlp"] = _contiguous_mlps(cfg, group_size, seed=11)
    quant, layer = {
        "gptq_v2": (_gptq_config(32), _gptq_layer),
        "gptq_v1": (_gptq_config(32, "gptq"), lambda p, w: _gptq_layer(p, w, "gptq")),
        "per_channel": (_gptq_config(-1), _gptq_layer),
        "no_g_idx": (_gptq_config(64), lambda p, w: _gptq_layer(p, w, g_idx=False)),
        "compressed": (_compressed_config(False, 32, "group"), lambda p, w: _compressed_layer(p, w, False, True)),
        "compressed_sym_no_g_idx": (_compressed_config(True, 64, None),
                                    lambda p, w: _compressed_layer(p, w, True, False)),
        "compressed_channel": (_compressed_config(False, -1, None), lambda p, w: _compressed_layer(p, w, False, False)),
    }[variant]
    _write_llama(path, cfg, weights, quant, layer)


VARIANTS = ["gptq_v2", "gptq_v1", "per_channel", "no_g_idx", "compressed", "compressed_sym_no_g_idx",
            "compressed_channel", "gptbigcode"]
FORMS = ["N", "L", "U", "T"]


def _whole_read_mlps(path, par):
    """The path before slicing: every MLP layer read whole, then sharded in memory by TPMLP.from_full."""
    cfg, qc, t = loader.decoder_config(path), loader.read_quant_config(path), loader.Tensors(path)
    names = loader._NAMES[cfg.family]
    return [TPMLP.from_full(cfg.mlp_kind, {ours: loader.read_linear(t, names["layer"].format(i) + theirs, qc)
                                           for ours, theirs in names["mlp"].items()},
                            par.form, par.rank, par.world, par.group, fused=par.fused,
                            collectives=par.collectives, kernel=par.kernel, presort=par.presort)
            for i in range(cfg.layers)]


def _assert_same_mlp(got, want, where):
    attrs = ("kind", "form", "rank", "world", "group", "fused", "collectives", "gather_dim", "kernel", "presort")
    assert [getattr(got, a) for a in attrs] == [getattr(want, a) for a in attrs], where
    got_state, want_state = got.state_dict(), want.state_dict()
    assert list(got_state) == list(want_state), where  # the same buffers, None ones included (absent from both)
    for name, x in want_state.items():
        y = got_state[name]
        assert y.dtype == x.dtype and torch.equal(y, x), (where, name)
    layers = [(n, m) for n, m in want.named_modules() if isinstance(m, GPTQLinear)]
    assert [n for n, _ in layers] == [n for n, m in got.named_modules() if isinstance(m, GPTQLinear)], where
    for name, m in layers:
        ours = got.get_submodule(name)
        for a in ("group_size", "group_offset", "zero_offset", "kernel"):
            assert getattr(ours, a) == getattr(m, a), (where, name, a)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_sliced_load_equals_whole_read_then_shard(tmp_path, variant, form):
    _write_variant(tmp_path, variant)
    fused_options = (False,) if variant == "gptbigcode" else (False, True)
    for world, fused, presort in itertools.product((1, 2, 4), fused_options, (False, True)):
        for rank in range(world):
            par = Parallel(rank, world, form=form, fused=fused, presort=presort)
            model = load_checkpoint(str(tmp_path), par, dtype=torch.float32, max_seq=CFG.max_seq)
            want = _whole_read_mlps(str(tmp_path), par)
            assert len(model.blocks) == len(want)
            for i, (block, mlp) in enumerate(zip(model.blocks, want)):
                _assert_same_mlp(block.mlp, mlp, (variant, form, world, rank, fused, presort, i))


class _Recording:
    """safe_open that counts, per tensor, the elements each read returns (get_tensor: all of them)."""

    def __init__(self):
        self.read = Counter()

    def __call__(self, path, framework):
        return _RecordingFile(safe_open(path, framework=framework), self.read)


class _RecordingFile:
    def __init__(self, f, read):
        self.f, self.read = f, read

    def keys(self):
        return self.f.keys()

    def get_tensor(self, name):
        x = self.f.get_tensor(name)
        self.read[name] += x.numel()
        return x

    def get_slice(self, name):
        return _RecordingSlice(self.f.get_slice(name), name, self.read)


class _RecordingSlice:
    def __init__(self, s, name, read):
        self.s, self.name, self.read = s, name, read

    def get_shape(self):
        return self.s.get_shape()

    def __getitem__(self, index):
        x = self.s[index]
        self.read[self.name] += x.numel()
        return x


# form -> the layers each rank reads 1/world of (GPTQ: qweight, and qzeros / scales of column-parallel layers)
SLICED = {"N": ("gate", "up"), "L": ("gate", "up", "down"), "U": ("gate", "up", "down"), "T": ()}


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("variant", ["gptq_v2", "compressed"])
def test_each_rank_reads_only_its_slices(tmp_path, monkeypatch, variant, form):
    _write_variant(tmp_path, variant)
    with safe_open(tmp_path / "model.safetensors", framework="pt") as f:
        size = {name: f.get_slice(name).get_shape() for name in f.keys()}
    numel = {name: int(torch.tensor(shape).prod()) for name, shape in size.items()}
    packed, along_n = (("weight_packed",), ("weight_scale", "weight_zero_point")) if variant == "compressed" else \
        (("qweight",), ("qzeros", "scales"))
    world = 2
    for rank in range(world):
        recording = _Recording()
        monkeypatch.setattr(loader, "safe_open", recording)
        load_checkpoint(str(tmp_path), Parallel(rank, world, form=form), dtype=torch.float32, max_seq=CFG.max_seq)
        for i in range(CFG.layers):
            for n in ("gate", "up", "down"):
                sliced = n in SLICED[form]
                names = packed + (along_n if n != "down" else ())
                for name in (f"model.layers.{i}.mlp.{n}_proj.{k}" for k in names):
                    want = numel[name] // world if sliced else numel[name]
                    assert recording.read[name] == want, (name, rank, recording.read[name], numel[name])
        # weight_shape (two numbers) is read for the layer's N, then again by the reader
        twice = [name for name in numel if recording.read[name] > numel[name] and not name.endswith("weight_shape")]
        assert not twice, f"read more than once: {twice}"


def test_sliced_reads_keep_clear_errors(tmp_path):
    """Missing tensors, misshapen ones and a world that does not divide the MLP: named errors, on the sliced paths."""
    weights = random_weights(CFG, torch.float32, seed=13)

    def load():
        return load_checkpoint(str(tmp_path), Parallel(1, 2, form="U"), dtype=torch.float32, max_seq=CFG.max_seq)

    def drop(layer, name):
        return lambda p, w: {k: v for k, v in _gptq_layer(p, w).items() if k != f"{p}.{name}" or layer not in p}

    _write_llama(tmp_path, CFG, weights, _gptq_config(32), drop("gate_proj", "scales"))
    with pytest.raises(CheckpointError, match=r"gate_proj: model\.layers\.0\.mlp\.gate_proj\.scales: not in the"):
        load()
    _write_llama(tmp_path, CFG, weights, _gptq_config(32), drop("down_proj", "qweight"))
    with pytest.raises(CheckpointError, match=r"down_proj: model\.layers\.0\.mlp\.down_proj\.qweight: not in the"):
        load()

    def wide_scales(p, w):  # gate_proj's scales: 8 more columns than its qweight has
        t = _gptq_layer(p, w)
        if "gate_proj" in p:
            t[f"{p}.scales"] = torch.cat([w.scales, w.scales[:, :8]], dim=1)
        return t

    _write_llama(tmp_path, CFG, weights, _gptq_config(32), wide_scales)
    with pytest.raises(CheckpointError, match=r"gate_proj\.scales: expected 128 along dim 1 .*got shape \(2, 136\)"):
        load()
    odd = DecoderConfig(vocab=128, hidden=64, inter=80, layers=1, heads=4, kv_heads=2, max_seq=32)
    _write_llama(tmp_path, odd, random_weights(odd, torch.float32, group_size=16, seed=13), _gptq_config(16),
                 _gptq_layer)
    for form in FORMS:
        with pytest.raises(CheckpointError, match=r"down_proj: in_features=80 must be divisible by world_size \* 8"):
            load_checkpoint(str(tmp_path), Parallel(0, 4, form=form), dtype=torch.float32, max_seq=32)
