import pytest
import torch

from tpaware_compile.models import Decoder, DecoderConfig, Parallel, random_weights

CONFIGS = {"llama": DecoderConfig(family="llama", kv_heads=2),
           "gptbigcode": DecoderConfig(family="gptbigcode", kv_heads=1)}


def _prefill_then_decode(rank, world, family, form, collectives="functional"):
    cfg = CONFIGS[family]
    model = Decoder(cfg, Parallel(rank, world, form=form, collectives=collectives), random_weights(cfg, seed=2),
                    batch=2)
    tokens = torch.randint(0, cfg.vocab, (2, 7), generator=torch.Generator().manual_seed(3))
    prefill = model(tokens[:, :6], torch.arange(6))
    decode = model(tokens[:, 6:], torch.tensor([6]))
    return torch.cat([prefill, decode], dim=1)


@pytest.mark.parametrize("family", CONFIGS)
def test_decode_continues_prefill(family):
    cfg = CONFIGS[family]
    tokens = torch.randint(0, cfg.vocab, (2, 7))
    model = Decoder(cfg, Parallel(), random_weights(cfg, seed=2), batch=2)
    whole = model(tokens, torch.arange(7))
    model_b = Decoder(cfg, Parallel(), random_weights(cfg, seed=2), batch=2)
    model_b(tokens[:, :6], torch.arange(6))
    assert torch.allclose(model_b(tokens[:, 6:], torch.tensor([6])), whole[:, 6:], atol=1e-5)


@pytest.mark.parametrize("family", CONFIGS)
@pytest.mark.parametrize("world", [2, 4])
def test_tensor_parallel_decoder_matches_one_rank(ranks, family, world):
    want = _prefill_then_decode(0, 1, family, "N")
    for form in ("N", "L", "U", "T"):
        for got in ranks(world).run(_prefill_then_decode, family, form):
            assert torch.allclose(got, want, rtol=1e-4, atol=1e-4), (form, float((got - want).abs().max()))


def test_c10d_collectives(ranks):
    want = _prefill_then_decode(0, 1, "llama", "N")
    for got in ranks(2).run(_prefill_then_decode, "llama", "N", "c10d"):
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-4)
