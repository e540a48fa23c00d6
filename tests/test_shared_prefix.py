"""Evaluation with each operand prefix computed once (GatedTransformer.run_shared_prefix) gives what
the whole forward pass gives: the same answers, failures and open edges, for every gating evaluate
offers; and it steps aside when a user's hook is attached. A TransformerLens bridge with the same
weights, gated through hooks, agrees too: both call the gate of sparsecirc.gates."""

from copy import deepcopy

import pytest
import torch

from conftest import bridge_twin
from sparsecirc import AdditionTask, Edge, ModelConfig, build_model, evaluate, load_checkpoint, mask_closing
from sparsecirc.evaluation import answer_logits
from sparsecirc.paths import reference_base_checkpoint_path, reference_sparse_checkpoint_path
from sparsecirc.sparse_attention import analysis_run
from sparsecirc.transformer import GatedTransformer


NEAR = 1e-4  # closer to a decision than this, rounding may tip it either way


def through_whole_pass(monkeypatch, *args, **kwargs):
    """``evaluate`` through the whole forward pass, as for a model with a user's hook."""
    with monkeypatch.context() as patch:
        patch.setattr(GatedTransformer, "has_user_hooks", lambda model: True)
        return evaluate(*args, **kwargs)


def both_passes(model, task, operands, reference=None, **options):
    """Both passes on ``operands`` with ``evaluate``'s gating ``options``: ``(lean, whole)``, each
    ``(logits [n, answer_digits, d_vocab], open edges [n, layer] or None)``: the shared-prefix
    run of ``model`` and the whole forward pass of ``reference`` (default ``model``; a bridge
    twin gates through hooks), and ``unsure`` [n]: the inputs on which the whole pass has a gate
    logit within ``NEAR`` of 0, or two best logits of an answer slot within ``NEAR`` of each other."""
    tokens, _ = task.encode_operands(operands[:, 0], operands[:, 1])
    with analysis_run(model, **options) as gates:
        counted = gates.mode != "dense" or options.get("edge_mask") is not None
        prefix_key = operands[:, 0] * 10 ** (task.operand_digits - 1) + operands[:, 1] // 10
        lean = model.run_shared_prefix(tokens, prefix_key, 2 * task.operand_digits, task.prompt_len, counted)
    reference = model if reference is None else reference
    with analysis_run(reference, **options) as gates:
        logits = reference(tokens)[:, task.prompt_len:]
        whole = (logits, gates.open_edges.sum(-1) if counted else None)
        best_two = logits.topk(2, dim=-1).values  # [n, answer_digits, 2]
        unsure = ((best_two[..., 0] - best_two[..., 1]) < NEAR).any(-1)
        if gates.mode != "dense":
            unsure |= (gates.logits.abs() < NEAR).flatten(1).any(-1)
    return lean, whole, unsure


def assert_same_where_sure(lean, whole, unsure):
    """Logits to rounding and open edges exactly, on every input not ``unsure``."""
    sure = ~unsure
    assert sure.float().mean() > 0.5  # most inputs are compared
    torch.testing.assert_close(lean[0][sure], whole[0][sure], rtol=1e-4, atol=1e-4)
    if whole[1] is None:
        assert lean[1] is None
    else:
        assert torch.equal(lean[1][sure].float(), whole[1][sure].float())


def assert_evaluations_agree(lean, whole, n_unsure: int):
    """``evaluate``'s summary through both passes: equal but for the unsure inputs."""
    n = whole.n
    assert lean.n == n
    assert abs(lean.exact_match - whole.exact_match) * n <= n_unsure + 1e-6
    assert max(abs(x - y) for x, y in zip(lean.per_digit_accuracy, whole.per_digit_accuracy)) * n <= n_unsure + 1e-6
    if n_unsure == 0:
        assert lean.failures == whole.failures
        assert lean.loss == pytest.approx(whole.loss, rel=1e-4, abs=1e-7)
    assert (lean.open_edges is None) == (whole.open_edges is None)
    if whole.open_edges is not None:  # per input and layer, equal but for the unsure inputs
        assert int((lean.open_edges != whole.open_edges).any(-1).sum()) <= n_unsure


def every_edge_where(model, task, keep):
    return [Edge(layer, head, q, k) for layer in range(model.cfg.n_layers) for head in range(model.cfg.n_heads)
            for q in range(task.seq_len) for k in range(q + 1) if keep(layer, head, q, k)]


@pytest.fixture(scope="module")
def shipped_two_digit():
    base, _ = load_checkpoint(reference_base_checkpoint_path())
    sparse, _ = load_checkpoint(reference_sparse_checkpoint_path())
    task = AdditionTask(2, 5)
    everything = torch.cartesian_prod(torch.arange(100), torch.arange(100))
    return base, sparse, task, everything


@pytest.mark.parametrize("which, options", [  # make test-fast keeps the two sparse cases; make test runs all five
    pytest.param("base", {}, marks=pytest.mark.slow),                                  # dense model
    ("sparse", {}),                                                                    # a sparse model's own gates
    pytest.param("base", {"gate_bias": 3.0}, marks=pytest.mark.slow),                  # gates asked for by name
    ("sparse", {"close": True}),                                                       # ablation on top of the gates
    pytest.param("base", {"close": True, "dense": True}, marks=pytest.mark.slow),      # ablation on a dense model
])
def test_lean_pass_matches_the_whole_pass_on_every_two_digit_problem(shipped_two_digit, monkeypatch, which, options):
    base, sparse, task, everything = shipped_two_digit
    model = base if which == "base" else sparse
    assert not model.has_user_hooks()
    options = dict(options)
    if options.pop("close", False):  # a third of all edges, in every layer: answers change a lot
        options["edge_mask"] = mask_closing(model, every_edge_where(model, task, lambda l, h, q, k: (q + k + h) % 3 == 0))
    lean, whole, unsure = both_passes(model, task, everything, **options)
    assert_same_where_sure(lean, whole, unsure)
    if "edge_mask" in options:  # the closing mattered, so the comparison tested something
        assert (whole[0].argmax(-1) == task.encode_operands(everything[:, 0], everything[:, 1])[1]).all(-1).float().mean() < 0.9


def test_evaluate_gives_the_same_summary_through_either_pass(shipped_two_digit, monkeypatch):
    """``evaluate`` itself (batching, failures, edge counts) through both passes, once, on the
    most involved case: a sparse model's own gates with a third of all edges closed on top."""
    _, sparse, task, everything = shipped_two_digit
    closed = mask_closing(sparse, every_edge_where(sparse, task, lambda l, h, q, k: (q + k + h) % 3 == 0))
    result = evaluate(sparse, task, everything, batch_size=3000, edge_mask=closed)
    whole = through_whole_pass(monkeypatch, sparse, task, everything, batch_size=3000, edge_mask=closed)
    with analysis_run(sparse, edge_mask=closed) as gates:
        answer_logits(sparse, task.encode_operands(everything[:, 0], everything[:, 1])[0], task)
        n_unsure = int((gates.logits.abs() < NEAR).flatten(1).any(-1).sum())
    assert_evaluations_agree(result, whole, n_unsure)
    assert result.exact_match < 0.9 and result.mean_open_edges == pytest.approx(whole.mean_open_edges, abs=n_unsure)


@pytest.mark.slow
def test_lean_pass_matches_the_whole_pass_on_the_three_digit_sparse_model(monkeypatch):
    """The shipped 3-digit sparse model, with its gates and with a third of its layer-0 edges
    closed, on all 10,000 problems with a < 10 (1,000 distinct prefixes) plus 1,000 random
    ones, some repeated, all shuffled."""
    task = AdditionTask(3, 5)
    model, _ = load_checkpoint(reference_sparse_checkpoint_path(operand_digits=3))
    generator = torch.Generator().manual_seed(0)
    scattered = torch.randint(0, 1000, (500, 2), generator=generator)
    operands = torch.cat([torch.cartesian_prod(torch.arange(10), torch.arange(1000)), scattered, scattered])
    operands = operands[torch.randperm(len(operands), generator=generator)]
    closed = mask_closing(model, every_edge_where(model, task, lambda l, h, q, k: l == 0 and (q + k) % 3 == 0))
    for options in ({}, {"edge_mask": closed}):
        lean, whole, unsure = both_passes(model, task, operands, **options)
        assert_same_where_sure(lean, whole, unsure)
    result = evaluate(model, task, operands, edge_mask=closed)
    assert_evaluations_agree(result, through_whole_pass(monkeypatch, model, task, operands, edge_mask=closed),
                             int(unsure.sum()))
    assert result.exact_match < 0.5


@pytest.mark.parametrize("act_fn", ["relu", "gelu", "gelu_new", "silu"])
def test_shared_prefix_logits_match_transformer_lens_for_every_activation(act_fn):
    """Untrained dense 3-digit models, every MLP activation a config allows, against
    TransformerLens' native bridge with the same weights: the 2,000 problems with a < 2 share
    200 prefixes, which the shared-prefix run computes once each."""
    task = AdditionTask(3, 5)
    model = build_model(ModelConfig(3, 5, act_fn=act_fn, seed=7))
    operands = torch.cartesian_prod(torch.arange(2), torch.arange(1000))
    tokens, _ = task.encode_operands(operands[:, 0], operands[:, 1])
    prefix_key = operands[:, 0] * 100 + operands[:, 1] // 10
    with torch.no_grad():
        logits, open_edges = model.run_shared_prefix(tokens, prefix_key, 6, task.prompt_len, count_edges=False)
    with analysis_run(model):
        expected = bridge_twin(model)(tokens)[:, task.prompt_len:]  # TransformerLens' own forward pass
    assert open_edges is None and logits.shape == expected.shape == (2_000, 5, 13)
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)


def test_lean_pass_serves_one_digit_tasks(tiny_config, tiny_split, monkeypatch):
    model = build_model(tiny_config.sparse(1.0))
    everything = torch.cartesian_prod(torch.arange(10), torch.arange(10))
    lean, whole, unsure = both_passes(model, tiny_split.task, everything)
    assert_same_where_sure(lean, whole, unsure)
    assert_evaluations_agree(evaluate(model, tiny_split.task, everything, batch_size=33),
                             through_whole_pass(monkeypatch, model, tiny_split.task, everything, batch_size=33),
                             int(unsure.sum()))


def test_copies_double_models_and_removed_hooks(tiny_config, tiny_split):
    """A deep copy is served with its own gates; a float64 model runs too; removing every hook
    does not ungate a sparse model."""
    model = build_model(tiny_config.sparse(1.0))
    everything = torch.cartesian_prod(torch.arange(10), torch.arange(10))
    before = evaluate(model, tiny_split.task, everything)
    copy = deepcopy(model)
    assert evaluate(copy, tiny_split.task, everything).summary() == before.summary()
    model.reset_hooks(including_permanent=True)
    assert evaluate(model, tiny_split.task, everything).summary() == before.summary()
    seq_len = tiny_split.task.seq_len
    assert before.mean_open_edges < tiny_config.n_layers * tiny_config.n_heads * seq_len * (seq_len + 1) / 2  # gated
    double = build_model(tiny_config.sparse(1.0)).double()
    assert evaluate(double, tiny_split.task, everything).summary()["n_failures"] == before.summary()["n_failures"]


def test_a_model_with_a_user_hook_runs_whole(tiny_config, tiny_split):
    """A hook someone attached must fire on every position: such a model runs whole."""
    model = build_model(tiny_config)
    assert not model.has_user_hooks()
    calls = []
    model.hook_dict["blocks.0.hook_resid_pre"].add_hook(lambda x, hook: calls.append(x.shape[0]), is_permanent=True)
    assert model.has_user_hooks()
    evaluate(model, tiny_split.task, tiny_split.test, batch_size=7)
    assert sum(calls) == len(tiny_split.test)
    model.reset_hooks(including_permanent=True)
    assert not model.has_user_hooks()

    handle = model.blocks[1].register_forward_hook(lambda module, args, out: None)  # a plain torch hook
    assert model.has_user_hooks()
    handle.remove()
    with model.hooks(fwd_hooks=[("blocks.1.attn.hook_pattern", lambda pattern, hook: pattern)]):
        assert model.has_user_hooks()
    assert not model.has_user_hooks()


def _later_threshold(scores, bias, in_place=False):
    return (scores.add_(bias) if in_place else scores + bias) - 6.0  # about half the open gates close


def _halved_pattern(pattern, gates, in_place=False):
    return (pattern.mul_(gates) if in_place else pattern * gates) * 0.5


@pytest.mark.parametrize("where, change", [("gate_logits_from_scores", _later_threshold),
                                           ("gated_pattern", _halved_pattern)])
def test_one_change_to_the_gate_in_gates_py_reaches_both_models(shipped_two_digit, monkeypatch, where, change):
    """The gate logit and pattern x gates are defined once (sparsecirc.gates): changed there,
    the GatedTransformer and a TransformerLens bridge gated through hooks both follow, and
    still agree."""
    _, sparse, task, everything = shipped_two_digit
    operands = everything[::7]
    twin = bridge_twin(sparse)
    before, _, _ = both_passes(sparse, task, operands, twin)
    monkeypatch.setattr(f"sparsecirc.gates.{where}", change)
    lean, whole, unsure = both_passes(sparse, task, operands, twin)
    assert_same_where_sure(lean, whole, unsure)
    if where == "gate_logits_from_scores":  # fewer gates open in both
        assert (whole[1].sum(-1) < before[1].sum(-1)).float().mean() > 0.5
    else:  # layer 0's gates are the same (its input is), the outputs are not
        assert torch.equal(whole[1][:, 0].long(), before[1][:, 0].long())
        assert not torch.allclose(whole[0], before[0], atol=1e-2)


@pytest.mark.parametrize("which", ["base", "sparse"])
def test_a_transformer_lens_bridge_with_the_same_weights_agrees(shipped_two_digit, which):
    """The shipped models' weights in TransformerLens' native bridge, gated through hooks: the
    same answers and open edges on every 2-digit problem (but the unsure ones)."""
    base, sparse, task, everything = shipped_two_digit
    model = base if which == "base" else sparse
    options = {"gate_bias": 3.0} if which == "base" else {}
    lean, whole, unsure = both_passes(model, task, everything, bridge_twin(model), **options)
    assert_same_where_sure(lean, whole, unsure)
