"""The GatedTransformer: TransformerLens' hook points with the shapes they promise, the gate read
off the score the softmax reads, TransformerLens' initial weights, and TransformerLens' own
analysis tools running on it."""

import pytest
import torch
from transformer_lens.tools.analysis.attribution_patching import EdgeAttributionConfig, attribution_patch

from transformer_lens.model_bridge import TransformerBridge

from conftest import TINY, bridge_twin
from sparsecirc import AdditionTask, GatedTransformer, ModelConfig, build_model, load_checkpoint, set_gate_bias, sparse_attention
from sparsecirc.paths import reference_base_checkpoint_path


def _tokens(config, n=5):
    task = config.task
    return task.batch(task.all_pairs()[:: task.n_problems // n][:n])[0]


def test_hook_points_carry_what_their_names_say(tiny_config):
    model = build_model(tiny_config.sparse(0.5))
    tokens = _tokens(tiny_config)
    b, p = tokens.shape
    h, d, m = tiny_config.n_heads, tiny_config.d_head, tiny_config.d_model
    _, cache = model.run_with_cache(tokens)
    shapes = {"attn.hook_q": (b, p, h, d), "attn.hook_k": (b, p, h, d), "attn.hook_v": (b, p, h, d),
              "attn.hook_z": (b, p, h, d), "attn.hook_attn_scores": (b, h, p, p), "attn.hook_gate_logits": (b, h, p, p),
              "attn.hook_gates": (b, h, p, p), "attn.hook_pattern": (b, h, p, p), "hook_resid_pre": (b, p, m),
              "hook_attn_out": (b, p, m), "hook_mlp_out": (b, p, m), "mlp.hook_post": (b, p, tiny_config.d_mlp)}
    for name, shape in shapes.items():
        assert tuple(cache[f"blocks.1.{name}"].shape) == shape, name
    scores, logits = cache["blocks.1.attn.hook_attn_scores"], cache["blocks.1.attn.hook_gate_logits"]
    causal = torch.ones(p, p, dtype=torch.bool).tril()
    assert torch.equal(logits[..., causal], scores[..., causal] + 0.5)  # the gate reads the softmax's score
    gates = cache["blocks.1.attn.hook_gates"]
    assert torch.equal(gates[..., causal], (logits[..., causal] > 0).float())
    pattern = torch.softmax(scores, dim=-1) * gates  # no renormalisation
    torch.testing.assert_close(cache["blocks.1.attn.hook_pattern"], pattern)
    _, dense_cache = build_model(tiny_config).run_with_cache(tokens)
    assert "blocks.1.attn.hook_gates" not in dense_cache  # a dense model computes no gates


def test_a_patched_score_moves_the_softmax_and_the_gates_together(tiny_config):
    model = build_model(tiny_config.sparse(0.5))
    tokens = _tokens(tiny_config)
    lowered = [(f"blocks.{l}.attn.hook_attn_scores", lambda s, hook: s - 100.0) for l in range(tiny_config.n_layers)]
    with sparse_attention(model) as gates:
        model.run_with_hooks(tokens, fwd_hooks=lowered)
    assert gates.open_edges.sum() == 0  # every logit is now below 0: every gate shut


def test_answer_slots_alone_give_the_same_logits(tiny_config):
    model = build_model(tiny_config.sparse(0.5))
    tokens = _tokens(tiny_config)
    start = tiny_config.task.prompt_len
    torch.testing.assert_close(model(tokens, output_from=start), model(tokens)[:, start:])
    with pytest.raises(ValueError, match="context"):
        model(torch.zeros(1, tokens.shape[1] + 1, dtype=torch.long))


SHAPES = {"tiny": TINY, "2-digit": ModelConfig(), "3-digit": ModelConfig(operand_digits=3, seed=7),
          "odd widths": ModelConfig(n_layers=3, n_heads=3, d_head=5, d_model=17, d_mlp=33, seed=12345)}


@pytest.mark.parametrize("config", SHAPES.values(), ids=SHAPES.keys())
def test_initial_weights_are_transformer_lens_native(config):
    """build_model draws TransformerLens' boot_native weights itself (sparsecirc.transformer): bit for bit the same."""
    model = build_model(config)
    booted = TransformerBridge.boot_native(model.cfg)
    for name, value in booted.state_dict().items():
        assert torch.equal(model.state_dict()[name], value), name
    assert set(booted.state_dict()) == set(model.state_dict()) == set(bridge_twin(build_model(config)).state_dict())
    assert not torch.equal(build_model(config).embed.weight,
                           build_model(config.__class__(**{**config.to_dict(), "seed": config.seed + 1})).embed.weight)


def test_an_init_this_package_does_not_draw_is_refused_by_name():
    import copy
    from sparsecirc.transformer import native_initial_weights

    cfg = copy.deepcopy(build_model(TINY).cfg)
    cfg.init_mode = "xavier_uniform"
    with pytest.raises(ValueError, match="only TransformerLens' 'gpt2' init"):
        native_initial_weights(cfg)


@pytest.mark.parametrize("gated", [False, True])
def test_transformer_lens_attribution_patching_runs_and_agrees_with_the_bridge(gated):
    """TransformerLens 4.3's attribution_patch (node granularity) on the shipped base model, dense
    and gated: the same node scores as TransformerLens' own bridge with the same weights."""
    model, _ = load_checkpoint(reference_base_checkpoint_path())
    task = AdditionTask(2, 5)
    clean, _ = task.batch([(36, 28), (53, 21)])
    corrupt, _ = task.batch([(36, 21), (53, 28)])
    slot = task.prompt_len + 4

    def metric(logits):
        return logits[0, slot, clean[0, 4]] - logits[0, slot, corrupt[0, 4]]

    twin = bridge_twin(model).eval()
    if gated:
        set_gate_bias(model, 3.0)
        set_gate_bias(twin, 3.0)
    ours = attribution_patch(model, clean, corrupt, metric, EdgeAttributionConfig(granularity="node"))
    theirs = attribution_patch(twin, clean, corrupt, metric, EdgeAttributionConfig(granularity="node"))
    assert isinstance(model, GatedTransformer) and len(ours.node_scores) > 0
    assert set(ours.node_scores) == set(theirs.node_scores)
    for node, score in theirs.node_scores.items():
        assert ours.node_scores[node] == pytest.approx(score, rel=1e-3, abs=1e-4), node
    assert any(abs(score) > 1e-3 for score in ours.node_scores.values())


def test_hooks_cannot_reach_the_weights_and_copies_leave_blocks_behind(tiny_config):
    import copy
    import pickle

    model = build_model(tiny_config.sparse(0.5))
    tokens = _tokens(tiny_config)
    weights = model.pos_embed.weight.detach().clone()
    with torch.no_grad():
        model.run_with_hooks(tokens, fwd_hooks=[("hook_pos_embed", lambda x, hook: x.zero_())])
    assert torch.equal(model.pos_embed.weight, weights)  # an in-place edit changed this run only
    gated = model(tokens)
    with sparse_attention(model, "dense"):
        model(tokens).sum().backward()  # a recorded pass with a graph
        twin, unpickled = copy.deepcopy(model), pickle.loads(pickle.dumps(model))
    for other in (twin, unpickled):
        assert torch.equal(other(tokens), gated)  # its own gates, not the block's dense mode


def test_building_a_model_leaves_the_global_rng_alone(tiny_config):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_model(tiny_config)
    assert torch.equal(torch.rand(3), expected)


def test_the_in_place_relu_never_reaches_what_a_hook_or_the_graph_holds(tiny_config):
    """Without gradients or a hook on ``hook_pre`` the MLP applies its ReLU in place; a cached
    pre-activation keeps its negative values, and all three routes give the same logits."""
    model = build_model(tiny_config)
    tokens, _ = AdditionTask(1, 2).batch([(3, 4), (9, 9), (0, 5)])
    with torch.no_grad():
        in_place = model(tokens)
        cached_logits, cache = model.run_with_cache(tokens)
    with_graph = model(tokens)
    kept = []  # a plain torch hook on the layer whose output the pre-activation is
    handle = getattr(model.blocks[0].mlp, "in").register_forward_hook(lambda module, inputs, output: kept.append(output))
    try:
        with torch.no_grad():
            hooked = model(tokens)
    finally:
        handle.remove()
    assert (kept[0] < 0).any() and torch.equal(hooked, in_place)
    assert (cache["blocks.0.mlp.hook_pre"] < 0).any()
    assert torch.equal(cache["blocks.0.mlp.hook_post"], torch.relu(cache["blocks.0.mlp.hook_pre"]))
    assert torch.equal(in_place, cached_logits) and torch.equal(in_place, with_graph.detach())


def test_freed_memory_is_kept_only_inside_the_outermost_block():
    from sparsecirc import memory

    assert memory._depth == 0
    with pytest.raises(RuntimeError, match="inside"):
        with memory.keep_freed_memory():
            with memory.keep_freed_memory():
                assert memory._depth == (2 if memory._GLIBC is not None else 0)
            raise RuntimeError("inside")
    assert memory._depth == 0  # left even by an exception
