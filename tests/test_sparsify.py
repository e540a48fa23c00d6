import copy
import importlib
import math
import warnings

import pytest
import torch

from sparsecirc.checkpoint import load_checkpoint, save_checkpoint
from sparsecirc.evaluation import evaluate
from sparsecirc.model import build_model
from sparsecirc.sparse_attention import set_gate_bias, sparse_attention
from sparsecirc.sparsify import (LagrangeMultiplier, SparsifyConfig, SparsifyWarning, duplicate_edges, missed_bar, more_steps,
                                 sparsify, sparsify_step)
from sparsecirc.training import TrainConfig, train

sparsify_module = importlib.import_module("sparsecirc.sparsify")  # the name sparsify is the function


def tiny_base(config, trained_state):
    """A fresh model holding the shared trained tiny weights (conftest's ``tiny_trained_state``)."""
    model = build_model(config)
    model.load_state_dict(trained_state)
    return model


def test_multiplier_grows_while_the_constraint_is_violated():
    m = LagrangeMultiplier(tau=0.1, init=1.0, lr=0.1, ema=0.5)
    values = [m.update(0.5) for _ in range(20)]
    assert all(b > a for a, b in zip(values, values[1:]))


def test_multiplier_shrinks_while_the_constraint_holds():
    m = LagrangeMultiplier(tau=0.1, init=10.0, lr=0.1, ema=0.5)
    values = [m.update(0.01) for _ in range(20)]
    assert all(b < a for a, b in zip(values, values[1:]))


def test_multiplier_follows_the_moving_average_not_single_steps():
    m = LagrangeMultiplier(tau=0.1, init=1.0, lr=0.1, ema=0.9)
    for _ in range(30):
        m.update(0.3)  # long violation
    before = m.value
    m.update(0.0)  # one good step: the average is still above tau, so it keeps growing
    assert m.value > before
    assert m.constraint_ema > 0


def test_multiplier_stays_in_bounds_and_is_steady_at_the_target():
    m = LagrangeMultiplier(tau=0.1, init=1.0, lr=1.0, ema=0.0, minimum=0.5, maximum=4.0)
    for _ in range(50):
        m.update(10.0)
    assert m.value == 4.0
    for _ in range(50):
        m.update(0.0)
    assert m.value == 0.5
    steady = LagrangeMultiplier(tau=0.1, init=2.0, lr=0.5, ema=0.0)
    steady.update(0.1)
    assert math.isclose(steady.value, 2.0)


def test_bad_sparsify_configs():
    with pytest.raises(ValueError):
        SparsifyConfig(gate_bias=float("inf"))
    with pytest.raises(ValueError):
        SparsifyConfig(multiplier_init=0.0)
    with pytest.raises(ValueError):
        SparsifyConfig(constraint_ema=1.0)
    with pytest.raises(ValueError, match="decay_fraction"):
        SparsifyConfig(decay_fraction=1.5)
    with pytest.raises(ValueError, match="weight_decay"):
        SparsifyConfig(weight_decay=-0.1)
    with pytest.raises(ValueError, match="replay_size"):
        SparsifyConfig(replay_size=-1)
    with pytest.raises(ValueError, match="prune_needs_bar"):
        SparsifyConfig(prune_needs_bar=1)
    with pytest.raises(ValueError, match="multiplier_lr"):
        SparsifyConfig(multiplier_lr=-0.01)
    for bad in ({"batch_size": 10**12}, {"seed": -1}, {"seed": 2**63}):
        with pytest.raises(ValueError, match="batch_size|seed"):
            SparsifyConfig(**bad)
    for bad in ({"tau": float("nan")}, {"tau": float("inf")}, {"init": float("nan")}, {"init": -1.0}, {"init": "1"},
                {"lr": float("nan")}, {"ema": 2.0}, {"minimum": 5.0, "maximum": 1.0}, {"tau": "x"}):
        with pytest.raises(ValueError):
            LagrangeMultiplier(**{"tau": 0.1, **bad})
    for ce in (float("nan"), float("inf"), "x"):
        with pytest.raises(ValueError, match="finite number"):
            LagrangeMultiplier(0.1).update(ce)
    fixed = LagrangeMultiplier(tau=0.1, init=100.0, lr=0.0, minimum=10.0)  # multiplier_lr=0: a fixed penalty weight
    assert [fixed.update(ce) for ce in (1.0, 0.0, 1.0)] == [100.0] * 3
    with pytest.raises(ValueError, match="tau"):
        LagrangeMultiplier(tau=0.0)


def test_final_window_decays_the_learning_rate_and_tightens_tau():
    config = SparsifyConfig(steps=100, decay_fraction=0.2, lr=1e-2, final_lr_scale=0.1, slack=0.02, final_slack=0.002)
    assert [config.decay_progress(s) for s in (1, 80, 90, 100)] == [0.0, 0.0, 0.5, 1.0]
    assert config.lr_scale(80) == 1.0 and math.isclose(config.lr_scale(100), 0.1)
    assert math.isclose(config.tau(0.01, 50), 0.03) and math.isclose(config.tau(0.01, 100), 0.012)
    assert SparsifyConfig(steps=100, decay_fraction=0.0).decay_progress(100) == 0.0


def test_tau_is_looser_until_the_first_pruning_pass_then_only_tightens():
    config = SparsifyConfig(steps=100, prune_at=0.4, early_slack=0.03, slack=0.01, final_slack=0.0, decay_fraction=0.2)
    taus = [config.tau(0.05, s) for s in range(1, 101)]
    assert math.isclose(taus[0], 0.08) and math.isclose(taus[38], 0.08)  # steps 1 and 39
    assert math.isclose(taus[39], 0.06)  # step 40 = prune_at * steps
    assert all(later <= earlier for earlier, later in zip(taus, taus[1:]))
    assert math.isclose(taus[-1], 0.05)
    # without pruning there is no early phase
    assert math.isclose(SparsifyConfig(steps=100, prune_at=0.0, early_slack=0.03, slack=0.01).tau(0.05, 1), 0.06)
    for name in ("early_slack", "slack", "final_slack"):
        with pytest.raises(ValueError, match=f"^{name} must be >= 0"):
            SparsifyConfig(**{name: -0.01})


def test_tiny_sparsify_closes_edges_logs_every_step_and_round_trips(tmp_path, tiny_config, tiny_split,
                                                                    tiny_trained_state):
    model = tiny_base(tiny_config, tiny_trained_state)
    config = SparsifyConfig(gate_bias=2.0, lr=3e-3, batch_size=64, steps=120, eval_every=40, slack=0.05, decay_fraction=0.0,
                            multiplier_init=1.0, multiplier_min=0.1)  # weak start: sparsity pressure from the first step
    history = sparsify(model, tiny_split, config, progress=False)
    assert [row["step"] for row in history] == list(range(1, 121))
    assert {"ce", "tau", "multiplier", "expected_edges", "sampled_edges"} <= set(history[0])
    assert "test_edges" in history[39] and "test_edges" not in history[40]
    assert history[-1]["expected_edges"] < history[0]["expected_edges"]

    sparse_config = tiny_config.sparse(config.gate_bias)
    path = save_checkpoint(tmp_path / "s.pt", model, sparse_config, kind="sparse")
    reloaded, checkpoint = load_checkpoint(path, expected_config=sparse_config)
    assert checkpoint.config.gate_bias == 2.0 and checkpoint.config.name.endswith("_sparse")
    a = evaluate(model, tiny_split.task, tiny_split.all, gate_bias=2.0)
    b = evaluate(reloaded, tiny_split.task, tiny_split.all, gate_bias=checkpoint.config.gate_bias)
    assert a.summary() == b.summary()
    assert a.mean_open_edges < tiny_config.n_layers * tiny_config.n_heads * 10  # 10 causal pairs at 4 positions... at most
    with pytest.raises(ValueError, match="gate_bias"):
        load_checkpoint(path, expected_config=tiny_config)  # a sparse checkpoint is not the dense config


def test_sparsify_ends_in_the_sparsest_state_that_meets_the_accuracy_bar(tiny_config, tiny_split,
                                                                         tiny_trained_state):
    model = tiny_base(tiny_config, tiny_trained_state)
    config = SparsifyConfig(gate_bias=2.0, lr=3e-3, batch_size=64, steps=90, eval_every=30, slack=0.05,
                            select_accuracy=0.0)  # every evaluated state qualifies
    history = sparsify(model, tiny_split, config, progress=False)
    evaluated = [row for row in history if "train_edges" in row]
    fewest = min(evaluated, key=lambda row: (row["train_edges"], -row["step"]))
    assert history[-1]["selected_step"] == fewest["step"]
    result = evaluate(model, tiny_split.task, tiny_split.train, gate_bias=config.gate_bias)
    assert abs(result.mean_open_edges - fewest["train_edges"]) < 1e-6

    unreachable = SparsifyConfig(gate_bias=2.0, batch_size=64, steps=20, eval_every=10,
                                 select_accuracy=1.0, rescue_windows=0)  # no rescue: it ends at step 20
    fresh = build_model(tiny_config)  # untrained: never reaches 100%, so the final state is kept
    with pytest.warns(SparsifyWarning, match="no evaluated state reached the selection bar"):
        missed = sparsify(fresh, tiny_split, unreachable, progress=False)
    assert missed[-1]["selected_step"] == 20 and len(missed[-1]["warnings"]) >= 1
    assert history[-1]["warnings"] == missed_bar(history, config)


def test_a_run_that_misses_its_bar_says_what_it_missed(tiny_config):
    """missed_bar reads a finished history: the selection bar never met, a state from before the
    pruning passes ended, or more edges than the budget; a run that met all three says nothing."""
    config = SparsifyConfig(steps=100, eval_every=10, prune_at=0.4, prune_until=0.6, select_accuracy=0.99,
                            edge_budget=10.0)

    def history(selected, accuracy=1.0, edges=8.0, after=None):
        rows = [{"step": step, "train_exact_match": accuracy if after is None or step < 60 else after,
                 "train_edges": edges} for step in range(10, 101, 10)]
        rows[-1]["selected_step"] = selected
        return rows

    assert missed_bar(history(90), config) == []
    assert "before the pruning passes ended" in missed_bar(history(40, after=0.95), config)[0]
    assert missed_bar(history(40), config) == []  # states after the passes met the bar too: only sparser ones before
    assert "above the budget of 10. Try another --seed or a longer run (for example --steps 200, up from 100)" in (
        missed_bar(history(90, edges=13.1), config)[0])
    longer = SparsifyConfig(steps=2400, eval_every=10, prune_at=0.0, select_accuracy=0.99, edge_budget=10.0)
    assert "(for example --steps 3000, up from 2400)" in missed_bar(history(90, edges=13.1), longer)[0]
    assert [more_steps(n) for n in (1, 150, 1000, 1800, 2200)] == [100, 200, 1300, 2300, 2800]
    assert "no evaluated state reached" in missed_bar(history(100, accuracy=0.9), config)[0]
    with pytest.raises(ValueError, match="edge_budget"):
        SparsifyConfig(edge_budget=0.0)
    with pytest.raises(ValueError, match="verify_steps"):
        SparsifyConfig(verify_steps=-1)


def test_a_run_that_misses_its_bar_gets_rescue_windows_and_one_that_meets_it_does_not(tiny_config, tiny_split,
                                                                                      tiny_trained_state, monkeypatch):
    """A run whose selected state misses its bar at the last step goes on for up to
    rescue_windows more windows (the final window's evaluations, a lower learning rate, tau held)
    and stops at the first that ends with its bar met; one that meets it ends where it would have
    without them, float for float."""
    model, base_state = build_model(tiny_config), tiny_trained_state
    settings = dict(gate_bias=2.0, lr=3e-3, batch_size=64, steps=60, eval_every=20, slack=0.05, decay_fraction=0.2,
                    select_accuracy=0.0)

    def run(**changes):
        model.load_state_dict(base_state)
        set_gate_bias(model, None)
        return sparsify(model, tiny_split, SparsifyConfig(**settings, **changes), progress=False)

    met = run(rescue_windows=2, edge_budget=1000.0)
    assert len(met) == 60 and not any("rescue" in row for row in met) and met[-1]["warnings"] == []
    assert [row["ce"] for row in met] == [row["ce"] for row in run(rescue_windows=0, edge_budget=1000.0)]

    with pytest.warns(SparsifyWarning, match="above the budget"):
        missed = run(rescue_windows=2, edge_budget=0.01)  # no state can meet a budget of 0.01 edges
    assert [row["step"] for row in missed] == list(range(1, 60 + 2 * 12 + 1))
    assert [row["step"] for row in missed if "rescue" in row] == [60, 72]
    assert "above the budget" in missed[59]["rescue"][0]
    config = SparsifyConfig(**settings, rescue_windows=2)
    for step in (61, 72, 73, 84):  # the rescue windows replay the final window's evaluations (steps 49-60) ...
        assert missed[step - 1]["lr"] == settings["lr"] * config.lr_scale(step)
        assert ("train_edges" in missed[step - 1]) == config.evaluates_at(step - 12)
        # ... but tau stays at the base loss plus rescue_slack (step 48's tau is base + slack) ...
        assert missed[step - 1]["tau"] == pytest.approx(missed[47]["tau"] - settings["slack"] + config.rescue_slack)
    # ... and the learning rate starts at rescue_lr_scale (0.3) times lr, not at lr, and falls to the same end
    first = settings["lr"] * (config.rescue_lr_scale - (config.rescue_lr_scale - config.final_lr_scale) / 12)
    assert missed[60]["lr"] == missed[72]["lr"] == pytest.approx(first) and missed[48]["lr"] > 2 * first
    assert missed[71]["lr"] == missed[83]["lr"] == pytest.approx(missed[59]["lr"])
    assert SparsifyConfig(**settings, rescue_lr_scale=1.0).lr_scale(61) == config.lr_scale(49)
    with pytest.raises(ValueError, match="rescue_windows"):
        SparsifyConfig(rescue_windows=-1)
    for bad in (0.0, -0.3, 1.5):  # a fraction of lr in (0, 1]
        with pytest.raises(ValueError, match="rescue_lr_scale"):
            SparsifyConfig(rescue_lr_scale=bad)
    SparsifyConfig(final_lr_scale=0.5)  # a rescue that starts below the final learning rate and rises is allowed
    with pytest.raises(ValueError, match="^rescue_slack must be >= 0"):
        SparsifyConfig(rescue_slack=-0.01)

    # a run mended by its first window stops there: the bar is missed at step 60 only
    calls = []

    def missed_once(history, config, selected=None):
        calls.append(history[-1]["step"])
        return ["missed at the last step"] if len(calls) == 1 else []
    monkeypatch.setattr(sparsify_module, "missed_bar", missed_once)
    mended = run(rescue_windows=4, edge_budget=0.01)
    assert [row["step"] for row in mended if "rescue" in row] == [60] and len(mended) == 72
    assert calls[:2] == [60, 72] and mended[-1]["warnings"] == []


def test_with_rescue_passes_the_rescue_windows_make_pruning_passes_and_only_then(tiny_config, tiny_split,
                                                                                   tiny_trained_state):
    """rescue_passes (a trial, off by default) lets every evaluation of a rescue window at the bar
    make a pruning pass; without it passes stop at prune_until, and the run is the same up to the
    first pass of a rescue window."""
    settings = dict(gate_bias=2.0, lr=3e-3, batch_size=64, steps=60, eval_every=20, slack=0.05, decay_fraction=0.2,
                    select_accuracy=0.0, prune_at=0.3, prune_until=0.7, rescue_windows=2, edge_budget=0.01)
    on, off = SparsifyConfig(**settings, rescue_passes=True), SparsifyConfig(**settings)
    in_windows = [step for step in range(61, 85) if on.evaluates_at(step)]
    assert in_windows == [62, 72, 74, 84]  # the final window's evaluations (steps 50 and 60), twice
    assert [s for s in range(1, 85) if off.prunes_at(s)] == [20, 40]
    assert [s for s in range(1, 85) if on.prunes_at(s)] == [20, 40] + in_windows
    model, runs = build_model(tiny_config), {}
    for name, config in (("on", on), ("off", off)):
        model.load_state_dict(tiny_trained_state)
        set_gate_bias(model, None)
        with pytest.warns(SparsifyWarning, match="above the budget"):  # a budget of 0.01 edges: both windows run
            runs[name] = sparsify(model, tiny_split, config, progress=False)
    passes = {name: [row["step"] for row in history if "closed_edges" in row] for name, history in runs.items()}
    assert passes == {"off": [20, 40], "on": [20, 40] + in_windows}  # every state is at a bar of 0
    assert [row["ce"] for row in runs["on"][:62]] == [row["ce"] for row in runs["off"][:62]]
    assert runs["on"][-1]["step"] == runs["off"][-1]["step"] == 84
    with pytest.raises(ValueError, match="rescue_passes must be True or False"):
        SparsifyConfig(rescue_passes=1)


def test_a_rescue_window_after_one_that_ended_worse_starts_from_the_selected_state(tiny_config, tiny_split,
                                                                                   tiny_trained_state, monkeypatch):
    """With rescue_restarts (off by default), the first rescue window starts from the run's last
    state; a later one, if the window before it ended worse than the selected state, from the
    selected state (weights, optimiser, multipliers, replay set). Here the first two windows are
    made to end with every edge open (q zeroed after each of steps 72-84: each gate logit is the
    bias), so the second and the third both start from the state with the fewest edges, the same
    one twice."""
    model, base_state = build_model(tiny_config), tiny_trained_state
    settings = dict(gate_bias=2.0, lr=3e-3, batch_size=64, steps=60, eval_every=20, slack=0.05, decay_fraction=0.2,
                    select_accuracy=0.0, rescue_windows=3, rescue_restarts=True,
                    edge_budget=0.01)  # no state meets the budget
    real_step, seen = sparsify_module.sparsify_step, {}  # seen[step]: what that step started from

    def step_that_opens_every_edge_in_steps_72_to_84(model, optimizer, tokens, *args, **kwargs):
        step = len(seen) + 1
        param = model.blocks[0].attn.q.weight
        state = optimizer.state.get(param, {})
        seen[step] = (param.detach().clone(), state["exp_avg"].clone() if "exp_avg" in state else None,
                      tokens[64:].clone())  # tokens past the batch of 64: the replayed problems
        stats = real_step(model, optimizer, tokens, *args, **kwargs)
        if 72 <= step <= 84:
            with torch.no_grad():
                for block in model.blocks:
                    block.attn.q.weight.zero_()
                    block.attn.q.bias.zero_()
        return stats
    monkeypatch.setattr(sparsify_module, "sparsify_step", step_that_opens_every_edge_in_steps_72_to_84)

    def run(**changes):
        model.load_state_dict(base_state)
        set_gate_bias(model, None)
        seen.clear()
        with pytest.warns(SparsifyWarning, match="above the budget"):
            return sparsify(model, tiny_split, SparsifyConfig(**settings, **changes), progress=False)

    history = run()
    assert [row["step"] for row in history if "rescue" in row] == [60, 72, 84]
    edges = {row["step"]: row["train_edges"] for row in history if "train_edges" in row}
    best = max((step for step in edges if step < 72), key=lambda step: (-edges[step], step))  # fewest, latest on ties
    assert edges[best] < min(edges[step] for step in edges if 72 <= step <= 84)  # those windows did end worse
    assert "restarted_from" not in history[59] and history[71]["restarted_from"] == history[83]["restarted_from"] == best
    for first in (73, 85):  # each later window starts where step best + 1 started: weights, Adam's moments,
        weights, moments, replayed = seen[first]  # the replayed problems and the multiplier
        assert torch.equal(weights, seen[best + 1][0]) and weights.any()
        assert torch.equal(moments, seen[best + 1][1]) and torch.equal(replayed, seen[best + 1][2])
        assert history[first - 1]["multiplier"] == history[best]["multiplier"]

    settings.pop("rescue_restarts")
    without = run()  # the default: every window starts from the last state
    assert not any("restarted_from" in row for row in without) and not seen[73][0].any()
    assert [row["ce"] for row in without[:72]] == [row["ce"] for row in history[:72]]
    with pytest.raises(ValueError, match="rescue_restarts must be True or False"):
        SparsifyConfig(rescue_restarts=1)


def test_weight_decay_keeps_the_gate_logits_smaller(tiny_config, tiny_split):
    """The reason for the decay: without it, logits of useful gates grow without bound, where the
    penalty's gradient sigmoid'(g) vanishes. Same seed, same steps, with and without decay."""
    trained = build_model(tiny_config)
    train(trained, tiny_split, TrainConfig(lr=3e-3, batch_size=64, max_steps=200, eval_every=100), progress=False)
    largest_logit = {}
    for decay in (0.0, 1.0):
        model = build_model(tiny_config)
        model.load_state_dict(trained.state_dict())
        config = SparsifyConfig(gate_bias=2.0, lr=1e-2, batch_size=64, steps=60, eval_every=60, weight_decay=decay)
        sparsify(model, tiny_split, config, progress=False)
        tokens, _ = tiny_split.task.batch(list(tiny_split.all))
        with torch.no_grad(), sparse_attention(model, "deterministic", config.gate_bias) as gates:
            model(tokens)
        largest_logit[decay] = gates.logits[torch.isfinite(gates.logits)].abs().max().item()
    assert largest_logit[1.0] < largest_logit[0.0], largest_logit


def test_duplicate_edges_keeps_the_head_that_carries_most_attention():
    mass = torch.zeros(2, 3, 3, 3)  # [layer, head, query, key]
    mass[0, 0, 2, 0], mass[0, 1, 2, 0] = 0.6, 0.3  # two heads on one (query, key): head 1 is the duplicate
    mass[0, 2, 2, 1] = 0.01                        # a single head, however little it carries, stays
    mass[1, 1, 1, 1], mass[1, 2, 1, 1] = 0.2, 0.5  # layer 1: head 1 is the duplicate
    mass[1, 0, 2, 2] = 0.4                         # another layer's head on a pair is no duplicate
    closed = duplicate_edges(mass)
    assert sorted(map(tuple, closed.nonzero().tolist())) == [(0, 1, 2, 0), (1, 1, 1, 1)]
    assert not duplicate_edges(torch.zeros(2, 3, 3, 3)).any()


def test_held_shut_edges_are_closed_in_the_forward_pass_and_their_logits_pushed_below_the_margin(tiny_config, tiny_split):
    model = build_model(tiny_config)
    train(model, tiny_split, TrainConfig(lr=3e-3, batch_size=64, max_steps=200, eval_every=100), progress=False)
    task = tiny_split.task
    tokens, targets = task.batch(list(tiny_split.all))
    with torch.no_grad(), sparse_attention(model, "deterministic", 2.0) as gates:
        model(tokens)
    always_open = (gates.masks > 0).all(0)  # [layer, head, query, key]
    closed = torch.zeros_like(always_open)
    closed[tuple(always_open.nonzero()[0])] = True  # hold one edge that is open on every input shut
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(0)
    pushes = []
    for _ in range(40):
        stats = sparsify_step(model, optimizer, tokens, targets, task, 2.0, 1.0, 0.05, generator, closed, margin=1.0,
                              closed_weight=1.0)
        pushes.append(stats["closed_push"])
    with torch.no_grad(), sparse_attention(model, "sample", 2.0, edge_mask=(~closed).float(), generator=generator) as gates:
        model(tokens)
    assert (gates.masks[:, closed] == 0).all()  # shut in training, whatever the sample
    assert (gates.logits[:, closed] < -1.0).all(), gates.logits[:, closed].max()  # and below the margin: shut for good
    assert pushes[-1] == 0.0 < pushes[0]


def test_sparsify_closes_duplicates_during_the_run_and_still_selects_a_state_that_meets_the_bar(tiny_config, tiny_split,
                                                                                                tiny_trained_state):
    model = tiny_base(tiny_config, tiny_trained_state)
    config = SparsifyConfig(gate_bias=2.0, lr=3e-3, batch_size=64, steps=150, eval_every=25, slack=0.05, prune_at=0.3,
                            prune_until=0.7, select_accuracy=0.9)
    assert [s for s in range(1, 151) if config.prunes_at(s)] == [50, 75, 100]  # evaluations from step 45 to 105
    history = sparsify(model, tiny_split, config, progress=False)
    closed = [row["closed_edges"] for row in history if "closed_edges" in row]
    assert 1 <= len(closed) <= 3  # a pass waits until the one before it is verified
    if not any("reopened_edges" in row for row in history):
        assert closed == sorted(closed)  # the closed set only grows unless a pass is undone
    selected = history[-1]["selected_step"]
    chosen = next(row for row in history if row["step"] == selected)
    assert chosen["train_exact_match"] >= config.select_accuracy
    result = evaluate(model, tiny_split.task, tiny_split.train, gate_bias=config.gate_bias)
    assert result.exact_match >= config.select_accuracy
    assert not any(SparsifyConfig(prune_at=0.0).prunes_at(s) for s in range(1, 2401))
    with pytest.raises(ValueError, match="prune_until"):
        SparsifyConfig(prune_at=0.7, prune_until=0.5)
    with pytest.raises(ValueError, match="prune_margin"):
        SparsifyConfig(prune_margin=float("nan"))


def test_an_interrupted_sparsify_leaves_a_sparse_model_in_eval_mode(tiny_config, tiny_split, monkeypatch):
    import sys

    from sparsecirc.sparse_attention import gate_bias_of

    module = sys.modules["sparsecirc.sparsify"]  # the package exports a function of the same name

    model = build_model(tiny_config)
    calls = []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    real = module.sparsify_step
    monkeypatch.setattr(module, "sparsify_step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        sparsify(model, tiny_split, SparsifyConfig(gate_bias=2.0, batch_size=16, steps=10, eval_every=5), progress=False)
    assert gate_bias_of(model) == 2.0 and not model.training
    with pytest.raises(ValueError, match="already sparse"):
        sparsify(model, tiny_split, SparsifyConfig(steps=1), progress=False)


@pytest.mark.parametrize("bad", [{"batch_size": 2.5}, {"steps": True}, {"gate_bias": "3"}, {"lr": float("inf")},
                                 {"rescue_windows": 1.5}, {"rescue_windows": True}])
def test_sparsify_config_checks_types(bad):
    with pytest.raises(ValueError):
        SparsifyConfig(**bad)


def test_a_pruning_pass_that_breaks_the_model_is_undone(tiny_config, tiny_split, monkeypatch):
    """A pass that closes edges the model needs (here: every edge in use) never leaves the run
    below its bar: when no evaluation within verify_steps meets it, the run goes back to the
    state before the pass and reopens those edges. Without verification the same run ends below."""
    import sys

    module = sys.modules["sparsecirc.sparsify"]
    monkeypatch.setattr(module, "duplicate_edges", lambda mass: mass > 0)  # every used edge "a duplicate"
    base = build_model(tiny_config)
    train(base, tiny_split, TrainConfig(lr=3e-3, batch_size=64, max_steps=400, eval_every=100), progress=False)
    state = {k: v.clone() for k, v in base.state_dict().items()}
    config = SparsifyConfig(gate_bias=2.0, lr=3e-3, batch_size=64, steps=200, eval_every=20, slack=0.05, prune_at=0.3,
                            prune_until=0.5, decay_fraction=0.0, select_accuracy=0.9, verify_steps=40)
    endings = {}
    for verify_steps in (40, 0):
        model = build_model(tiny_config)
        model.load_state_dict(state)
        run = SparsifyConfig(**{**config.to_dict(), "verify_steps": verify_steps})
        with warnings.catch_warnings():  # the unverified run warns that it missed its bar: expected here
            warnings.simplefilter("ignore", SparsifyWarning)
            history = sparsify(model, tiny_split, run, progress=False)
        reopened = [row for row in history if "reopened_edges" in row]
        after = [row["train_exact_match"] for row in history if "train_exact_match" in row and row["step"] > 100]
        endings[verify_steps] = (reopened, after, history[-1]["selected_step"])
    reopened, after, _ = endings[40]
    assert reopened and reopened[0]["reopened_edges"] > 0 and reopened[0]["step"] == 60 + 40  # undone on time
    assert max(after) >= config.select_accuracy  # back at the bar after the pass was undone
    unverified, after_unverified, selected_unverified = endings[0]
    assert not unverified and max(after_unverified) < config.select_accuracy  # every edge shut for good: broken
    assert selected_unverified <= 60  # only states up to the pass (evaluated before any step with the edges shut)



@pytest.mark.parametrize("needs_bar", [True, False])
def test_a_pruning_pass_is_made_only_from_a_model_at_the_bar(tiny_config, tiny_split, needs_bar):
    """Duplicates measured on a broken model are no guide: a pass waits for an evaluation that meets
    select_accuracy (here never: an untrained model). ``prune_needs_bar=False`` prunes regardless."""
    model = build_model(tiny_config)  # untrained: far below the bar
    config = SparsifyConfig(gate_bias=2.0, batch_size=16, steps=40, eval_every=10, prune_at=0.25, prune_until=1.0,
                            decay_fraction=0.0, select_accuracy=0.99, prune_needs_bar=needs_bar)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SparsifyWarning)  # it misses its bar: expected
        history = sparsify(model, tiny_split, config, progress=False)
    assert all(row["train_exact_match"] < config.select_accuracy for row in history if "train_exact_match" in row)
    passes = [row["step"] for row in history if "closed_edges" in row]
    assert passes == ([] if needs_bar else [10, 20, 30, 40])


@pytest.mark.parametrize("replay_size", [0, 5])
def test_the_problems_an_evaluation_got_wrong_are_replayed_in_each_batch(tiny_config, tiny_split, monkeypatch,
                                                                         replay_size):
    """After each evaluation, up to ``replay_size`` of the training problems it answered wrong ride on
    top of every batch, once each, until the next evaluation."""
    import sys

    module = sys.modules["sparsecirc.sparsify"]
    batches, evaluations = [], []

    def spy_step(model, optimizer, tokens, targets, *args, **kwargs):
        batches.append(tokens.clone())
        return real_step(model, optimizer, tokens, targets, *args, **kwargs)

    def spy_evaluate(model, task, pairs, **kwargs):
        result = real_evaluate(model, task, pairs, **kwargs)
        evaluations.append((pairs, kwargs, result))
        return result

    real_step, real_evaluate = module.sparsify_step, module.evaluate
    monkeypatch.setattr(module, "sparsify_step", spy_step)
    monkeypatch.setattr(module, "evaluate", spy_evaluate)
    config = SparsifyConfig(gate_bias=2.0, batch_size=16, steps=20, eval_every=10, prune_at=0.0, decay_fraction=0.0,
                            replay_size=replay_size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SparsifyWarning)
        sparsify(build_model(tiny_config), tiny_split, config, progress=False)  # untrained: many wrong answers
    task = tiny_split.task
    assert [len(b) for b in batches[:10]] == [16] * 10  # nothing evaluated yet
    pairs, first = next((pairs, result) for pairs, kwargs, result in evaluations  # the first gated one of the training problems
                        if "gate_bias" in kwargs and len(pairs) == len(tiny_split.train))
    assert first.n_failures > replay_size  # more failures than the replay holds: it takes replay_size of them
    assert [len(b) for b in batches[10:]] == [16 + replay_size] * 10
    wrong_tokens = {tuple(task.batch([pairs[i]])[0][0].tolist()) for i in first.wrong.tolist()}
    for batch in batches[10:]:
        replayed = [tuple(row.tolist()) for row in batch[16:]]
        assert len(set(replayed)) == replay_size and set(replayed) <= wrong_tokens


def test_sparsify_refuses_what_is_not_a_split_a_config_or_a_loss(tiny_config, tiny_split):
    model = build_model(tiny_config)
    for args, kwargs in (((model, "split"), {}), ((model, tiny_split, "x"), {}),
                         ((model, tiny_split, SparsifyConfig(steps=1)), {"base": float("nan")}),
                         ((model, tiny_split, SparsifyConfig(steps=1)), {"base": "x"})):
        with pytest.raises(ValueError, match="AdditionSplit|base"):
            sparsify(*args, progress=False, **kwargs)
    from sparsecirc.sparse_attention import gate_bias_of
    assert gate_bias_of(model) is None  # refused before the model became sparse
