"""Circuit graphs: which positions read which, layer by layer, as a networkx ``DiGraph``.

Nodes are ``(level, position)``: level 0 is the input (token plus position embedding), level
``l + 1`` the residual stream after layer ``l``. An open attention edge in layer ``l`` from
query ``i`` to key ``j`` becomes a graph edge ``(l, j) -> (l + 1, i)``: information flows from
the key's position up to the query's. Every ``(l, p) -> (l + 1, p)`` is also a residual edge.

Edge attributes: ``residual`` (bool), ``heads`` (``{head: attention weight}``, empty for a pure
residual edge) and ``weight`` (the sum over heads). A query attending to its own position gives
an edge that is both residual and attention. Graph attributes: ``problem``, ``predicted``,
``n_layers``, ``seq_len``, ``answer_positions``, ``gated``.
"""

from __future__ import annotations


import networkx as nx
import torch

from .data import VOCAB, AdditionTask
from .checks import as_int
from .evaluation import check_task
from .sparse_attention import analysis_run, attention_shape, batch_slices


def level_name(level: int) -> str:
    """``0 -> "input"``, ``l + 1 -> "layer l"``."""
    return "input" if level == 0 else f"layer {level - 1}"


def build_circuit_graph(weights: torch.Tensor, open_mask: torch.Tensor, input_labels: list[str],
                        output_labels: list[str], answer_positions: list[int], **graph_attributes) -> nx.DiGraph:
    """The graph of one input from its attention.

    ``weights``: ``[layer, head, query, key]`` attention used (pattern times gate);
    ``open_mask``: same shape, nonzero where the edge is open (causal pairs only);
    ``input_labels``/``output_labels``: one label per position for the bottom and top rows.
    """
    if weights.ndim != 4 or weights.shape != open_mask.shape or weights.shape[-1] != weights.shape[-2]:
        raise ValueError(f"weights and open_mask must both be [layer, head, query, key], "
                         f"got {list(weights.shape)} and {list(open_mask.shape)}")
    n_layers, _, seq_len, _ = weights.shape
    if len(input_labels) != seq_len or len(output_labels) != seq_len:
        raise ValueError(f"need {seq_len} input and output labels, got {len(input_labels)} and {len(output_labels)}")
    graph = nx.DiGraph(n_layers=n_layers, seq_len=seq_len, answer_positions=list(answer_positions),
                       **graph_attributes)
    for level in range(n_layers + 1):
        for position in range(seq_len):
            label = input_labels[position] if level == 0 else output_labels[position] if level == n_layers else ""
            graph.add_node((level, position), level=level, position=position, label=label)
    for level in range(n_layers):
        for position in range(seq_len):
            graph.add_edge((level, position), (level + 1, position), residual=True, heads={}, weight=0.0)
    for layer, head, query, key in (open_mask != 0).nonzero().tolist():
        if key > query:
            raise ValueError(f"open_mask has a non-causal edge: layer {layer} head {head} query {query} key {key}")
        source, target = (layer, key), (layer + 1, query)
        if not graph.has_edge(source, target):
            graph.add_edge(source, target, residual=False, heads={}, weight=0.0)
        data = graph.edges[source, target]
        data["heads"][head] = float(weights[layer, head, query, key])
        data["weight"] += float(weights[layer, head, query, key])
    return graph


def circuit_graph(model, task: AdditionTask, problem: str, *, gate_bias: float | None = None, dense: bool = False,
                  edge_mask: torch.Tensor | None = None) -> nx.DiGraph:
    """The circuit of ``model`` on one problem such as ``"36+28"``.

    A sparse model runs with its own gates: the edges are the gates open under deterministic
    gating. A dense model (or ``dense=True``) gives every causal edge, with its attention
    weight; ``gate_bias=`` gates at another bias. ``edge_mask`` (``[layer, head, query,
    key]``) closes edges on top. The top row holds the predictions.
    """
    check_task(model, task)
    tokens, _ = task.batch([task.parse(problem)])
    with analysis_run(model, gate_bias=gate_bias, dense=dense, edge_mask=edge_mask) as gates:
        logits = model(tokens)
    predicted = "".join(VOCAB[t] for t in logits[0, task.prompt_len:].argmax(-1).tolist())
    input_labels = [VOCAB[t] for t in tokens[0].tolist()]
    output_labels = [""] * task.prompt_len + list(predicted)
    return build_circuit_graph(gates.weights[0], gates.masks[0], input_labels, output_labels,
                               task.answer_positions, problem=problem, predicted=predicted,
                               gated=gates.mode != "dense")


GRAPH_ATTRIBUTES = ("n_layers", "seq_len", "answer_positions")


def check_graph(graph) -> nx.DiGraph:
    """``graph``, or ``ValueError`` unless it is a circuit graph (from :func:`circuit_graph` or
    :func:`frequency_graph`: a ``DiGraph`` with the graph attributes ``GRAPH_ATTRIBUTES``)."""
    if not isinstance(graph, nx.DiGraph) or any(key not in graph.graph for key in GRAPH_ATTRIBUTES):
        got = f"a DiGraph with graph attributes {sorted(graph.graph)}" if isinstance(graph, nx.DiGraph) else \
            f"a {type(graph).__name__}"
        raise ValueError(f"expected a circuit graph from circuit_graph or frequency_graph (a DiGraph with graph "
                         f"attributes {list(GRAPH_ATTRIBUTES)}), got {got}")
    return graph


def attention_edges(graph: nx.DiGraph) -> list[tuple]:
    """The edges that carry attention (any head), with their data: ``[(source, target, data)]``."""
    return [(u, v, d) for u, v, d in graph.edges(data=True) if d["heads"]]


def check_positions(graph: nx.DiGraph, positions) -> list[int]:
    allowed = f"a non-empty list of int positions within 0..{graph.graph['seq_len'] - 1}"
    if isinstance(positions, (str, bytes)) or not hasattr(positions, "__iter__"):
        raise ValueError(f"positions must be {allowed}, got {type(positions).__name__} {positions!r:.40}")
    checked = []
    for p in positions:
        number = as_int(p)
        if number is None:
            raise ValueError(f"positions must be {allowed}; {p!r:.40} ({type(p).__name__}) is not an int")
        checked.append(number)
    bad = [p for p in checked if not 0 <= p < graph.graph["seq_len"]]
    if bad or not checked:
        raise ValueError(f"positions must be {allowed}, got {checked}")
    return checked


def prune_to_answers(graph: nx.DiGraph, positions=None) -> nx.DiGraph:
    """The part of ``graph`` from which the top-level nodes at ``positions`` (default: the answer
    slots) can be reached: backward reachability through attention and residual edges."""
    check_graph(graph)
    positions = check_positions(graph, graph.graph["answer_positions"] if positions is None else positions)
    top = graph.graph["n_layers"]
    targets = {(top, p) for p in positions}
    keep = set(targets)
    for target in targets:
        keep |= nx.ancestors(graph, target)
    return graph.subgraph(keep).copy()


def restrict_to_digit(graph: nx.DiGraph, digit: int) -> nx.DiGraph:
    """The subcircuit of one answer digit: ``digit`` counts answer slots from the most
    significant (0) to the units (``answer_digits - 1``)."""
    slots = check_graph(graph).graph["answer_positions"]
    if isinstance(digit, bool) or not isinstance(digit, int) or not 0 <= digit < len(slots):
        raise ValueError(f"digit must be an int in 0..{len(slots) - 1} (answer slots, most significant first), got "
                         f"{digit!r} ({type(digit).__name__})")
    return prune_to_answers(graph, [slots[digit]])


def edge_usage(model, task: AdditionTask, pairs, *, gate_bias: float | None = None, edge_mask: torch.Tensor | None = None,
               batch_size: int = 2500) -> tuple[torch.Tensor, torch.Tensor]:
    """How each edge is used over ``pairs`` under the model's deterministic gates (or at
    ``gate_bias``): ``(frequency, mass)``, both ``[layer, head, query, key]``. ``frequency`` is
    the fraction of inputs on which the edge is open; ``mass`` the mean attention it carries
    (softmax weight times gate, 0 where closed). ``edge_mask`` closes edges on top of the gates.
    A dense model without ``gate_bias`` has every causal edge open on every input."""
    check_task(model, task)
    pairs = task.check_pairs(pairs)
    n_layers, n_heads, _ = attention_shape(model)
    counts = torch.zeros(n_layers, n_heads, task.seq_len, task.seq_len)
    mass = torch.zeros_like(counts)
    slices = batch_slices(len(pairs), batch_size)
    with analysis_run(model, gate_bias=gate_bias, edge_mask=edge_mask) as gates:
        for part in slices:
            tokens, _ = task.batch(pairs[part])
            model(tokens)
            counts += gates.masks.sum(0)
            mass += gates.weights.sum(0)
    return counts / len(pairs), mass / len(pairs)


def edge_frequency(model, task: AdditionTask, pairs, *, gate_bias: float | None = None,
                   edge_mask: torch.Tensor | None = None, batch_size: int = 2500) -> torch.Tensor:
    """How often each edge is open over ``pairs`` under the model's deterministic gates:
    ``[layer, head, query, key]``, fractions in [0, 1] (see :func:`edge_usage`)."""
    return edge_usage(model, task, pairs, gate_bias=gate_bias, edge_mask=edge_mask, batch_size=batch_size)[0]


def frequency_graph(frequency: torch.Tensor, task: AdditionTask, min_frequency: float = 0.0) -> nx.DiGraph:
    """The aggregated circuit: an attention edge wherever some head opens it on more than
    ``min_frequency`` of the inputs; ``heads`` holds each head's frequency and ``weight`` the
    largest of them. ``frequency``: ``[layer, head, query, key]`` from :func:`edge_frequency`."""
    if not isinstance(task, AdditionTask):
        raise ValueError(f"task must be an AdditionTask, got {type(task).__name__}")
    allowed = f"a float tensor [layer, head, {task.seq_len}, {task.seq_len}] of fractions in [0, 1] from edge_frequency"
    if not isinstance(frequency, torch.Tensor) or not frequency.is_floating_point() or frequency.ndim != 4 \
            or tuple(frequency.shape[-2:]) != (task.seq_len, task.seq_len) or 0 in frequency.shape:
        got = f"{frequency.dtype} of shape {list(frequency.shape)}" if isinstance(frequency, torch.Tensor) else \
            type(frequency).__name__
        raise ValueError(f"frequency must be {allowed} (for {task.name}), got {got}")
    if not ((frequency >= 0) & (frequency <= 1)).all():
        raise ValueError(f"frequency must be {allowed}; it holds values outside [0, 1] (or NaN)")
    if isinstance(min_frequency, bool) or not isinstance(min_frequency, (int, float)) or not 0 <= min_frequency < 1:
        raise ValueError(f"min_frequency must be a number in [0, 1) (edges open on more than this fraction of the "
                         f"inputs are drawn), got {min_frequency!r}")
    open_mask = frequency > min_frequency
    output_labels = [""] * task.prompt_len + task.position_labels[task.prompt_len:]
    graph = build_circuit_graph(frequency, open_mask, task.position_labels, output_labels, task.answer_positions,
                                problem=None, predicted=None, gated=True)
    for _, _, data in attention_edges(graph):
        data["weight"] = max(data["heads"].values())
    return graph


def describe_edges(graph: nx.DiGraph, labels: list[str] | None = None) -> list[str]:
    """One line per attention edge, bottom layer first: ``"layer 0 head 2: = (5) <- a1 (1)  0.93"``."""
    seq_len = check_graph(graph).graph["seq_len"]
    labels = [str(p) for p in range(seq_len)] if labels is None else labels
    if isinstance(labels, str) or not hasattr(labels, "__len__") or len(labels) != seq_len:
        raise ValueError(f"labels must be a list of {seq_len} position names, one per position (e.g. "
                         f"task.position_labels), got {labels!r:.80}")
    lines = []
    for (level, key), (_, query), data in sorted(attention_edges(graph), key=lambda e: (e[0][0], e[1][1], e[0][1])):
        for head, weight in sorted(data["heads"].items()):
            lines.append(f"layer {level} head {head}: {labels[query]} ({query}) <- {labels[key]} ({key})  {weight:.2f}")
    return lines
