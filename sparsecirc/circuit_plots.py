"""Figure-1-style pictures of circuit graphs (matplotlib), and saving them as PNG and SVG.

The layout is a grid: token positions left to right, levels (input, layer 0, ...) bottom to
top. Attention edges are drawn from the key's node up to the query's node, one curve per head,
blue with width and opacity by attention weight (or one colour per head); residual edges are
thin grey verticals. No edge hides another: each curve leaves its key straight up, runs across
in its query's lane (in each layer, every query that reads something has its own height) and
comes straight up into the query, so the curves that leave one key part at once and those that feed one query join only
at its end; heads that share a (query, key) run apart; and even a weight near 0 keeps a visible
minimum width and opacity.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import networkx as nx
import torch
from matplotlib.patches import PathPatch
from matplotlib.path import Path as CurvePath

from .circuit import attention_edges, check_graph, level_name
from .files import write_atomically
from .plots import plot_head_grid

HEAD_COLOURS = plt.get_cmap("tab10").colors
MIN_WIDTH, MIN_ALPHA = 0.6, 0.25  # what an open edge with weight ~0 still gets
HEAD_SPREAD = 0.12  # how far apart (in levels, or columns on a vertical edge) the curves of one edge's heads run


def query_lanes(queries) -> dict[int, float]:
    """The lane (height, as a fraction of a level) of each query position that receives
    attention in one layer: spread evenly over the level by position, so that neighbouring
    answer slots, which layer 0 often feeds together, still run far apart."""
    ordered = sorted(set(queries))
    if len(ordered) == 1:
        return {ordered[0]: 0.5}
    return {query: 0.2 + 0.6 * rank / (len(ordered) - 1) for rank, query in enumerate(ordered)}


def edge_curves(n_heads: int, lane: float, vertical: bool) -> list[tuple[float, float]]:
    """``(height, bow)`` of each of ``n_heads`` curves on one edge that runs in ``lane``: heads
    on one edge run ``HEAD_SPREAD / 2`` apart in height, and on a ``vertical`` edge (a position
    reading itself) they bow sideways apart."""
    offsets = [i - (n_heads - 1) / 2 for i in range(n_heads)]
    return [(lane + HEAD_SPREAD / 2 * o, 2 * HEAD_SPREAD * o if vertical else 0.0) for o in offsets]


def _draw_edge(ax, start, end, height: float, bow: float, colour, strength: float) -> None:
    """A cubic curve from ``start`` up to ``end``: it leaves the key straight up, runs across at
    ``height`` of the level and comes straight up into the query."""
    (x0, y0), (x1, y1) = start, end
    if x1 == x0 and bow == 0:
        path = CurvePath([start, end], [CurvePath.MOVETO, CurvePath.LINETO])
    else:
        middle = y0 + height * (y1 - y0)
        path = CurvePath([(x0, y0), (x0 + bow, middle), (x1 + bow, middle), (x1, y1)],
                         [CurvePath.MOVETO, CurvePath.CURVE4, CurvePath.CURVE4, CurvePath.CURVE4])
    ax.add_patch(PathPatch(path, facecolor="none", edgecolor=colour, lw=MIN_WIDTH + 2.6 * strength,
                           alpha=MIN_ALPHA + (1 - MIN_ALPHA) * strength, zorder=2, capstyle="round"))


def plot_circuit(graph: nx.DiGraph, ax=None, color_by: str = "weight", title: str | None = None,
                 position_labels: list[str] | None = None):
    """Draw one circuit graph on ``ax`` (a new figure if None); returns the axes.

    Every head on an edge is its own curve. ``color_by``: ``"weight"`` (blue) or ``"head"`` (the
    head's colour, with a legend); width and opacity grow with that head's attention weight.
    """
    if color_by not in ("weight", "head"):
        raise ValueError(f"color_by must be 'weight' or 'head', got {color_by!r}")
    n_layers, seq_len = check_graph(graph).graph["n_layers"], graph.graph["seq_len"]
    if ax is None:
        _, ax = plt.subplots(figsize=(0.75 * seq_len + 1.5, 0.9 * n_layers + 1.6))
    for (level, position), (_, target), data in graph.edges(data=True):
        if data["residual"]:
            ax.plot([position, target], [level, level + 1], color="0.8", lw=0.8, zorder=1)
    edges = attention_edges(graph)
    lanes = {level: query_lanes(q for (l, _), (_, q), _ in edges if l == level) for level in range(n_layers)}
    for (level, key), (_, query), data in edges:
        heads = sorted(data["heads"].items())
        for (head, weight), (height, bow) in zip(heads, edge_curves(len(heads), lanes[level][query], key == query)):
            colour = "tab:blue" if color_by == "weight" else HEAD_COLOURS[head % len(HEAD_COLOURS)]
            _draw_edge(ax, (key, level), (query, level + 1), height, bow, colour, min(1.0, max(0.0, weight)))
    nodes = list(graph.nodes)
    ax.scatter([p for _, p in nodes], [l for l, _ in nodes], s=18, color="0.3", zorder=3)
    for (level, position), data in graph.nodes(data=True):
        if level == 0 and data["label"]:
            ax.text(position, -0.35, data["label"], ha="center", va="top", fontsize=11, family="monospace")
        elif level == n_layers and data["label"]:
            ax.text(position, n_layers + 0.3, data["label"], ha="center", va="bottom", fontsize=11,
                    family="monospace", color="tab:green")
    if color_by == "head":
        heads = sorted({h for _, _, d in attention_edges(graph) for h in d["heads"]})
        for head in heads:
            ax.plot([], [], color=HEAD_COLOURS[head % len(HEAD_COLOURS)], lw=2, label=f"head {head}")
        if heads:
            ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8, frameon=False)
    ax.set_xticks(range(seq_len), position_labels or [""] * seq_len, fontsize=7, color="0.4")
    ax.tick_params(axis="x", length=0, pad=22)
    ax.set_yticks(range(n_layers + 1), [level_name(level) for level in range(n_layers + 1)], fontsize=8)
    ax.set_xlim(-0.6, seq_len - 0.4)
    ax.set_ylim(-0.9, n_layers + 0.8)
    for side in ("top", "right", "bottom"):
        ax.spines[side].set_visible(False)
    n_attention = sum(len(d["heads"]) for _, _, d in attention_edges(graph))
    ax.set_title(f"{title or ''}  ({n_attention} attention edges)".strip(), fontsize=10)
    return ax


def plot_circuits(graphs: dict[str, nx.DiGraph], color_by: str = "weight", position_labels: list[str] | None = None,
                  suptitle: str | None = None):
    """Panels stacked top to bottom on the same layout, one per ``{title: graph}`` (e.g. Base and
    Sparse, as in the paper's Figure 1). Returns the figure."""
    if not graphs:
        raise ValueError("need at least one graph to plot")
    first = check_graph(next(iter(graphs.values())))
    n_layers, seq_len = first.graph["n_layers"], first.graph["seq_len"]
    for name, graph in graphs.items():
        if (check_graph(graph).graph["n_layers"], graph.graph["seq_len"]) != (n_layers, seq_len):
            raise ValueError(f"graph {name!r} has another layout than the first; panels must share one")
    width = 0.75 * seq_len + (2.6 if color_by == "head" else 1.5)
    fig, axes = plt.subplots(len(graphs), 1, figsize=(width, (0.9 * n_layers + 1.6) * len(graphs)), squeeze=False)
    for ax, (name, graph) in zip(axes[:, 0], graphs.items()):
        plot_circuit(graph, ax, color_by=color_by, title=name, position_labels=position_labels)
    if suptitle:
        fig.suptitle(suptitle)
    fig.tight_layout()
    return fig


def plot_figure1(rows: dict[str, dict[str, nx.DiGraph]], color_by: str = "weight",
                 position_labels: list[str] | None = None, suptitle: str | None = None):
    """The paper's Figure 1 layout: one column per problem, one row per model, every panel on the
    same axes. ``rows``: ``{model name: {problem: graph}}``, e.g. ``{"Dense": {...}, "Sparse": {...}}``
    with the same problems in the same order. Returns the figure."""
    if not rows or not all(rows.values()):
        raise ValueError("need at least one model with at least one problem")
    problems = list(next(iter(rows.values())))
    for name, graphs in rows.items():
        if list(graphs) != problems:
            raise ValueError(f"row {name!r} has problems {list(graphs)}, the first row {problems}: they must match")
    layouts = {(check_graph(g).graph["n_layers"], g.graph["seq_len"]) for graphs in rows.values() for g in graphs.values()}
    if len(layouts) != 1:
        raise ValueError(f"all graphs must share one layout (layers, positions), got {sorted(layouts)}")
    n_layers, seq_len = layouts.pop()
    fig, axes = plt.subplots(len(rows), len(problems), squeeze=False,
                             figsize=((0.62 * seq_len + 1.0) * len(problems) + (1.2 if color_by == "head" else 0),
                                      (1.1 * n_layers + 1.6) * len(rows)))
    for row, (name, graphs) in enumerate(rows.items()):
        for column, (problem, graph) in enumerate(graphs.items()):
            ax = axes[row, column]
            plot_circuit(graph, ax, color_by=color_by, title=f"{name}: {problem}", position_labels=position_labels)
            if column > 0:
                ax.set_yticklabels([])
            if color_by == "head" and column < len(problems) - 1 and ax.get_legend():
                ax.get_legend().remove()
    if suptitle:
        fig.suptitle(suptitle)
    fig.tight_layout()
    return fig


def plot_edge_frequency(frequency: torch.Tensor, position_labels: list[str], title: str | None = None):
    """Heat maps of how often each edge is open, one panel per (layer, head): rows are queries,
    columns keys. ``frequency``: ``[layer, head, query, key]`` in [0, 1]."""
    fig, axes = plot_head_grid(frequency, position_labels, title or "How often each edge is open",
                               "fraction of inputs with the edge open")
    for (layer, head), ax in zip(((l, h) for l in range(axes.shape[0]) for h in range(axes.shape[1])), axes.flat):
        ax.set_title(f"layer {layer}, head {head}: {int((frequency[layer, head] > 0).sum())} ever open", fontsize=8)
    return fig


def save_figure(fig, folder: str | Path, name: str, overwrite: bool = False) -> list[Path]:
    """Write ``fig`` as ``<folder>/<name>.png`` and ``.svg``. Existing files are kept unless
    ``overwrite=True``: then a ``FileExistsError`` says which."""
    folder = Path(folder)
    paths = [folder / f"{name}.png", folder / f"{name}.svg"]
    existing = [str(p) for p in paths if p.exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{existing} already exist; pass overwrite=True to replace them")
    write_atomically(paths[0], lambda file: fig.savefig(file, format="png", dpi=150, bbox_inches="tight"),
                     overwrite=overwrite)
    with plt.rc_context({"svg.hashsalt": "sparsecirc"}):  # fixed ids and no date: reruns give the same file
        write_atomically(paths[1], lambda file: fig.savefig(file, format="svg", bbox_inches="tight",
                                                            metadata={"Date": None}), overwrite=overwrite)
    return paths
