"""Pictures for the notebooks: training curves and attention patterns (matplotlib)."""

from __future__ import annotations

import matplotlib.pyplot as plt
import torch

from .data import VOCAB, AdditionTask


@torch.no_grad()
def attention_patterns(model, task: AdditionTask, problem: str) -> torch.Tensor:
    """Post-softmax attention of one problem: ``[layer, head, query_pos, key_pos]``."""
    tokens, _ = task.batch([task.parse(problem)])
    _, cache = model.run_with_cache(tokens, names_filter=lambda name: name.endswith("attn.hook_pattern"))
    return torch.stack([cache[f"blocks.{layer}.attn.hook_pattern"][0] for layer in range(model.cfg.n_layers)])


def plot_training_history(history: list[dict], title: str = "Base training"):
    """Loss (log scale) and exact-match accuracy against steps, train and held-out."""
    steps = [h["step"] for h in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 3.6))
    ax_loss.plot(steps, [h["train_loss"] for h in history], label="train (batches)")
    ax_loss.plot(steps, [h["test_loss"] for h in history], label="held-out")
    ax_loss.set(yscale="log", xlabel="step", ylabel="cross-entropy on answer slots", title="loss")
    ax_acc.plot(steps, [h["train_exact_match"] for h in history], label="train")
    ax_acc.plot(steps, [h["test_exact_match"] for h in history], label="held-out")
    ax_acc.set(xlabel="step", ylabel="exact match", ylim=(-0.02, 1.02), title="accuracy (all 5 digits right)")
    for ax in (ax_loss, ax_acc):
        ax.legend()
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_attention_patterns(patterns: torch.Tensor, task: AdditionTask, problem: str, predicted: str | None = None):
    """A grid of heat maps, one per (layer, head): rows are queries, columns keys.

    ``patterns``: ``[layer, head, query_pos, key_pos]``.
    """
    n_layers, n_heads = patterns.shape[:2]
    tokens, _ = task.encode_problem(problem)
    labels = [f"{VOCAB[t]} {name}" for t, name in zip(tokens, task.position_labels)]
    fig, axes = plt.subplots(n_layers, n_heads, figsize=(2.6 * n_heads, 2.6 * n_layers), squeeze=False)
    for layer in range(n_layers):
        for head in range(n_heads):
            ax = axes[layer, head]
            ax.imshow(patterns[layer, head].numpy(), cmap="Blues", vmin=0, vmax=1)
            ax.set_title(f"L{layer} H{head}", fontsize=9)
            ax.set_xticks(range(task.seq_len), labels if layer == n_layers - 1 else [], rotation=90, fontsize=6)
            ax.set_yticks(range(task.seq_len), labels if head == 0 else [], fontsize=6)
    heading = f"Attention patterns for {problem}"
    if predicted is not None:
        heading += f" (model answers {predicted})"
    fig.suptitle(heading + "; rows = query, columns = key")
    fig.tight_layout()
    return fig
