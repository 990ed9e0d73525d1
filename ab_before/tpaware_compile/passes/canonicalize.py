"""Bring the many spellings of one step to one spelling, so the matcher meets each concept once.

Semantics-preserving and exact (data movement only), so it runs on every graph whether or not an MLP matches:
  * op packets (``_c10d_functional.wait_tensor``) -> their ``.default`` overload;
  * ``tpaware::gptq_mm_triton`` (an eager model's Triton kernel choice) -> ``tpaware::gptq_mm``, the same
    function: the lowering pass picks the kernels again after the rewrite;
  * ``wait_tensor(wait_tensor(t))`` -> ``wait_tensor(t)`` (funcol's AsyncCollectiveTensor adds a second wait);
  * method calls (``t.chunk``, ``t.narrow``, ``t.index_select``, ``t.split``) -> torch functions;
  * slices of one dim (``chunk``/``split`` + ``getitem``, ``t[..., a:b]``) -> ``torch.narrow(t, dim, start, length)``
    with a non-negative start and a negative dim;
  * a permutation of the last dim (``t[..., idx]``) -> ``torch.index_select(t, -1, idx)``;
  * in-place c10d calls, which Dynamo remaps to ``copy_(dst, wait_tensor(collective(...)))`` into a fresh
    tensor (``new_empty`` or a matmul result): later readers of ``dst`` read the wait instead.
"""

import operator

import torch
from torch.fx import GraphModule, Node

from ..compat import functional_op, overload_of

_SAME_FUNCTION = {"tpaware::gptq_mm_triton": "gptq_mm"}  # by name: matching must not import triton


_METHODS = {"chunk": torch.chunk, "split": torch.split, "narrow": torch.narrow, "index_select": torch.index_select,
            "cat": torch.cat}


def canonicalize(gm: GraphModule) -> None:
    for node in list(gm.graph.nodes):
        _normalize_target(node)
    for node in list(gm.graph.nodes):
        _collapse_waits(node)
    for node in list(gm.graph.nodes):
        _functionalize_copy(node)
    for node in list(gm.graph.nodes):
        _slices_to_narrow(gm, node)
        _getitem_to_index_select(gm, node)
    gm.graph.eliminate_dead_code(is_impure_node=_keep)
    gm.graph.lint()
    gm.recompile()


def _keep(node: Node) -> bool:
    # Only the nodes we just bypassed may go (split/chunk, the buffer of an in-place gather); the rest stays.
    bypassed = (node.op == "call_function" and node.target in (torch.chunk, torch.split)) or (
        node.op == "call_method" and node.target in _FRESH_METHODS)
    return not bypassed


def _normalize_target(node: Node) -> None:
    if node.op == "call_function":
        target = overload_of(node.target)
        same = _SAME_FUNCTION.get(target.name()) if isinstance(target, torch._ops.OpOverload) else None
        node.target = getattr(torch.ops.tpaware, same).default if same else target
    elif node.op == "call_method" and node.target in _METHODS:
        node.op, node.target = "call_function", _METHODS[node.target]


def _collapse_waits(node: Node) -> None:
    wait = functional_op("wait_tensor")
    if node.target is wait and isinstance(node.args[0], Node) and node.args[0].target is wait:
        node.replace_all_uses_with(node.args[0])
        node.graph.erase_node(node)


# Producers of fresh tensors (no views, no inputs): a copy_ into one of them is only an alias for later readers.
_FRESH_METHODS = {"new_empty", "new_zeros"}
_FRESH_FUNCTIONS = {torch.empty, torch.zeros, torch.matmul, operator.matmul, torch.mm}


def _fresh(node) -> bool:
    if not isinstance(node, Node):
        return False
    if node.op == "call_method":
        return node.target in _FRESH_METHODS
    gptq_mm = torch.ops.tpaware.gptq_mm.default
    return node.op == "call_function" and (node.target in _FRESH_FUNCTIONS or node.target is gptq_mm)


def _functionalize_copy(node: Node) -> None:
    """``copy_(dst, wait)`` (Dynamo's spelling of in-place c10d) -> readers of dst after it read ``wait``."""
    if not (node.op == "call_method" and node.target == "copy_" and len(node.args) == 2):
        return
    dst, src = node.args
    if not (_fresh(dst) and isinstance(src, Node) and src.target is functional_op("wait_tensor")):
        return
    order = {n: i for i, n in enumerate(node.graph.nodes)}
    for user in list(dst.users):
        if order[user] > order[node]:
            user.replace_input_with(dst, src)
    node.replace_all_uses_with(src)
    node.graph.erase_node(node)


def shape_of(node) -> tuple:
    val = node.meta.get("example_value", node.meta.get("val")) if isinstance(node, Node) else None
    return tuple(val.shape) if isinstance(val, torch.Tensor) else ()


def _static(n) -> bool:
    return isinstance(n, int)


def _slices_to_narrow(gm: GraphModule, node: Node) -> None:
    """``chunk(t, n, d)[i]``, ``split(t, s, d)[i]``, ``t[..., a:b]`` -> ``narrow(t, d, start, len)``."""
    if node.op != "call_function" or node.target is not operator.getitem or not isinstance(node.args[0], Node):
        return
    src, index = node.args
    found = _chunk_piece(src, index) if isinstance(index, int) else _slice_piece(src, index)
    if found is None:
        return
    tensor, dim, start, length = found
    with gm.graph.inserting_before(node):
        new = gm.graph.call_function(torch.narrow, (tensor, dim, start, length))
    new.meta.update(node.meta)
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)


def _chunk_piece(src: Node, i: int):
    if src.op != "call_function" or src.target not in (torch.chunk, torch.split):
        return None
    tensor, size_arg = src.args[0], src.args[1]
    dim = src.args[2] if len(src.args) > 2 else src.kwargs.get("dim", 0)
    shape = shape_of(tensor)
    if not shape or not isinstance(size_arg, int) or not _static(shape[dim]):
        return None
    n = shape[dim]
    size = -(-n // size_arg) if src.target is torch.chunk else size_arg
    start = i * size
    return (tensor, dim - len(shape) if dim >= 0 else dim, start, min(size, n - start)) if start < n else None


def _slice_piece(src: Node, index):
    """``t[..., a:b]`` (or the slice on the last of full slices) -> narrow along that dim."""
    shape = shape_of(src)
    if not isinstance(index, tuple) or not shape:
        return None
    if len(index) == 2 and index[0] is Ellipsis and isinstance(index[1], slice):
        dim, sl = -1, index[1]
    else:
        return None
    n = shape[dim]
    if sl.step not in (None, 1) or not _static(n):
        return None
    start, stop, _ = sl.indices(n)
    return (src, dim, start, stop - start) if stop > start else None


def _getitem_to_index_select(gm: GraphModule, node: Node) -> None:
    if node.op != "call_function" or node.target is not operator.getitem:
        return
    src, index = node.args
    if not (isinstance(index, tuple) and len(index) == 2 and index[0] is Ellipsis and isinstance(index[1], Node)):
        return
    val = index[1].meta.get("example_value", index[1].meta.get("val"))
    if not isinstance(val, torch.Tensor) or val.dim() != 1 or val.dtype not in (torch.int64, torch.int32):
        return  # boolean masks and multi-dim indices are not permutations
    with gm.graph.inserting_before(node):
        new = gm.graph.call_function(torch.index_select, (src, -1, index[1]))
    new.meta.update(node.meta)
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)
