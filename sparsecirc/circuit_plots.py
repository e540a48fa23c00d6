"""Figure-1-style pictures of circuit graphs (matplotlib), and saving them as PNG and SVG.

The layout is a grid: token positions left to right, levels (input, layer 0, ...) bottom to
top. Attention edges are drawn from the key's node up to the query's node, one curve per head,
blue with width and opacity by attention weight (or one colour per head); residual edges are
thin grey verticals. No edge hides another: heads that share a (query, key) bend apart, an edge
that spans columns arcs up above the row, and even a weight near 0 keeps a visible minimum width and
opacity.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import networkx as nx
import torch
from matplotlib.patches import FancyArrowPatch

from .circuit import attention_edges, level_name

HEAD_COLOURS = plt.get_cmap("tab10").colors
MIN_WIDTH, MIN_ALPHA = 0.6, 0.25  # what an open edge with weight ~0 still gets
BEND, HEAD_SPREAD = 0.5, 0.2  # how far an edge arcs up (in columns), and the extra bend between heads on one edge


def edge_curvatures(n_heads: int, key: int, query: int) -> list[float]:
    """``arc3`` curvatures for ``n_heads`` curves on one (key -> query) edge. An edge that spans
    columns arcs upwards by about ``BEND`` columns whatever its length (a long layer-0 edge rises
    above the row instead of lying on it), and heads on the same edge bend apart."""
    span = abs(query - key)
    base = -min(0.3, BEND / span) if span else 0.0  # arc3: negative bends left of travel, i.e. up when going right
    if n_heads == 1:
        return [base]
    spread = HEAD_SPREAD / max(1.0, span / 2)
    return [base + spread * (i - (n_heads - 1) / 2) for i in range(n_heads)]


def _draw_edge(ax, start, end, curvature: float, colour, strength: float) -> None:
    ax.add_patch(FancyArrowPatch(start, end, connectionstyle=f"arc3,rad={curvature:.3f}", arrowstyle="-",
                                 color=colour, lw=MIN_WIDTH + 2.6 * strength,
                                 alpha=MIN_ALPHA + (1 - MIN_ALPHA) * strength, zorder=2, shrinkA=0, shrinkB=0))


def plot_circuit(graph: nx.DiGraph, ax=None, color_by: str = "weight", title: str | None = None,
                 position_labels: list[str] | None = None):
    """Draw one circuit graph on ``ax`` (a new figure if None); returns the axes.

    Every head on an edge is its own curve. ``color_by``: ``"weight"`` (blue) or ``"head"`` (the
    head's colour, with a legend); width and opacity grow with that head's attention weight.
    """
    if color_by not in ("weight", "head"):
        raise ValueError(f"color_by must be 'weight' or 'head', got {color_by!r}")
    n_layers, seq_len = graph.graph["n_layers"], graph.graph["seq_len"]
    if ax is None:
        _, ax = plt.subplots(figsize=(0.75 * seq_len + 1.5, 0.9 * n_layers + 1.6))
    for (level, position), (_, target), data in graph.edges(data=True):
        if data["residual"]:
            ax.plot([position, target], [level, level + 1], color="0.8", lw=0.8, zorder=1)
    for (level, key), (_, query), data in attention_edges(graph):
        heads = sorted(data["heads"].items())
        for (head, weight), curvature in zip(heads, edge_curvatures(len(heads), key, query)):
            colour = "tab:blue" if color_by == "weight" else HEAD_COLOURS[head % len(HEAD_COLOURS)]
            _draw_edge(ax, (key, level), (query, level + 1), curvature, colour, min(1.0, max(0.0, weight)))
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
    first = next(iter(graphs.values()))
    n_layers, seq_len = first.graph["n_layers"], first.graph["seq_len"]
    for name, graph in graphs.items():
        if (graph.graph["n_layers"], graph.graph["seq_len"]) != (n_layers, seq_len):
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
    layouts = {(g.graph["n_layers"], g.graph["seq_len"]) for graphs in rows.values() for g in graphs.values()}
    if len(layouts) != 1:
        raise ValueError(f"all graphs must share one layout (layers, positions), got {sorted(layouts)}")
    n_layers, seq_len = layouts.pop()
    fig, axes = plt.subplots(len(rows), len(problems), squeeze=False,
                             figsize=((0.62 * seq_len + 1.0) * len(problems) + (1.2 if color_by == "head" else 0),
                                      (0.9 * n_layers + 1.6) * len(rows)))
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
    n_layers, n_heads = frequency.shape[:2]
    fig, axes = plt.subplots(n_layers, n_heads, figsize=(2.4 * n_heads + 0.8, 2.4 * n_layers), squeeze=False)
    for layer in range(n_layers):
        for head in range(n_heads):
            ax = axes[layer, head]
            image = ax.imshow(frequency[layer, head].numpy(), cmap="Blues", vmin=0, vmax=1)
            opened = int((frequency[layer, head] > 0).sum())
            ax.set_title(f"L{layer} H{head} ({opened} ever open)", fontsize=8)
            ax.set_xticks(range(len(position_labels)), position_labels if layer == n_layers - 1 else [],
                          rotation=90, fontsize=6)
            ax.set_yticks(range(len(position_labels)), position_labels if head == 0 else [], fontsize=6)
    fig.colorbar(image, ax=axes, shrink=0.6, label="fraction of inputs with the edge open")
    fig.suptitle(title or "How often each edge is open (rows = query, columns = key)")
    return fig


def save_figure(fig, folder: str | Path, name: str, overwrite: bool = False) -> list[Path]:
    """Write ``fig`` as ``<folder>/<name>.png`` and ``.svg``. Existing files are kept unless
    ``overwrite=True``: then a ``FileExistsError`` says which."""
    folder = Path(folder)
    paths = [folder / f"{name}.png", folder / f"{name}.svg"]
    existing = [str(p) for p in paths if p.exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{existing} already exist; pass overwrite=True to replace them")
    folder.mkdir(parents=True, exist_ok=True)
    fig.savefig(paths[0], dpi=150, bbox_inches="tight")
    with plt.rc_context({"svg.hashsalt": "sparsecirc"}):  # fixed ids and no date: reruns give the same file
        fig.savefig(paths[1], bbox_inches="tight", metadata={"Date": None})
    return paths
