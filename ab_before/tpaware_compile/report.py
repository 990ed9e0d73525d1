"""RewriteReport: one row per candidate MLP of a compiled graph, applied or skipped with the reason.

    import tpaware_compile.report as R
    print(R.last_report())          # tabulated; R.all_reports(), R.reports_json()
    print(R.last_reports().render())  # every graph so far (prefill and decode are two graphs)

Printed by the backend when ``TPAWARE_REPORT=1`` or ``options={"tpaware.report": True}``.
"""

import json
from dataclasses import asdict, dataclass, field
from typing import List, Optional, Tuple

import sympy
from tabulate import tabulate

M = sympy.Symbol("M", positive=True, integer=True)  # tokens per call (product of the activation's leading dims)
# Words that passes/lower.py puts in a first layer's lowering line, and what the kernels column then says
SWIGLU_FUSED = "fused SwiGLU"
PERM_FOLDED = "x[..., perm] folded into the call"
TILED = "tiled words"
_FIRST_LAYER_NOTES = ((SWIGLU_FUSED, "one fused SwiGLU kernel"), (PERM_FOLDED, "x[P1] folded into the call"),
                      (TILED, TILED))


@dataclass
class RewriteRow:
    mlp: str  # module path of the MLP, e.g. layers.0.mlp
    layers: str  # e.g. "gate, up, down"
    kind: str  # swiglu | gelu | mlp
    form: str  # N | L | U | T (already TP-aware)
    tp: int
    applied: bool = False
    reason: str = ""  # why skipped (empty when applied)
    collectives_removed: int = 0  # per call
    comm_removed: sympy.Expr = sympy.Integer(0)  # bytes received per rank per call, in terms of M
    kernels: str = ""  # what the first layers and the down projection run after the rewrite
    weights: str = ""  # "in place" (project modules converted) or "private copy"
    private_bytes: int = 0  # bytes of the private copy held by the compiled graph
    down_node: str = ""  # name of the down projection's node (to attach the lowering's kernel choice)
    col_nodes: Tuple[str, ...] = ()  # names of the first layers' nodes (the lowering may fuse them)

    @property
    def comm_at_m1(self) -> int:
        return int(self.comm_removed.subs(M, 1))

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(comm_removed=str(self.comm_removed), comm_at_m1=self.comm_at_m1)
        return d


@dataclass
class RewriteReport:
    graph: int  # index of the compiled graph in this process
    rows: List[RewriteRow] = field(default_factory=list)
    hand_off: str = ""  # what ran the graph after the passes: inductor | eager
    graph_module: Optional[object] = field(default=None, repr=False)  # with tpaware.keep_graph only
    example_inputs: Optional[list] = field(default=None, repr=False)

    @property
    def applied(self) -> List[RewriteRow]:
        return [r for r in self.rows if r.applied]

    @property
    def skipped(self) -> List[RewriteRow]:
        return [r for r in self.rows if not r.applied]

    def set_kernels(self, choices: List[str]) -> None:
        """Lowering lines ("node: kernel") -> the down part of each row's kernels column, by its down node; the
        first layers' part (e.g. "gate/up: sorted via x[P1]; ") stays, and says when they were fused and when
        their x[P1] is folded into the call."""
        by_node = dict(line.split(": ", 1) for line in choices if ": " in line)
        for r in self.rows:
            if r.down_node in by_node:
                first = r.kernels.split("down: ", 1)[0]
                lines = [by_node.get(n, "") for n in r.col_nodes]
                notes = [note for key, note in _FIRST_LAYER_NOTES if any(key in line for line in lines)]
                if first and notes:
                    first = first[:-2] + "".join(f", {note}" for note in notes) + "; "
                r.kernels = f"{first}down: {by_node[r.down_node]}"

    def table(self) -> str:
        head = ["mlp", "layers", "kind", "form", "TP", "status", "coll. removed", "bytes removed/call", "@M=1",
                "kernels", "weights"]
        body = [[r.mlp, r.layers, r.kind, r.form, r.tp, "applied" if r.applied else f"skipped: {r.reason}",
                 r.collectives_removed, str(r.comm_removed), r.comm_at_m1, r.kernels,
                 r.weights + (f" ({r.private_bytes} B)" if r.private_bytes else "")] for r in self.rows]
        hand_off = f" (then {self.hand_off})" if self.hand_off else ""
        return f"tpaware rewrite report, graph {self.graph}{hand_off}\n" + tabulate(body, head, tablefmt="github")

    __str__ = render = table

    def to_dict(self) -> dict:
        return {"graph": self.graph, "hand_off": self.hand_off, "rows": [r.to_dict() for r in self.rows]}


_REPORTS: List[RewriteReport] = []


def new_report() -> RewriteReport:
    _REPORTS.append(RewriteReport(graph=len(_REPORTS)))
    return _REPORTS[-1]


def last_report() -> Optional[RewriteReport]:
    return _REPORTS[-1] if _REPORTS else None


def all_reports() -> List[RewriteReport]:
    return list(_REPORTS)


class ReportSet(list):
    """Several graphs' reports (prefill and decode are two graphs), rendered or dumped together."""

    def render(self) -> str:
        return "\n\n".join(r.table() for r in self) if self else "tpaware: no graph compiled yet"

    def to_json(self) -> str:
        return json.dumps([r.to_dict() for r in self], indent=1)


def last_reports(n: Optional[int] = None) -> ReportSet:
    """The last ``n`` graphs' reports (default: every graph compiled in this process)."""
    return ReportSet(_REPORTS if n is None else _REPORTS[-n:])


def reports_json() -> str:
    return json.dumps([r.to_dict() for r in _REPORTS], indent=1)


def clear_reports() -> None:
    _REPORTS.clear()
