"""Property tests: every input to the public doors either does the right thing or raises ValueError."""

import math
from pathlib import Path

import numpy as np

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

from sparsecirc.checkpoint import read_checkpoint, save_checkpoint
from sparsecirc.data import VOCAB, AdditionTask
from sparsecirc.model import ModelConfig, build_model
from sparsecirc.sparse_attention import Edge, mask_closing, sparse_attention

TASKS = [AdditionTask(1, 2), AdditionTask(2, 5), AdditionTask(3, 4)]
TINY = ModelConfig(operand_digits=1, answer_digits=2, n_layers=2, n_heads=2, d_head=4, d_model=8, d_mlp=16)
MODEL = build_model(TINY)

problem_text = st.text(alphabet=st.sampled_from("0123456789+= \t-x\u0662\uff12"), max_size=12) | st.text(max_size=12)


@given(st.sampled_from(TASKS), problem_text)
def test_parse_returns_operands_in_range_or_refuses(task, text):
    try:
        a, b = task.parse(text)
    except ValueError:
        return
    assert 0 <= a <= task.max_operand and 0 <= b <= task.max_operand
    assert set(text) <= set("0123456789+= ")  # only ASCII digits, '+', '=' and spaces get through
    assert task.parse(task.format_problem(a, b)) == (a, b)


@given(st.sampled_from(TASKS), st.data())
def test_parse_reads_every_problem_back_with_spaces_around_tokens(task, data):
    a = data.draw(st.integers(0, task.max_operand))
    b = data.draw(st.integers(0, task.max_operand))
    pad = [data.draw(st.sampled_from(["", " ", "  "])) for _ in range(4)]
    assert task.parse(f"{pad[0]}{a}{pad[1]}+{pad[2]}{b}{pad[3]}") == (a, b)


token_lists = st.lists(st.integers(-3, 16) | st.floats(allow_nan=True) | st.booleans() | st.none(), max_size=14)
token_tensors = st.tuples(st.sampled_from([torch.long, torch.int32, torch.uint8, torch.float32, torch.bool]),
                          st.lists(st.integers(0, 15), max_size=14), st.booleans())


@given(st.sampled_from(TASKS), token_lists | token_tensors)
def test_decode_gives_a_line_of_vocabulary_or_refuses(task, tokens):
    if isinstance(tokens, tuple):
        dtype, values, two_d = tokens
        tokens = torch.tensor(values, dtype=dtype)
        tokens = tokens[None] if two_d else tokens
    try:
        line = task.decode(tokens)
    except ValueError:
        return
    ids = tokens.tolist() if torch.is_tensor(tokens) else tokens
    assert len(line) == task.seq_len and all(isinstance(t, int) and not isinstance(t, bool) for t in ids)
    assert line == "".join(VOCAB[t] for t in ids)


edge_field = st.integers(-2, 12) | st.floats(allow_nan=True) | st.booleans() | st.none() | st.text(max_size=2)


@given(edge_field, edge_field, edge_field, edge_field)
@example(1.5, 0, 1, 0)
@example(True, 0, 1, 0)
@example("0", 0, 1, 0)
@example(torch.tensor(1), 0, 1, 0)  # a 0-d integer tensor is an index: accepted
def test_an_edge_is_four_non_negative_ints_and_a_mask_closes_exactly_it(layer, head, query, key):
    try:
        edge = Edge(layer, head, query, key)
    except ValueError as error:
        assert "non-negative int" in str(error)
        return
    assert (edge.layer, edge.head, edge.query, edge.key) == tuple(int(v) for v in (layer, head, query, key))
    assert all(type(v) is int and v >= 0 for v in (edge.layer, edge.head, edge.query, edge.key))
    try:
        mask = mask_closing(MODEL, [edge])
    except ValueError:
        assert not (edge.layer < TINY.n_layers and edge.head < TINY.n_heads and edge.key <= edge.query < TINY.task.seq_len)
        return
    assert mask.sum() == mask.numel() - 1 and mask[edge.layer, edge.head, edge.query, edge.key] == 0


@given(st.lists(st.sampled_from([0.0, 1.0, 0.5, 2.0, -1.0, float("nan"), float("inf")]), min_size=1, max_size=4))
@example([2.0])
@example([0.5])
@example([float("nan")])
def test_an_edge_mask_is_accepted_exactly_when_it_holds_zeros_and_ones(values):
    mask = torch.ones(TINY.n_layers, TINY.n_heads, TINY.task.seq_len, TINY.task.seq_len)
    mask.view(-1)[: len(values)] = torch.tensor(values)
    tokens, _ = TINY.task.batch([(3, 4)])
    valid = all(v in (0.0, 1.0) for v in values)
    try:
        with sparse_attention(MODEL, "dense", edge_mask=mask) as gates:
            MODEL(tokens)
    except ValueError as error:
        assert not valid and "only 0" in str(error)
        return
    assert valid and set(gates.masks.unique().tolist()) <= {0.0, 1.0}


plain = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=5),
                     lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
                     max_leaves=8)
unreadable = st.sampled_from([torch.tensor(1.0), {1, 2}, object(), b"bytes", 1j, {1: "int key"}, np.float64(1.0),
                              np.arange(3), Path("a")])


@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("checkpoints")


@given(st.dictionaries(st.text(max_size=6), plain | unreadable, max_size=4))
def test_a_checkpoint_reads_back_what_was_saved_or_refuses_before_writing(checkpoint_dir, metrics):
    path = checkpoint_dir / "m.pt"
    save_checkpoint(path, MODEL, TINY, {"kept": 1}, overwrite=True)
    before = path.read_bytes()
    try:
        save_checkpoint(path, MODEL, TINY, metrics, overwrite=True)
    except ValueError:
        assert path.read_bytes() == before
        assert [p.name for p in checkpoint_dir.iterdir()] == ["m.pt"]  # no temporary file left
        return
    back = read_checkpoint(path)
    assert back.metrics == _as_saved(metrics) and back.config == TINY


def _as_saved(value):
    """What torch.save / torch.load give back: tuples come back as tuples, the rest as is."""
    if isinstance(value, dict):
        return {k: _as_saved(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_as_saved(v) for v in value]
    return value
