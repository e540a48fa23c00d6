"""Base training: cross-entropy on the answer slots only, AdamW, seeded, with periodic evaluation."""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, fields

import torch
from tqdm.auto import tqdm

from .data import MAX_ENUMERATED_PROBLEMS, AdditionSplit, sample_pairs
from .evaluation import answer_logits, answer_loss, check_task, evaluate
from .memory import keep_freed_memory
from .sparse_attention import gate_bias_of

# Seconds between progress-bar refreshes. In a notebook every refresh is a widget message; a
# minutes-long loop at tqdm's default (0.1 s) sends thousands while nbval waits for the cell to
# finish, and on a slow machine nbval then failed notebook 03 with "Timeout of 5 seconds
# exceeded waiting for output" (most likely a full message queue dropped the final message).
PROGRESS_INTERVAL = 2.0
MAX_BATCH_SIZE = MAX_ENUMERATED_PROBLEMS


def check_field_types(config) -> None:
    """Raise ``ValueError`` unless every field of the dataclass ``config`` annotated ``int`` holds
    an int and every ``float`` field a finite int or float (bools are neither)."""
    for f in fields(config):
        value = getattr(config, f.name)
        kind = (float, int) if f.type == "float" else int if f.type == "int" else None
        if kind is None:
            continue
        if isinstance(value, bool) or not isinstance(value, kind) or (kind is not int and not math.isfinite(value)):
            raise ValueError(f"{f.name} must be a finite {f.type}, got {value!r}")


@dataclass(frozen=True)
class TrainConfig:
    """Optimiser and schedule. Stops when a fixed sample of the *training* split (all of it for two
    digits) reaches ``target_accuracy`` exact match (the held-out split never steers training) or
    after ``max_steps``.

    Every ``eval_every`` steps the run evaluates a fixed sample of ``curve_size`` training and
    ``curve_size`` held-out problems drawn with ``seed``: the learning curve (the training sample
    is drawn from the stopping rule's, below, and is all of it if that is no larger). The stopping
    rule reads a larger fixed sample of ``eval_size`` training problems (a split no larger is
    evaluated whole: the 2-digit split of 9,000 always is). It holds the curve's sample and so its
    failures, and is evaluated only when it could meet the target with those alone (with the
    default target of 1.0: when the curve's sample is all right); so the run stops at the same
    evaluation as if all ``eval_size`` were evaluated every time (up to a prediction that changes
    with the batch it is evaluated in, which we have not seen). Whole splits and all problems are evaluated once, at the end, by the caller
    (``python -m sparsecirc train``)."""

    lr: float = 1e-3
    weight_decay: float = 0.01
    batch_size: int = 256
    max_steps: int = 2000
    eval_every: int = 50
    target_accuracy: float = 1.0
    eval_size: int = 10_000
    curve_size: int = 1_000
    seed: int = 0

    def __post_init__(self):
        check_field_types(self)
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if (self.lr <= 0 or self.batch_size < 1 or self.max_steps < 1 or self.eval_every < 1 or self.eval_size < 1
                or self.curve_size < 1):
            raise ValueError(f"lr, batch_size, max_steps, eval_every, eval_size and curve_size must be positive: {self}")
        if self.batch_size > MAX_BATCH_SIZE:
            raise ValueError(f"batch_size must be at most {MAX_BATCH_SIZE:,} (a batch is sampled from the training "
                             f"split, which holds at most that many problems), got {self.batch_size:,}")
        if not 0 <= self.seed < 2**63:
            raise ValueError(f"seed must be an int in 0..2**63-1, got {self.seed}")
        if not 0 < self.target_accuracy <= 1:
            raise ValueError(f"target_accuracy must be in (0, 1], got {self.target_accuracy}")

    def to_dict(self) -> dict:
        return asdict(self)


def train_step(model, optimizer, tokens: torch.Tensor, targets: torch.Tensor, task) -> float:
    """One optimiser step on a batch: tokens ``[batch, seq_len]``, targets ``[batch, answer_digits]``."""
    loss = answer_loss(answer_logits(model, tokens, task), targets)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.item()


def train(model, split: AdditionSplit, config: TrainConfig = TrainConfig(), progress: bool = True) -> list[dict]:
    """Train ``model`` in place on ``split.train``. Returns the history: one dict per
    evaluation with ``step``, ``seconds``, ``train_loss`` (running mean since the last
    evaluation), train/test ``loss`` and ``exact_match`` on the curve's samples, and, where the
    stopping rule was checked, ``stop_exact_match`` on its ``eval_size`` training problems."""
    if not isinstance(split, AdditionSplit):
        raise ValueError(f"split must be an AdditionSplit (see make_split, load_split), got {type(split).__name__}")
    if not isinstance(config, TrainConfig):
        raise ValueError(f"config must be a TrainConfig, got {type(config).__name__}")
    task = split.task
    check_task(model, task)
    if gate_bias_of(model) is not None:
        raise ValueError(f"this is a sparse model (gate_bias {gate_bias_of(model)}); train trains dense base models")
    train_tokens, train_targets = task.batch(list(split.train))
    stop_sample = sample_pairs(split.train, config.eval_size, config.seed)  # steers the stopping rule
    train_sample = sample_pairs(stop_sample, config.curve_size, config.seed)  # the curve; a subset of stop_sample
    test_sample = sample_pairs(split.test, config.curve_size, config.seed)  # only reported
    generator = torch.Generator().manual_seed(config.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay, fused=True)
    history, running, start = [], [], time.perf_counter()
    with keep_freed_memory():  # an evaluation every 50 steps: its buffers are not faulted in again each time
        try:
            model.train()
            bar = tqdm(range(1, config.max_steps + 1), desc="training", disable=not progress, mininterval=PROGRESS_INTERVAL)
            for step in bar:
                index = torch.randint(len(train_tokens), (config.batch_size,), generator=generator)
                running.append(train_step(model, optimizer, train_tokens[index], train_targets[index], task))
                if step % config.eval_every == 0 or step == config.max_steps:
                    on_train = evaluate(model, task, train_sample)
                    on_test = evaluate(model, task, test_sample)
                    # stop_sample holds train_sample and so its failures: it is evaluated only when it could
                    # meet the target with those alone (with the default target of 1.0: when train_sample does)
                    stop = None
                    if (len(stop_sample) - on_train.n_failures) / len(stop_sample) >= config.target_accuracy:
                        stop = on_train if stop_sample == train_sample else evaluate(model, task, stop_sample)
                    row = {"step": step, "seconds": time.perf_counter() - start, "train_loss": sum(running) / len(running),
                           "train_eval_loss": on_train.loss, "train_exact_match": on_train.exact_match,
                           "test_loss": on_test.loss, "test_exact_match": on_test.exact_match}
                    if stop is not None:
                        row["stop_exact_match"] = stop.exact_match
                    history.append(row)
                    running = []
                    bar.set_postfix(loss=f"{on_train.loss:.4f}", train=f"{on_train.exact_match:.4f}",
                                    test=f"{on_test.exact_match:.4f}")
                    if stop is not None and stop.exact_match >= config.target_accuracy:
                        break
            bar.close()
        finally:
            model.eval()
    return history
