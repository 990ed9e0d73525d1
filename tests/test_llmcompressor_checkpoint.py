"""Real act-order checkpoints written by llm-compressor 0.13.0 (compressed-tensors ``pack-quantized``, with
``weight_g_idx``) are read by tpaware_compile/compressed.py and dequantized bit for bit as the library itself
decompresses them.

llm-compressor lives in its own cached venv (library_venv.py; about 1.5 minutes to build on a fresh machine,
TPAWARE_LLMCOMPRESSOR_VENV overrides the location). The worker (llmcompressor_worker.py) runs in that venv as a
subprocess, quantizes a tiny random Llama on CPU and writes the checkpoint, the library's own dequantized weights
and its own logits; this file, in the main environment, compares.
"""

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from library_logits import assert_logits_match
from library_venv import library_python, run_worker
from tpaware_compile.compressed import (CompressedFormatError, CompressedScheme, compressed_scheme,
                                        is_compressed_config, read_compressed_linear)
from tpaware_compile.gptq import dequantize, pack_rows, unpack_cols

LLMCOMPRESSOR = "llmcompressor==0.13.0"
CASES = ["sym-32", "asym-32", "asym-64"]
PROJ = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
WORKER = Path(__file__).with_name("llmcompressor_worker.py")


@pytest.fixture(scope="module")
def library_out(tmp_path_factory) -> Path:
    """Run llm-compressor once for every case; returns the folder holding one subfolder per case."""
    python = library_python(LLMCOMPRESSOR, "TPAWARE_LLMCOMPRESSOR_VENV")
    out = tmp_path_factory.mktemp("llmcompressor")
    run_worker(python, WORKER, out, CASES)
    return out


def _config(case_dir: Path) -> dict:
    with open(case_dir / "quantized" / "config.json") as f:
        return json.load(f)


def _layers(case_dir: Path):
    """(prefix, the library's dequantized [K, N]) for every quantized linear of the case."""
    return sorted(load_file(case_dir / "library_dequant.safetensors").items())


def _open(case_dir: Path):
    return safe_open(case_dir / "quantized" / "model.safetensors", framework="pt")


@pytest.mark.parametrize("case", CASES)
def test_config_is_pack_quantized_act_order(library_out, case):
    cfg = _config(library_out / case)
    assert is_compressed_config(cfg) and is_compressed_config(cfg["quantization_config"])
    mode, group_size = case.split("-")
    assert compressed_scheme(cfg) == CompressedScheme(4, int(group_size), "group", mode == "sym")


@pytest.mark.parametrize("case", CASES)
def test_dequantize_matches_library_bitwise(library_out, case):
    case_dir = library_out / case
    qc = _config(case_dir)["quantization_config"]
    layers = _layers(case_dir)
    assert {p.rsplit(".", 1)[1] for p, _ in layers} == PROJ and len(layers) == 2 * len(PROJ)
    with _open(case_dir) as f:
        for prefix, theirs in layers:
            ours = dequantize(read_compressed_linear(f, prefix, qc))  # in the scales' dtype, as the library does
            assert theirs.dtype == torch.float16 and ours.dtype == theirs.dtype and ours.shape == theirs.shape
            assert torch.equal(ours, theirs), f"{case} {prefix}: {(ours != theirs).sum()} elements differ"


@pytest.mark.parametrize("case", CASES)
def test_g_idx_is_act_order(library_out, case):
    case_dir = library_out / case
    qc = _config(case_dir)["quantization_config"]
    with _open(case_dir) as f:
        for prefix, _ in _layers(case_dir):
            w = read_compressed_linear(f, prefix, qc)
            g = w.g_idx.long()
            assert torch.equal(g, f.get_tensor(f"{prefix}.weight_g_idx").long())
            assert bool((g[1:] < g[:-1]).any()), f"{prefix}: g_idx is monotone, not act-order"
            assert bool((torch.bincount(g, minlength=w.num_groups) == w.group_size).all())


def test_zero_points_exercise_both_conventions(library_out):
    """Guards the test itself: sym stores no zero point (read as 8), and the asym checkpoints hold zero points
    at both ends of the nibble range, where an offset or sign mistake in a reader cannot hide."""
    for case in CASES:
        qc = _config(library_out / case)["quantization_config"]
        with _open(library_out / case) as f:
            prefixes = [p for p, _ in _layers(library_out / case)]
            stored = any(f"{p}.weight_zero_point" in f.keys() for p in prefixes)
            zeros = torch.cat([unpack_cols(read_compressed_linear(f, p, qc).qzeros).flatten() for p in prefixes])
        if case.startswith("sym"):
            assert not stored and bool((zeros == 8).all())
        else:
            assert stored and (int(zeros.min()), int(zeros.max())) == (0, 15), (int(zeros.min()), int(zeros.max()))


@pytest.mark.parametrize("case", CASES)
def test_library_logits_written(library_out, case):
    """The worker's logits (for the loader's end-to-end check) come from the quantized model: finite, the
    right shape, and not degenerate (different positions predict different things)."""
    out = load_file(library_out / case / "library_logits.safetensors")
    tokens, logits = out["tokens"], out["logits"]
    vocab = _config(library_out / case)["vocab_size"]
    assert tokens.dtype == torch.int64 and tokens.dim() == 2 and int(tokens.max()) < vocab
    assert logits.shape == (*tokens.shape, vocab) and bool(torch.isfinite(logits).all())
    assert logits.argmax(-1).unique().numel() > 1


# ---- compressed.py on its own: no llm-compressor needed ----

def _qconfig(**weights) -> dict:
    w = {"num_bits": 4, "type": "int", "symmetric": False, "strategy": "group", "group_size": 16,
         "actorder": "group", "dynamic": False, **weights}
    return {"quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": w, "format": "pack-quantized",
                                          "input_activations": None, "output_activations": None}},
            "ignore": ["lm_head"], "kv_cache_scheme": None, "sparsity_config": {}}


def _synthetic_layer(n=16, k=32, group_size=16, seed=3):
    """A pack-quantized layer written by hand from the format facts (nibble = signed value + 8, element i of a
    row at bits 4 * (i % 8) of word i // 8), plus the weight it must dequantize to, computed independently."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randint(-8, 8, (n, k), generator=gen)  # signed, HF layout [N, K]
    groups = k // group_size
    zp = torch.randint(-8, 8, (n, groups), generator=gen)
    scale = (torch.rand(n, groups, generator=gen) + 0.5).half()
    g_idx = torch.arange(k) % groups  # interleaved groups: every group full, order not monotone
    want = ((q - zp[:, g_idx]).float() * scale[:, g_idx].float()).half().t()  # [K, N]
    t = {"l.weight_packed": pack_rows((q + 8).t()).t().contiguous(),  # [N, K/8]: pack_rows packs dim 0
         "l.weight_zero_point": pack_rows(zp + 8),  # [N/8, G]: packed along N
         "l.weight_scale": scale, "l.weight_g_idx": g_idx.to(torch.int32), "l.weight_shape": torch.tensor([n, k])}
    return t, want


def test_synthetic_layer_reads_exactly():
    t, want = _synthetic_layer()
    w = read_compressed_linear(t, "l", _qconfig())
    assert (w.in_features, w.out_features, w.group_size, w.zero_offset) == (32, 16, 16, 0)
    assert torch.equal(dequantize(w), want)


def test_symmetric_layer_means_zero_point_zero():
    t, _ = _synthetic_layer()
    del t["l.weight_zero_point"]
    q = torch.randint(-8, 8, (16, 32), generator=torch.Generator().manual_seed(4))
    t["l.weight_packed"] = pack_rows((q + 8).t()).t().contiguous()
    g = t["l.weight_g_idx"].long()
    want = (q.float() * t["l.weight_scale"][:, g].float()).half().t()
    assert torch.equal(dequantize(read_compressed_linear(t, "l", _qconfig(symmetric=True))), want)
    t["l.weight_zero_point"] = torch.zeros(2, 2, dtype=torch.int32)
    with pytest.raises(CompressedFormatError, match="symmetric scheme but the layer stores weight_zero_point"):
        read_compressed_linear(t, "l", _qconfig(symmetric=True))


def test_g_idx_placeholder_and_uneven_groups():
    t, _ = _synthetic_layer()
    t["l.weight_g_idx"] = torch.full((32,), -1, dtype=torch.int32)  # the library's "column order" marker
    assert read_compressed_linear(t, "l", _qconfig()).g_idx is None
    t["l.weight_g_idx"] = torch.tensor([0] * 20 + [1] * 12, dtype=torch.int32)  # the library would regroup these
    with pytest.raises(CompressedFormatError, match="every group must hold group_size=16"):
        read_compressed_linear(t, "l", _qconfig())
    del t["l.weight_g_idx"]
    with pytest.raises(CompressedFormatError, match="weight_g_idx: missing, but actorder='group'"):
        read_compressed_linear(t, "l", _qconfig())
    assert read_compressed_linear(t, "l", _qconfig(actorder=None)).g_idx is None


def test_channel_strategy_is_one_group():
    t, _ = _synthetic_layer(group_size=32)
    t["l.weight_g_idx"] = torch.zeros(32, dtype=torch.int32)
    w = read_compressed_linear(t, "l", _qconfig(strategy="channel", group_size=None))
    assert (w.group_size, w.num_groups) == (32, 1)


@pytest.mark.parametrize("top,group,weights,match", [
    ({"quant_method": "gptq"}, {}, {}, r"quant_method 'gptq' is not 'compressed-tensors'"),
    ({"quantization_status": "frozen"}, {}, {}, r"quantization_status 'frozen' is not 'compressed'"),
    ({"format": "naive-quantized"}, {"format": None}, {}, r"format 'naive-quantized' is not supported"),
    ({}, {"format": "int-quantized"}, {}, r"format 'int-quantized' is not supported"),
    ({"sparsity_config": {"format": "sparse-24-bitmask"}}, {}, {}, r"sparsity_config is not supported"),
    ({"kv_cache_scheme": {"num_bits": 8}}, {}, {}, r"kv_cache_scheme is not supported"),
    ({}, {}, {"num_bits": 8}, r"8-bit 'int' weights are not supported"),
    ({}, {}, {"type": "float"}, r"4-bit 'float' weights are not supported"),
    ({}, {}, {"strategy": "tensor"}, r"strategy 'tensor' is not supported"),
    ({}, {}, {"strategy": "block", "group_size": None}, r"strategy 'block' is not supported"),
    ({}, {"input_activations": {"num_bits": 8}}, {}, r"input_activations quantization is not supported"),
])
def test_unsupported_configs_are_named(top, group, weights, match):
    cfg = _qconfig(**weights)
    cfg.update(top)
    cfg["config_groups"]["group_0"].update(group)
    with pytest.raises(CompressedFormatError, match=match):
        compressed_scheme({"quantization_config": cfg})
    t, _ = _synthetic_layer()
    with pytest.raises(CompressedFormatError, match=match):
        read_compressed_linear(t, "l", cfg)


def test_mixed_config_groups_are_refused():
    cfg = _qconfig()
    cfg["config_groups"]["group_1"] = {**cfg["config_groups"]["group_0"],
                                       "weights": {**cfg["config_groups"]["group_0"]["weights"], "group_size": 32}}
    with pytest.raises(CompressedFormatError, match="different weight schemes"):
        compressed_scheme(cfg)


def test_missing_and_misshapen_tensors_are_named():
    assert not is_compressed_config({"quantization_config": {"quant_method": "gptq"}})
    t, _ = _synthetic_layer()
    del t["l.weight_scale"]
    with pytest.raises(CompressedFormatError, match=r"l\.weight_scale: not in the checkpoint"):
        read_compressed_linear(t, "l", _qconfig())
    t, _ = _synthetic_layer()
    t["l.weight_packed"] = t["l.weight_packed"][:, :3]
    with pytest.raises(CompressedFormatError, match=r"l\.weight_packed: expected shape \(16, 4\)"):
        read_compressed_linear(t, "l", _qconfig())
    t, _ = _synthetic_layer()
    t["l.weight_shape"] = torch.tensor([12, 32])
    with pytest.raises(CompressedFormatError, match=r"needs both dims divisible by 8"):
        read_compressed_linear(t, "l", _qconfig())


# ---- the whole model: our loader and decoder against the library's own forward ----

@pytest.mark.parametrize("case", CASES)
def test_loaded_model_logits_match_library(library_out, ranks, case):
    theirs = load_file(library_out / case / "library_logits.safetensors")
    path = str(library_out / case / "quantized")
    assert_logits_match(ranks, path, theirs, case)
