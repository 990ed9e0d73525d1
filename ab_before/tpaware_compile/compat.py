"""Every torch-version difference the backend depends on, in one place (dev: torch 2.13, GPU machine: 2.11)."""

import re
from typing import Any, Dict, Optional

import torch
import torch.distributed as dist

TORCH_VERSION = tuple(int(v) for v in re.findall(r"\d+", torch.__version__)[:2])
# torch 2.11 graph-breaks inside funcol.all_gather_tensor(gather_dim=-1) (_maybe_view_chunk_cat is skipped).
TRACES_GATHER_LAST_DIM = TORCH_VERSION >= (2, 13)

_SEGMENT = re.compile(r"\._(modules|buffers|parameters)\['([^']+)'\]|\.([A-Za-z_]\w*)")


def source_name(source) -> str:
    # torch 2.13 made Source.name a property; 2.11 has a method.
    name = source.name
    return name() if callable(name) else name


def placeholder_source(node: torch.fx.Node) -> Optional[str]:
    """``L['self']._modules['mlp']._buffers['perm']`` for a module buffer placeholder, else None."""
    grapharg = node.meta.get("grapharg")
    return None if grapharg is None or grapharg.source is None else source_name(grapharg.source)


def parse_source(name: str):
    """``L['self']._modules['a']._modules['0']._buffers['w']`` -> ('self', ['a', '0'], 'w'), or None when the
    source is not a module attribute reached from a frame local."""
    head = re.match(r"L\['([^']+)'\]", name or "")
    if head is None:
        return None
    parts = [m.group(2) or m.group(3) for m in _SEGMENT.finditer(name, head.end())]
    if not parts or "".join(m.group(0) for m in _SEGMENT.finditer(name, head.end())) != name[head.end():]:
        return None
    return head.group(1), parts[:-1], parts[-1]


def frame_locals() -> Optional[Dict[str, Any]]:
    """The real locals of the frame Dynamo is compiling (the backend runs inside its tracer), or None.
    Lets the backend find the module objects behind parameter placeholders and convert them in place."""
    try:
        from torch._dynamo.symbolic_convert import InstructionTranslator

        return InstructionTranslator.current_tx().output.root_tx.f_locals
    except Exception:  # no tracer (the backend called by hand) or an internal rename: fall back to private copies
        return None


def resolve_group(group_name: str) -> dist.ProcessGroup:
    from torch.distributed.distributed_c10d import _resolve_process_group

    return _resolve_process_group(group_name)


def functional_op(name: str):
    """The ``.default`` overload of a ``_c10d_functional`` op (graphs may hold the packet or the overload)."""
    return getattr(torch.ops._c10d_functional, name).default


def overload_of(target):
    """OpOverloadPacket -> its default overload; anything else unchanged."""
    if isinstance(target, torch._ops.OpOverloadPacket) and "default" in target.overloads():
        return target.default
    return target


def raise_recompile_limit(n: int) -> None:
    """Let Dynamo compile one forward for many module instances (benchmarks rotate over weight copies; past
    the limit Dynamo silently runs eager). The key was ``cache_size_limit`` before ``recompile_limit``."""
    import torch._dynamo.config as cfg

    key = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"
    setattr(cfg, key, max(getattr(cfg, key), n))
