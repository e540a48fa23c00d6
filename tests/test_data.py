import json

import numpy as np
import pytest
import torch

from sparsecirc.data import (BLANK_ID, REST, VOCAB, AdditionSplit, AdditionTask, load_split, make_split,
                             sample_pairs, save_split)

TASK = AdditionTask()


def test_layout_of_the_figure_1_example():
    tokens, answer = TASK.encode_problem("36+28")
    assert TASK.decode(tokens) == "36+28=?????"
    assert TASK.decode_answer(answer) == "00064"
    assert TASK.seq_len == 11 and TASK.answer_positions == [6, 7, 8, 9, 10]
    assert tokens[6:] == [BLANK_ID] * 5
    assert len(VOCAB) == 13


@pytest.mark.parametrize("task", [AdditionTask(), AdditionTask(3, 4), AdditionTask(1, 2)])
def test_encode_decode_round_trip_on_every_problem(task):
    for a, b in task.all_pairs()[:: max(1, task.n_problems // 500)]:
        tokens, answer = task.encode(a, b)
        assert task.decode_problem(tokens) == task.decode_problem(torch.tensor(tokens)) == (a, b)
        assert int(task.decode_answer(answer)) == a + b
        assert task.parse(task.format_problem(a, b)) == (a, b)


def test_parse_accepts_short_operands_and_leading_zeros():  # spaces around tokens: test_properties
    assert TASK.parse("7+3") == (7, 3)
    assert TASK.parse("07+03=") == (7, 3)


@pytest.mark.parametrize("bad", ["3 6+28", "36+2 8", "3+4\uff12", "\u0663+4", "36\t+28", "36+28\n", "36+28==", "+36+28"])
def test_parse_refuses_spaces_inside_numbers_and_other_digits(bad):
    with pytest.raises(ValueError, match="cannot parse"):
        TASK.parse(bad.encode().decode("unicode_escape"))


def test_parse_errors_do_not_echo_a_huge_input():
    with pytest.raises(ValueError) as error:
        TASK.parse("1" * 200_000 + "+1")
    assert len(str(error.value)) < 300
    with pytest.raises(ValueError) as error:
        TASK.parse("x" * 200_000)
    assert len(str(error.value)) < 300


@pytest.mark.parametrize("bad, message", [
    ("3a+28", "cannot parse"),
    ("123+4", "at most 2 digits"),
    ("-3+28", "non-negative"),
    ("36-28", "cannot parse"),
    ("36+", "cannot parse"),
    ("", "cannot parse"),
])
def test_bad_problem_strings_say_what_is_allowed(bad, message):
    with pytest.raises(ValueError, match=message):
        TASK.parse(bad)


def test_operands_out_of_range_and_non_strings():
    with pytest.raises(ValueError, match="outside 0..99"):
        TASK.encode(100, 1)
    with pytest.raises(ValueError, match="outside 0..99"):
        TASK.encode(-1, 1)
    with pytest.raises(ValueError, match="string"):
        TASK.parse(36)
    for bad, kind in [(np.int64(3), "numpy.int64"), (np.int32(3), "numpy.int32"), (3.0, "float"), (True, "bool")]:
        for call in (lambda: TASK.encode(bad, 1), lambda: TASK.batch([(1, bad)]), lambda: TASK.check_pairs([[bad, 1]])):
            with pytest.raises(ValueError, match=f"is a {kind}; operands must be Python ints in 0..99"):
                call()


def test_bad_token_sequences():
    with pytest.raises(ValueError, match="expected 11 token ids"):
        TASK.decode([1, 2, 3])
    for bad in (torch.tensor([3.7] * 11), torch.ones(11, dtype=torch.bool), torch.zeros(2, 11, dtype=torch.long),
                [3.7] * 11, [True] * 11, "36+28=?????"):
        with pytest.raises(ValueError, match="token ids must be"):
            TASK.decode(bad)
    with pytest.raises(ValueError, match="out of range"):
        TASK.decode([0] * 10 + [13])
    with pytest.raises(ValueError, match="not a add_d2_a5 input line"):
        TASK.decode_problem([0] * 11)
    with pytest.raises(ValueError, match="digit tokens"):
        TASK.decode_answer([0, 0, 0, 6, 10])
    with pytest.raises(ValueError, match="expected 5 token ids"):
        TASK.decode_answer([6, 4])


@pytest.mark.parametrize("operand_digits, answer_digits", [(2, 2), (3, 3), (0, 5), (2, 0)])
def test_widths_that_cannot_hold_the_sum(operand_digits, answer_digits):
    with pytest.raises(ValueError):
        AdditionTask(operand_digits, answer_digits)


def test_batch_shapes_and_dtype():
    tokens, targets = TASK.batch([(36, 28), (99, 99)])
    assert tokens.shape == (2, 11) and targets.shape == (2, 5)
    assert tokens.dtype == torch.long
    assert TASK.decode_answer(targets[1]) == "00198"
    with pytest.raises(ValueError, match="empty"):
        TASK.batch([])


def test_carries():
    assert TASK.carries(36, 28) == [True, False]
    assert TASK.carries(53, 21) == [False, False]
    assert TASK.carries(43, 59) == [True, True]
    assert TASK.carries(50, 50) == [False, True]


def test_split_counts_disjoint_and_seeded():
    split = make_split(TASK, test_size=1000, seed=0)
    assert len(split.train) == 9000 and len(split.test) == 1000
    assert not set(split.train) & set(split.test)
    assert set(split.all) == set(TASK.all_pairs())
    assert make_split(TASK, 1000, 0) == split
    assert make_split(TASK, 1000, 1).test != split.test
    with pytest.raises(ValueError, match="test_size"):
        make_split(TASK, test_size=10_000)


def test_save_load_round_trip_and_no_overwrite(tmp_path):
    split = make_split(AdditionTask(1, 2), test_size=20, seed=3)
    path = save_split(split, tmp_path / "d.json")
    assert json.loads(path.read_text())["train"] == REST  # a whole-task split stores only the held-out problems
    assert load_split(path) == split
    save_split(split, path)  # same content: allowed, nothing changes
    with pytest.raises(FileExistsError, match="different dataset"):
        save_split(make_split(AdditionTask(1, 2), test_size=20, seed=4), path)


def test_a_sampled_split_round_trips_with_both_lists(tmp_path):
    whole = make_split(AdditionTask(1, 2), test_size=20, seed=3)
    sampled = AdditionSplit(whole.task, whole.train[:30], whole.test[:5], seed=3)
    path = save_split(sampled, tmp_path / "s.json")
    assert len(json.loads(path.read_text())["train"]) == 30
    assert load_split(path) == sampled
    big = AdditionTask(4, 5)  # 10^8 problems: too many to enumerate, fine to sample
    four = AdditionSplit(big, ((1234, 5678), (9999, 1)), ((42, 4242),), seed=0)
    assert load_split(save_split(four, tmp_path / "four.json")) == four


def test_load_rejects_broken_and_edited_files(tmp_path):
    split = make_split(AdditionTask(1, 2), test_size=20, seed=3)
    record = json.loads(save_split(split, tmp_path / "d.json").read_text())
    listed = dict(record, train=[split.task.format_problem(a, b) for a, b in split.train])

    def write(name, content):
        p = tmp_path / name
        p.write_text(content if isinstance(content, str) else json.dumps(content))
        return p

    with pytest.raises(ValueError, match="not valid JSON"):
        load_split(write("a.json", "{not json"))
    with pytest.raises(ValueError, match="not a sparsecirc dataset"):
        load_split(write("b.json", {"format": "other"}))
    moved = sorted(set(record["test"][1:]) | {listed["train"][0]})  # one held-out problem swapped for a training one
    with pytest.raises(ValueError, match="not the 20 that seed 3 draws"):
        load_split(write("c.json", dict(record, test=moved)))
    with pytest.raises(ValueError, match="not the 20 that seed 4 draws"):
        load_split(write("d.json", dict(record, seed=4)))
    overlap = dict(listed, test=record["test"][:-1] + [listed["train"][0]])
    with pytest.raises(ValueError, match="in both train and test"):
        load_split(write("e.json", overlap))
    twice = dict(listed, train=listed["train"][:-1] + listed["train"][:1])
    with pytest.raises(ValueError, match="appear twice in train"):
        load_split(write("f.json", twice))
    with pytest.raises(ValueError, match="cannot parse"):
        load_split(write("g.json", dict(listed, train=["1x+2"] + listed["train"][1:])))
    with pytest.raises(ValueError, match="n_train"):
        load_split(write("h.json", dict(record, n_train=7)))
    four = {"format": record["format"], "operand_digits": 4, "answer_digits": 5, "seed": 0, "n_train": 1,
            "n_test": 1, "test": ["0001+0002"], "train": REST}
    with pytest.raises(ValueError, match="too many to enumerate"):
        load_split(write("i.json", four))


def test_format_1_files_still_load_and_must_be_whole(tmp_path):
    split = make_split(AdditionTask(1, 2), test_size=20, seed=3)
    record = {"format": "sparsecirc.addition-split/1", "operand_digits": 1, "answer_digits": 2, "seed": 3,
              "n_train": len(split.train), "n_test": len(split.test),
              "train": [split.task.format_problem(a, b) for a, b in split.train],
              "test": [split.task.format_problem(a, b) for a, b in split.test]}
    path = tmp_path / "v1.json"
    path.write_text(json.dumps(record))
    assert load_split(path) == split
    save_split(split, path)  # the same split in the old format: left alone
    short = dict(record, train=record["train"][:-1], n_train=record["n_train"] - 1)
    path.write_text(json.dumps(short))
    with pytest.raises(ValueError, match="exactly once"):
        load_split(path)


@pytest.mark.slow
def test_a_three_digit_split_file_is_small(tmp_path):
    split = make_split(AdditionTask(3, 5), test_size=1000, seed=0)
    path = save_split(split, tmp_path / "d3.json")
    assert path.stat().st_size < 20_000  # 1,000 held-out problems, not 1,000,000 lines
    assert load_split(path) == split


def test_evaluation_samples_are_fixed_and_stay_inside_their_split():
    split = make_split(AdditionTask(2, 5), test_size=1000, seed=0)
    train_sample = sample_pairs(split.train, 500, seed=0)
    assert train_sample == sample_pairs(split.train, 500, seed=0) != sample_pairs(split.train, 500, seed=1)
    assert len(set(train_sample)) == 500 and set(train_sample) <= set(split.train)
    assert not set(train_sample) & set(split.test)  # the training-side sample never sees a held-out problem
    assert sample_pairs(split.test, 5000, seed=0) == split.test  # no larger than the size: the whole split
    with pytest.raises(ValueError, match="positive int size"):
        sample_pairs(split.test, 0, seed=0)


def test_shipped_dataset_is_the_default_split():
    from sparsecirc.paths import reference_dataset_path

    split = load_split(reference_dataset_path())
    assert split == make_split(TASK, 1000, 0)


@pytest.mark.slow
def test_shipped_three_digit_split_and_paths():
    from sparsecirc.paths import reference_dataset_path, reference_sparse_checkpoint_path

    split = load_split(reference_dataset_path(operand_digits=3))
    assert split == make_split(AdditionTask(3, 5), 10_000, 0) and len(split.train) == 990_000
    assert reference_sparse_checkpoint_path(operand_digits=3).is_file()
    with pytest.raises(ValueError, match="shipped for operand_digits in"):
        reference_dataset_path(operand_digits=4)


def test_operand_tensors_and_sample_sizes_are_checked_at_the_door():
    task = AdditionTask(2, 5)
    tokens, targets = task.batch(torch.tensor([[36, 28], [99, 99]]))
    assert tokens.tolist() == [task.encode(36, 28)[0], task.encode(99, 99)[0]] and targets[1].tolist() == [0, 0, 1, 9, 8]
    for bad, message in [(torch.tensor([[36.0, 28.0]]), "must be long"), (torch.tensor([36, 28]), "must be long"),
                         (torch.tensor([[36, 100]]), "in 0..99"), (torch.tensor([[-1, 3]]), "in 0..99"),
                         (torch.zeros(0, 2, dtype=torch.long), "at least one problem")]:
        with pytest.raises(ValueError, match=message):
            task.operand_tensor(bad)
    with pytest.raises(ValueError, match="outside 0..99"):
        task.batch([(36, 280)])


@pytest.mark.parametrize("digits, message", [((19, 21), "at most 18"), ((10**7, 5), "at most 18"),
                                             ((2, 10**9), "answer_digits must be at most 20")])
def test_task_sizes_are_bounded_before_any_work(digits, message):
    with pytest.raises(ValueError, match=message):
        AdditionTask(*digits)
    task = AdditionTask(18, 19)  # the largest: its sums still fit int64
    _, target = task.batch([(task.max_operand, task.max_operand)])
    assert task.decode_answer(target[0].tolist()) == str(2 * task.max_operand)


_SPLIT_TASK = AdditionTask(1, 2)


@pytest.mark.parametrize("call, message", [
    (lambda: make_split("add_d1_a2", 20, 0), "task must be an AdditionTask, got str"),
    (lambda: make_split(_SPLIT_TASK, 20, None), "seed must be a Python int .* got None"),
    (lambda: make_split(_SPLIT_TASK, 20, 1.5), "seed must be a Python int .* got 1.5 \\(float\\)"),
    (lambda: make_split(_SPLIT_TASK, 20, np.int64(0)), "seed must be a Python int .*numpy.int64"),
    (lambda: AdditionSplit(_SPLIT_TASK, ((1, 2),), ((1, 2),), 0), "1 problems are both in train and in test"),
    (lambda: AdditionSplit(_SPLIT_TASK, (), ((1, 2),), 0), "train must be a non-empty tuple"),
    (lambda: AdditionSplit(_SPLIT_TASK, ((1, 2),), None, 0), "test must be a non-empty tuple"),
    (lambda: AdditionSplit(_SPLIT_TASK, ((1, 2),), ((3, 4, 5),), 0), "test must hold \\(a, b\\) pairs"),
    (lambda: AdditionSplit("add_d1_a2", ((1, 2),), ((3, 4),), 0), "task must be an AdditionTask"),
    (lambda: AdditionSplit(_SPLIT_TASK, ((1, 2),), ((3, 4),), "0"), "seed must be a Python int"),
    (lambda: save_split("split", "x.json"), "split must be an AdditionSplit"),
    (lambda: save_split(make_split(_SPLIT_TASK, 20, 0), None), "path must be a file path .* got NoneType"),
    (lambda: load_split(5), "path must be a file path .* got int"),
    (lambda: _SPLIT_TASK.batch(None), "problems must be a list of \\(a, b\\) pairs, got NoneType"),
    (lambda: _SPLIT_TASK.batch(5), "problems must be a list of \\(a, b\\) pairs, got int"),
])
def test_split_and_batch_doors_refuse_bad_input(call, message):
    """Refused with a ValueError that names the problem, never an AttributeError or TypeError from inside."""
    with pytest.raises(ValueError, match=message):
        call()


def test_a_batch_takes_pairs_from_an_iterator_like_operand_tensor():
    tokens, _ = _SPLIT_TASK.batch(iter([(1, 2), (3, 4)]))
    assert tokens.shape == (2, _SPLIT_TASK.seq_len)
    split = AdditionSplit(_SPLIT_TASK, [[1, 2]], [(3, 4)], 0)  # lists are kept as tuples
    assert split.train == ((1, 2),) and split.test == ((3, 4),)
