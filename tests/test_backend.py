"""The tpaware backend on CPU ranks (gloo): every form x MLP kind x TP size inside a small decoder.

One compile per cell is shared by all of its assertions (CPU compiles are slow): prefill and decode graphs,
eager after compile, the rewritten graph itself, the report's figures and weight memory.
"""

import pytest
import sympy

import backend_cases as C
from tpaware_compile.compat import TRACES_GATHER_LAST_DIM

CELLS = [(family, form, world) for world in (1, 2, 4) for family in ("llama", "gptbigcode") for form in "NLU"]


def _id(cell):
    return "-".join(map(str, cell))


@pytest.fixture(scope="module")
def cells(ranks):
    cache = {}

    def get(family, form, world, **kw):
        key = (family, form, world, tuple(sorted(kw.items())))
        if key not in cache:
            cache[key] = ranks(world).run(C.compile_decoder_kw, family, form, kw)
        return cache[key]

    return get


@pytest.mark.parametrize("cell", CELLS, ids=_id)
def test_numerics(cells, cell):
    """Form N: 1e-6 relative, in practice exactly eager; L and U: 1e-5 (down sums its rows in another order).

    Form N's exactness survives the folded act-order of gate/up (x[P1] @ W[P1]: the same products summed in
    another order) because the reference op accumulates in fp64: the products of an fp32/fp16 x and a
    dequantized weight are exact in fp64, the reordered fp64 sums differ by at most ~K * 2**-53 of the sum of
    |terms|, and the final rounding to x's dtype absorbs that unless the sum sits that close to a rounding
    boundary (odds ~K * 2**-29 per output at fp32; 0 of 270k outputs differed over K = 64..2048, fp32/fp16/bf16).
    What can differ is silu: ATen's vectorized fp32 silu rounds the values of a partial last block (its scalar
    tail) unlike those of its vector body, and the rewrite moves h's columns, so which values land in the tail
    changes. On an AVX-512 CPU (blocks of 32 floats) a TP 4 rank's 5 x 48 values leave a tail of 16: 28 of 320
    logits differed (4.4e-8 relative); under AVX2, or at TP 1 / 2, none."""
    family, form, world = cell
    for r in cells(*cell):
        if form == "N":
            assert max(r["err"]) < 1e-6 and r["eager_after_err"] < 1e-6, r["err"]
        else:
            assert max(r["err"]) < 1e-5 and r["eager_after_err"] < 1e-5, r["err"]


@pytest.mark.parametrize("cell", CELLS, ids=_id)
def test_rewritten_graph(cells, cell):
    """On the graph: no AllGather, no permutation before down; down has no g_idx and its own groups only;
    after down exactly one collective (the AllReduce), none at TP 1."""
    family, form, world = cell
    for rank, r in enumerate(cells(*cell)):
        g = r["graph"]
        assert g["all_gathers"] == 0 and len(g["mlps"]) == C.config().layers
        for mlp in g["mlps"]:
            assert mlp["g_idx_is_none"] and mlp["permutations"] == []
            # the first layers too: rows sorted by their act-order P1, fed x[..., P1] by one index_select
            assert mlp["cols_g_idx_none"] and all(mlp["cols_g_idx_none"]) and mlp["cols_read_permuted_x"]
            assert mlp["cols_p1_source"] == ["get_attr"]
            assert mlp["scales_groups"] == C.expected_groups(rank, world)
            expected = ["_c10d_functional.all_reduce.default"] if world > 1 else []
            assert mlp["collectives"] == expected


@pytest.mark.parametrize("cell", CELLS, ids=_id)
def test_report_and_conversion(cells, cell):
    """Report figures; modules converted in place and idempotent (the decode retrace finds form T);
    weight memory within 1.02x of eager."""
    family, form, world = cell
    for r in cells(*cell):
        first, second = r["reports"][0]["rows"], r["reports"][1]["rows"]
        assert [row["applied"] for row in first] == [True, True]
        for row in first:
            assert (row["form"], row["tp"], row["weights"]) == (form, world, "in place")
            assert row["kind"] == ("swiglu" if family == "llama" else "gelu")
            removed = world > 1 and form == "N"
            assert row["collectives_removed"] == int(removed)
            per_token = (world - 1) * (C.INTER // world) * 4  # fp32 activation columns of the other ranks
            assert sympy.sympify(row["comm_removed"]) == sympy.sympify(f"{per_token if removed else 0}*M")
            assert row["comm_at_m1"] == (per_token if removed else 0)
        assert len(second) == 2  # the folded x[P1] before gate/up is not read as a permutation before a down
        assert all(not row["applied"] and row["reason"].startswith("already TP-aware") for row in second)
        assert r["forms"] == ["T", "T"] and r["in_perm"] == [True, True]
        first_layers = "gate/up" if family == "llama" else "fc"
        assert all(row["kernels"].startswith(f"{first_layers}: sorted via x[P1]; down: ") for row in first)
        assert all(all(g) for g in r["g_idx_none"]), r["g_idx_none"]  # every gptq_mm of both graphs
        assert r["memory"] <= 1.02


@pytest.mark.parametrize("cell", [("llama", "N", 2), ("gptbigcode", "L", 2), ("llama", "U", 1)], ids=_id)
def test_presorted_first_layers(cells, cell):
    """Modules whose first layers are already sorted by P1 and read x[P1] (``presort``, as vLLM runs act-order
    column-parallel layers): the rewrite leaves that permutation where it is, only permutes columns, and the
    converted module keeps its in_perm, so eager after compile stays correct."""
    family, form, world = cell
    for r in cells(*cell, presort=True):
        if form == "N":
            assert r["equal"] == [True, True] and r["eager_after_equal"], r["err"]
        else:
            assert max(r["err"]) < 1e-5 and r["eager_after_err"] < 1e-5, r["err"]
        assert r["graph"]["all_gathers"] == 0
        for mlp in r["graph"]["mlps"]:
            assert mlp["g_idx_is_none"] and mlp["permutations"] == []
            assert all(mlp["cols_g_idx_none"]) and mlp["cols_read_permuted_x"]
            assert mlp["cols_p1_source"] == ["placeholder"]  # the module's own x[P1], left in place
        first = r["reports"][0]["rows"]
        assert [row["applied"] for row in first] == [True, True]
        assert all(": sorted groups; down: " in row["kernels"] for row in first)
        assert all(row["reason"].startswith("already TP-aware") for row in r["reports"][1]["rows"])
        assert r["forms"] == ["T", "T"] and r["in_perm"] == [True, True]
        assert all(all(g) for g in r["g_idx_none"]) and r["memory"] <= 1.02


@pytest.mark.parametrize("cell", [("llama", "N", 2), ("gptbigcode", "L", 2), ("llama", "U", 1),
                                  ("gptbigcode", "N", 1)], ids=_id)
def test_tiled_weights(cells, cell):
    """tpaware.tile_weights: the rewritten MLPs hold their weights tiled (layout.py), the modules in place (form N's
    down too): every quantized matmul of both graphs reads tiled words, numbers as eager's (form N exactly), eager
    after compile right on the modules' tiled buffers, weight memory as eager's, and the report says so."""
    family, form, world = cell
    for r in cells(*cell, tileable=True, **{"tpaware.tile_weights": True}):
        if form == "N":
            assert r["equal"] == [True, True] and r["eager_after_equal"], r["err"]
        else:
            assert max(r["err"]) < 1e-5 and r["eager_after_err"] < 1e-5, r["err"]
        assert all(all(t) for t in r["tiled"]) and [len(t) for t in r["tiled"]] == [6 if family == "llama" else 4] * 2
        assert all(r["modules_tiled"]) and r["forms"] == ["T", "T"]
        assert r["memory"] <= 1.02
        for row in r["reports"][0]["rows"]:
            assert row["applied"] and row["weights"] == "in place"
            assert row["kernels"].endswith(", tiled words") and ", tiled words; down: " in row["kernels"]


def test_weights_stay_n_major_by_default_on_cpu(cells):
    """tile_weights "auto" tiles on sm_90 GPUs only: on CPU the same tileable decoder keeps N-major words."""
    for r in cells("llama", "N", 2, tileable=True):
        assert not any(any(t) for t in r["tiled"]) and not any(r["modules_tiled"])
        assert all("tiled" not in row["kernels"] for row in r["reports"][0]["rows"])


@pytest.mark.parametrize("form", ["N", "L"])
def test_fused_gate_up(cells, form):
    for r in cells("llama", form, 2, fused=True):
        assert r["reports"][0]["rows"][0]["layers"] == "gate_up, down"
        assert r["reports"][0]["rows"][0]["kernels"].startswith("gate_up: sorted via x[P1]")
        assert all(all(g) for g in r["g_idx_none"]) and r["in_perm"] == [True, True]
        assert all(row["applied"] for row in r["reports"][0]["rows"])
        assert (r["equal"] == [True, True]) if form == "N" else max(r["err"]) < 1e-5


@pytest.mark.parametrize("form", ["N", "U"])
def test_gptq_v1_zero_points(cells, form):
    """GPTQ v1 checkpoints store zero - 1 (zero_offset 1): packed zeros survive the exchange."""
    for r in cells("llama", form, 2, zero_offset=1):
        assert all(row["applied"] for row in r["reports"][0]["rows"])
        assert (r["equal"] == [True, True]) if form == "N" else max(r["err"]) < 1e-5


def test_bf16_activations_and_their_bytes(cells):
    """bf16 activations: the removed AllGather moved 2 bytes per column; numerics exact as in eager."""
    for r in cells("gptbigcode", "N", 2, dtype="bfloat16"):
        assert r["equal"] == [True, True]
        row = r["reports"][0]["rows"][0]
        assert row["comm_at_m1"] == (C.INTER // 2) * 2 and row["comm_removed"] == f"{C.INTER}*M"


def test_dynamic_first_compile(cells):
    """torch.compile(dynamic=True): a symbolic token count in the graph that is rewritten."""
    for r in cells("llama", "N", 2, dynamic=True):
        assert r["equal"] == [True, True] and all(row["applied"] for row in r["reports"][0]["rows"])


def test_c10d_spelling(cells):
    for r in cells("llama", "N", 2, collectives="c10d"):
        assert r["equal"] == [True, True] and r["graph"]["all_gathers"] == 0
        assert all(row["applied"] for row in r["reports"][0]["rows"])


@pytest.mark.parametrize("cell", [("gptbigcode", "N", 2), ("llama", "U", 1)], ids=_id)
def test_inductor_hand_off(cells, cell):
    """Inductor runs the rest; its own config keys pass through options= beside ours. The graph that converted
    the modules runs once (eager) and is retraced in form T, which Inductor compiles."""
    for r in cells(*cell, **{"hand_off": "inductor", "triton.cudagraphs": False}):
        assert [rep["hand_off"] for rep in r["reports"]] == ["eager", "inductor"]
        assert max(r["err"]) < 1e-4 and r["graph"]["all_gathers"] == 0
        assert all(row["applied"] for row in r["reports"][0]["rows"])


@pytest.mark.skipif(not TRACES_GATHER_LAST_DIM,
                    reason="torch 2.11 cannot trace all_gather_tensor(gather_dim=-1): it graph-breaks (DESIGN.md §5)")
def test_gather_last_dim(ranks):
    for r in ranks(2).run(C.gather_last_dim_case):
        assert r["equal"] and [row["applied"] for row in r["rows"]][:1] == [True]


@pytest.mark.parametrize("spelling", ["", "spelled", "split"])
def test_foreign_module_keeps_private_copy(ranks, spelling):
    """A module that is not ours (and spellings of the rank slice / permutation): rewritten on a private copy."""
    for r in ranks(2).run(C.foreign_case, spelling):
        row = r["rows"][0]
        assert row["applied"] and row["weights"] == "private copy" and row["private_bytes"] > 0
        assert "sorted via x[P1]" in row["kernels"]  # the permutation is a constant of the graph
        assert r["equal"] and r["buffers_unchanged"] and r["eager_after_err"] == 0


@pytest.mark.parametrize("world", [1, 2])
def test_foreign_module_tiled_private_copy(ranks, world):
    """A foreign module with tpaware.tile_weights: its private copies of gate and up are tiled; form N's down,
    which the graph reads from the module as it is, stays N-major (tiling it would hold a second copy)."""
    for r in ranks(world).run(C.foreign_tiled_case):
        row = r["rows"][0]
        assert row["applied"] and row["weights"] == "private copy" and row["private_bytes"] > 0
        assert r["tiled"] == [True, True, False]  # gate, up, down in graph order
        assert r["equal"] and r["buffers_unchanged"] and r["eager_after_err"] == 0


def test_tile_weights_option_is_checked():
    import torch

    with pytest.raises(Exception, match="tile_weights must be"):
        torch.compile(lambda x: x * 2, backend=C.tpaware, options={"tpaware.tile_weights": "yes"})(torch.ones(2))


def test_foreign_module_through_inductor(ranks):
    """The rewritten graph itself (constants, unread old weights dropped) compiled by Inductor."""
    for r in ranks(2).run(C.foreign_case, "", "inductor"):
        assert r["rows"][0]["applied"] and r["hand_offs"] == ["inductor"]
        assert r["err"] < 1e-5 and r["buffers_unchanged"]


@pytest.mark.parametrize("variant, reason", [
    ("runtime_perm", "permutation computed at run time"),
    ("other_user", "gathered activation"),
    ("graph_break", "MLP split by a graph break"),
    ("break_before_down", "MLP split by a graph break"),
])
def test_not_rewritten(ranks, variant, reason):
    for r in ranks(2).run(C.foreign_case, variant):
        assert r["rows"] and not any(row["applied"] for row in r["rows"])
        assert any(reason in row["reason"] for row in r["rows"]), r["rows"]
        assert r["err"] < 1e-6 and r["buffers_unchanged"]


@pytest.mark.parametrize("form", ["N", "U"])
def test_gate_up_with_different_act_orders(ranks, form):
    """gate and up with their own g_idx: one x[P1] cannot serve both, so they keep their g_idx (said in the
    kernels column); the rest of the rewrite still applies and eager after compile still matches."""
    for r in ranks(2).run(C.distinct_g_idx_case, form):
        row = r["rows"][0]
        assert row["applied"] and "per-row g_idx kept (layers reading x have different g_idx)" in row["kernels"]
        assert r["err"] < 1e-5 and r["eager_after_err"] < 1e-5 and r["in_perm"] is False


def test_group_offset_refused_when_asked(cells):
    """TP 4 over 6 groups: shards would share a boundary group; with allow_group_offset off, skipped with why."""
    for r in cells("llama", "U", 4, **{"tpaware.allow_group_offset": False}):
        rows = r["reports"][0]["rows"]
        assert rows and all(not row["applied"] and "6 groups over 4 ranks" in row["reason"] for row in rows)
        assert max(r["err"]) < 1e-5


def test_identity_permutation_at_tp1(ranks):
    (r,) = ranks(1).run(C.identity_case)
    assert [row["reason"] for row in r["rows"]] == ["identity permutation: nothing to fold"]
    assert r["equal"]


def test_unquantized_mlp_untouched(ranks):
    (r,) = ranks(1).run(C.dense_case)
    assert r["rows"] == [] and r["equal"]


def test_no_recompile_per_token_count(ranks):
    (counts,) = set(map(tuple, ranks(1).run(C.dynamic_m_case)))
    assert counts[-1] == counts[2] <= 3, counts


def test_failure_on_one_rank_raises_everywhere(ranks):
    pool = ranks(2)
    try:
        results = pool.run(C.failure_case, timeout=120)
    finally:
        pool.close()  # the group saw an unfinished collective: start the next test on fresh ranks
    assert all(r["raised"] for r in results), results
    assert "injected failure" in results[1]["message"]
    assert all(r["seconds"] < 60 for r in results), results


def test_report_python_api_and_env(capfd, monkeypatch):
    """In this process (TP 1): TPAWARE_REPORT=1 prints the table; last/all reports and JSON are available."""
    import json

    import torch

    from tpaware_compile import report as R
    from tpaware_compile.nn import TPMLP

    torch._dynamo.reset()
    R.clear_reports()
    monkeypatch.setenv("TPAWARE_REPORT", "1")
    mlp = TPMLP.from_full("swiglu", C.mlp_weights(), "U", 0, 1)
    x = torch.randn(3, 64)
    ref = mlp(x)
    out = torch.compile(mlp, backend=C.tpaware, options={"tpaware.hand_off": "eager"})(x)
    assert C.rel_err(ref, out) < 1e-5
    printed = capfd.readouterr().out
    assert "tpaware rewrite report" in printed and "applied" in printed
    row = R.last_report().rows[0]
    assert (row.form, row.tp, row.applied, row.collectives_removed, row.comm_at_m1) == ("U", 1, True, 0, 0)
    assert json.loads(R.reports_json())[0]["rows"][0]["mlp"] == row.mlp
    assert R.all_reports()[0] is R.last_report()
    assert "tpaware rewrite report, graph 0" in R.last_reports().render()


def test_entry_point_registered():
    """``backend="tpaware"`` resolves through the torch_dynamo_backends entry point once the package is installed."""
    from importlib.metadata import entry_points

    import torch

    if not any(ep.name == "tpaware" for ep in entry_points(group="torch_dynamo_backends")):
        pytest.skip("package not installed (pip install -e .): entry point absent")
    from tpaware_compile.backend import tpaware

    assert torch._dynamo.lookup_backend("tpaware") is tpaware


def test_parse_source():
    from tpaware_compile.compat import parse_source

    name = "L['self']._modules['blocks']._modules['0']._modules['mlp']._modules['gate']._buffers['qweight']"
    assert parse_source(name) == ("self", ["blocks", "0", "mlp", "gate"], "qweight")
    assert parse_source("L['self']._buffers['perm']") == ("self", [], "perm")
    assert parse_source("L['x']") is None and parse_source("G['w']") is None


def test_unknown_backend_option_is_refused():
    import torch

    with pytest.raises(Exception, match="unknown backend options"):
        torch.compile(lambda x: x * 2, backend=C.tpaware, options={"tpaware.nope": 1})(torch.ones(2))
