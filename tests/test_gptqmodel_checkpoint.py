"""Real act-order checkpoints written by GPTQModel 7.6.0 are read (tpaware_compile/checkpoint.py) and dequantized
bit for bit as GPTQModel itself dequantizes them.

GPTQModel lives in its own cached venv (library_venv.py; about 3 minutes to build on a fresh machine,
TPAWARE_GPTQMODEL_VENV overrides the location). The worker (gptqmodel_worker.py) runs there, quantizes a tiny
random Llama on CPU, and writes the checkpoint, GPTQModel's own dequantized weights and its own logits.
"""

from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from library_logits import assert_logits_match
from library_venv import library_python, run_worker
from tpaware_compile.checkpoint import checkpoint_format, load_quant_config, read_gptq_linear, v1_to_v2_qzeros
from tpaware_compile.gptq import dequantize, pack_cols, unpack_cols
from tpaware_compile.reorder import shard_rows, sort_rows

GPTQMODEL = "gptqmodel==7.6.0"
CASES = ["sym-32-gptq", "asym-32-gptq", "asym-64-gptq_v2"]
WORKER = Path(__file__).with_name("gptqmodel_worker.py")


@pytest.fixture(scope="module")
def gptqmodel_out(tmp_path_factory) -> Path:
    """Run GPTQModel once for every case; returns the folder holding one subfolder per case."""
    python = library_python(GPTQMODEL, "TPAWARE_GPTQMODEL_VENV")
    out = tmp_path_factory.mktemp("gptqmodel")
    run_worker(python, WORKER, out, CASES, GPTQMODEL_CPU_WORKERS="2")  # the CI machine has 2 cores
    return out


def _layers(case_dir: Path):
    """(prefix, GPTQModel's dequantized [K, N] fp16) for every quantized linear of the case."""
    return sorted(load_file(case_dir / "gptqmodel_dequant.safetensors").items())


@pytest.mark.parametrize("case", CASES)
def test_dequantize_matches_gptqmodel_bitwise(gptqmodel_out, case):
    case_dir = gptqmodel_out / case
    cfg = load_quant_config(str(case_dir / "quantized"))
    assert cfg["desc_act"] is True and checkpoint_format(cfg) == case.split("-")[2]
    layers = _layers(case_dir)
    assert {p.rsplit(".", 1)[1] for p, _ in layers} >= {"gate_proj", "up_proj", "down_proj"}
    with safe_open(case_dir / "quantized" / "model.safetensors", framework="pt") as f:
        for prefix, theirs in layers:
            w = read_gptq_linear(f, prefix, cfg)
            assert w.group_size == int(case.split("-")[1])
            ours = dequantize(w, torch.float16)
            assert ours.shape == theirs.shape and theirs.dtype == torch.float16
            assert torch.equal(ours, theirs), f"{case} {prefix}: {(ours != theirs).sum()} elements differ"


@pytest.mark.parametrize("case", CASES)
def test_checkpoint_g_idx_is_act_order(gptqmodel_out, case):
    cfg = load_quant_config(str(gptqmodel_out / case / "quantized"))
    with safe_open(gptqmodel_out / case / "quantized" / "model.safetensors", framework="pt") as f:
        for prefix, _ in _layers(gptqmodel_out / case):
            w = read_gptq_linear(f, prefix, cfg)
            g = w.g_idx.long()
            assert bool((g[1:] < g[:-1]).any()), f"{prefix}: g_idx is monotone, not act-order"
            counts = torch.bincount(g, minlength=w.num_groups)
            assert bool((counts == w.group_size).all()), f"{prefix}: groups are not exactly group_size rows"


def test_zero_points_exercise_both_conventions(gptqmodel_out):
    """Guards the test itself: sym zeros are all 8, and the asym v1 checkpoint holds zero points of 0, the
    case where reading v1 nibble by nibble (nibble + 1) goes wrong."""
    for case, expect_sym in [("sym-32-gptq", True), ("asym-32-gptq", False)]:
        with safe_open(gptqmodel_out / case / "quantized" / "model.safetensors", framework="pt") as f:
            stored = [f.get_tensor(f"{p}.qzeros") for p, _ in _layers(gptqmodel_out / case)]
        if expect_sym:
            assert all(bool((q == 0x77777777).all()) for q in stored), "sym v1 qzeros must all be 0x77777777"
        else:
            assert any(bool((unpack_cols(v1_to_v2_qzeros(q)) == 0).any()) for q in stored)


def test_tp_sharding_of_real_down_proj(gptqmodel_out):
    """The TP-aware transform on a real act-order down_proj: sorting makes groups contiguous (g_idx dropped) and
    the row shards of the sorted weight are exactly its rows, so x[:, P] @ W[P] == x @ W shard by shard."""
    case_dir = gptqmodel_out / "asym-32-gptq"
    cfg = load_quant_config(str(case_dir / "quantized"))
    with safe_open(case_dir / "quantized" / "model.safetensors", framework="pt") as f:
        w = read_gptq_linear(f, "model.layers.0.mlp.down_proj", cfg)
    sorted_w, perm = sort_rows(w)
    assert sorted_w.g_idx is None
    full = dequantize(w, torch.float32)  # [K, N]
    assert torch.equal(dequantize(sorted_w, torch.float32), full[perm])
    x = torch.randn(3, w.in_features, generator=torch.Generator().manual_seed(0))
    world, rows = 4, w.in_features // 4
    partial = [x[:, perm][:, r * rows:(r + 1) * rows] @ dequantize(shard_rows(sorted_w, r, world), torch.float32)
               for r in range(world)]
    torch.testing.assert_close(sum(partial), x @ full, rtol=1e-5, atol=1e-5)


# ---- checkpoint.py on its own: no GPTQModel needed ----

def test_v1_to_v2_qzeros_undoes_word_subtraction():
    zeros = torch.randint(0, 16, (4, 64), generator=torch.Generator().manual_seed(5), dtype=torch.int32)
    zeros[0, :8] = 0  # zero points of 0 borrow across nibbles in v1
    zeros[1, 7] = 0  # top nibble: the borrow leaves the word
    v2 = pack_cols(zeros)  # [4, 8]
    v1 = (v2.long() - 0x11111111) & 0xFFFFFFFF  # how a v1 writer stores them: one 32-bit subtraction per word
    v1 = torch.where(v1 >= 2**31, v1 - 2**32, v1).to(torch.int32)
    assert torch.equal(v1_to_v2_qzeros(v1), v2)
    assert v1_to_v2_qzeros(torch.tensor([[0x77777777]], dtype=torch.int32)).item() == 0x88888888 - 2**32


def _tiny_layer(g_idx: bool = True):
    gen = torch.Generator().manual_seed(9)
    t = {"l.qweight": torch.randint(-2**31, 2**31 - 1, (4, 16), generator=gen, dtype=torch.int32),
         "l.qzeros": torch.randint(-2**31, 2**31 - 1, (1, 2), generator=gen, dtype=torch.int32),
         "l.scales": torch.rand(1, 16, generator=gen).half()}
    if g_idx:
        t["l.g_idx"] = torch.zeros(32, dtype=torch.int32)
    return t


def test_read_per_channel_and_v2_keeps_zeros():
    t = _tiny_layer()
    w = read_gptq_linear(t, "l", {"bits": 4, "group_size": -1, "checkpoint_format": "gptq_v2"})
    assert (w.group_size, w.zero_offset) == (32, 0) and torch.equal(w.qzeros, t["l.qzeros"])
    w1 = read_gptq_linear(t, "l", {"bits": 4, "group_size": 32})  # no format: AutoGPTQ's v1
    assert torch.equal(w1.qzeros, v1_to_v2_qzeros(t["l.qzeros"]))
    assert read_gptq_linear(_tiny_layer(g_idx=False), "l", {"bits": 4, "group_size": 32}).g_idx is None


@pytest.mark.parametrize("cfg,match", [
    ({"bits": 8, "group_size": 32}, r"quant_config: bits=8 unsupported"),
    ({"bits": 4}, r"quant_config: group_size missing"),
    ({"bits": 4, "group_size": 32, "quant_method": "awq"}, r"quant_config: quant_method 'awq'"),
    ({"bits": 4, "group_size": 32, "checkpoint_format": "marlin"}, r"quant_config: checkpoint_format 'marlin'"),
])
def test_read_rejects_bad_config(cfg, match):
    with pytest.raises(ValueError, match=match):
        read_gptq_linear(_tiny_layer(), "l", cfg)


def test_read_names_missing_and_bad_tensors():
    t = _tiny_layer()
    del t["l.scales"]
    with pytest.raises(KeyError, match=r"l\.scales: not in the checkpoint"):
        read_gptq_linear(t, "l", {"bits": 4, "group_size": 32})
    t = _tiny_layer()
    t["l.scales"] = torch.rand(2, 16).half()  # 2 groups, but qzeros has 1
    with pytest.raises(ValueError, match=r"qzeros: expected shape \(2, 2\)"):
        read_gptq_linear(t, "l", {"bits": 4, "group_size": 32})


# ---- the whole model: our loader and decoder against GPTQModel's own forward ----

@pytest.mark.parametrize("case", CASES)
def test_loaded_model_logits_match_gptqmodel(gptqmodel_out, ranks, case):
    theirs = load_file(gptqmodel_out / case / "gptqmodel_logits.safetensors")
    path = str(gptqmodel_out / case / "quantized")
    assert_logits_match(ranks, path, theirs, case)
