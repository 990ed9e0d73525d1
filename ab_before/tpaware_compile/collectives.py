"""The two collectives of tensor-parallel layers, spelled as people write them: functional collectives
(the default) or in-place c10d calls (Dynamo remaps those to functional ones when it traces)."""

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol

STYLES = ("functional", "c10d")


def _group(group):
    return group if group is not None else dist.group.WORLD


def all_gather_last_dim(h: torch.Tensor, world: int, group=None, style: str = "functional",
                        gather_dim: int = 0) -> torch.Tensor:
    """[..., C] on every rank -> [..., world * C], rank r's columns at [r * C, (r + 1) * C).
    ``gather_dim=0`` gathers along dim 0 then chunks and concatenates, as most TP code does;
    ``gather_dim=-1`` asks the functional collective for the last dim directly."""
    if world == 1:
        return h
    h = h.contiguous()
    if style == "c10d":
        out = h.new_empty((world * h.shape[0],) + tuple(h.shape[1:]))
        dist.all_gather_into_tensor(out, h, group=_group(group))
    elif gather_dim == -1:
        return funcol.all_gather_tensor(h, -1, _group(group))
    else:
        out = funcol.all_gather_tensor(h, 0, _group(group))  # [world * B, ..., C]
    return torch.cat(out.chunk(world, dim=0), dim=-1)


def all_reduce_sum(y: torch.Tensor, world: int, group=None, style: str = "functional") -> torch.Tensor:
    if world == 1:
        return y
    if style == "c10d":
        dist.all_reduce(y, group=_group(group))
        return y
    return funcol.all_reduce(y, "sum", _group(group))
