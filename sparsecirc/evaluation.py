"""Answer-slot loss and accuracy: exact match, per digit, and the list of failures."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .data import VOCAB, AdditionTask
from .sparse_attention import analysis_gates, sparse_attention


def answer_logits(model, tokens: torch.Tensor, task: AdditionTask) -> torch.Tensor:
    """Logits at the answer slots: tokens ``[batch, seq_len]`` -> ``[batch, answer_digits, d_vocab]``."""
    if tokens.ndim != 2 or tokens.shape[1] != task.seq_len:
        raise ValueError(f"tokens must have shape [batch, {task.seq_len}] for {task.name}, got {list(tokens.shape)}")
    return model(tokens)[:, task.prompt_len:, :]


def answer_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over answer slots: logits ``[batch, answer_digits, d_vocab]``,
    targets ``[batch, answer_digits]``."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


@dataclass
class Evaluation:
    n: int
    loss: float
    exact_match: float
    per_digit_accuracy: list[float]
    failures: list[tuple[str, str, str]] = field(default_factory=list)  # (problem, predicted, expected)
    open_edges: torch.Tensor | None = None  # [n, layer]: open edges per input and layer (gated models)

    @property
    def mean_open_edges(self) -> float | None:
        return None if self.open_edges is None else float(self.open_edges.sum(-1).mean())

    def summary(self) -> dict:
        result = {"n": self.n, "loss": self.loss, "exact_match": self.exact_match,
                  "per_digit_accuracy": self.per_digit_accuracy, "n_failures": len(self.failures)}
        if self.open_edges is not None:
            per_input = self.open_edges.sum(-1)
            result.update(mean_open_edges=self.mean_open_edges,
                          open_edges_per_layer=self.open_edges.mean(0).tolist(),
                          open_edges_min=float(per_input.min()), open_edges_max=float(per_input.max()))
        return result


@torch.no_grad()
def evaluate(model, task: AdditionTask, pairs, batch_size: int = 2500, gate_bias: float | None = None,
             edge_mask: torch.Tensor | None = None) -> Evaluation:
    """Evaluate on ``pairs`` (a list of ``(a, b)``). Per-digit accuracy is listed from the most
    significant answer slot to the units.

    With ``gate_bias`` the model runs with deterministic edge gates (a sparse model) and the
    result counts the open edges of every input; ``edge_mask`` closes edges on top (ablations).
    """
    pairs = list(pairs)
    gated = gate_bias is not None or edge_mask is not None
    was_training = model.training
    model.eval()
    total_loss, correct_digits, correct_exact, failures = 0.0, torch.zeros(task.answer_digits), 0, []
    open_edges = []
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start:start + batch_size]
        tokens, targets = task.batch(chunk)
        if gated:
            with analysis_gates(model, gate_bias, edge_mask) as gates:
                logits = answer_logits(model, tokens, task)
            open_edges.append(gates.open_edges.sum(-1))  # [batch, layer]
        else:
            logits = answer_logits(model, tokens, task)
        total_loss += answer_loss(logits, targets).item() * len(chunk)
        predicted = logits.argmax(-1)
        right = predicted == targets
        correct_digits += right.float().sum(0)
        exact = right.all(-1)
        correct_exact += int(exact.sum())
        for i in (~exact).nonzero().flatten().tolist():
            a, b = chunk[i]
            failures.append((task.format_problem(a, b),
                             "".join(VOCAB[t] for t in predicted[i].tolist()), task.answer(a, b)))
    model.train(was_training)
    n = len(pairs)
    return Evaluation(n, total_loss / n, correct_exact / n, (correct_digits / n).tolist(), failures,
                      torch.cat(open_edges) if gated else None)


@torch.no_grad()
def predict(model, task: AdditionTask, problem: str, gate_bias: float | None = None) -> str:
    """The model's answer digits for one problem string, e.g. ``predict(model, task, "36+28")``;
    with ``gate_bias``, through deterministic edge gates."""
    tokens, _ = task.batch([task.parse(problem)])
    was_training = model.training
    model.eval()
    if gate_bias is None:
        predicted = answer_logits(model, tokens, task).argmax(-1)[0]
    else:
        with sparse_attention(model, "deterministic", gate_bias):
            predicted = answer_logits(model, tokens, task).argmax(-1)[0]
    model.train(was_training)
    return "".join(VOCAB[t] for t in predicted.tolist())
