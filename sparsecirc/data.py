"""The addition task: vocabulary, token layout, encoding, decoding, and the dataset split.

Layout for the default task (2-digit operands, 5 answer slots), 11 positions::

    position  0 1 2 3 4 5 6 7 8 9 10
    token     3 6 + 2 8 = ? ? ? ? ?      -> answer slots hold 0 0 0 6 4

The model reads the whole line in one causal pass and predicts answer digit k at answer
slot k. The answer is the sum zero-padded to ``answer_digits`` digits, most significant first.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from .files import as_path, write_atomically

MAX_OPERAND_DIGITS = 18  # 2 * (10**18 - 1) fits int64

PLUS, EQUALS, BLANK = "+", "=", "?"
VOCAB: tuple[str, ...] = tuple("0123456789") + (PLUS, EQUALS, BLANK)
TOKEN_ID = {tok: i for i, tok in enumerate(VOCAB)}  # a digit token's id is its value
PLUS_ID, EQUALS_ID, BLANK_ID = TOKEN_ID[PLUS], TOKEN_ID[EQUALS], TOKEN_ID[BLANK]

DATASET_FORMAT = "sparsecirc.addition-split/2"
DATASET_FORMAT_1 = "sparsecirc.addition-split/1"  # every problem listed; still read


def _shorten(text: str, limit: int = 40) -> str:
    """``repr(text)``, cut to about ``limit`` characters for an error message."""
    return repr(text) if len(text) <= limit else repr(text[:limit]) + f"... ({len(text)} characters)"


@dataclass(frozen=True)
class AdditionTask:
    """``a + b`` with ``operand_digits``-digit operands and ``answer_digits`` answer slots."""

    operand_digits: int = 2
    answer_digits: int = 5

    def __post_init__(self):
        if isinstance(self.operand_digits, bool) or not isinstance(self.operand_digits, int) or self.operand_digits < 1:
            raise ValueError(f"operand_digits must be a positive int, got {self.operand_digits!r}")
        if self.operand_digits > MAX_OPERAND_DIGITS:  # before 10**operand_digits is ever computed
            raise ValueError(f"operand_digits must be at most {MAX_OPERAND_DIGITS} (sums must fit a 64-bit integer), "
                             f"got {self.operand_digits}")
        if isinstance(self.answer_digits, int) and not isinstance(self.answer_digits, bool) \
                and self.answer_digits > MAX_OPERAND_DIGITS + 2:
            raise ValueError(f"answer_digits must be at most {MAX_OPERAND_DIGITS + 2}, got {self.answer_digits}")
        if isinstance(self.answer_digits, bool) or not isinstance(self.answer_digits, int) or self.answer_digits < 1:
            raise ValueError(f"answer_digits must be a positive int, got {self.answer_digits!r}")
        largest_sum = 2 * (10**self.operand_digits - 1)
        if len(str(largest_sum)) > self.answer_digits:
            raise ValueError(
                f"answer_digits={self.answer_digits} cannot hold the largest sum {largest_sum} of "
                f"two {self.operand_digits}-digit operands; use answer_digits >= {len(str(largest_sum))}"
            )

    # ---- layout -------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return f"add_d{self.operand_digits}_a{self.answer_digits}"

    @property
    def max_operand(self) -> int:
        return 10**self.operand_digits - 1

    @property
    def n_problems(self) -> int:
        return (self.max_operand + 1) ** 2

    @property
    def prompt_len(self) -> int:
        """Positions up to and including ``=``."""
        return 2 * self.operand_digits + 2

    @property
    def seq_len(self) -> int:
        return self.prompt_len + self.answer_digits

    @property
    def answer_positions(self) -> list[int]:
        return list(range(self.prompt_len, self.seq_len))

    @property
    def position_labels(self) -> list[str]:
        """Names of the positions, e.g. ``['a1', 'a0', '+', 'b1', 'b0', '=', 's4', ..., 's0']``:
        digit k counts from the units (k=0)."""
        d = self.operand_digits
        a = [f"a{d - 1 - k}" for k in range(d)]
        b = [f"b{d - 1 - k}" for k in range(d)]
        s = [f"s{self.answer_digits - 1 - k}" for k in range(self.answer_digits)]
        return a + [PLUS] + b + [EQUALS] + s

    # ---- parsing ------------------------------------------------------------------------
    def parse(self, problem: str) -> tuple[int, int]:
        """``"36+28"`` -> ``(36, 28)``. Allowed: ASCII digits 0-9, one ``+``, an optional ``=`` at
        the end, and spaces around them (``" 36 + 28 = "``), not inside a number. Operands have
        at most ``operand_digits`` digits (leading zeros allowed: ``"07+03"``)."""
        if not isinstance(problem, str):
            raise ValueError(f"a problem must be a string like '36+28', got {type(problem).__name__}")
        d = self.operand_digits
        match = re.fullmatch(r" *([0-9]+) *\+ *([0-9]+) *(?:= *)?", problem)
        if match is None:
            raise ValueError(
                f"cannot parse problem {_shorten(problem)}: expected two non-negative integers of at most "
                f"{d} ASCII digits joined by '+', e.g. {'3' * d}+{'2' * d}"
            )
        a_text, b_text = match.groups()
        for operand in (a_text, b_text):
            if len(operand) > d:
                raise ValueError(
                    f"operand {_shorten(operand)} in {_shorten(problem)} has {len(operand)} digits; this task "
                    f"({self.name}) takes operands of at most {d} digits (0..{self.max_operand})"
                )
        return int(a_text), int(b_text)

    def check_operands(self, a: int, b: int) -> None:
        for x in (a, b):
            if not isinstance(x, int) or isinstance(x, bool):
                kind = f"{type(x).__module__}.{type(x).__qualname__}".removeprefix("builtins.")
                raise ValueError(f"operand {x!r} is a {kind}; operands must be Python ints in 0..{self.max_operand} "
                                 f"(convert with int(x), or array.tolist())")
            if not 0 <= x <= self.max_operand:
                raise ValueError(
                    f"operand {x!r} is outside 0..{self.max_operand} for this task ({self.name})"
                )

    def check_pairs(self, pairs) -> list[tuple[int, int]]:
        """``pairs`` as a non-empty list of ``(a, b)`` operand pairs of this task, checked."""
        if isinstance(pairs, (str, bytes)) or not hasattr(pairs, "__iter__"):
            raise ValueError(f"problems must be a list of (a, b) pairs, got {type(pairs).__name__}; "
                             f"use task.parse('36+28') for one problem string")
        pairs = list(pairs)
        if not pairs:
            raise ValueError("need at least one problem, got an empty list")
        for pair in pairs:
            if not isinstance(pair, (tuple, list)) or len(pair) != 2:
                raise ValueError(f"problems must be (a, b) pairs, got {pair!r}")
            self.check_operands(*pair)
        return [tuple(pair) for pair in pairs]

    def answer(self, a: int, b: int) -> str:
        """The answer digits as text: ``answer(36, 28) == '00064'``."""
        self.check_operands(a, b)
        return str(a + b).zfill(self.answer_digits)

    # ---- encoding -----------------------------------------------------------------------
    def encode(self, a: int, b: int) -> tuple[list[int], list[int]]:
        """Token ids of the input line ``[seq_len]`` and of the answer digits ``[answer_digits]``."""
        self.check_operands(a, b)
        tokens, targets = self.encode_operands(torch.tensor([a]), torch.tensor([b]))
        return tokens[0].tolist(), targets[0].tolist()

    def encode_problem(self, problem: str) -> tuple[list[int], list[int]]:
        return self.encode(*self.parse(problem))

    def operand_tensor(self, pairs) -> torch.Tensor:
        """``pairs`` as a checked long tensor ``[n, 2]`` of ``(a, b)``: a long tensor ``[n, 2]``
        is checked in one vectorised pass; a list of pairs one by one (:meth:`check_pairs`)."""
        if torch.is_tensor(pairs):
            if pairs.dtype != torch.long or pairs.ndim != 2 or pairs.shape[1] != 2:
                raise ValueError(f"an operand tensor must be long [n, 2], got {pairs.dtype} of shape {list(pairs.shape)}")
            if len(pairs) == 0:
                raise ValueError("need at least one problem, got an empty tensor")
            if int(pairs.min()) < 0 or int(pairs.max()) > self.max_operand:
                raise ValueError(f"operands must be in 0..{self.max_operand} for this task ({self.name}), "
                                 f"got values in {int(pairs.min())}..{int(pairs.max())}")
            return pairs
        return torch.tensor(self.check_pairs(pairs), dtype=torch.long)

    def encode_operands(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Vectorised encoding of checked operands ``a``, ``b`` (long ``[n]``): tokens
        ``[n, seq_len]`` and answer targets ``[n, answer_digits]``, most significant first.
        Digit tokens have the digit's value as id."""
        n, d = len(a), self.operand_digits
        powers = torch.tensor([10**k for k in reversed(range(d))])
        total = a + b
        answer = [total // 10**k % 10 if 10**k <= 2 * self.max_operand else torch.zeros_like(total)
                  for k in reversed(range(self.answer_digits))]  # powers beyond the largest sum are 0 (and would overflow)
        tokens = torch.cat([a[:, None] // powers % 10, torch.full((n, 1), PLUS_ID), b[:, None] // powers % 10,
                            torch.full((n, 1), EQUALS_ID), torch.full((n, self.answer_digits), BLANK_ID)], dim=1)
        return tokens, torch.stack(answer, dim=1)

    def batch(self, pairs) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens ``[batch, seq_len]`` and answer targets ``[batch, answer_digits]`` (long) of
        ``pairs``: a list of ``(a, b)`` or a long tensor ``[batch, 2]``."""
        if isinstance(pairs, (list, tuple)) and len(pairs) == 0:
            raise ValueError("cannot build a batch from an empty list of problems")
        operands = self.operand_tensor(pairs)  # refuses what is not a list of pairs or a long [n, 2] tensor
        return self.encode_operands(operands[:, 0], operands[:, 1])

    # ---- decoding -----------------------------------------------------------------------
    def check_tokens(self, tokens, length: int | None = None) -> list[int]:
        """Token ids (a 1-D integer tensor or a list of ints) as a list, checked: ``length``
        of them (default ``seq_len``), each a vocabulary id."""
        length = self.seq_len if length is None else length
        if torch.is_tensor(tokens):
            if tokens.ndim != 1 or tokens.is_floating_point() or tokens.is_complex() or tokens.dtype == torch.bool:
                raise ValueError(f"token ids must be a 1-D integer tensor, got {tokens.dtype} of shape {list(tokens.shape)}")
            ids = tokens.tolist()
        elif isinstance(tokens, (list, tuple)):
            ids = list(tokens)
            if any(isinstance(t, bool) or not isinstance(t, int) for t in ids):
                raise ValueError("token ids must be ints")
        else:
            raise ValueError(f"token ids must be a list of ints or a 1-D integer tensor, got {type(tokens).__name__}")
        if len(ids) != length:
            raise ValueError(f"expected {length} token ids for {self.name}, got {len(ids)}")
        bad = [t for t in ids if not 0 <= t < len(VOCAB)]
        if bad:
            raise ValueError(f"token ids {bad[:5]} are out of range; the vocabulary has ids 0..{len(VOCAB) - 1}")
        return ids

    def decode(self, tokens) -> str:
        """Token ids ``[seq_len]`` -> the line as text, e.g. ``'36+28=?????'``."""
        return "".join(VOCAB[t] for t in self.check_tokens(tokens))

    def decode_problem(self, tokens) -> tuple[int, int]:
        """Token ids ``[seq_len]`` of a well-formed input line -> ``(a, b)``."""
        text = self.decode(tokens)
        d = self.operand_digits
        expected = re.fullmatch(rf"(\d{{{d}}})\+(\d{{{d}}})=" + re.escape(BLANK) * self.answer_digits, text)
        if expected is None:
            raise ValueError(f"{text!r} is not a {self.name} input line like '{'3' * d}+{'2' * d}={BLANK * self.answer_digits}'")
        return int(expected.group(1)), int(expected.group(2))

    def decode_answer(self, digits) -> str:
        """Predicted or target answer ids ``[answer_digits]`` -> text like ``'00064'``."""
        ids = self.check_tokens(digits, self.answer_digits)
        if any(not 0 <= t <= 9 for t in ids):
            raise ValueError(f"answer ids must be digit tokens 0..9, got {ids}")
        return "".join(VOCAB[t] for t in ids)

    def format_problem(self, a: int, b: int) -> str:
        self.check_operands(a, b)
        return f"{a:0{self.operand_digits}d}+{b:0{self.operand_digits}d}"

    # ---- all problems -------------------------------------------------------------------
    def all_pairs(self) -> list[tuple[int, int]]:
        n = self.max_operand + 1
        return [(a, b) for a in range(n) for b in range(n)]

    def carries(self, a: int, b: int) -> list[bool]:
        """``carries[k]`` is True if adding digit column k (0 = units) carries into column k+1."""
        self.check_operands(a, b)
        out, carry = [], 0
        for k in range(self.operand_digits):
            column = (a // 10**k) % 10 + (b // 10**k) % 10 + carry
            carry = int(column >= 10)
            out.append(bool(carry))
        return out


@dataclass(frozen=True)
class AdditionSplit:
    """A train/test split of a task's problems, as ``(a, b)`` pairs: usually every problem
    (:func:`make_split`), or any disjoint sample of them."""

    task: AdditionTask
    train: tuple[tuple[int, int], ...]
    test: tuple[tuple[int, int], ...]
    seed: int

    def __post_init__(self):
        if not isinstance(self.task, AdditionTask):
            raise ValueError(f"task must be an AdditionTask, got {type(self.task).__name__}")
        _check_seed(self.seed)
        for name in ("train", "test"):
            pairs = getattr(self, name)
            if not isinstance(pairs, (tuple, list)) or not pairs:
                raise ValueError(f"{name} must be a non-empty tuple (or list) of (a, b) pairs, got "
                                 f"{type(pairs).__name__} {pairs!r:.60}")
            if not all(type(pair) is tuple and len(pair) == 2 for pair in pairs):
                if not all(isinstance(pair, (tuple, list)) and len(pair) == 2 for pair in pairs):
                    bad = next(pair for pair in pairs if not isinstance(pair, (tuple, list)) or len(pair) != 2)
                    raise ValueError(f"{name} must hold (a, b) pairs, it holds {bad!r:.60}")
                pairs = tuple(tuple(pair) for pair in pairs)
            object.__setattr__(self, name, tuple(pairs))
        shared = set(self.train) & set(self.test)
        if shared:
            raise ValueError(f"{len(shared)} problems are both in train and in test (e.g. {min(shared)}); a split's "
                             f"held-out problems must not be trained on")

    @property
    def all(self) -> tuple[tuple[int, int], ...]:
        return self.train + self.test


def _check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int):
        kind = f"{type(seed).__module__}.{type(seed).__qualname__}".removeprefix("builtins.")
        raise ValueError(f"seed must be a Python int (the same seed gives the same split), got {seed!r:.40} ({kind}); "
                         f"convert with int(x)")
    return seed


def sample_pairs(pairs, size: int, seed: int) -> tuple[tuple[int, int], ...]:
    """A fixed sample of ``size`` of ``pairs`` drawn with ``seed``, in their original order;
    all of them if there are no more than ``size``. Used to evaluate during a run."""
    pairs = tuple(pairs)
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"a sample needs a positive int size, got {size!r}")
    if len(pairs) <= size:
        return pairs
    chosen = sorted(random.Random(seed).sample(range(len(pairs)), size))
    return tuple(pairs[i] for i in chosen)


MAX_ENUMERATED_PROBLEMS = 10**6  # 3-digit operands; 4 digits would be 10^8 pairs in memory


def make_split(task: AdditionTask = AdditionTask(), test_size: int = 1000, seed: int = 0) -> AdditionSplit:
    """Shuffle every problem with ``seed`` and hold out ``test_size`` of them. Tasks of more
    than ``MAX_ENUMERATED_PROBLEMS`` problems are refused before any memory is spent."""
    if not isinstance(task, AdditionTask):
        raise ValueError(f"task must be an AdditionTask, got {type(task).__name__}")
    _check_seed(seed)
    if task.n_problems > MAX_ENUMERATED_PROBLEMS:
        raise ValueError(f"{task.name} has {task.n_problems:,} problems, more than the {MAX_ENUMERATED_PROBLEMS:,} "
                         f"a split enumerates; use operand_digits <= 3")
    if isinstance(test_size, bool) or not isinstance(test_size, int) or not 0 < test_size < task.n_problems:
        raise ValueError(f"test_size must be in 1..{task.n_problems - 1} for {task.name}, got {test_size}")
    pairs = task.all_pairs()
    random.Random(seed).shuffle(pairs)
    test = tuple(sorted(pairs[:test_size]))
    train = tuple(sorted(pairs[test_size:]))
    return AdditionSplit(task, train, test, seed)


REST = "every other problem"  # the train field of a split that holds the whole task


def save_split(split: AdditionSplit, path: str | Path) -> Path:
    """Write the split as JSON (format ``sparsecirc.addition-split/2``)::

        {"format": ..., "operand_digits": 2, "answer_digits": 5, "seed": 0, "n_train": 9000,
         "n_test": 1000, "test": ["00+07", ...], "train": "every other problem"}

    A split made by :func:`make_split` stores only what cannot be recomputed: the task, the
    seed and the held-out problems; training is every other problem (11 kB for 1,000 held out
    of 1,000,000). Any other split, for instance a sample built in Python, stores both lists.
    An existing file is left alone if it holds the same split; a different file is never
    overwritten (``FileExistsError``): move it or choose another path.
    """
    if not isinstance(split, AdditionSplit):
        raise ValueError(f"split must be an AdditionSplit (see make_split), got {type(split).__name__}")
    path = as_path(path)
    if path.is_dir():
        raise ValueError(f"{path} is a directory; give a file path such as {path / (split.task.name + '.json')}")
    task = split.task
    whole = (task.n_problems <= MAX_ENUMERATED_PROBLEMS and len(split.train) + len(split.test) == task.n_problems
             and 0 < len(split.test) < task.n_problems and split == make_split(task, len(split.test), split.seed))
    record = {
        "format": DATASET_FORMAT,
        "operand_digits": task.operand_digits,
        "answer_digits": task.answer_digits,
        "seed": split.seed,
        "n_train": len(split.train),
        "n_test": len(split.test),
        "test": [task.format_problem(a, b) for a, b in split.test],
        "train": REST if whole else [task.format_problem(a, b) for a, b in split.train],
    }
    if path.exists():
        try:
            same = load_split(path) == split
        except ValueError:
            same = False
        if same:
            return path
        raise FileExistsError(f"{path} exists and holds a different dataset; not overwriting it")
    text = (json.dumps(record, indent=0) + "\n").encode()
    try:
        return write_atomically(path, lambda file: file.write(text), overwrite=False)
    except FileExistsError:  # appeared while writing
        raise FileExistsError(f"{path} exists and holds a different dataset; not overwriting it") from None


def _parse_all(task: AdditionTask, problems, path: Path, name: str) -> tuple[tuple[int, int], ...]:
    if not isinstance(problems, list) or not all(isinstance(p, str) for p in problems):
        raise ValueError(f"{path}: {name} must be a list of problem strings")
    try:
        pairs = tuple(task.parse(p) for p in problems)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None
    if len(set(pairs)) != len(pairs):
        raise ValueError(f"{path}: {len(pairs) - len(set(pairs))} problems appear twice in {name}")
    return pairs


def load_split(path: str | Path) -> AdditionSplit:
    """Read a split written by :func:`save_split` (format 2, or format 1 which listed every
    problem), checking it: every problem parses, train and held-out are disjoint, counts match,
    and a whole-task split's held-out problems are exactly those its seed draws."""
    path = as_path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no dataset file at {path}" + (" (it is a directory)" if path.is_dir() else ""))
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not a sparsecirc dataset (not valid JSON text: {err})") from None
    formats = (DATASET_FORMAT, DATASET_FORMAT_1)
    if not isinstance(record, dict) or record.get("format") not in formats:
        raise ValueError(f"{path} is not a sparsecirc dataset (expected format {DATASET_FORMAT!r})")
    missing = [k for k in ("operand_digits", "answer_digits", "seed", "n_train", "n_test", "train", "test") if k not in record]
    if missing:
        raise ValueError(f"{path}: the dataset lacks {missing}")
    seed = record["seed"]
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"{path}: seed must be an int, got {seed!r}")
    task = AdditionTask(record["operand_digits"], record["answer_digits"])
    test = _parse_all(task, record["test"], path, "test")
    if len(test) != record["n_test"]:
        raise ValueError(f"{path}: {len(test)} held-out problems, but n_test says {record['n_test']}")
    if record["train"] == REST and record["format"] == DATASET_FORMAT:
        if task.n_problems > MAX_ENUMERATED_PROBLEMS:
            raise ValueError(f"{path}: {task.name} has {task.n_problems:,} problems, too many to enumerate as "
                             f"training problems; list them explicitly (a sampled split)")
        if not 0 < len(test) < task.n_problems:
            raise ValueError(f"{path}: a whole-task split needs 1..{task.n_problems - 1} held-out problems")
        expected = make_split(task, len(test), seed)
        if expected.test != tuple(sorted(test)):
            raise ValueError(f"{path}: the held-out problems are not the {len(test)} that seed {seed} draws "
                             f"(a problem was moved or the seed was changed)")
        if record["n_train"] != len(expected.train):
            raise ValueError(f"{path}: n_train says {record['n_train']}, the task leaves {len(expected.train)}")
        return expected
    train = _parse_all(task, record["train"], path, "train")
    if len(train) != record["n_train"]:
        raise ValueError(f"{path}: {len(train)} training problems, but n_train says {record['n_train']}")
    if not train or not test:
        raise ValueError(f"{path}: the split needs at least one training and one held-out problem")
    if set(train) & set(test):
        raise ValueError(f"{path}: {len(set(train) & set(test))} problems are in both train and test")
    if record["format"] == DATASET_FORMAT_1 and len(train) + len(test) != task.n_problems:
        raise ValueError(f"{path}: the split must hold each of the {task.n_problems} problems exactly once")
    return AdditionSplit(task, train, test, seed)
