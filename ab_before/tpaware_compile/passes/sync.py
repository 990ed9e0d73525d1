"""The backend's own collectives: every one bounded by a timeout, and helpers for ranks to agree.

Compile-time only (weight exchange, plan agreement, probe check), over the model's own process group.
A rank whose local step fails still joins the next agreement with ok=False, so every rank raises together
instead of its peers waiting out the timeout.
"""

import datetime
import hashlib
from dataclasses import dataclass
from typing import List, Optional

import torch
import torch.distributed as dist


class RewriteAborted(RuntimeError):
    """Raised on every rank when any rank failed a step of a rewrite."""


@dataclass
class Sync:
    group: Optional[dist.ProcessGroup]  # None: world 1, every collective is the identity
    timeout_s: float = 300.0

    @property
    def world(self) -> int:
        return 1 if self.group is None else self.group.size()

    @property
    def device(self) -> torch.device:
        # NCCL moves CUDA tensors only; gloo takes CPU tensors (and CUDA ones through a host copy).
        if self.group is not None and dist.get_backend(self.group) == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def _wait(self, work, what: str) -> None:
        try:
            ok = work.wait(timeout=datetime.timedelta(seconds=self.timeout_s))
        except Exception as e:  # gloo raises on timeout; NCCL may return False
            raise RewriteAborted(f"tpaware: {what} failed or timed out after {self.timeout_s:.0f} s: {e}") from e
        if ok is False:
            raise RewriteAborted(f"tpaware: {what} timed out after {self.timeout_s:.0f} s")

    def all_gather(self, t: torch.Tensor, what: str = "all_gather") -> List[torch.Tensor]:
        if self.group is None:
            return [t]
        home, t = t.device, t.to(self.device).contiguous()
        out = [torch.empty_like(t) for _ in range(self.world)]
        self._wait(dist.all_gather(out, t, group=self.group, async_op=True), what)
        return [o.to(home) for o in out]

    def all_reduce(self, t: torch.Tensor, op=dist.ReduceOp.SUM, what: str = "all_reduce") -> torch.Tensor:
        if self.group is None:
            return t
        home, t = t.device, t.to(self.device, copy=True)
        self._wait(dist.all_reduce(t, op=op, group=self.group, async_op=True), what)
        return t.to(home)

    def all_ok(self, ok: bool, what: str) -> bool:
        """True iff every rank says ok."""
        flag = torch.tensor([0 if ok else 1], dtype=torch.int64)
        return int(self.all_reduce(flag, dist.ReduceOp.MAX, what)) == 0

    def same(self, digest: int, what: str) -> bool:
        """True iff every rank holds the same 63-bit digest."""
        got = self.all_gather(torch.tensor([digest], dtype=torch.int64), what)
        return all(int(g) == digest for g in got)


def digest(*parts) -> int:
    """A 63-bit hash of strings, ints and tensors (by value), equal on every rank for equal inputs."""
    h = hashlib.sha256()
    for p in parts:
        if isinstance(p, torch.Tensor):
            t = p.detach().cpu().contiguous().reshape(-1)
            h.update(f"{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        else:
            h.update(repr(p).encode())
    return int.from_bytes(h.digest()[:8], "little") >> 1
