"""Dynamo shares one compiled graph between module instances of the same code and shapes. The rewritten graph
holds its own instance's weights in their new layout, so another instance must never compute with them."""

import pytest
import torch

from mlp_cases import mlp_weights, rel_err
from tpaware_compile.backend import tpaware
from tpaware_compile.nn import TPMLP, reference_mlp


@pytest.mark.parametrize("kind", ["swiglu", "gelu"])
def test_each_instance_computes_with_its_own_weights(kind):
    torch._dynamo.reset()
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(0))
    with pytest.warns(UserWarning, match="reused by Dynamo for another instance"):
        for seed in (1, 2, 3):
            w = mlp_weights(kind, seed=seed)
            mlp = torch.compile(TPMLP.from_full(kind, w, "N", 0, 1), backend=tpaware,
                                options={"tpaware.hand_off": "eager"})
            for _ in range(2):  # first call converts (or falls back), second runs the retrace or the fallback
                assert rel_err(mlp(x), reference_mlp(kind, w, x)) < 1e-5, seed
