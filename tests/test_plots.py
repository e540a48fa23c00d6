import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import pytest
import torch

from sparsecirc.model import build_model
from sparsecirc.plots import (attention_patterns, plot_attention_patterns, plot_edge_count_distribution,
                              plot_edges_per_layer, plot_size_curves, plot_sparsify_history, plot_training_history)
from sparsecirc.sparsify import SparsifyConfig, sparsify
from sparsecirc.training import TrainConfig, train


def test_plots_draw_from_real_runs(tmp_path, tiny_config, tiny_split):
    model = build_model(tiny_config)
    history = train(model, tiny_split, TrainConfig(batch_size=32, max_steps=20, eval_every=10), progress=False)
    patterns = attention_patterns(model, tiny_split.task, "3+4")
    assert patterns.shape == (tiny_config.n_layers, tiny_config.n_heads, 6, 6)
    assert torch.allclose(patterns.sum(-1), torch.ones(tiny_config.n_layers, tiny_config.n_heads, 6))
    sparse_history = sparsify(model, tiny_split, SparsifyConfig(batch_size=32, steps=30, eval_every=10),
                              progress=False)
    figures = [plot_training_history(history), plot_attention_patterns(patterns, tiny_split.task, "3+4", "07"),
               plot_sparsify_history(sparse_history), plot_edges_per_layer({"dense": [10.0, 10.0], "sparse": [2.0, 0.0]}),
               plot_edge_count_distribution([3, 4, 4, 5])]
    rescues = [row["step"] for row in sparse_history if "rescue" in row]  # a 20-step model misses its bar
    assert rescues and ("a rescue window starts" in figures[2]._suptitle.get_text())
    assert all(sum(line.get_linestyle() == "-." for line in ax.lines) == len(rescues) for ax in figures[2].axes)
    for i, fig in enumerate(figures):
        path = tmp_path / f"figure{i}.png"
        fig.savefig(path)
        assert path.stat().st_size > 1000


def test_head_grid_names_every_tick_and_has_a_colour_bar():
    import pytest

    from sparsecirc.plots import plot_head_grid

    values = torch.rand(2, 3, 4, 4)
    labels = ["a", "b", "c", "d"]
    fig, axes = plot_head_grid(values, labels, "title", "weight")
    assert axes.shape == (2, 3) and len(fig.axes) == 2 * 3 + 1  # the panels and one colour bar
    assert fig.axes[-1].get_ylabel() == "weight"
    assert [t.get_text() for t in axes[1, 0].get_xticklabels()] == labels
    assert [t.get_text() for t in axes[0, 0].get_yticklabels()] == labels
    with pytest.raises(ValueError, match="one label per position"):
        plot_head_grid(values, labels[:3], "title", "weight")


_STEP = {"step": 0, "ce": 1.0, "tau": 1.0, "constraint_ema": 0.0, "multiplier": 1.0, "expected_edges": 5.0, "lr": 1e-3}


@pytest.mark.parametrize("draw, message", [
    (lambda: plot_sparsify_history([]), "non-empty list of dicts sparsify returns, got \\[\\]"),
    (lambda: plot_sparsify_history("history"), "non-empty list of dicts sparsify returns"),
    (lambda: plot_sparsify_history([{"step": 0}]), "history rows lack \\['ce', 'tau'"),
    (lambda: plot_sparsify_history([_STEP, {**_STEP, "step": 1}]), "history has no evaluation rows"),
    (lambda: plot_edges_per_layer({}), "per_layer must be a non-empty dict"),
    (lambda: plot_edges_per_layer({"a": []}), "per_layer must be a non-empty dict"),
    (lambda: plot_edges_per_layer({"a": [1.0, 2.0], "b": [1.0]}), "all equally long"),
    (lambda: plot_edges_per_layer([1.0, 2.0]), "per_layer must be a non-empty dict"),
    (lambda: plot_training_history([]), "non-empty list of dicts train returns"),
    (lambda: plot_training_history([{"step": 0}]), "non-empty list of dicts train returns"),
    (lambda: plot_edge_count_distribution([]), "non-empty 1-d"),
    (lambda: plot_edge_count_distribution([[1, 2]]), "non-empty 1-d"),
    (lambda: plot_size_curves({}), "curves must be a non-empty dict"),
])
def test_plots_refuse_what_they_cannot_draw(draw, message):
    figures = plt.get_fignums()
    with pytest.raises(ValueError, match=message):
        draw()
    assert plt.get_fignums() == figures  # refused before a figure was made
