"""Answer-slot loss and accuracy: exact match, per digit, and the list of failures."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .data import VOCAB, AdditionTask
from .memory import keep_freed_memory
from .model import task_of
from .sparse_attention import analysis_run, batch_slices, check_attention_hooks
from .transformer import GatedTransformer

MAX_SHARED_PREFIX_DIGITS = 9  # the prefix key a * 10**(d-1) + b // 10 stays within int64


def check_task(model, task: AdditionTask) -> None:
    """Raise ``ValueError`` unless ``task`` is an :class:`AdditionTask` that fits ``model``
    (its sequence length is the model's context, its vocabulary the model's)."""
    check_attention_hooks(model)
    if not isinstance(task, AdditionTask):
        raise ValueError(f"task must be an AdditionTask, got {type(task).__name__}")
    built_for = task_of(model)
    if built_for is not None and built_for != task:
        raise ValueError(f"{task.name} does not fit this model: it was built for {built_for.name}")
    n_ctx, d_vocab = model.cfg.n_ctx, model.cfg.d_vocab
    if task.seq_len != n_ctx or d_vocab != len(VOCAB):
        raise ValueError(f"{task.name} (sequence length {task.seq_len}) does not fit this model "
                         f"(context {n_ctx}, vocabulary {d_vocab}): use the task the model was built for")


def check_tokens(model, tokens: torch.Tensor, task: AdditionTask | None = None) -> None:
    """Raise ``ValueError`` unless ``tokens`` are long vocabulary ids ``[batch, seq_len]`` of the
    task ``model`` was built for (or of ``task``, checked against the model)."""
    if task is not None:
        check_task(model, task)
    else:
        check_attention_hooks(model)
        task = task_of(model)
    seq_len = model.cfg.n_ctx if task is None else task.seq_len
    name = f"this model ({model.cfg.n_ctx} positions)" if task is None else task.name
    if not isinstance(tokens, torch.Tensor) or tokens.ndim != 2 or tokens.shape[1] != seq_len:
        raise ValueError(f"tokens must be a tensor of shape [batch, {seq_len}] for {name}, got "
                         f"{list(tokens.shape) if isinstance(tokens, torch.Tensor) else type(tokens).__name__}")
    if tokens.dtype != torch.long or (tokens.numel() and not (0 <= int(tokens.min()) and int(tokens.max()) < len(VOCAB))):
        raise ValueError(f"tokens must be long ids in 0..{len(VOCAB) - 1}, got {tokens.dtype}")


def answer_logits(model, tokens: torch.Tensor, task: AdditionTask) -> torch.Tensor:
    """Logits at the answer slots: tokens ``[batch, seq_len]`` -> ``[batch, answer_digits, d_vocab]``."""
    if not isinstance(task, AdditionTask):
        raise ValueError(f"task must be an AdditionTask (it says where the answer slots are), got {type(task).__name__}")
    check_tokens(model, tokens, task)
    if isinstance(model, GatedTransformer) and not model.has_user_hooks():
        return model(tokens, output_from=task.prompt_len)  # the last layer computes only the answer slots
    return model(tokens)[:, task.prompt_len:, :]


def _describe(value) -> str:
    return f"{value.dtype} {list(value.shape)}" if isinstance(value, torch.Tensor) else type(value).__name__


def answer_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over answer slots: logits ``[batch, answer_digits, d_vocab]``,
    targets ``[batch, answer_digits]``."""
    if (not isinstance(logits, torch.Tensor) or not isinstance(targets, torch.Tensor) or logits.ndim != 3
            or tuple(targets.shape) != tuple(logits.shape[:2]) or len(targets) == 0 or targets.dtype != torch.long
            or not logits.is_floating_point()):
        raise ValueError(f"need float logits [batch >= 1, answer_digits, d_vocab] and long targets [batch, answer_digits], "
                         f"got {_describe(logits)} and {_describe(targets)}")
    if int(targets.min()) < 0 or int(targets.max()) >= logits.shape[-1]:
        raise ValueError(f"targets must be token ids in 0..{logits.shape[-1] - 1}, got "
                         f"{int(targets.min())}..{int(targets.max())}")
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


MAX_FAILURES_LISTED = 1000


@dataclass
class Evaluation:
    n: int
    loss: float
    exact_match: float
    per_digit_accuracy: list[float]
    failures: list[tuple[str, str, str]] = field(default_factory=list)  # (problem, predicted, expected), the first MAX_FAILURES_LISTED
    open_edges: torch.Tensor | None = None  # [n, layer]: open edges per input and layer (gated models)
    wrong: torch.Tensor | None = None  # [n_failures]: positions in ``pairs`` of every problem answered wrong

    @property
    def n_failures(self) -> int:
        """All problems answered wrong (``failures`` lists at most ``MAX_FAILURES_LISTED``)."""
        return self.n - round(self.exact_match * self.n)

    @property
    def mean_open_edges(self) -> float | None:
        return None if self.open_edges is None else float(self.open_edges.sum(-1).mean())

    def summary(self) -> dict:
        result = {"n": self.n, "loss": self.loss, "exact_match": self.exact_match,
                  "per_digit_accuracy": self.per_digit_accuracy, "n_failures": self.n_failures}
        if self.open_edges is not None:
            per_input = self.open_edges.sum(-1)
            result.update(mean_open_edges=self.mean_open_edges,
                          open_edges_per_layer=self.open_edges.mean(0).tolist(),
                          open_edges_min=float(per_input.min()), open_edges_max=float(per_input.max()))
        return result


def evaluate(model, task: AdditionTask, pairs, *, gate_bias: float | None = None, dense: bool = False,
             edge_mask: torch.Tensor | None = None, batch_size: int = 2500) -> Evaluation:
    """Evaluate on ``pairs`` (a non-empty list of ``(a, b)``, or a long tensor ``[n, 2]``). Per-digit accuracy is listed from
    the most significant answer slot to the units.

    The model runs with its own gating (a sparse model: deterministic gates at its bias) unless
    asked otherwise (``gate_bias=``, ``dense=True``; see
    :func:`~sparsecirc.sparse_attention.analysis_run`); ``edge_mask`` closes edges on top
    (ablations). With gates, the result counts the open edges of every input.

    A :class:`~sparsecirc.transformer.GatedTransformer` with no user hooks attached runs each
    operand prefix once (:meth:`~sparsecirc.transformer.GatedTransformer.run_shared_prefix`: the
    same forward pass, about twice as fast on a whole enumeration); with hooks, it runs whole.
    """
    check_task(model, task)
    operands = task.operand_tensor(pairs)  # [n, 2], checked once
    slices = batch_slices(len(operands), batch_size)
    total_loss, correct_digits, correct_exact, failures = 0.0, torch.zeros(task.answer_digits), 0, []
    open_edges, wrong_positions = [], []
    shared = (isinstance(model, GatedTransformer) and not model.has_user_hooks()
              and task.operand_digits <= MAX_SHARED_PREFIX_DIGITS)
    with keep_freed_memory(), analysis_run(model, gate_bias=gate_bias, dense=dense, edge_mask=edge_mask) as gates:
        counts_edges = gates.mode != "dense" or edge_mask is not None
        for part in slices:
            chunk = operands[part]
            tokens, targets = task.encode_operands(chunk[:, 0], chunk[:, 1])
            if shared:
                prefix_key = chunk[:, 0] * 10 ** (task.operand_digits - 1) + chunk[:, 1] // 10
                logits, edges = model.run_shared_prefix(tokens, prefix_key, 2 * task.operand_digits, task.prompt_len,
                                                        counts_edges)
                if counts_edges:
                    open_edges.append(edges)
            else:
                logits = answer_logits(model, tokens, task)
                if counts_edges:
                    open_edges.append(gates.open_edges.sum(-1))  # [batch, layer]
            total_loss += answer_loss(logits, targets).item() * len(chunk)
            predicted = logits.argmax(-1)
            right = predicted == targets
            correct_digits += right.float().sum(0)
            exact = right.all(-1)
            correct_exact += int(exact.sum())
            wrong = (~exact).nonzero().flatten()
            wrong_positions.append(wrong.cpu() + part.start)
            for i in wrong[:MAX_FAILURES_LISTED - len(failures)].tolist():  # Python work only for the failures listed
                a, b = chunk[i].tolist()
                failures.append((task.format_problem(a, b),
                                 "".join(VOCAB[t] for t in predicted[i].tolist()), task.answer(a, b)))
    n = len(operands)
    return Evaluation(n, total_loss / n, correct_exact / n, (correct_digits / n).tolist(), failures,
                      torch.cat(open_edges) if counts_edges else None, torch.cat(wrong_positions))


def predict(model, task: AdditionTask, problem: str, *, gate_bias: float | None = None, dense: bool = False) -> str:
    """The model's answer digits for one problem string, e.g. ``predict(model, task, "36+28")``,
    with its own gating unless asked otherwise (``gate_bias=``, ``dense=True``)."""
    check_task(model, task)
    tokens, _ = task.batch([task.parse(problem)])
    with analysis_run(model, gate_bias=gate_bias, dense=dense):
        predicted = answer_logits(model, tokens, task).argmax(-1)[0]
    return "".join(VOCAB[t] for t in predicted.tolist())
