"""Explore one problem: the dense and the sparse circuit side by side, both models' answers, and
the sparse circuit with edges of your choice closed.

:func:`explore` computes what is shown, as a plain :class:`ExplorerView` a test can check;
:class:`Explorer` puts it behind ipywidgets (a problem box, a few examples, one tick box per open
edge of the sparse circuit: tick it to close the edge). Displayed, it is the live widget in
Jupyter, and a still picture of its current output where no kernel runs (GitHub).
"""

from __future__ import annotations

import base64
import html
import io
from dataclasses import dataclass

import networkx as nx

from .circuit import attention_edges, circuit_graph
from .circuit_plots import plot_circuits
from .data import AdditionTask
from .evaluation import check_task
from .sparse_attention import Edge, gate_bias_of, mask_closing

EXAMPLES = {2: ["53+21", "36+28", "43+59", "99+99", "50+50", "0+0"],
            3: ["123+456", "358+127", "999+1", "550+450", "0+0"]}


def graph_edges(graph: nx.DiGraph) -> set[Edge]:
    """Every (layer, head, query, key) drawn in a circuit graph."""
    return {Edge(level, head, query, key)
            for (level, key), (_, query), data in attention_edges(graph) for head in data["heads"]}


def edge_name(edge: Edge, labels: list[str]) -> str:
    """``"L0 H1  s2 <- a1"``."""
    return f"L{edge.layer} H{edge.head}  {labels[edge.query]} <- {labels[edge.key]}"


@dataclass(frozen=True)
class ExplorerView:
    """What the explorer shows for one problem.

    ``open_edges``: the sparse model's own open edges on this problem, before anything is
    closed; ``closed``: the ones closed on top; ``sparse_graph`` is drawn with them closed, and
    ``sparse_answer`` is the answer it gives then (``sparse_answer_intact`` with nothing closed).
    """

    problem: str
    true_answer: str
    dense_answer: str
    sparse_answer_intact: str
    sparse_answer: str
    open_edges: tuple[Edge, ...]
    closed: tuple[Edge, ...]
    dense_graph: nx.DiGraph
    sparse_graph: nx.DiGraph

    @property
    def drawn_edges(self) -> set[Edge]:
        """The edges of the sparse panel: the open ones minus the closed ones (a closed edge can
        also shift what later layers open, so this is read off the gated run itself)."""
        return graph_edges(self.sparse_graph)

    def summary(self) -> str:
        """The answers, one line each, marked right or wrong."""
        def mark(answer):
            return "right" if answer == self.true_answer else "WRONG"
        lines = [f"{self.problem} = {self.true_answer}",
                 f"dense model  : {self.dense_answer} ({mark(self.dense_answer)}), "
                 f"{len(graph_edges(self.dense_graph))} edges",
                 f"sparse model : {self.sparse_answer_intact} ({mark(self.sparse_answer_intact)}), "
                 f"{len(self.open_edges)} open edges"]
        if self.closed:
            lines.append(f"sparse, {len(self.closed)} closed: {self.sparse_answer} ({mark(self.sparse_answer)}), "
                         f"{len(self.drawn_edges)} edges left")
        return "\n".join(lines)

    def figure(self, position_labels: list[str] | None = None):
        """Dense above, sparse (with the closed edges gone) below, one colour per head."""
        closed = f", {len(self.closed)} closed" if self.closed else ""
        return plot_circuits({f"Dense: answers {self.dense_answer}": self.dense_graph,
                              f"Sparse{closed}: answers {self.sparse_answer}": self.sparse_graph},
                             color_by="head", position_labels=position_labels,
                             suptitle=f"{self.problem} = {self.true_answer}")


def check_closed(closed) -> tuple[Edge, ...]:
    """``closed`` as sorted ``Edge``s, checked: a list (tuple, set) of ``Edge``s or ``(layer,
    head, query, key)`` tuples of ints."""
    allowed = "a list of edges, Edge(layer, head, query, key) or 4-tuples of ints"
    if not isinstance(closed, (list, tuple, set, frozenset)):
        raise ValueError(f"closed must be {allowed}; got {type(closed).__name__} {closed!r:.40}")
    for edge in closed:
        if not isinstance(edge, Edge) and not (isinstance(edge, (tuple, list)) and len(edge) == 4):
            raise ValueError(f"closed must be {allowed}; it holds {edge!r}")
    return tuple(sorted({edge if isinstance(edge, Edge) else Edge(*edge) for edge in closed}))


def explore(dense, sparse, task: AdditionTask, problem: str, closed=()) -> ExplorerView:
    """The view of ``problem`` (e.g. ``"36+28"``) through the dense model and through the sparse
    one with its own gates, the edges ``closed`` (``Edge``s open on this problem) shut.

    Raises ``ValueError`` for a problem the task does not accept, a ``dense`` model that has
    gates, a ``sparse`` one that has none, or a closed edge that is not open on this problem.
    """
    closed = check_closed(closed)
    check_task(dense, task)
    check_task(sparse, task)
    if gate_bias_of(dense) is not None:
        raise ValueError("dense must be a model without gates (the base model); got a sparse model")
    if gate_bias_of(sparse) is None:
        raise ValueError("sparse must be a sparse model (loaded from a sparse checkpoint); got a dense one")
    a, b = task.parse(problem)
    intact = circuit_graph(sparse, task, problem)
    open_edges = tuple(sorted(graph_edges(intact)))
    not_open = [edge for edge in closed if edge not in open_edges]
    if not_open:
        raise ValueError(f"can only close edges open on {problem}: {not_open} are not; open are {list(open_edges)}")
    gated = circuit_graph(sparse, task, problem, edge_mask=mask_closing(sparse, closed)) if closed else intact
    dense_graph = circuit_graph(dense, task, problem)
    return ExplorerView(problem=task.format_problem(a, b), true_answer=task.answer(a, b),
                        dense_answer=dense_graph.graph["predicted"], sparse_answer_intact=intact.graph["predicted"],
                        sparse_answer=gated.graph["predicted"], open_edges=open_edges, closed=closed,
                        dense_graph=dense_graph, sparse_graph=gated)


class Explorer:
    """The live explorer: ``Explorer(base, sparse, task)`` as the last line of a notebook cell.

    ``problem`` (a ``Text``) and ``examples`` (a ``Dropdown``) choose the problem; ``edge_boxes``
    maps each open edge of the sparse circuit to a ``Checkbox`` (ticked: closed). Set their
    ``value`` from code and :attr:`view` follows; :attr:`message` holds the text shown, an
    error included.
    """

    def __init__(self, dense, sparse, task: AdditionTask, problem: str = "36+28"):
        import ipywidgets as widgets

        if not isinstance(problem, str):
            raise ValueError(f"problem must be a string like '36+28', got {type(problem).__name__} {problem!r}")
        check_task(dense, task)
        check_task(sparse, task)
        self.dense, self.sparse, self.task = dense, sparse, task
        self.labels = task.position_labels
        self.view: ExplorerView | None = None
        self.message = ""
        self.edge_boxes: dict[Edge, widgets.Checkbox] = {}
        examples = EXAMPLES.get(task.operand_digits, [])
        self.problem = widgets.Text(value=problem, description="problem", continuous_update=False)
        self.examples = widgets.Dropdown(options=["(pick one)"] + examples, description="or pick")
        self.answers = widgets.HTML()
        self.boxes = widgets.VBox(layout=widgets.Layout(width="220px"))
        self.picture = widgets.Output()
        self.widget = widgets.VBox([widgets.HBox([self.problem, self.examples]), self.answers,
                                    widgets.HBox([self.boxes, self.picture])])
        self.problem.observe(lambda change: self._new_problem(), names="value")
        self.examples.observe(self._pick, names="value")
        self._new_problem()

    def _pick(self, change) -> None:
        if change["new"] != "(pick one)":
            self.problem.value = change["new"]

    def _new_problem(self) -> None:
        import ipywidgets as widgets

        for box in self.edge_boxes.values():
            box.unobserve_all()
        self.edge_boxes = {}
        try:
            intact = explore(self.dense, self.sparse, self.task, self.problem.value)
        except ValueError as error:
            self._show_error(error)
            return
        self.edge_boxes = {edge: widgets.Checkbox(value=False, description=edge_name(edge, self.labels), indent=False)
                           for edge in intact.open_edges}
        for box in self.edge_boxes.values():
            box.observe(lambda change: self.refresh(), names="value")
        self.boxes.children = [widgets.HTML("<b>tick to close</b>")] + list(self.edge_boxes.values())
        self.refresh(intact)

    def closed_edges(self) -> list[Edge]:
        return [edge for edge, box in self.edge_boxes.items() if box.value]

    def refresh(self, view: ExplorerView | None = None) -> None:
        """Recompute the view from the widgets' values and redraw."""
        import matplotlib.pyplot as plt
        from IPython.display import display

        try:
            self.view = view or explore(self.dense, self.sparse, self.task, self.problem.value, self.closed_edges())
        except ValueError as error:
            self._show_error(error)
            return
        self.message = self.view.summary()
        self.answers.value = f"<pre>{html.escape(self.message)}</pre>"
        figure = self.view.figure(self.labels)
        self.picture.clear_output(wait=True)
        with self.picture:
            display(figure)
        plt.close(figure)

    def _show_error(self, error: ValueError) -> None:
        self.view = None
        self.message = str(error)
        self.answers.value = f"<pre style='color: #b00'>{html.escape(self.message)}</pre>"
        self.boxes.children = []
        self.picture.clear_output()

    def _repr_mimebundle_(self, include=None, exclude=None) -> dict:
        """The live widget where a kernel runs it (JupyterLab, VS Code), and a PNG of what it
        shows now for pages rendered without one (GitHub, nbviewer), which skip the widget."""
        import matplotlib.pyplot as plt

        bundle = dict(self.widget._repr_mimebundle_() or {})
        bundle["text/plain"] = f"Explorer\n{self.message}"
        if self.view is not None:
            figure = self.view.figure(self.labels)
            buffer = io.BytesIO()
            figure.savefig(buffer, format="png", dpi=60, bbox_inches="tight")
            plt.close(figure)
            bundle["image/png"] = base64.b64encode(buffer.getvalue()).decode("ascii")
        return bundle
