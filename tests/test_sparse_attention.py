"""Edge gating through TransformerLens hooks, on two configs of different shape."""

import pytest
import torch

from sparsecirc.gates import n_causal_pairs
from sparsecirc.model import ModelConfig, build_model
from sparsecirc.sparse_attention import (Edge, attached_hook_count, mask_closing, mask_keeping, sparse_attention)

CONFIGS = [
    ModelConfig(operand_digits=1, answer_digits=2, n_layers=2, n_heads=2, d_head=8, d_model=16, d_mlp=32),
    ModelConfig(operand_digits=2, answer_digits=3, n_layers=3, n_heads=3, d_head=4, d_model=12, d_mlp=24, seed=5),
]


def _model_and_tokens(config, n=6):
    task = config.task
    return build_model(config), task.batch(task.all_pairs()[:: max(1, task.n_problems // n)][:n])[0]


@pytest.mark.parametrize("config", CONFIGS)
def test_all_gates_open_reproduces_the_dense_model(config):
    model, tokens = _model_and_tokens(config)
    dense = model(tokens)
    with sparse_attention(model, "deterministic", bias=1e4) as gates:
        gated = model(tokens)
    assert torch.allclose(gated, dense, atol=1e-6)
    n_pos = tokens.shape[1]
    assert (gates.open_edges == n_causal_pairs(n_pos)).all()
    assert gates.masks.shape == (tokens.shape[0], config.n_layers, config.n_heads, n_pos, n_pos)


@pytest.mark.parametrize("config", CONFIGS)
def test_gate_logit_is_the_softmax_score(config):
    """softmax(gate logits - bias) is exactly the pattern the model computes."""
    model, tokens = _model_and_tokens(config)
    _, cache = model.run_with_cache(tokens, names_filter=lambda name: name.endswith("hook_pattern"))
    with sparse_attention(model, "deterministic", bias=50.0) as gates:  # all open; exact enough in float32
        model(tokens)
    assert (gates.open_edges == n_causal_pairs(tokens.shape[1])).all()
    patterns = torch.stack([cache[f"blocks.{l}.attn.hook_pattern"] for l in range(config.n_layers)], dim=1)
    assert torch.allclose(torch.softmax(gates.logits - 50.0, dim=-1), patterns, atol=1e-5)


@pytest.mark.parametrize("config", CONFIGS)
def test_closing_gates_changes_the_output_and_leaves_no_hooks(config):
    model, tokens = _model_and_tokens(config)
    dense = model(tokens)
    assert attached_hook_count(model) == 0
    with sparse_attention(model, "deterministic", bias=-1e4) as gates:
        closed = model(tokens)
        assert attached_hook_count(model) > 0
    assert not torch.allclose(closed, dense)
    assert gates.open_edges.sum() == 0
    assert attached_hook_count(model) == 0
    assert torch.equal(model(tokens), dense)


def test_no_hook_survives_an_exception(tiny_config):
    model, tokens = _model_and_tokens(tiny_config)
    with pytest.raises(KeyError):
        with sparse_attention(model, "sample"):
            model(tokens).sum().backward()
            raise KeyError("inside the block")
    assert attached_hook_count(model) == 0


def test_sample_mode_gives_hard_gates_and_gradients_to_qk_weights(tiny_config):
    model, tokens = _model_and_tokens(tiny_config)
    with sparse_attention(model, "sample", bias=0.0, generator=torch.Generator().manual_seed(0)) as gates:
        out = model(tokens)
        expected = gates.expected_edges
    assert set(gates.masks.unique().tolist()) <= {0.0, 1.0}
    assert 0 < gates.open_edges.sum() < gates.masks[0].numel() * tokens.shape[0]
    expected.sum().backward()
    assert model.blocks[0].attn.q.weight.grad.abs().sum() > 0  # the penalty reaches the scores
    model.zero_grad()
    with sparse_attention(model, "sample", bias=0.0, generator=torch.Generator().manual_seed(0)):
        model(tokens)[:, -1].sum().backward()
    assert model.blocks[0].attn.k.weight.grad.abs().sum() > 0  # and so does the task loss, through the gates


def test_expected_edges_matches_sigmoid_of_logits(tiny_config):
    model, tokens = _model_and_tokens(tiny_config)
    with sparse_attention(model, "deterministic", bias=2.0) as gates:
        model(tokens)
    expected = torch.sigmoid(gates.logits).sum(dim=(-2, -1))  # -inf off the triangle -> 0
    assert torch.allclose(gates.expected_edges, expected, atol=1e-5)
    assert (gates.open_edges == (gates.logits > 0).sum(dim=(-2, -1))).all()


def test_fixed_masks_close_or_keep_given_edges(tiny_config):
    model, tokens = _model_and_tokens(tiny_config)
    dense = model(tokens)
    edge = Edge(layer=1, head=0, query=tokens.shape[1] - 1, key=0)
    with sparse_attention(model, "dense", edge_mask=mask_closing(model, [edge])) as gates:
        closed_one = model(tokens)
    assert gates.masks[:, 1, 0, edge.query, edge.key].sum() == 0
    assert gates.open_edges.sum() == tokens.shape[0] * (tiny_config.n_layers * tiny_config.n_heads * n_causal_pairs(tokens.shape[1]) - 1)
    assert not torch.allclose(closed_one, dense)
    keep = [edge, Edge(0, 1, 2, 1)]
    with sparse_attention(model, "dense", edge_mask=mask_keeping(model, keep)) as gates:
        model(tokens)
    assert gates.open_edge_list(0) == sorted(keep)


def test_bad_arguments_raise_clear_errors(tiny_config):
    model, _ = _model_and_tokens(tiny_config)
    with pytest.raises(ValueError, match="unknown gating mode"):
        with sparse_attention(model, "soft"):
            pass
    with pytest.raises(ValueError, match="finite"):
        with sparse_attention(model, bias=float("nan")):
            pass
    with pytest.raises(ValueError, match="edge_mask must have shape"):
        with sparse_attention(model, edge_mask=torch.ones(3, 3)):
            pass
    for bad, message in [(Edge(5, 0, 1, 0), "layer must be in 0..1"), (Edge(0, 9, 1, 0), "head must be in 0..1"),
                         (Edge(0, 0, 1, 3), "not a causal edge"), (Edge(0, 0, 40, 0), "positions must be in")]:
        with pytest.raises(ValueError, match=message):
            mask_closing(model, [bad])
    assert attached_hook_count(model) == 0


def test_reading_gates_before_a_forward_pass_is_an_error(tiny_config):
    model, _ = _model_and_tokens(tiny_config)
    with sparse_attention(model, "deterministic") as gates:
        with pytest.raises(RuntimeError, match="run a forward pass"):
            gates.masks
