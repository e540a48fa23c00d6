import matplotlib

matplotlib.use("Agg")

import torch

from sparsecirc.model import build_model
from sparsecirc.plots import (attention_patterns, plot_attention_patterns, plot_edge_count_distribution,
                              plot_edges_per_layer, plot_sparsify_history, plot_training_history)
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
