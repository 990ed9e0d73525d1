"""Our loader and decoder against a quantizing library's own forward, on the checkpoint it wrote: logits
within 1e-2 and the same top token at every position, at TP 1/2/4, eager and compiled with tpaware."""

import torch


def _our_logits(rank, world, path, tokens, compiled):
    from tpaware_compile.models import Parallel
    from tpaware_compile.models.loader import load_checkpoint
    from tpaware_compile.report import clear_reports, last_reports

    model = load_checkpoint(path, Parallel(rank, world, form="N"), dtype=torch.float32, batch=tokens.shape[0],
                            max_seq=32)
    if compiled:
        from tpaware_compile.backend import tpaware

        torch._dynamo.reset()  # a fresh cache: this rank process compiled other checkpoints' models before
        clear_reports()
        model = torch.compile(model, backend=tpaware, options={"tpaware.hand_off": "eager"})
    with torch.no_grad():
        logits = model(tokens, torch.arange(tokens.shape[1]))
    assert not compiled or any(r.applied for r in last_reports()), "the checkpoint's MLPs were not rewritten"
    return logits


def assert_logits_match(ranks, path: str, theirs: dict, case: str) -> None:
    """``theirs``: {"tokens": [B, S], "logits": [B, S, vocab]} from the library's own forward."""
    for world, compiled in ((1, False), (2, False), (4, False), (1, True), (2, True), (4, True)):
        for ours in ranks(world).run(_our_logits, path, theirs["tokens"], compiled):
            assert float((ours - theirs["logits"]).abs().max()) < 1e-2, (case, world, compiled)
            assert torch.equal(ours.argmax(-1), theirs["logits"].argmax(-1)), (case, world, compiled)
