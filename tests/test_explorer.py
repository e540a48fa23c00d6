"""The explorer of notebook 04, driven headless through its widgets' values."""

import matplotlib
import pytest
from matplotlib.patches import PathPatch

from sparsecirc import Edge, load_checkpoint, load_split
from sparsecirc.explorer import Explorer, explore, graph_edges
from sparsecirc.paths import reference_base_checkpoint_path, reference_dataset_path, reference_sparse_checkpoint_path

matplotlib.use("Agg")


@pytest.fixture(scope="module")
def shipped():
    task = load_split(reference_dataset_path()).task
    return load_checkpoint(reference_base_checkpoint_path())[0], load_checkpoint(reference_sparse_checkpoint_path())[0], task


def test_explorer_shows_answers_and_the_edges_left_when_edges_are_ticked_closed(shipped):
    base, sparse, task = shipped
    explorer = Explorer(base, sparse, task, problem="36+28")
    view = explorer.view
    assert view.true_answer == "00064" and "36+28 = 00064" in explorer.message
    assert f"sparse model : {view.sparse_answer_intact}" in explorer.message
    assert set(explorer.edge_boxes) == set(view.open_edges) == view.drawn_edges  # one tick box per drawn edge
    assert all(edge.key <= edge.query for edge in view.open_edges) and 0 < len(view.open_edges) < 30

    units = task.answer_positions[-1]
    into_units = [edge for edge in view.open_edges if edge.query == units]
    assert into_units, "the sparse model must read something into the units slot"
    for edge in into_units:
        explorer.edge_boxes[edge].value = True
    view = explorer.view
    assert view.closed == tuple(sorted(into_units))
    assert view.drawn_edges <= set(view.open_edges) - set(into_units)  # closed edges are not drawn
    assert f"sparse, {len(into_units)} closed: {view.sparse_answer}" in explorer.message
    assert view.sparse_answer[:-1] == view.sparse_answer_intact[:-1]  # the other digits do not read the units slot

    figure = view.figure(task.position_labels)
    sparse_panel = figure.axes[1]
    assert len([p for p in sparse_panel.patches if isinstance(p, PathPatch)]) == len(view.drawn_edges)

    bundle = explorer._repr_mimebundle_()
    assert bundle["image/png"] and "application/vnd.jupyter.widget-view+json" in bundle  # a still for GitHub, live in Jupyter
    assert explorer.message in bundle["text/plain"]

    explorer.examples.value = "43+59"  # picking an example replaces the problem and unticks everything
    assert explorer.problem.value == "43+59" and explorer.view.closed == () and "43+59 = 00102" in explorer.message


def test_explorer_reports_bad_input_instead_of_failing(shipped):
    base, sparse, task = shipped
    explorer = Explorer(base, sparse, task, problem="36+28")
    explorer.problem.value = "123+4"
    assert explorer.view is None and "at most 2 digits" in explorer.message and not explorer.edge_boxes
    explorer.problem.value = "7+8"
    assert explorer.view.true_answer == "00015"

    with pytest.raises(ValueError, match="can only close edges open on"):
        explore(base, sparse, task, "36+28", closed=[Edge(3, 3, 10, 0)])
    with pytest.raises(ValueError, match="dense must be a model without gates"):
        explore(sparse, sparse, task, "36+28")
    with pytest.raises(ValueError, match="sparse must be a sparse model"):
        explore(base, base, task, "36+28")


@pytest.mark.parametrize("closed, message", [([(0, 0, 1)], "it holds \\(0, 0, 1\\)"), (5, "got int 5"),
                                             ("ab", "got str 'ab'"), ([Edge(0, 0, 1, 0), "xyzw"], "it holds 'xyzw'")])
def test_explore_refuses_closed_edges_that_are_not_a_list_of_edges(shipped, closed, message):
    with pytest.raises(ValueError, match=f"closed must be a list of edges, Edge\\(layer, head, query, key\\) or "
                                         f"4-tuples of ints; {message}"):
        explore(*shipped, "36+28", closed=closed)


def test_explorer_refuses_a_problem_that_is_not_a_string(shipped):
    with pytest.raises(ValueError, match="problem must be a string like '36\\+28', got int 3628"):
        Explorer(*shipped, 3628)
    with pytest.raises(ValueError, match="task must be an AdditionTask, got NoneType"):
        Explorer(*shipped[:2], None)


def test_graph_edges_lists_every_head(shipped):
    base, sparse, task = shipped
    view = explore(base, sparse, task, "99+99")
    assert len(graph_edges(view.dense_graph)) == base.cfg.n_layers * base.cfg.n_heads * task.seq_len * (task.seq_len + 1) // 2
