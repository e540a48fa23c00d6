import pytest
import torch

from sparsecirc.evaluation import evaluate, predict
from sparsecirc.model import build_model
from sparsecirc.training import TrainConfig, train


def test_tiny_training_run_lowers_the_loss(tiny_config, tiny_split):
    model = build_model(tiny_config)
    before = evaluate(model, tiny_split.task, tiny_split.train)
    history = train(model, tiny_split, TrainConfig(lr=3e-3, batch_size=64, max_steps=150, eval_every=50), progress=False)
    after = evaluate(model, tiny_split.task, tiny_split.train)
    assert [h["step"] for h in history][:1] == [50]
    assert after.loss < 0.5 * before.loss
    assert after.exact_match > before.exact_match


def test_training_is_seeded(tiny_config, tiny_split):
    config = TrainConfig(batch_size=32, max_steps=20, eval_every=10)
    a, b = build_model(tiny_config), build_model(tiny_config)
    train(a, tiny_split, config, progress=False)
    train(b, tiny_split, config, progress=False)
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), name


def test_training_stops_at_the_target(tiny_config, tiny_split):
    config = TrainConfig(lr=3e-3, batch_size=64, max_steps=3000, eval_every=10, target_accuracy=0.3)
    history = train(build_model(tiny_config), tiny_split, config, progress=False)
    assert history[-1]["step"] < config.max_steps
    assert history[-1]["train_exact_match"] >= 0.3
    assert all(h["train_exact_match"] < 0.3 for h in history[:-1])


def test_evaluation_lists_failures_with_text(tiny_config, tiny_split):
    model = build_model(tiny_config)  # untrained: almost everything fails
    task = tiny_split.task
    result = evaluate(model, task, tiny_split.test, batch_size=7)  # batches that do not divide the 20 problems
    one_by_one = [(task.format_problem(a, b), predict(model, task, task.format_problem(a, b)), task.answer(a, b))
                  for a, b in tiny_split.test]
    assert result.failures == [row for row in one_by_one if row[1] != row[2]] != []
    assert result.exact_match == sum(row[1] == row[2] for row in one_by_one) / len(one_by_one)
    # every wrong answer's position in the pairs, across batches (sparsify replays these problems)
    assert result.wrong.tolist() == [i for i, row in enumerate(one_by_one) if row[1] != row[2]]
    assert len(result.wrong) == result.n_failures
    problem, predicted, expected = result.failures[0]
    assert len(predicted) == len(expected) == 2 and "+" in problem
    assert len(predict(model, tiny_split.task, "3+4")) == 2
    with pytest.raises(ValueError, match="at most 1 digits"):
        predict(model, tiny_split.task, "36+28")


@pytest.mark.parametrize("bad, message", [({"lr": 0}, "must be positive"), ({"target_accuracy": 1.5}, "target_accuracy"),
                                          ({"batch_size": 10**12}, "batch_size must be at most 1,000,000"),
                                          ({"seed": -1}, "seed must be an int in 0..2\\*\\*63-1"),
                                          ({"seed": 10**30}, "seed must be an int in 0..2\\*\\*63-1")])
def test_bad_train_config(bad, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**bad)


@pytest.mark.parametrize("split, config, message", [("split", TrainConfig(), "split must be an AdditionSplit"),
                                                    (None, TrainConfig(), "split must be an AdditionSplit"),
                                                    ("tiny", "config", "config must be a TrainConfig"),
                                                    ("tiny", {}, "config must be a TrainConfig")])
def test_train_refuses_what_is_not_a_split_or_a_config(tiny_config, tiny_split, split, config, message):
    with pytest.raises(ValueError, match=message):
        train(build_model(tiny_config), tiny_split if split == "tiny" else split, config, progress=False)


def test_eval_size_must_be_positive():
    import pytest

    from sparsecirc.sparsify import SparsifyConfig
    from sparsecirc.training import TrainConfig

    for make in (TrainConfig, SparsifyConfig):
        with pytest.raises(ValueError, match="eval_size"):
            make(eval_size=0)


def test_answer_loss_and_logits_refuse_what_does_not_fit(tiny_config, tiny_split):
    from sparsecirc.evaluation import answer_logits, answer_loss

    logits = torch.zeros(1, 2, 13)
    for bad_logits, bad_targets in (([[0.0]], torch.zeros(1, 2, dtype=torch.long)),
                                    (logits, torch.zeros(1, 2)),  # float targets
                                    (logits, torch.full((1, 2), 13)),  # outside the vocabulary
                                    (torch.zeros(0, 2, 13), torch.zeros(0, 2, dtype=torch.long)),  # no problems: NaN
                                    (logits, torch.zeros(1, 3, dtype=torch.long))):
        with pytest.raises(ValueError, match="logits|targets"):
            answer_loss(bad_logits, bad_targets)
    model = build_model(tiny_config)
    tokens, _ = tiny_split.task.batch(list(tiny_split.test))
    with pytest.raises(ValueError, match="task must be an AdditionTask"):
        answer_logits(model, tokens, None)


def test_a_small_curve_sample_stops_where_the_whole_stopping_sample_would(tiny_config, tiny_split):
    """The curve is evaluated on a few problems; the stopping rule (target 1.0) on all of
    ``eval_size``, checked only when the curve's sample is all right, which it must be then: the
    run stops at the same step, with the same weights, as one evaluating all of them every time."""
    def run(curve_size):
        model = build_model(tiny_config)
        config = TrainConfig(lr=3e-3, batch_size=64, max_steps=2000, eval_every=10, curve_size=curve_size)
        return model, train(model, tiny_split, config, progress=False)

    small, small_history = run(curve_size=5)
    whole, whole_history = run(curve_size=len(tiny_split.train))
    assert whole_history[-1]["step"] < 2000 and whole_history[-1]["stop_exact_match"] == 1.0
    assert [h["step"] for h in small_history] == [h["step"] for h in whole_history]
    checked = [h for h in small_history if "stop_exact_match" in h]
    assert checked[-1] is small_history[-1] and checked[-1]["stop_exact_match"] == 1.0
    assert all(h["train_exact_match"] == 1.0 for h in checked)  # checked only when the curve's sample was right
    assert any(h["stop_exact_match"] < 1.0 for h in checked[:-1])  # the small sample alone would have stopped early
    for (name, a), b in zip(small.state_dict().items(), whole.state_dict().values()):
        assert torch.equal(a, b), name
