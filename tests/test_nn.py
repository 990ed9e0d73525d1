import pytest
import torch

from mlp_cases import mlp_weights, rel_err
from tpaware_compile.nn import FORMS, GPTQLinear, TPMLP, reference_mlp
from tpaware_compile.reorder import stable_argsort

VARIANTS = [("swiglu", False), ("swiglu", True), ("gelu", False)]


def _form_errors(rank, world, dtype, collectives, gather_dim, group_size, inter):
    """Every form x MLP kind on this rank: relative error of the TP output against the unsharded reference."""
    errors = {}
    for kind, fused in VARIANTS:
        weights = mlp_weights(kind, inter=inter, group_size=group_size, seed=7)
        x = torch.randn(3, 5, 64, generator=torch.Generator().manual_seed(rank * 0 + 11)).to(dtype)
        ref = reference_mlp(kind, weights, x)
        for form, presort in [(f, False) for f in FORMS] + [(f, True) for f in "NLU"]:
            mlp = TPMLP.from_full(kind, weights, form, rank, world, fused=fused,
                                  collectives=collectives, gather_dim=gather_dim, presort=presort)
            y = mlp(x)
            assert y.dtype == dtype and y.shape == ref.shape
            errors[(kind, fused, form, presort)] = rel_err(y, ref)
    return errors


@pytest.mark.parametrize("world", [1, 2, 4])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 1e-2)])
def test_every_form_matches_unsharded_reference(ranks, world, dtype, tol):
    for errors in ranks(world).run(_form_errors, dtype, "functional", 0, 32, 192):
        bad = {k: e for k, e in errors.items() if not e < tol}
        assert not bad, f"relative error over {tol}: {bad}"


@pytest.mark.parametrize("collectives,gather_dim", [("c10d", 0), ("functional", -1)])
def test_collective_spellings(ranks, collectives, gather_dim):
    for errors in ranks(2).run(_form_errors, torch.float32, collectives, gather_dim, 32, 192):
        assert max(errors.values()) < 1e-5, errors


def test_shards_starting_inside_a_group(ranks):
    # inter 192 over 4 ranks = 48 rows a rank, groups of 64: shards 1 and 2 start mid-group
    for errors in ranks(4).run(_form_errors, torch.float32, "functional", 0, 64, 192):
        assert max(errors.values()) < 1e-5, errors


@pytest.mark.parametrize("kind,fused", VARIANTS)
def test_form_t_folds_the_first_layer_act_order(kind, fused):
    """Form T (the backend's target): every layer has contiguous groups; the first layers' act-order P1 is the
    in_perm buffer that forward applies to x. The other forms keep their g_idx and have no in_perm."""
    weights = mlp_weights(kind, seed=7)
    first = weights["fc" if kind == "gelu" else "gate"]
    for rank in (0, 1):  # building a shard needs no process group
        mlp = TPMLP.from_full(kind, weights, "T", rank, 2, fused=fused)
        assert torch.equal(mlp.in_perm, stable_argsort(first.g_idx))
        assert all(m.g_idx is None for m in mlp.modules() if isinstance(m, GPTQLinear))
    for form in "NLU":
        assert TPMLP.from_full(kind, weights, form, 0, 2, fused=fused).in_perm is None
        # presort: the same sorted first layers as form T's, less its column permutation; down as the form has it
        mlp = TPMLP.from_full(kind, weights, form, 0, 2, fused=fused, presort=True)
        assert torch.equal(mlp.in_perm, stable_argsort(first.g_idx))
        firsts = [mlp.gate_up] if fused else [getattr(mlp, n) for n in (("fc",) if kind == "gelu" else ("gate", "up"))]
        assert all(m.g_idx is None for m in firsts)
        assert (getattr(mlp, "proj" if kind == "gelu" else "down").g_idx is None) == (form == "N")


def test_bad_construction_raises():
    weights = mlp_weights("swiglu")
    with pytest.raises(ValueError, match="form must be one of"):
        TPMLP.from_full("swiglu", weights, "X", 0, 1)
    with pytest.raises(ValueError, match="missing \\['down'\\]"):
        TPMLP.from_full("swiglu", {k: weights[k] for k in ("gate", "up")}, "N", 0, 1)
    with pytest.raises(ValueError, match="fused=True applies"):
        TPMLP.from_full("gelu", mlp_weights("gelu"), "N", 0, 1, fused=True)
    with pytest.raises(ValueError, match="divisible by world_size"):
        TPMLP.from_full("swiglu", weights, "N", 0, 5)
    cols, rows = [weights["gate"], weights["up"]], weights["down"]
    with pytest.raises(ValueError, match="needed by form N and only by it"):
        TPMLP.from_shards("swiglu", cols, rows, None, None, "N", 0, 1)
    with pytest.raises(ValueError, match="needed by form N and only by it"):
        TPMLP.from_shards("swiglu", cols, rows, None, torch.arange(192), "L", 0, 1)


def _triton_kernel_errors(rank, world):
    """kernel="triton" runs the Triton kernels (here under the interpreter): sorted and per-row g_idx layouts,
    eager and compiled, against the unsharded reference."""
    errors = {}
    for kind, fused in VARIANTS:
        weights = mlp_weights(kind, inter=128, group_size=32, seed=5)
        x = torch.randn(2, 64, generator=torch.Generator().manual_seed(4)).half()
        ref = reference_mlp(kind, weights, x)
        for form in ("N", "L", "T"):
            mlp = TPMLP.from_full(kind, weights, form, rank, world, fused=fused, kernel="triton")
            errors[(kind, fused, form, "eager")] = rel_err(mlp(x), ref)
        errors[(kind, fused, "T", "compiled")] = rel_err(torch.compile(mlp, backend="eager")(x), ref)
    return errors


@pytest.mark.interpreter
def test_triton_kernel_option_under_interpreter(ranks):
    for errors in ranks(2, interpret=True).run(_triton_kernel_errors):
        assert max(errors.values()) < 1e-2, errors
