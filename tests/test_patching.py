import numpy as np
import pytest
import torch

from sparsecirc.circuit_size import Patcher, needed_for
from sparsecirc.data import AdditionTask
from sparsecirc.gates import causal_mask
from sparsecirc.model import build_model
from sparsecirc.patching import PatchingPairs, logit_difference, make_pairs, patched_logits, record_attention
from sparsecirc.sparse_attention import set_gate_bias


@pytest.fixture
def tiny_model_and_pairs(tiny_config, tiny_split):
    model = build_model(tiny_config)
    model.eval()
    return model, make_pairs(tiny_split.task, 12, seed=0)


def test_pairs_are_balanced_one_digit_corruptions():
    task = AdditionTask()
    pairs = make_pairs(task, 40, seed=3)
    assert len(pairs) == 40 and sum(pairs.flips_carry) == 20
    for (a, b), (a2, b2), flips in zip(pairs.clean, pairs.corrupted, pairs.flips_carry):
        changed = [x != y for x, y in zip(f"{a:02d}{b:02d}", f"{a2:02d}{b2:02d}")]
        assert sum(changed) == 1
        assert flips == (task.carries(a, b) != task.carries(a2, b2))
    assert make_pairs(task, 40, seed=3) == pairs
    for n, kind in [(7, "int"), ("4", "str"), (4.0, "float"), (True, "bool")]:
        with pytest.raises(ValueError, match=f"n must be an even int >= 2 .*, got .* \\({kind}\\)"):
            make_pairs(task, n)
    with pytest.raises(ValueError, match="task must be an AdditionTask"):
        make_pairs("add_d2_a5", 4)


def test_logit_difference_by_hand():
    logits = torch.zeros(1, 3, 13)
    logits[0, 1, 4], logits[0, 1, 6] = 2.0, -1.0  # slot 1: clean digit 4, corrupted 6
    logits[0, 2, 8] = 5.0  # slot 2 is the same in both: ignored
    clean, corrupted = torch.tensor([[0, 4, 8]]), torch.tensor([[0, 6, 8]])
    assert logit_difference(logits, clean, corrupted).tolist() == [3.0]
    with pytest.raises(ValueError, match="at least one answer digit"):
        logit_difference(logits, clean, clean)
    no_pairs = torch.zeros(0, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="targets must both be \\[pairs, answer_digits\\] with at least one pair"):
        logit_difference(logits[:0], no_pairs, no_pairs)
    with pytest.raises(ValueError, match="a whole number of copies of the 1 pairs, got shape \\[0, 3, 13\\]"):
        logit_difference(logits[:0], clean, corrupted)


@pytest.mark.parametrize("gate_bias", [None, 0.5])
def test_patching_with_itself_changes_nothing_and_everything_gives_the_corrupted_run(tiny_model_and_pairs, gate_bias):
    model, pairs = tiny_model_and_pairs
    clean_tokens, corrupted_tokens, _, _ = pairs.tokens()
    clean_run = record_attention(model, clean_tokens, gate_bias=gate_bias)
    corrupted_run = record_attention(model, corrupted_tokens, gate_bias=gate_bias)
    seq = pairs.task.seq_len
    shape = (1, model.cfg.n_layers, model.cfg.n_heads, seq, seq)
    mlps = torch.zeros(1, model.cfg.n_layers)
    with_itself = patched_logits(model, clean_tokens, clean_run, torch.zeros(shape), mlps, gate_bias=gate_bias)
    assert torch.allclose(with_itself, clean_run["logits"], atol=1e-5)
    everything = patched_logits(model, clean_tokens, corrupted_run, torch.zeros(shape), mlps, gate_bias=gate_bias)
    answers = pairs.task.prompt_len
    assert torch.allclose(everything[:, answers:], corrupted_run["logits"][:, answers:], atol=1e-5)
    # one head patched changes the answers (the patch does something)
    one_head = torch.ones(shape)
    one_head[0, 0, 0] = 0
    assert not torch.allclose(patched_logits(model, clean_tokens, corrupted_run, one_head, None, gate_bias=gate_bias),
                              clean_run["logits"])
    with pytest.raises(ValueError, match="keep must be"):
        patched_logits(model, clean_tokens, corrupted_run, torch.ones(1, 9, 9, seq, seq))


def test_explained_effect_is_one_with_everything_kept_and_zero_with_nothing(tiny_model_and_pairs):
    model, pairs = tiny_model_and_pairs
    patcher = Patcher(model, pairs, progress=False, batch_limit=50)  # several passes of 4 variants
    effects = patcher.effects()
    n_edges = int(effects.edge_candidates.sum())
    seq = pairs.task.seq_len
    assert n_edges == model.cfg.n_layers * model.cfg.n_heads * seq * (seq + 1) // 2  # dense: every causal edge
    assert effects.full_effect != 0
    edge_curve = patcher.edge_curve(effects, [0, 1, n_edges])
    assert edge_curve[0].item() == pytest.approx(0.0, abs=1e-5) and edge_curve[-1].item() == pytest.approx(1.0, abs=1e-5)
    n_heads = model.cfg.n_layers * model.cfg.n_heads
    head_curve = patcher.head_curve(effects, list(range(n_heads + 1)))
    assert head_curve[0].item() == pytest.approx(0.0, abs=1e-5) and head_curve[-1].item() == pytest.approx(1.0, abs=1e-5)
    assert needed_for(list(range(n_heads + 1)), head_curve, 1.0 - 1e-5) is not None
    assert needed_for([0, 1], torch.tensor([0.1, 0.2]), 0.9) is None
    curves = patcher.curves(effects)  # the usual points, as notebooks 05 and 06 draw them
    head_ks, heads = curves["heads"]
    edge_ks, edges = curves["edges"]
    assert head_ks == list(range(n_heads + 1)) and torch.allclose(heads, head_curve)
    assert edge_ks[0] == 0 and edge_ks[-1] == n_edges and edge_ks == sorted(set(edge_ks))
    assert edges[-1].item() == pytest.approx(1.0, abs=1e-5)
    import matplotlib

    matplotlib.use("Agg")
    from sparsecirc.plots import plot_size_curves

    fig = plot_size_curves({"tiny": curves}, level=0.5)
    assert len(fig.axes) == 2 and "for 50%" in fig.axes[1].get_legend().get_texts()[0].get_text()


def test_closed_edges_have_no_effect_in_a_sparse_model(tiny_model_and_pairs):
    """Patching every edge closed in both runs leaves the metric where it is; patching the open
    ones moves it. Checked by running the patches, not read off the effects table."""
    model, pairs = tiny_model_and_pairs
    set_gate_bias(model, 0.0)  # a sparse model: its own gates are used, no bias passed below
    patcher = Patcher(model, pairs, progress=False)
    candidates = patcher.edge_candidates()
    closed = ~candidates & causal_mask(pairs.task.seq_len)
    assert closed.any() and candidates.any()
    clean = patcher.run(torch.ones(1, *patcher.shape))[0]
    closed_patched = patcher.run((~closed).float()[None])[0]
    open_patched = patcher.run((~candidates).float()[None])[0]
    assert closed_patched.item() == pytest.approx(clean.item(), abs=1e-5)
    assert abs(open_patched.item() - clean.item()) > 1e-3


def test_patching_and_evaluation_leave_the_train_mode_as_they_found_it(tiny_model_and_pairs):
    from sparsecirc.circuit import circuit_graph, edge_frequency
    from sparsecirc.evaluation import evaluate, predict

    model, pairs = tiny_model_and_pairs
    task = pairs.task
    model.train()
    Patcher(model, pairs, progress=False).effects()
    predict(model, task, "3+4")
    circuit_graph(model, task, "3+4")
    edge_frequency(model, task, [(1, 2)], gate_bias=0.0)
    assert model.training
    with pytest.raises(ValueError, match="outside"):
        evaluate(model, task, [(1, 2), (1, 99)], batch_size=1)  # fails in the second batch, inside the gated run
    assert model.training
    for bad in (0, -5, 2.5, True):
        with pytest.raises(ValueError, match="batch_size"):
            evaluate(model, task, [(1, 2)], batch_size=bad)
    with pytest.raises(ValueError, match="at least one problem"):
        evaluate(model, task, [])


def test_patch_masks_must_be_zeros_and_ones_of_the_right_shape(tiny_model_and_pairs):
    model, pairs = tiny_model_and_pairs
    clean_tokens, corrupted_tokens, _, _ = pairs.tokens()
    corrupted_run = record_attention(model, corrupted_tokens)
    seq = pairs.task.seq_len
    shape = (1, model.cfg.n_layers, model.cfg.n_heads, seq, seq)
    with pytest.raises(ValueError, match="keep must hold only 0"):
        patched_logits(model, clean_tokens, corrupted_run, torch.full(shape, 2.0))
    with pytest.raises(ValueError, match="keep_mlp must be"):
        patched_logits(model, clean_tokens, corrupted_run, torch.ones(shape), torch.ones(1, 7))
    with pytest.raises(ValueError, match="keep_mlp must hold only 0"):
        patched_logits(model, clean_tokens, corrupted_run, torch.ones(shape), torch.full((1, model.cfg.n_layers), 0.5))


def test_patching_pairs_refuse_lists_of_different_lengths_and_same_sum_pairs():
    task = AdditionTask(2, 5)
    with pytest.raises(ValueError, match="equally long"):
        PatchingPairs(task, ((1, 2), (3, 4)), ((1, 3),), (False, False))
    with pytest.raises(ValueError, match="equally long"):
        PatchingPairs(task, ((1, 2),), ((1, 3),), ())
    with pytest.raises(ValueError, match="not empty"):
        PatchingPairs(task, (), (), ())
    with pytest.raises(ValueError, match="pair 1: 30\\+4 and 31\\+3 have the same sum"):
        PatchingPairs(task, ((1, 2), (30, 4)), ((1, 3), (31, 3)), (False, False))
    with pytest.raises(ValueError, match="same sum"):  # identical
        PatchingPairs(task, ((5, 6),), ((5, 6),), (False,))
    with pytest.raises(ValueError, match="0..99"):
        PatchingPairs(task, ((100, 2),), ((1, 3),), (False,))
    with pytest.raises(ValueError, match="operand np.int64\\(5\\) is a numpy.int64; operands must be Python ints"):
        PatchingPairs(task, ((np.int64(5), 2),), ((1, 3),), (False,))
    with pytest.raises(ValueError, match="True or False"):
        PatchingPairs(task, ((1, 2),), ((1, 3),), (1,))
    with pytest.raises(ValueError, match="clean must be a tuple or list"):
        PatchingPairs(task, None, None, None)
    for n, seed, message in [(10**30, 0, "n must be at most 100,000"), (4, None, "seed must be an int"),
                             (4, "x", "seed must be an int"), (4, float("nan"), "seed must be an int")]:
        with pytest.raises(ValueError, match=message):  # 10**30 once looped for ever
            make_pairs(task, n, seed)
    pairs = PatchingPairs(task, [[1, 2]], [(1, 3)], [False])
    assert pairs.clean == ((1, 2),) and pairs.corrupted == ((1, 3),) and len(pairs) == 1


def test_curves_and_needed_for_refuse_counts_that_do_not_fit(tiny_model_and_pairs):
    model, pairs = tiny_model_and_pairs
    with pytest.raises(ValueError, match="pairs must be PatchingPairs"):
        Patcher(model, "pairs", progress=False)
    patcher = Patcher(model, pairs, progress=False)
    effects = patcher.effects()
    for call, message in [(lambda: patcher.edge_curve(effects, [-1]), "ks must be .* it holds -1"),  # kept all but one
                          (lambda: patcher.head_curve(effects, [-1]), "ks must be .* it holds -1"),
                          (lambda: patcher.head_curve(effects, [1.5]), "it holds 1.5 \\(float\\)"),
                          (lambda: patcher.edge_curve(effects, []), "got an empty list"),
                          (lambda: patcher.edge_curve(effects, 5), "ks must be .* got int"),
                          (lambda: patcher.edge_curve("effects", [1]), "effects must be the PatchingEffects"),
                          (lambda: patcher.curves(None), "effects must be the PatchingEffects"),
                          (lambda: patcher.run([[1]]), "keep must be a tensor"),
                          (lambda: needed_for([0, 1, 2], torch.tensor([0.1, 0.95])), "one value per k \\(3\\)"),
                          (lambda: needed_for([0, 1], torch.tensor([0.1, 0.5, 0.95])), "one value per k \\(2\\)"),
                          (lambda: needed_for([2, 1, 0], torch.tensor([0.95, 0.95, 0.1])), "strictly ascending"),
                          (lambda: needed_for([0, 1], [0.1, 0.95]), "explained must be a 1-D tensor"),
                          (lambda: needed_for([0, 1], torch.tensor([0.1, 0.95]), float("nan")), "level must be a finite"),
                          (lambda: needed_for(["a", "b"], torch.tensor([0.1, 0.95])), "it holds 'a'"),
                          (lambda: needed_for([], torch.tensor([])), "got an empty list")]:
        with pytest.raises(ValueError, match=message):
            call()


def test_functions_that_take_tokens_refuse_another_tasks_tokens(tiny_config):
    from sparsecirc.evaluation import answer_logits
    from sparsecirc.patching import patched_logits, record_attention
    from sparsecirc.plots import attention_patterns
    model = build_model(tiny_config)  # 1-digit operands, 6 positions
    two_digit = AdditionTask(2, 5)
    tokens, _ = two_digit.batch([(36, 28)])
    with pytest.raises(ValueError, match="built for add_d1_a2"):
        answer_logits(model, tokens, two_digit)
    with pytest.raises(ValueError, match="built for add_d1_a2"):
        attention_patterns(model, two_digit, "36+28")
    with pytest.raises(ValueError, match="shape \\[batch, 6\\] for add_d1_a2"):
        record_attention(model, tokens[:, :6].contiguous()[:, :5])
    with pytest.raises(ValueError, match="shape \\[batch, 6\\] for add_d1_a2"):
        record_attention(model, tokens)
    with pytest.raises(ValueError, match="long ids"):
        record_attention(model, torch.full((1, 6), 20))
    keep = torch.ones(1, 2, 2, 11, 11)
    with pytest.raises(ValueError, match="shape \\[batch, 6\\]"):
        patched_logits(model, tokens, {}, keep)
