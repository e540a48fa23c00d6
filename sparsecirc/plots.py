"""Pictures for the notebooks: training curves and attention patterns (matplotlib)."""

from __future__ import annotations

import matplotlib.pyplot as plt
from matplotlib.ticker import NullFormatter, ScalarFormatter
import torch

from .circuit_size import needed_for
from .data import VOCAB, AdditionTask
from .evaluation import check_task


@torch.no_grad()
def attention_patterns(model, task: AdditionTask, problem: str) -> torch.Tensor:
    """Post-softmax attention of one problem: ``[layer, head, query_pos, key_pos]``."""
    check_task(model, task)
    tokens, _ = task.batch([task.parse(problem)])
    _, cache = model.run_with_cache(tokens, names_filter=lambda name: name.endswith("attn.hook_pattern"))
    return torch.stack([cache[f"blocks.{layer}.attn.hook_pattern"][0] for layer in range(model.cfg.n_layers)])


def plot_training_history(history: list[dict], title: str = "Base training"):
    """Loss (log scale) and exact-match accuracy against steps, train and held-out."""
    needed = ("step", "train_loss", "test_loss", "train_exact_match", "test_exact_match")
    if not isinstance(history, list) or not history or not all(isinstance(h, dict) and all(k in h for k in needed)
                                                                 for h in history):
        raise ValueError(f"history must be the non-empty list of dicts train returns, each with {list(needed)}; "
                         f"got {history!r:.80}")
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


def plot_head_grid(values: torch.Tensor, labels: list[str], title: str, colour_label: str, cmap: str = "Blues"):
    """One heat map per (layer, head) on a shared 0-1 colour scale with a colour bar: rows are
    queries, columns keys, every tick named by ``labels``. ``values``: ``[layer, head, query,
    key]`` in [0, 1]. Returns ``(fig, axes)``; ``axes[layer, head]``."""
    n_layers, n_heads, n_query, n_key = values.shape
    if len(labels) != n_key or n_query != n_key:
        raise ValueError(f"need one label per position ({n_key}) and square maps, got {len(labels)} labels "
                         f"for [{n_query}, {n_key}] maps")
    fig, axes = plt.subplots(n_layers, n_heads, figsize=(2.7 * n_heads + 1.2, 2.7 * n_layers + 0.4), squeeze=False,
                             layout="constrained")
    for layer in range(n_layers):
        for head in range(n_heads):
            ax = axes[layer, head]
            image = ax.imshow(values[layer, head].numpy(), cmap=cmap, vmin=0, vmax=1)
            ax.set_title(f"layer {layer}, head {head}", fontsize=9)
            ax.set_xticks(range(n_key), labels, rotation=90, fontsize=7)
            ax.set_yticks(range(n_query), labels, fontsize=7)
            if layer < n_layers - 1:
                ax.tick_params(labelbottom=False)
            if head > 0:
                ax.tick_params(labelleft=False)
    fig.colorbar(image, ax=axes, shrink=0.5, label=colour_label)
    fig.suptitle(title + "\n(rows: query position; columns: key position)")
    return fig, axes


def plot_attention_patterns(patterns: torch.Tensor, task: AdditionTask, problem: str, predicted: str | None = None):
    """A grid of heat maps, one per (layer, head): rows are queries, columns keys, ticks the
    token and the position's name (``"3 a1"``). ``patterns``: ``[layer, head, query_pos, key_pos]``."""
    tokens, _ = task.encode_problem(problem)
    labels = [name if VOCAB[t] == name else f"{VOCAB[t]} {name}" for t, name in zip(tokens, task.position_labels)]
    heading = f"Attention patterns for {problem}"
    if predicted is not None:
        heading += f" (model answers {predicted})"
    fig, _ = plot_head_grid(patterns, labels, heading, "attention weight (softmax)")
    return fig


STEP_KEYS = ("step", "ce", "tau", "constraint_ema", "multiplier", "expected_edges", "lr")  # every row of sparsify's
EVALUATION_KEYS = ("test_edges", "test_exact_match")  # the rows where it evaluated


def check_sparsify_history(history) -> None:
    """Raise ``ValueError`` unless ``history`` is a list of rows as :func:`sparsify` returns it:
    every row with ``STEP_KEYS``, at least one evaluation row with ``EVALUATION_KEYS``."""
    if not isinstance(history, list) or not history or not all(isinstance(row, dict) for row in history):
        raise ValueError(f"history must be the non-empty list of dicts sparsify returns, got {history!r:.80}")
    missing = [key for key in STEP_KEYS if any(key not in row for row in history)]
    if missing:
        raise ValueError(f"history rows lack {missing}; pass the history sparsify returns")
    if not any(all(key in row for key in EVALUATION_KEYS) for row in history):
        raise ValueError(f"history has no evaluation rows (with {list(EVALUATION_KEYS)}) to draw; pass the history "
                         f"of a sparsify run that evaluated (every eval_every steps and at the end)")


def plot_sparsify_history(history: list[dict], title: str = "Sparse attention post-training"):
    """Four panels against steps: CE and its target tau, the multiplier, open edges per input
    (log scale, with the steps where duplicate edges were closed), and held-out exact match
    with deterministic gates; the final window, the selected step and the start of each rescue
    window are marked."""
    check_sparsify_history(history)
    steps = [row["step"] for row in history]
    evals = [row for row in history if "test_edges" in row]
    fig, axes = plt.subplots(2, 2, figsize=(11, 6.5))
    ax = axes[0, 0]
    ax.plot(steps, [row["ce"] for row in history], lw=0.6, alpha=0.6, label="CE (training batch)")
    ax.plot(steps, [row["tau"] + row["constraint_ema"] for row in history], lw=1.2, label="moving average")
    ax.plot(steps, [row["tau"] for row in history], "k--", lw=1, label="target tau")
    ax.set(yscale="log", title="cross-entropy against its target", xlabel="step")
    ax.legend(fontsize=8)
    ax = axes[0, 1]
    ax.plot(steps, [row["multiplier"] for row in history], color="tab:red")
    ax.set(yscale="log", title="Lagrange multiplier", xlabel="step")
    ax = axes[1, 0]
    ax.plot(steps, [row["expected_edges"] for row in history], lw=1, label="expected (training)")
    ax.plot([row["step"] for row in evals], [row["test_edges"] for row in evals], "o-", ms=3,
            label="open, deterministic gates (held-out)")
    prunes = [row for row in history if "closed_edges" in row]
    for i, row in enumerate(prunes):
        ax.axvline(row["step"], color="tab:orange", lw=0.8, ls="--",
                   label=f"duplicates closed (in all: {prunes[-1]['closed_edges']} gates)" if i == 0 else None)
    ax.set(yscale="log", title="open edges per input", xlabel="step")
    ax.legend(fontsize=8)
    ax = axes[1, 1]
    ax.plot([row["step"] for row in evals], [row["test_exact_match"] for row in evals], "o-", ms=3, color="tab:green")
    ax.set(title="held-out exact match (deterministic gates)", xlabel="step", ylim=(min(0.9, *[r["test_exact_match"] for r in evals]) - 0.01, 1.005))
    full_lr = history[0]["lr"]
    decay = [row["step"] for row in history if row["lr"] < full_lr]
    selected = history[-1].get("selected_step")
    rescues = [row["step"] for row in history if "rescue" in row]  # a rescue window starts after each
    for ax in axes.flat:
        ax.grid(alpha=0.3)
        if decay:
            ax.axvspan(decay[0], decay[-1], color="tab:gray", alpha=0.15, lw=0)
        if selected is not None:
            ax.axvline(selected, color="tab:purple", lw=1, ls=":")
        for step in rescues:
            ax.axvline(step, color="tab:red", lw=1, ls="-.")
    notes = (["grey: lr decays, tau tightens", "dotted: selected state"] if decay else []) + (
        ["dash-dot: a rescue window starts"] if rescues else [])
    fig.suptitle(title + (f"  ({'; '.join(notes)})" if notes else ""))
    fig.tight_layout()
    return fig


def plot_edges_per_layer(per_layer: dict[str, list[float]], title: str = "Open edges per input, by layer"):
    """Grouped bars: ``{label: [mean open edges in layer 0, 1, ...]}``, log scale."""
    lengths = [len(v) if hasattr(v, "__len__") and not isinstance(v, str) else 0 for v in per_layer.values()] \
        if isinstance(per_layer, dict) else []
    if not lengths or min(lengths) == 0 or len(set(lengths)) > 1:
        raise ValueError(f"per_layer must be a non-empty dict {{label: [mean open edges in layer 0, 1, ...]}} of lists "
                         f"all equally long, one number per layer; got {per_layer!r:.80}")
    labels = list(per_layer)
    n_layers = len(next(iter(per_layer.values())))
    width = 0.8 / len(labels)
    fig, ax = plt.subplots(figsize=(8.5, 3.5))
    for i, label in enumerate(labels):
        xs = [layer + (i - (len(labels) - 1) / 2) * width for layer in range(n_layers)]
        bars = ax.bar(xs, per_layer[label], width, label=label)
        ax.bar_label(bars, fmt="%.1f", fontsize=8)
    tallest = max(max(values) for values in per_layer.values())
    ax.set(xticks=range(n_layers), xticklabels=[f"layer {l}" for l in range(n_layers)], yscale="symlog",
           ylim=(0, 4 * max(tallest, 1.0)), ylabel="mean open edges per input", title=title)  # room for the labels
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    return fig


def plot_edge_count_distribution(edges_per_input, title: str = "Open edges per input over all problems"):
    """Histogram of the number of open edges per input (one integer per problem)."""
    counts = torch.as_tensor(edges_per_input)
    if counts.ndim != 1 or len(counts) == 0 or not counts.is_floating_point() and counts.dtype not in (torch.long, torch.int):
        raise ValueError(f"edges_per_input must be a non-empty 1-d list or tensor of counts (one per problem), got "
                         f"{edges_per_input!r:.80}")
    counts = counts.round().long()
    values, frequency = counts.unique(return_counts=True)
    fig, ax = plt.subplots(figsize=(7, 3.2))
    ax.bar(values.tolist(), frequency.tolist(), width=0.8, color="tab:blue")
    ax.set(xlabel="open edges (all layers and heads)", ylabel="problems", title=title)
    ax.xaxis.get_major_locator().set_params(integer=True)
    fig.tight_layout()
    return fig


def plot_size_curves(curves: dict[str, dict], level: float = 0.9, colours: dict[str, str] | None = None):
    """Explained effect against heads kept (left) and edges kept (right, log scale), one line per
    model, with the count each needs to reach ``level`` marked. ``curves``: ``{model name:
    Patcher.curves(...)}``. Returns the figure."""
    if not isinstance(curves, dict) or not curves:
        raise ValueError(f"curves must be a non-empty dict {{model name: Patcher.curves(...)}}, got {curves!r:.80}")
    colours = colours or {}
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    for ax, kind in zip(axes, ("heads", "edges")):
        for name, by_kind in curves.items():
            ks, explained = by_kind[kind]
            needed = needed_for(ks, explained, level)
            xs = ks if kind == "heads" else [max(k, 0.8) for k in ks]  # k = 0 drawn at 0.8 on the log axis
            line, = ax.plot(xs, explained.tolist(), "o-" if kind == "heads" else "-", ms=3, color=colours.get(name),
                            label=f"{name}: {needed} {kind} for {level:.0%}")
            if needed is not None:
                ax.axvline(needed, color=line.get_color(), ls=":", lw=1)
        ax.axhline(level, color="k", lw=0.8, ls="--")
        ax.set(xlabel=f"{kind} kept (ranked by effect)", ylabel="explained effect",
               title=f"explained effect against {kind} kept", ylim=(-0.05, 1.05))
        if kind == "edges":
            ax.set_xscale("log")
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def plot_recipe_ablation(rows: list[dict], max_edges: float = 10.0, min_exact_match: float = 0.999):
    """Edges per input and wrong answers per variant of the sparse recipe, one dot per seed, the
    median as a bar and the range as a line; the bars every run must meet dashed. ``rows``: dicts
    with ``variant``, ``seed``, ``edges_mean`` and ``exact_match`` (on all problems), ``n`` problems;
    variants are drawn top to bottom in their first-seen order."""
    variants = list(dict.fromkeys(row["variant"] for row in rows))
    n = rows[0]["n"]
    fig, (ax_edges, ax_wrong) = plt.subplots(1, 2, figsize=(10, 0.45 * len(variants) + 1.6), sharey=True)
    for y, variant in enumerate(variants):
        mine = [row for row in rows if row["variant"] == variant]
        for ax, values in ((ax_edges, [row["edges_mean"] for row in mine]),
                           (ax_wrong, [round((1 - row["exact_match"]) * n) for row in mine])):
            ordered = sorted(values)
            ax.plot([ordered[0], ordered[-1]], [y, y], color="tab:gray", lw=1, zorder=1)
            ax.scatter(values, [y] * len(values), s=18, color="tab:blue", alpha=0.7, zorder=2)
            ax.scatter([ordered[len(ordered) // 2]], [y], marker="|", s=300, color="black", zorder=3)
    ax_edges.axvline(max_edges, color="tab:red", ls="--", lw=1)
    ax_edges.set(xscale="log", xlabel="open edges per input (all problems)", yticks=range(len(variants)),
                 yticklabels=variants, title=f"circuit size (dashed: the bar, {max_edges:g})")
    low, high = min(row["edges_mean"] for row in rows), max(row["edges_mean"] for row in rows)
    ax_edges.set_xticks([t for t in (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000) if low / 2 <= t <= high * 2])
    ax_edges.xaxis.set_major_formatter(ScalarFormatter())
    ax_edges.xaxis.set_minor_formatter(NullFormatter())
    ax_wrong.axvline((1 - min_exact_match) * n, color="tab:red", ls="--", lw=1)
    ax_wrong.set(xscale="symlog", xlabel=f"problems answered wrong (of {n:,})",
                 title=f"accuracy (dashed: the bar, {min_exact_match:.1%} right)")
    ax_wrong.set_xlim(left=0)
    ax_edges.invert_yaxis()  # shared: the first variant on top in both panels
    for ax in (ax_edges, ax_wrong):
        ax.grid(alpha=0.3, axis="x")
    fig.suptitle("Each part of the recipe switched off in turn (dots: seeds; black tick: median; line: range)")
    fig.tight_layout()
    return fig


def plot_discovery_curves(results: list, level: float = 0.9):
    """Faithfulness against circuit size, one line per method, one panel per model and unit
    (dense and sparse side by side, attention edges above residual edges when there are any).
    ``results``: :class:`~sparsecirc.discovery.MethodResult` s, as ``discover`` returns them.
    A method with one circuit (the read-off) is a star; ACDC's thresholds are dots. Returns the figure."""
    if not isinstance(results, list) or not results or not all(hasattr(r, "faithfulness") for r in results):
        raise ValueError("results must be a non-empty list of MethodResult (sparsecirc.discovery.discover)")
    units = list(dict.fromkeys(r.unit for r in results))
    models = list(dict.fromkeys(r.model for r in results))
    fig, axes = plt.subplots(len(units), len(models), figsize=(6 * len(models), 3.8 * len(units)), squeeze=False)
    for row, unit in enumerate(units):
        for column, model in enumerate(models):
            ax = axes[row, column]
            for r in (r for r in results if r.unit == unit and r.model == model):
                sizes = [max(size, 0.8) for size in r.sizes]  # size 0 drawn at 0.8 on the log axis
                style = "*" if len(sizes) == 1 else "o--" if r.method == "ACDC" else "-"
                label = f"{r.method}: {r.needed.get(level)} for {level:.0%}"
                ax.plot(sizes, r.faithfulness, style, ms=12 if style == "*" else 4, label=label)
            ax.axhline(level, color="k", lw=0.8, ls="--")
            ax.set(xscale="log", ylim=(-0.1, 1.1), xlabel=f"{unit}s in the circuit", ylabel="faithfulness",
                   title=f"{model} model, {unit}s")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    return fig
