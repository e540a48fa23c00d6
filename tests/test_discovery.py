import pytest
import torch
from transformer_lens.tools.analysis.attribution_patching import EdgeAttributionConfig, attribution_patch
from transformer_lens.tools.analysis.attribution_patching import faithfulness as faithfulness_of_residual_edges

from sparsecirc import discovery
from sparsecirc.circuit_size import Patcher
from sparsecirc.gates import causal_mask
from sparsecirc.model import build_model
from sparsecirc.patching import PatchingPairs, logit_difference, make_pairs
from sparsecirc.sparse_attention import set_gate_bias


@pytest.fixture
def dense_and_sparse(tiny_config, tiny_split):
    """The tiny model dense, and a copy of it made sparse by gating it at bias 0 (about half the
    edges of each input closed), with 12 pairs."""
    dense, sparse = build_model(tiny_config), build_model(tiny_config)
    set_gate_bias(sparse, 0.0)
    return dense, sparse, make_pairs(tiny_split.task, 12, seed=0)


def test_eap_scores_summed_over_keys_are_transformer_lens_node_scores(dense_and_sparse):
    """With one step, EAP-IG is TransformerLens' EAP: per pair, the scores of a head's edges into
    query q add up to the library's score of that head's output at position q."""
    for model in dense_and_sparse[:2]:
        pairs = dense_and_sparse[2]
        for n in range(3):
            one = PatchingPairs(pairs.task, pairs.clean[n:n + 1], pairs.corrupted[n:n + 1], pairs.flips_carry[n:n + 1])
            clean, corrupted, clean_targets, corrupted_targets = one.tokens()
            ours = discovery.attribution_scores(model, one, ig_steps=1).sum(-1)  # [layer, head, query]

            def metric(logits):
                return logit_difference(logits[:, one.task.prompt_len:], clean_targets, corrupted_targets).sum()

            model.eval()
            theirs = attribution_patch(model, clean, corrupted, metric, EdgeAttributionConfig(granularity="node"))
            heads = {(node.layer, node.head, node.position): score for node, score in theirs.node_scores.items()
                     if node.kind == "attn_head_out"}
            assert len(heads) == ours.numel()
            for (layer, head, position), score in heads.items():
                assert ours[layer, head, position].item() == pytest.approx(score, rel=1e-4, abs=1e-5)


def test_eap_equals_patching_where_the_metric_is_linear_in_the_edge(dense_and_sparse):
    """Make everything after the last layer's attention linear (its MLP writes 0, the final
    LayerNorm is the identity): then patching one edge of that layer changes the metric by
    exactly its EAP score."""
    model, pairs = dense_and_sparse[0], dense_and_sparse[2]
    with torch.no_grad():
        for parameter in model.blocks[-1].mlp.out.parameters():
            parameter.zero_()
    model.ln_final.forward = lambda x: model.ln_final.hook_normalized(x)
    scores = discovery.attribution_scores(model, pairs)
    effects = Patcher(model, pairs, progress=False).effects().edge_effects
    torch.testing.assert_close(scores[-1], effects[-1], rtol=1e-4, atol=1e-5)
    assert scores[-1].abs().max() > 1e-3  # the comparison is not between zeros
    assert not torch.allclose(scores[0], effects[0], rtol=1e-3, atol=1e-4)  # upstream it is only an estimate


def test_integrated_gradients_differ_from_one_step_and_converge(dense_and_sparse):
    model, pairs = dense_and_sparse[0], dense_and_sparse[2]
    one, five, fifty = (discovery.attribution_scores(model, pairs, k) for k in (1, 5, 50))
    assert not torch.allclose(one, five)
    assert (five - fifty).abs().max() < (one - fifty).abs().max()


def test_faithfulness_of_everything_is_one_and_of_nothing_zero(dense_and_sparse):
    for model in dense_and_sparse[:2]:
        for ablation in ("corrupt", "mean"):
            patcher = Patcher(model, dense_and_sparse[2], progress=False, ablation=ablation)
            everything = causal_mask(patcher.shape[-1]).expand(*patcher.shape)
            values = discovery.faithfulness(patcher, torch.stack([everything, torch.zeros_like(everything)]))
            torch.testing.assert_close(values, torch.tensor([1.0, 0.0]), rtol=0, atol=1e-5)


def test_mean_ablation_patches_each_edge_to_its_mean_term(dense_and_sparse):
    """Patching with every edge at its mean is not the corrupted run: the two empties differ."""
    model, pairs = dense_and_sparse[0], dense_and_sparse[2]
    corrupt, mean = (Patcher(model, pairs, progress=False, ablation=a).endpoints() for a in ("corrupt", "mean"))
    assert corrupt[0] == pytest.approx(mean[0], abs=1e-5)  # the same clean run
    assert abs(corrupt[1] - mean[1]) > 1e-3


def test_closed_edges_of_a_sparse_model_score_zero_in_every_method(dense_and_sparse):
    sparse, pairs = dense_and_sparse[1], dense_and_sparse[2]
    patcher = Patcher(sparse, pairs, progress=False)
    read = discovery.read_off(patcher)
    assert 0 < read.sum() < causal_mask(patcher.shape[-1]).expand(*patcher.shape).sum()  # some closed, some open
    for steps in (1, 4):
        scores = discovery.attribution_scores(sparse, pairs, steps)
        assert (scores[~read] == 0).all()
        assert (scores[read] != 0).any()
    found = discovery.acdc(patcher, 0.0, progress=False)
    assert not (found.circuit & ~read).any()
    assert discovery.faithfulness(patcher, read).item() == pytest.approx(1.0, abs=1e-6)  # the read-off needs no search


def test_acdc_circuit_holds_its_faithfulness_when_evaluated_again(dense_and_sparse):
    dense, pairs = dense_and_sparse[0], dense_and_sparse[2]
    patcher = Patcher(dense, pairs, progress=False)
    small, large = (discovery.acdc(patcher, t, progress=False) for t in (0.05, 0.0))
    assert small.n_edges < large.n_edges <= discovery.n_attention_edges(patcher)
    for found in (small, large):
        assert discovery.faithfulness(patcher, found.circuit).item() == pytest.approx(found.faithfulness, abs=1e-5)
    assert large.faithfulness >= 1 - 1e-5  # at threshold 0 no removal may cost anything
    assert small.tested == discovery.n_attention_edges(patcher)  # a dense model: every causal edge is tried


def test_top_edge_curves_and_sizes(dense_and_sparse):
    dense, pairs = dense_and_sparse[0], dense_and_sparse[2]
    patcher = Patcher(dense, pairs, progress=False)
    scores = discovery.attribution_scores(dense, pairs)
    n = discovery.n_attention_edges(patcher)
    ks = discovery.size_grid(n)
    assert ks[0] == 0 and ks[-1] == n and ks == sorted(set(ks))
    curve = discovery.faithfulness_curve(patcher, scores, ks)
    assert curve[0].item() == pytest.approx(0.0, abs=1e-5) and curve[-1].item() == pytest.approx(1.0, abs=1e-5)
    needed = discovery.edges_needed(ks, curve)
    assert set(needed) == {0.8, 0.9, 0.95} and needed[0.8] <= needed[0.9] <= needed[0.95] <= n


def test_discovery_refuses_bad_input_with_a_clear_message(dense_and_sparse):
    dense, sparse, pairs = dense_and_sparse
    patcher = Patcher(dense, pairs, progress=False)
    shape = patcher.shape
    with pytest.raises(ValueError, match="ig_steps"):
        discovery.attribution_scores(dense, pairs, ig_steps=0)
    with pytest.raises(ValueError, match="PatchingPairs"):
        discovery.attribution_scores(dense, [(1, 2)])
    with pytest.raises(ValueError, match="equally long"):
        PatchingPairs(pairs.task, pairs.clean, pairs.corrupted[:-1], pairs.flips_carry)
    with pytest.raises(ValueError, match=r"\[layer, head, query, key\]"):
        discovery.faithfulness(patcher, torch.zeros(0, *shape))  # no circuit at all
    with pytest.raises(ValueError, match=r"\[layer, head, query, key\]"):
        discovery.faithfulness(patcher, torch.ones(1, 2, 3))
    unknown = torch.zeros(shape)
    unknown[0, 0, 0, 1] = 1  # key after query: no such edge
    with pytest.raises(ValueError, match="later key"):
        discovery.faithfulness(patcher, unknown)
    with pytest.raises(ValueError, match="0 .* and 1"):
        discovery.faithfulness(patcher, torch.full(shape, 0.5))
    with pytest.raises(ValueError, match="threshold"):
        discovery.acdc(patcher, 1.5)
    with pytest.raises(ValueError, match="sparse model"):
        discovery.read_off(patcher)
    with pytest.raises(ValueError, match="ks must be"):
        discovery.faithfulness_curve(patcher, torch.zeros(shape), [discovery.n_attention_edges(patcher) + 1])
    with pytest.raises(ValueError, match="ablation"):
        Patcher(dense, pairs, ablation="zero")


def test_transformer_lens_edge_attribution_runs_and_its_edges_add_up_to_its_node_scores(dense_and_sparse):
    """With ``use_split_qkv_input`` each head reads its own copy of the residual stream (the same
    logits), so the library's residual-edge EAP and faithfulness run on our models; a writer's
    outgoing edge scores add up to its node score, which holds only if every reader's copy is
    the residual stream it should be."""
    for model in dense_and_sparse[:2]:
        pairs = dense_and_sparse[2]
        clean, corrupted, clean_targets, corrupted_targets = pairs.tokens()
        model.eval()
        with torch.no_grad():
            fused = model(clean)
            model.set_use_split_qkv_input(True)
            split = model(clean)
            model.set_use_split_qkv_input(False)
        torch.testing.assert_close(split, fused, rtol=1e-5, atol=1e-5)

        def metric(logits):
            return logit_difference(logits[:, pairs.task.prompt_len:], clean_targets[:1], corrupted_targets[:1]).sum()

        nodes = attribution_patch(model, clean[:1], corrupted[:1], metric, EdgeAttributionConfig(granularity="node"))
        edges = attribution_patch(model, clean[:1], corrupted[:1], metric, EdgeAttributionConfig(granularity="edge"))
        assert not model.cfg.use_split_qkv_input  # the library restores the flag
        sums = {}
        for (writer, _), score in edges.edge_scores.items():
            sums[writer] = sums.get(writer, 0.0) + score
        assert {node.kind for node in sums} == {"embed", "attn_head_out", "mlp_out"}
        for writer, total in sums.items():
            assert total == pytest.approx(nodes.node_scores[writer], rel=1e-3, abs=1e-5), writer
        everything = faithfulness_of_residual_edges(model, clean[:1], corrupted[:1], metric, list(edges.edge_scores))
        assert everything.recovered == pytest.approx(1.0, abs=1e-5)


def test_discover_fills_the_table_and_draws_it(dense_and_sparse, tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    from sparsecirc.plots import plot_discovery_curves

    dense, sparse, pairs = dense_and_sparse
    few = make_pairs(pairs.task, 2, seed=1)
    results = discovery.discover(dense, sparse, pairs, few, progress=False, ig_steps=(3,), acdc_thresholds=(0.0, 0.05))
    methods = {(r.model, r.method, r.unit) for r in results}
    assert ("sparse", "read-off", "attention edge") in methods and ("dense", "read-off", "attention edge") not in methods
    assert {("dense", "EAP (TransformerLens)", "residual edge"), ("sparse", "EAP-IG (k=3)", "attention edge")} <= methods
    read = next(r for r in results if r.method == "read-off")
    assert read.faithfulness == [pytest.approx(1.0, abs=1e-6)] and read.jaccard_read_off == 1.0
    for r in results:
        row = r.row()
        assert set(row) >= {"edges_80", "edges_90", "edges_95", "heads", "seconds", "jaccard_read_off"}
        assert len(r.sizes) == len(r.faithfulness) and 0 <= r.jaccard_read_off <= 1
        if r.model == "sparse" and r.unit == "attention edge" and r.needed[0.9] is not None:
            assert r.needed[0.9] <= read.needed[0.9]  # discovery on the sparse model never needs more than its open edges
    fig = plot_discovery_curves(results)
    assert len(fig.axes) == 4  # two units x two models
    fig.savefig(tmp_path / "curves.png")
    with pytest.raises(ValueError, match="MethodResult"):
        plot_discovery_curves([])


def test_discover_refuses_bad_input_before_any_work(dense_and_sparse):
    dense, sparse, pairs = dense_and_sparse
    with pytest.raises(ValueError, match="without gates"):
        discovery.discover(sparse, dense, pairs)  # swapped
    with pytest.raises(ValueError, match="acdc_thresholds"):
        discovery.discover(dense, sparse, pairs, acdc_thresholds=())
    with pytest.raises(ValueError, match="ig_steps"):
        discovery.discover(dense, sparse, pairs, ig_steps=5)
    with pytest.raises(ValueError, match="unknown options"):
        discovery.discover(dense, sparse, pairs, threshold=0.1)
    with pytest.raises(ValueError, match="PatchingPairs"):
        discovery.discover(dense, sparse, pairs, residual_pairs=[(1, 2)])
    with pytest.raises(ValueError, match="Nodes"):
        discovery.residual_faithfulness(dense, pairs, [[("writer", "reader", "x", "y")]])


def test_the_share_of_the_read_off_kept_is_one_when_a_circuit_holds_all_of_it(dense_and_sparse):
    dense, sparse, pairs = dense_and_sparse
    results = discovery.discover(dense, sparse, pairs, progress=False, ig_steps=(2,), acdc_thresholds=(0.0,))
    for r in results:
        assert 0 <= r.contains_read_off <= 1
        assert r.contains_read_off >= r.jaccard_read_off
    assert next(r for r in results if r.method == "read-off").contains_read_off == 1.0


def test_exercise_checkers_say_what_is_wrong(dense_and_sparse):
    dense, _, pairs = dense_and_sparse
    patcher = Patcher(dense, pairs, progress=False)
    scores = discovery.attribution_scores(dense, pairs)
    assert discovery.check_attention_scores(None, dense, pairs).startswith("not yet")
    assert discovery.check_attention_scores(scores[0], dense, pairs).startswith("not yet: expected shape")
    assert discovery.check_attention_scores(-scores, dense, pairs).startswith("almost: the sign")
    assert discovery.check_attention_scores(scores * len(pairs), dense, pairs).startswith("almost: off by a factor")
    assert discovery.check_attention_scores(scores.clone(), dense, pairs) == "correct"
    right = discovery.faithfulness_curve(patcher, scores, [5]).item()
    assert discovery.check_top_edges_faithfulness(None, patcher, scores, 5).startswith("not yet")
    assert discovery.check_top_edges_faithfulness(right, patcher, scores, 5) == "correct"
    assert discovery.check_top_edges_faithfulness(right + 0.5, patcher, scores, 5).startswith("not yet: got")
