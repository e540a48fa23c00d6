import matplotlib

matplotlib.use("Agg")

import networkx as nx
import pytest
import torch

from sparsecirc.circuit import (attention_edges, build_circuit_graph, circuit_graph, describe_edges, edge_frequency,
                                frequency_graph, prune_to_answers, restrict_to_digit)
from sparsecirc.circuit_plots import plot_circuit, plot_circuits, plot_edge_frequency, save_figure
from sparsecirc.gates import causal_mask
from sparsecirc.model import build_model
from sparsecirc.plots import attention_patterns
from sparsecirc.sparse_attention import Edge, analysis_run, mask_keeping


def test_graph_of_a_tiny_model_with_known_gates(tiny_config, tiny_split):
    task, model = tiny_split.task, build_model(tiny_config)
    kept = [Edge(0, 0, 5, 1), Edge(0, 1, 5, 1), Edge(1, 0, 5, 5)]  # two heads on one pair; one self edge
    graph = circuit_graph(model, task, "3+4", edge_mask=mask_keeping(model, kept))
    assert graph.number_of_nodes() == (tiny_config.n_layers + 1) * task.seq_len == 18
    assert graph.number_of_edges() == tiny_config.n_layers * task.seq_len + 1  # residuals + one cross edge
    edges = {(u, v): d for u, v, d in attention_edges(graph)}
    assert set(edges) == {((0, 1), (1, 5)), ((1, 5), (2, 5))}
    assert set(edges[(0, 1), (1, 5)]["heads"]) == {0, 1} and not edges[(0, 1), (1, 5)]["residual"]
    assert edges[(1, 5), (2, 5)]["residual"] and set(edges[(1, 5), (2, 5)]["heads"]) == {0}
    patterns = attention_patterns(model, task, "3+4")
    assert edges[(0, 1), (1, 5)]["heads"][1] == pytest.approx(float(patterns[0, 1, 5, 1]))
    assert [graph.nodes[(0, p)]["label"] for p in range(task.seq_len)] == list("3+4=??")
    assert graph.graph["predicted"] == "".join(graph.nodes[(2, p)]["label"] for p in task.answer_positions)


def test_dense_graph_has_every_causal_edge_with_its_weight(tiny_config, tiny_split):
    task, model = tiny_split.task, build_model(tiny_config)
    graph = circuit_graph(model, task, "3+4")
    pairs = task.seq_len * (task.seq_len + 1) // 2
    assert len(attention_edges(graph)) == tiny_config.n_layers * pairs
    assert all(len(d["heads"]) == tiny_config.n_heads for _, _, d in attention_edges(graph))
    # each query's attention sums to 1 per head, so the weights into a node sum to n_heads
    for level in range(tiny_config.n_layers):
        into = sum(d["weight"] for u, v, d in graph.in_edges((level + 1, 4), data=True))
        assert into == pytest.approx(tiny_config.n_heads, abs=1e-5)
    assert len(describe_edges(graph)) == tiny_config.n_layers * tiny_config.n_heads * pairs


def test_pruning_keeps_exactly_what_reaches_the_answer():
    # 2 layers, 4 positions, answer at 3. Layer 0: 2 <- 0 and 1 <- 0. Layer 1: 3 <- 2.
    mask = torch.zeros(2, 1, 4, 4)
    mask[0, 0, 2, 0] = mask[0, 0, 1, 0] = mask[1, 0, 3, 2] = 1
    graph = build_circuit_graph(mask * 0.5, mask, list("abcd"), ["", "", "", "x"], [3])
    pruned = prune_to_answers(graph)
    assert set(pruned.nodes) == {(2, 3), (1, 3), (1, 2), (0, 3), (0, 2), (0, 0)}
    assert {(u, v) for u, v, _ in attention_edges(pruned)} == {((0, 0), (1, 2)), ((1, 2), (2, 3))}
    assert nx.is_directed_acyclic_graph(pruned)
    assert set(restrict_to_digit(graph, 0).nodes) == set(pruned.nodes)
    # the answer at position 1 needs only 1 <- 0 in layer 0 and residuals
    assert set(prune_to_answers(graph, [1]).nodes) == {(2, 1), (1, 1), (0, 1), (0, 0)}


def test_bad_graph_inputs_are_refused(tiny_config, tiny_split):
    task, model = tiny_split.task, build_model(tiny_config)
    graph = circuit_graph(model, task, "3+4")
    for digit, kind in [(2, "int"), (1.5, "float"), (True, "bool"), ("1", "str")]:
        with pytest.raises(ValueError, match=f"digit must be an int in 0..1 .*, got .* \\({kind}\\)"):
            restrict_to_digit(graph, digit)
    with pytest.raises(ValueError, match="labels must be a list of 6 position names"):
        describe_edges(graph, ["x"])
    for call in (plot_circuit, lambda g: plot_circuits({"one": g}), prune_to_answers, lambda g: restrict_to_digit(g, 0),
                 describe_edges):
        with pytest.raises(ValueError, match="expected a circuit graph from circuit_graph or frequency_graph"):
            call(nx.DiGraph())
    with pytest.raises(ValueError, match="positions must be"):
        prune_to_answers(graph, [6])
    for positions in ([1.7], [True], ["3"], [None], [float("inf")], 5):  # 1.7 and True once became position 1
        with pytest.raises(ValueError, match="positions must be a non-empty list of int positions within 0..5"):
            prune_to_answers(graph, positions)
    frequency = torch.ones(tiny_config.n_layers, tiny_config.n_heads, 6, 6).tril()
    for args, message in [((frequency.tolist(), task), "frequency must be a float tensor"),
                          ((frequency[:, :, :3, :3], task), "frequency must be a float tensor .* got torch.float32 of shape"),
                          ((frequency * 5, task), "values outside \\[0, 1\\]"),
                          ((frequency * float("nan"), task), "values outside \\[0, 1\\]"),
                          ((frequency, "task"), "task must be an AdditionTask"),
                          ((frequency, task, float("nan")), "min_frequency must be a number in \\[0, 1\\)"),
                          ((frequency, task, -1.0), "min_frequency must be a number in \\[0, 1\\)"),
                          ((frequency, task, None), "min_frequency must be a number in \\[0, 1\\)")]:
        with pytest.raises(ValueError, match=message):
            frequency_graph(*args)
    with pytest.raises(ValueError):
        circuit_graph(model, task, "36+28")  # the tiny task has 1-digit operands
    with pytest.raises(ValueError, match="non-causal"):
        bad = torch.zeros(1, 1, 3, 3)
        bad[0, 0, 0, 2] = 1
        build_circuit_graph(bad, bad, list("abc"), list("abc"), [2])


def test_edge_frequency_counts_open_gates(tiny_config, tiny_split):
    task, model = tiny_split.task, build_model(tiny_config)
    all_open = edge_frequency(model, task, tiny_split.all, gate_bias=100.0)
    assert torch.equal(all_open, causal_mask(task.seq_len).float().expand_as(all_open))
    assert edge_frequency(model, task, tiny_split.all, gate_bias=-100.0).sum() == 0
    some = edge_frequency(model, task, tiny_split.all, gate_bias=0.0)
    tokens, _ = task.batch(list(tiny_split.all))
    with analysis_run(model, gate_bias=0.0) as gates:  # the same gates, counted by hand
        model(tokens)
        by_hand = (gates.logits > 0).float().mean(0)
    torch.testing.assert_close(some, by_hand)
    assert 0 < some.sum() < causal_mask(task.seq_len).sum() * model.cfg.n_layers * model.cfg.n_heads  # some shut, some open
    assert ((some > 0) & (some < 1)).any()  # and some open on part of the inputs only
    graph = frequency_graph(some, task, min_frequency=0.5)
    assert len(attention_edges(graph)) == len({(l, q, k) for l, h, q, k in (some > 0.5).nonzero().tolist()})


def test_circuit_plots_run_headless_and_save_without_overwriting(tmp_path, tiny_config, tiny_split):
    task, model = tiny_split.task, build_model(tiny_config)
    graphs = {"dense": circuit_graph(model, task, "3+4"), "gated": circuit_graph(model, task, "3+4", gate_bias=0.0)}
    figures = {"weights": plot_circuits(graphs, position_labels=task.position_labels),
               "heads": plot_circuits(graphs, color_by="head"),
               "frequency": plot_edge_frequency(edge_frequency(model, task, tiny_split.all, gate_bias=0.0), task.position_labels)}
    for name, fig in figures.items():
        paths = save_figure(fig, tmp_path / "figures", name)
        assert [p.suffix for p in paths] == [".png", ".svg"] and all(p.stat().st_size > 1000 for p in paths)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_figure(figures["weights"], tmp_path / "figures", "weights")
    with pytest.raises(ValueError, match="color_by"):
        plot_circuits(graphs, color_by="rainbow")


def test_figure1_draws_every_head_of_every_edge_as_its_own_visible_curve(tiny_config):
    from matplotlib.patches import PathPatch

    from sparsecirc.circuit_plots import MIN_ALPHA, MIN_WIDTH, edge_curves, plot_figure1, query_lanes

    task, model = tiny_config.task, build_model(tiny_config)
    problems = ["3+4", "5+5", "9+9"]
    rows = {"Dense": {p: circuit_graph(model, task, p) for p in problems},
            "Gated": {p: circuit_graph(model, task, p, gate_bias=0.0) for p in problems}}
    fig = plot_figure1(rows, position_labels=task.position_labels)
    assert len(fig.axes) == 6 and len({(ax.get_xlim(), ax.get_ylim()) for ax in fig.axes}) == 1  # the same axes
    for ax, graph in zip(fig.axes, [g for graphs in rows.values() for g in graphs.values()]):
        curves = [p for p in ax.patches if isinstance(p, PathPatch)]
        assert len(curves) == sum(len(d["heads"]) for _, _, d in attention_edges(graph))  # one curve per head
        assert all(c.get_linewidth() >= MIN_WIDTH and c.get_alpha() >= MIN_ALPHA for c in curves)
    heights = edge_curves(2, lane=0.5, vertical=False)
    assert heights[0] != heights[1]  # two heads on one edge run apart
    lanes = query_lanes([8, 9, 10, 9])
    assert sorted(lanes) == [8, 9, 10] and min(abs(a - b) for a in lanes.values() for b in lanes.values() if a != b) >= 0.25
    assert edge_curves(2, lane=0.5, vertical=True)[0][1] != 0  # heads on a vertical edge bow apart
    with pytest.raises(ValueError, match="must match"):
        plot_figure1({"A": {"3+4": rows["Dense"]["3+4"]}, "B": {"5+5": rows["Dense"]["5+5"]}})
