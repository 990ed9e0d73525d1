"""The registered backend: ``torch.compile(model, backend="tpaware", options={...})``.

Backend keys (all start with ``tpaware.``; the rest of ``options`` are Inductor config, e.g. ``triton.cudagraphs``):

    tpaware.hand_off    "inductor" (default) or "eager": what runs the graph after our passes (a graph that
                        converted project modules in place runs eagerly once: Dynamo retraces it in form T)
    tpaware.report      print the rewrite report of each graph (also: TPAWARE_REPORT=1)
    tpaware.timeout_s   bound on every compile-time collective (default 300)
    tpaware.probe_rtol  tolerance of the old-vs-new probe check (default 1e-4); tpaware.probe_seed its input
    tpaware.allow_group_offset  shards may share a boundary group (default True; False skips such MLPs)
    tpaware.lower       passes/lower.py mode: "auto" (default), "always" or "never"
    tpaware.fuse_swiglu lower silu(gate) * up on two sorted-group matmuls to one fused kernel (default True)
    tpaware.tile_weights  hold the rewritten MLPs' sorted-group weights in the tiled layout the Hopper kernels read
                        fastest (layout.py): "auto" (default: when the weights are on an sm_90 GPU and the
                        lowering is on), True or False. In place, like the rewrite: no second copy
    tpaware.fold_perm   when x is a graph input, the first layers' calls take x and P1 instead of x[..., P1]
                        (default False: on an H100 the MLP was as fast or faster with Inductor's gather,
                        bench/README.md; a computed x always keeps the gather, fused into its producer)
    tpaware.fail_rank   failure injection for tests: that rank raises during the exchange
    tpaware.keep_graph  keep the rewritten graph and its inputs on the report (tests, debugging; holds memory)
"""

import os
import weakref
from typing import Callable, List, Tuple

import torch
from torch.fx import GraphModule

from . import report as _report
from .layout import pays_on
from .passes.owners import caller_scope
from .passes.rewrite import RewriteOptions, rewrite_graph

_PREFIX = "tpaware."
_REWRITE_KEYS = {"timeout_s", "probe_rtol", "probe_seed", "allow_group_offset", "fail_rank"}


def tpaware(gm: GraphModule, example_inputs: List, options=None, mode=None, **_) -> Callable:
    ours, inductor = _split_options(options or {})
    rewrite_opts = RewriteOptions(**{k: v for k, v in ours.items() if k in _REWRITE_KEYS})
    rewrite_opts.tile_weights = _tile_weights(ours.get("tile_weights", "auto"), ours.get("lower", "auto"),
                                              example_inputs)
    original = _copy(gm)  # before surgery: rewritten again for each other module instance that reuses the graph

    def compile_for(example_inputs, scope=None) -> Tuple[Callable, List[int]]:
        """(the callable for one module instance, the weight inputs its rewrite retired: none if not rewritten)"""
        gm = _copy(original)
        rep = _report.new_report()
        pending = rewrite_graph(gm, example_inputs, rewrite_opts, rep, scope)
        fn = _finish(gm, example_inputs, ours, inductor, mode, rep, pending)
        return (fn, _retired_inputs(gm, example_inputs)) if rep.applied else (fn, [])

    fn, retired = compile_for(example_inputs)
    if not retired:
        return fn
    return _per_instance(fn, example_inputs, retired, original, compile_for)


def _finish(gm, example_inputs, ours, inductor, mode, rep, pending) -> Callable:
    _lower(gm, rep, ours.get("lower", "auto"), ours.get("fuse_swiglu", True), ours.get("fold_perm", False))
    if ours.get("keep_graph"):
        rep.graph_module, rep.example_inputs = gm, list(example_inputs)
    rep.hand_off = _choose_hand_off(ours.get("hand_off", "inductor"), rep)
    if ours.get("report") or os.environ.get("TPAWARE_REPORT") == "1":
        print(rep.table(), flush=True)
    if not pending:
        return _hand_off(gm, example_inputs, rep.hand_off, inductor, mode)
    gm, example_inputs, keep = _drop_unused_inputs(gm, example_inputs)
    return _select(_hand_off(gm, example_inputs, rep.hand_off, inductor, mode), keep, pending)


def _copy(gm: GraphModule) -> GraphModule:
    graph = torch.fx.Graph()
    graph.output(graph.graph_copy(gm.graph, {}))
    return GraphModule(gm, graph)


def _retired_inputs(gm: GraphModule, example_inputs) -> List[int]:
    """Indices of the weight inputs the rewritten graph no longer reads (it holds their new layout instead)."""
    phs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    return [i for i, n in enumerate(phs) if not n.users and isinstance(example_inputs[i], torch.Tensor)]


def _per_instance(fn: Callable, example_inputs, retired: List[int], original: GraphModule,
                  compile_for: Callable) -> Callable:
    """The rewritten graph holds one module instance's weights in their new layout, and Dynamo shares a graph
    between instances of one code with equal shapes (e.g. every block of a model compiled block by block). A
    call whose weight inputs are not the tensors a rewrite was made from comes from another instance: rewrite
    the original graph again for it, on its first call (all ranks call it together), with the calling frame's
    modules so that ours are converted in place; their next call retraces in form T."""
    instances = [(_weak(example_inputs, retired), _unboxed(fn))]
    placeholders = [n for n in original.graph.nodes if n.op == "placeholder"]

    def run(*args):
        for refs, call in instances:
            if all(ref() is args[i] for i, ref in refs):
                return call(*args)
        scope = caller_scope(placeholders, args, retired)
        fn, mine = compile_for(list(args), scope)
        instances.append((_weak(args, mine or retired), _unboxed(fn)))
        return instances[-1][1](*args)

    return run


def _unboxed(fn: Callable) -> Callable:
    """Our wrapper is called with one argument per input; an Inductor callable may take them as one list."""
    return (lambda *args: fn(list(args))) if getattr(fn, "_boxed_call", False) else fn


def _weak(inputs, indices: List[int]):
    """(index, weak reference) per weight input: identifies an instance without keeping its old tensors alive."""
    return [(i, weakref.ref(inputs[i])) for i in indices]


def _choose_hand_off(how: str, rep) -> str:
    # Converting our modules to form T fails Dynamo's guards (the MLP's ``form``): such a graph runs once and is
    # retraced in form T, so compiling it with Inductor would be wasted time.
    return "eager" if any(r.weights == "in place" for r in rep.applied) else how


def _tile_weights(choice, lower: str, example_inputs) -> bool:
    if choice not in ("auto", True, False):
        raise ValueError(f"tpaware.tile_weights must be 'auto', True or False, got {choice!r}")
    if choice != "auto":
        return choice
    devices = {v.device for v in example_inputs if isinstance(v, torch.Tensor)}
    return lower != "never" and any(pays_on(d) for d in devices)


def _split_options(options: dict):
    known = _REWRITE_KEYS | {"hand_off", "report", "lower", "fuse_swiglu", "fold_perm", "keep_graph",
                             "tile_weights"}
    unknown = [k for k in options if k.startswith(_PREFIX) and k[len(_PREFIX):] not in known]
    if unknown:
        raise ValueError(f"tpaware: unknown backend options {unknown}")
    ours = {k[len(_PREFIX):]: v for k, v in options.items() if k.startswith(_PREFIX)}
    return ours, {k: v for k, v in options.items() if not k.startswith(_PREFIX)}


def _lower(gm: GraphModule, rep, mode: str, fuse_swiglu: bool, fold_perm: bool) -> None:
    """passes/lower.py swaps gptq_mm calls for the Triton ops and returns one "node: kernel" line per call,
    which the report keeps."""
    from .passes.lower import lower_gptq_mm

    rep.set_kernels(lower_gptq_mm(gm, mode, fuse_swiglu, fold_perm))


def _hand_off(gm: GraphModule, example_inputs, how: str, inductor: dict, mode) -> Callable:
    if how == "eager":
        return gm.forward
    if how != "inductor":
        raise ValueError(f"tpaware.hand_off must be 'inductor' or 'eager', got {how!r}")
    from torch._inductor.compile_fx import compile_fx

    patches = dict(torch._inductor.list_mode_options(mode)) if mode else {}
    patches.update(inductor)
    # A fresh GraphModule: Inductor looks up Dynamo's parameter sources by module, and our constants have none.
    return compile_fx(GraphModule(gm, gm.graph), example_inputs, config_patches=patches)


def _drop_unused_inputs(gm: GraphModule, example_inputs):
    """The old weights are no longer read by the rewritten graph; their modules may now hold other shapes or
    None (converted in place), so stop passing them instead of making Inductor guard on them. Works on a copy:
    Dynamo decides what to pass from its own graph's placeholders."""
    retired = set(_retired_inputs(gm, example_inputs))
    copy = _copy(gm)
    phs = [n for n in copy.graph.nodes if n.op == "placeholder"]
    for i in retired:
        copy.graph.erase_node(phs[i])
    copy.graph.lint()
    copy.recompile()
    keep = [i for i in range(len(phs)) if i not in retired]
    return copy, [example_inputs[i] for i in keep], keep


def _select(fn: Callable, keep: List[int], pending: List[Callable]) -> Callable:
    """Call ``fn`` on the inputs it still reads. On the first call, first convert the project's modules in place:
    not earlier, since Dynamo builds its guards from the modules as traced after the backend returns (the
    conversion then fails them once, and the retrace finds form T with nothing left to rewrite)."""

    def convert_once():
        while pending:
            pending.pop(0)()

    # Dynamo calls compiled graphs with one argument per input (Inductor's aot forward too, whatever its
    # copied _boxed_call attribute says), so the wrapper is unboxed.
    def run(*args):
        convert_once()
        return fn(*[args[i] for i in keep])

    return run
