"""Edge gating, on two configs of different shape and two kinds of model: sparsecirc's own
GatedTransformer (gated in its forward pass) and a TransformerLens bridge with the same weights
(gated through hooks). Both call the gate of sparsecirc.gates and must agree."""

import pytest
import torch

from sparsecirc.gates import n_causal_pairs
from sparsecirc.model import ModelConfig, build_model
from conftest import bridge_twin
from sparsecirc.sparse_attention import (Edge, EdgeGates, analysis_run, gate_bias_of, mask_closing, mask_keeping, set_gate_bias,
                                         sparse_attention)

CONFIGS = [
    ModelConfig(operand_digits=1, answer_digits=2, n_layers=2, n_heads=2, d_head=8, d_model=16, d_mlp=32),
    ModelConfig(operand_digits=2, answer_digits=3, n_layers=3, n_heads=3, d_head=4, d_model=12, d_mlp=24, seed=5),
]


@pytest.fixture(params=["gated", "bridge"])
def kind(request):
    return request.param


def _build(config, kind):
    model = build_model(config)
    return model if kind == "gated" else bridge_twin(model)


def _model_and_tokens(config, kind="gated", n=6):
    task = config.task
    return _build(config, kind), task.batch(task.all_pairs()[:: max(1, task.n_problems // n)][:n])[0]


@pytest.mark.parametrize("config", CONFIGS)
def test_all_gates_open_reproduces_the_dense_model(kind, config):
    model, tokens = _model_and_tokens(config, kind)
    dense = model(tokens)
    with sparse_attention(model, "deterministic", gate_bias=1e4) as gates:
        gated = model(tokens)
    assert torch.allclose(gated, dense, atol=1e-6)
    n_pos = tokens.shape[1]
    assert (gates.open_edges == n_causal_pairs(n_pos)).all()
    assert gates.masks.shape == (tokens.shape[0], config.n_layers, config.n_heads, n_pos, n_pos)


@pytest.mark.parametrize("config", CONFIGS)
def test_gate_logit_is_the_softmax_score(kind, config):
    """softmax(gate logits - bias) is exactly the pattern the model computes."""
    model, tokens = _model_and_tokens(config, kind)
    _, cache = model.run_with_cache(tokens, names_filter=lambda name: name.endswith("hook_pattern"))
    with sparse_attention(model, "deterministic", gate_bias=50.0) as gates:  # all open; exact enough in float32
        model(tokens)
    assert (gates.open_edges == n_causal_pairs(tokens.shape[1])).all()
    patterns = torch.stack([cache[f"blocks.{l}.attn.hook_pattern"] for l in range(config.n_layers)], dim=1)
    assert torch.allclose(torch.softmax(gates.logits - 50.0, dim=-1), patterns, atol=1e-5)


@pytest.mark.parametrize("config", CONFIGS)
def test_closing_gates_changes_the_output_and_leaves_no_hooks(kind, config, temporary_hook_count):
    model, tokens = _model_and_tokens(config, kind)
    dense = model(tokens)
    assert temporary_hook_count(model) == 0
    for _ in range(2):
        with sparse_attention(model, "deterministic", gate_bias=-1e4) as gates:
            closed = model(tokens)
            assert temporary_hook_count(model) == 0  # blocks switch the model's own hooks, they add none
        assert not torch.allclose(closed, dense)
        assert gates.open_edges.sum() == 0
        assert temporary_hook_count(model) == 0
        assert torch.equal(model(tokens), dense)
    points = {id(point): point for point in model.hook_dict.values()}.values()  # hook_dict also holds aliases
    permanent = sum(len(point.fwd_hooks) for point in points)
    # a bridge: hook_q, hook_k, hook_pattern, attached once, however many blocks; a GatedTransformer gates without hooks
    assert permanent == (3 * config.n_layers if kind == "bridge" else 0)


def test_no_hook_survives_an_exception(kind, tiny_config, temporary_hook_count):
    model, tokens = _model_and_tokens(tiny_config, kind)
    with pytest.raises(KeyError):
        with sparse_attention(model, "sample", gate_bias=3.0):
            model(tokens).sum().backward()
            raise KeyError("inside the block")
    assert temporary_hook_count(model) == 0


def test_sample_mode_gives_hard_gates_and_gradients_to_qk_weights(kind, tiny_config):
    model, tokens = _model_and_tokens(tiny_config, kind)
    with sparse_attention(model, "sample", gate_bias=0.0, generator=torch.Generator().manual_seed(0)) as gates:
        out = model(tokens)
        expected = gates.expected_edges
    assert set(gates.masks.unique().tolist()) <= {0.0, 1.0}
    assert 0 < gates.open_edges.sum() < gates.masks[0].numel() * tokens.shape[0]
    expected.sum().backward()
    assert model.blocks[0].attn.q.weight.grad.abs().sum() > 0  # the penalty reaches the scores
    model.zero_grad()
    with sparse_attention(model, "sample", gate_bias=0.0, generator=torch.Generator().manual_seed(0)):
        model(tokens)[:, -1].sum().backward()
    assert model.blocks[0].attn.k.weight.grad.abs().sum() > 0  # and so does the task loss, through the gates


def test_expected_edges_matches_sigmoid_of_logits(kind, tiny_config):
    model, tokens = _model_and_tokens(tiny_config, kind)
    with sparse_attention(model, "deterministic", gate_bias=2.0) as gates:
        model(tokens)
    expected = torch.sigmoid(gates.logits).sum(dim=(-2, -1))  # -inf off the triangle -> 0
    assert torch.allclose(gates.expected_edges, expected, atol=1e-5)
    assert (gates.open_edges == (gates.logits > 0).sum(dim=(-2, -1))).all()


def test_fixed_masks_close_or_keep_given_edges(kind, tiny_config):
    model, tokens = _model_and_tokens(tiny_config, kind)
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


def test_bad_arguments_raise_clear_errors(kind, tiny_config, temporary_hook_count):
    model, _ = _model_and_tokens(tiny_config, kind)
    with pytest.raises(ValueError, match="unknown gating mode"):
        with sparse_attention(model, "soft"):
            pass
    with pytest.raises(ValueError, match="finite"):
        with sparse_attention(model, gate_bias=float("nan")):
            pass
    with pytest.raises(ValueError, match="edge_mask must have shape"):
        with sparse_attention(model, edge_mask=torch.ones(3, 3)):
            pass
    full = torch.ones(tiny_config.n_layers, tiny_config.n_heads, tiny_config.task.seq_len, tiny_config.task.seq_len)
    for mask, message in [(full.to("meta"), "edge_mask is on the meta device"),
                          (full.to_sparse(), "edge_mask is sparse \\(sparse_coo\\)")]:
        with pytest.raises(ValueError, match=message):
            with analysis_run(model, edge_mask=mask):
                pass
    for bad, message in [(Edge(5, 0, 1, 0), "layer must be in 0..1"), (Edge(0, 9, 1, 0), "head must be in 0..1"),
                         (Edge(0, 0, 1, 3), "not a causal edge"), (Edge(0, 0, 40, 0), "positions must be in")]:
        with pytest.raises(ValueError, match=message):
            mask_closing(model, [bad])
    seq = tiny_config.task.seq_len
    tokens = tiny_config.task.batch([(1, 2)])[0]
    for call, message in [(lambda: mask_closing(model, None), "edges must be a list of Edge"),
                          (lambda: mask_closing(model, 5), "edges must be a list of Edge"),
                          (lambda: mask_closing(None, []), "edge gating needs a GatedTransformer"),
                          (lambda: set_gate_bias(None, 1.0), "edge gating needs a GatedTransformer"),
                          (lambda: analysis_run(None).__enter__(), "edge gating needs a GatedTransformer"),
                          (lambda: sparse_attention(model, "sample", gate_bias=1.0, generator=5).__enter__(),
                           "generator must be a torch.Generator"),
                          (lambda: sparse_attention(model, "dense", edge_mask=full.expand(0, *full.shape)).__enter__(),
                           "edge_mask has a batch of 0 masks"),
                          (lambda: EdgeGates("soft", 1.0, 2, 2), "unknown gating mode"),
                          (lambda: EdgeGates("sample", float("nan"), 2, 2), "finite"),
                          (lambda: EdgeGates("sample", 1.0, 0, 2), "n_layers must be a positive int")]:
        with pytest.raises(ValueError, match=message):
            call()
    with pytest.raises(ValueError, match="a batch of 3 masks but the input a batch of 1"):
        with sparse_attention(model, "deterministic", gate_bias=1.0, edge_mask=full.expand(3, *full.shape)):
            model(tokens)
    assert seq == tokens.shape[1]
    assert temporary_hook_count(model) == 0


def test_reading_gates_before_a_forward_pass_is_an_error(kind, tiny_config):
    model, _ = _model_and_tokens(tiny_config, kind)
    with sparse_attention(model, "deterministic", gate_bias=3.0) as gates:
        with pytest.raises(RuntimeError, match="run a forward pass"):
            gates.masks


def test_a_sparse_model_runs_with_its_own_gates_on_every_path(kind, tiny_config):
    model, tokens = _model_and_tokens(tiny_config, kind)
    dense = model(tokens)
    with sparse_attention(model, "deterministic", gate_bias=0.5) as gates:
        gated = model(tokens)
    assert not torch.allclose(gated, dense) and 0 < gates.open_edges.sum()
    set_gate_bias(model, 0.5)
    assert gate_bias_of(model) == 0.5
    assert torch.equal(model(tokens), gated)  # a plain forward pass is gated
    logits, cache = model.run_with_cache(tokens)
    assert torch.equal(logits, gated)
    assert torch.equal(cache["blocks.0.attn.hook_pattern"], gates.weights[:, 0])  # the cache holds the gated pattern
    with sparse_attention(model) as own:  # no gate_bias: the model's own
        model(tokens)
    assert own.gate_bias == 0.5 and torch.equal(own.masks, gates.masks)
    with sparse_attention(model, "dense"):  # the weights without gates: asked for by name
        assert torch.equal(model(tokens), dense)
    assert torch.equal(model(tokens), gated)  # and the gates are back after the block
    set_gate_bias(model, None)
    assert gate_bias_of(model) is None and torch.equal(model(tokens), dense)


def test_a_sparse_config_builds_a_gated_model(kind, tiny_config):
    sparse = _build(tiny_config.sparse(0.5), kind)
    dense = _build(tiny_config, kind)
    _, tokens = _model_and_tokens(tiny_config, kind)
    assert gate_bias_of(sparse) == 0.5 and gate_bias_of(dense) is None
    with sparse_attention(dense, "deterministic", gate_bias=0.5):
        expected = dense(tokens)
    assert torch.equal(sparse(tokens), expected)


def test_gating_a_dense_model_needs_a_bias_and_blocks_do_not_nest(kind, tiny_config):
    model, tokens = _model_and_tokens(tiny_config, kind)
    for mode in ("deterministic", "sample"):
        with pytest.raises(ValueError, match="need a gate_bias"):
            with sparse_attention(model, mode):
                pass
    with pytest.raises(ValueError, match="takes no gate_bias"):
        with sparse_attention(model, "dense", gate_bias=1.0):
            pass
    with sparse_attention(model, "deterministic", gate_bias=-1e4) as outer:
        with pytest.raises(ValueError, match="do not nest"):
            with sparse_attention(model, "dense"):
                pass
        model(tokens)  # the outer block still holds
    assert outer.open_edges.sum() == 0
    with pytest.raises(ValueError, match="TransformerBridge"):
        with sparse_attention(torch.nn.Linear(2, 2)):
            pass


def test_analysis_run_restores_the_mode_after_an_exception(kind, tiny_config):
    model, tokens = _model_and_tokens(tiny_config, kind)
    model.train()
    with pytest.raises(KeyError):
        with analysis_run(model, gate_bias=1.0):
            assert not model.training and not torch.is_grad_enabled()
            raise KeyError("inside")
    assert model.training
    with pytest.raises(ValueError, match="not both"):
        with analysis_run(model, gate_bias=1.0, dense=True):
            pass
    assert model.training


def test_a_copy_of_a_sparse_model_has_gates_of_its_own(kind, tiny_config):
    import copy

    model = _build(tiny_config.sparse(0.5), kind)
    _, tokens = _model_and_tokens(tiny_config, kind)
    gated = model(tokens).detach()
    model(tokens).sum().backward()  # a pass with a graph: the copy must not trip over it
    twin = copy.deepcopy(model)
    assert torch.equal(twin(tokens), gated) and gate_bias_of(twin) == 0.5
    with sparse_attention(twin, "dense"):
        ungated = twin(tokens)
        assert torch.equal(model(tokens), gated)  # the original keeps its gates while the copy's block is open
    assert not torch.equal(ungated, gated)
    with sparse_attention(model, "dense"):
        assert torch.equal(twin(tokens), gated)  # and the original's block does not reach the copy
    set_gate_bias(twin, None)
    assert torch.equal(twin(tokens), ungated) and torch.equal(model(tokens), gated)


def test_removing_every_hook_does_not_ungate_a_sparse_model(kind, tiny_config, temporary_hook_count):
    model = _build(tiny_config.sparse(0.5), kind)
    _, tokens = _model_and_tokens(tiny_config, kind)
    gated = model(tokens)
    model.reset_hooks(including_permanent=True)
    assert torch.equal(model(tokens), gated)  # the gating hooks come back before the pass
    model.reset_hooks(including_permanent=True)
    assert torch.equal(model.run_with_cache(tokens)[0], gated)  # also on paths that call model.forward directly
    assert temporary_hook_count(model) == 0


def test_a_patched_q_changes_the_gates_as_it_changes_the_softmax(kind, tiny_config):
    model = _build(tiny_config.sparse(0.5), kind)
    _, tokens = _model_and_tokens(tiny_config, kind)
    zero_q = [(f"blocks.{l}.attn.hook_q", lambda q, hook: torch.zeros_like(q)) for l in range(tiny_config.n_layers)]
    with sparse_attention(model) as gates:
        model.run_with_hooks(tokens, fwd_hooks=zero_q)
    n_pos = tokens.shape[1]
    assert (gates.open_edges == n_causal_pairs(n_pos)).all()  # q = 0: every logit is the bias, 0.5 > 0: all open
