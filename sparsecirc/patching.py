"""Activation patching of heads, MLPs and single attention edges, batched.

A *pair* is a clean problem and a corrupted one that differs in one operand digit. We run the
clean problem and replace chosen activations with their values from the corrupted run:

- a head: its output ``z`` (``hook_z``, before ``W_O``) at every position;
- an MLP: its output (``hook_mlp_out``) at every position;
- an edge (layer, head, query i, key j): the term ``A_ij v_j`` that key j adds to query i's
  ``z``, replaced by the corrupted run's ``A'_ij v'_j``.

Patching every edge of a head is patching the head, so heads and edges share one mechanism: a
*keep mask* ``[variant, layer, head, query, key]`` with 1 where the current run's term stays and
0 where the corrupted term goes in. Many masks run in one forward pass (the batch is masks x
pairs). On a sparse model the gates stay in force: ``A`` is the gated pattern of each run.

Metric (per pair, on the answer slots whose digit differs between clean and corrupted): the
logit of the clean digit minus the logit of the corrupted digit, averaged over those slots and
then over pairs. It is large and positive on the clean run, negative on the corrupted one.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from .data import AdditionTask
from .evaluation import check_tokens
from .sparse_attention import analysis_run


@dataclass(frozen=True)
class PatchingPairs:
    """Clean and corrupted problems, pair by pair; ``flips_carry[n]``: does the corruption change
    any carry of the sum?"""

    task: AdditionTask
    clean: tuple[tuple[int, int], ...]
    corrupted: tuple[tuple[int, int], ...]
    flips_carry: tuple[bool, ...]

    def __post_init__(self):
        if not isinstance(self.task, AdditionTask):
            raise ValueError(f"task must be an AdditionTask, got {type(self.task).__name__}")
        for name in ("clean", "corrupted", "flips_carry"):
            if not isinstance(getattr(self, name), (tuple, list)):
                raise ValueError(f"{name} must be a tuple or list with one entry per pair, got "
                                 f"{type(getattr(self, name)).__name__}")
        lengths = {"clean": len(self.clean), "corrupted": len(self.corrupted), "flips_carry": len(self.flips_carry)}
        if len(set(lengths.values())) != 1 or lengths["clean"] == 0:
            raise ValueError(f"clean, corrupted and flips_carry must be equally long and not empty (one entry per "
                             f"pair), got lengths {lengths}")
        clean = self.task.check_pairs(list(self.clean))
        corrupted = self.task.check_pairs(list(self.corrupted))
        for n, ((a, b), (a2, b2)) in enumerate(zip(clean, corrupted)):
            if a + b == a2 + b2:
                raise ValueError(f"pair {n}: {a}+{b} and {a2}+{b2} have the same sum, so no answer digit differs "
                                 f"and the metric is undefined; a corruption must change the sum")
        if any(type(flip) is not bool for flip in self.flips_carry):
            raise ValueError("flips_carry must hold True or False for each pair")
        object.__setattr__(self, "clean", tuple(map(tuple, clean)))
        object.__setattr__(self, "corrupted", tuple(map(tuple, corrupted)))
        object.__setattr__(self, "flips_carry", tuple(self.flips_carry))

    def __len__(self) -> int:
        return len(self.clean)

    def tokens(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``clean_tokens, corrupted_tokens [pair, seq_len]`` and ``clean_targets,
        corrupted_targets [pair, answer_digits]``."""
        clean_tokens, clean_targets = self.task.batch(list(self.clean))
        corrupted_tokens, corrupted_targets = self.task.batch(list(self.corrupted))
        return clean_tokens, corrupted_tokens, clean_targets, corrupted_targets


def corrupt_one_digit(task: AdditionTask, a: int, b: int, rng: random.Random) -> tuple[int, int]:
    """``(a, b)`` with one random digit of one random operand replaced by another digit."""
    operands = [a, b]
    which, place = rng.randrange(2), rng.randrange(task.operand_digits)
    digit = operands[which] // 10 ** place % 10
    new_digit = rng.choice([d for d in range(10) if d != digit])
    operands[which] += (new_digit - digit) * 10 ** place
    return operands[0], operands[1]


MAX_PAIRS = 100_000


def make_pairs(task: AdditionTask, n: int, seed: int = 0) -> PatchingPairs:
    """``n`` pairs, half whose corruption flips a carry and half whose does not (seeded)."""
    if not isinstance(task, AdditionTask):
        raise ValueError(f"task must be an AdditionTask, got {type(task).__name__}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 2 or n % 2:
        raise ValueError(f"n must be an even int >= 2 (half carry-flipping, half not), got {n!r} ({type(n).__name__})")
    if n > MAX_PAIRS:
        raise ValueError(f"n must be at most {MAX_PAIRS:,} pairs (every patched variant runs all of them), got {n:,}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an int (the same seed gives the same pairs), got {seed!r:.40} "
                         f"({type(seed).__name__})")
    rng = random.Random(seed)
    wanted = {True: n // 2, False: n // 2}
    rows = []
    while wanted[True] or wanted[False]:
        a, b = rng.randrange(task.max_operand + 1), rng.randrange(task.max_operand + 1)
        a2, b2 = corrupt_one_digit(task, a, b, rng)
        flips = task.carries(a, b) != task.carries(a2, b2)
        if wanted[flips]:
            wanted[flips] -= 1
            rows.append(((a, b), (a2, b2), flips))
    clean, corrupted, flips = zip(*rows)
    return PatchingPairs(task, clean, corrupted, flips)


def logit_difference(answer_logits: torch.Tensor, clean_targets: torch.Tensor,
                     corrupted_targets: torch.Tensor) -> torch.Tensor:
    """Per pair: mean over differing answer slots of logit(clean digit) - logit(corrupted digit).

    ``answer_logits [batch, answer_digits, vocab]``, targets ``[batch, answer_digits]``; the
    batch may be a whole number of copies of the pairs (variants x pairs). Returns ``[batch]``.
    """
    if clean_targets.ndim != 2 or clean_targets.shape != corrupted_targets.shape or len(clean_targets) == 0:
        raise ValueError(f"clean and corrupted targets must both be [pairs, answer_digits] with at least one pair, got "
                         f"shapes {list(clean_targets.shape)} and {list(corrupted_targets.shape)}")
    if answer_logits.ndim != 3 or len(answer_logits) == 0 or len(answer_logits) % len(clean_targets) \
            or answer_logits.shape[1] != clean_targets.shape[1]:
        raise ValueError(f"answer_logits must be [batch, answer_digits, vocab] with the batch a whole number of copies "
                         f"of the {len(clean_targets)} pairs, got shape {list(answer_logits.shape)}")
    copies = answer_logits.shape[0] // clean_targets.shape[0]
    clean_targets, corrupted_targets = clean_targets.repeat(copies, 1), corrupted_targets.repeat(copies, 1)
    differs = (clean_targets != corrupted_targets).float()
    if (differs.sum(-1) == 0).any():
        raise ValueError("every pair must change at least one answer digit")
    gap = (answer_logits.gather(-1, clean_targets[..., None]) - answer_logits.gather(-1, corrupted_targets[..., None]))[..., 0]
    return (gap * differs).sum(-1) / differs.sum(-1)


def record_attention(model, tokens: torch.Tensor, *, gate_bias: float | None = None, dense: bool = False) -> dict:
    """Gated attention pattern ``A [batch, layer, head, q, k]``, values ``v [batch, layer, pos, head,
    d_head]`` and MLP outputs ``mlp [batch, layer, pos, d_model]`` of a run, and its ``logits``.
    The model runs with its own gating unless asked otherwise (``gate_bias=``, ``dense=True``)."""
    check_tokens(model, tokens)
    n_layers = model.cfg.n_layers
    record = {"A": [None] * n_layers, "v": [None] * n_layers, "mlp": [None] * n_layers}

    def keep(kind, layer):
        def hook(tensor, hook):
            record[kind][layer] = tensor.detach()
        return hook

    hooks = []
    for layer in range(n_layers):
        hooks += [(f"blocks.{layer}.attn.hook_pattern", keep("A", layer)), (f"blocks.{layer}.attn.hook_v", keep("v", layer)),
                  (f"blocks.{layer}.hook_mlp_out", keep("mlp", layer))]
    with analysis_run(model, gate_bias=gate_bias, dense=dense):
        with model.hooks(fwd_hooks=hooks):  # the gates fire first: these hooks see the gated pattern
            logits = model(tokens)
    return {kind: torch.stack(values, dim=1) for kind, values in record.items()} | {"logits": logits}


def mean_record(model, tokens: torch.Tensor, *, gate_bias: float | None = None, dense: bool = False) -> dict:
    """For mean ablation: the mean over ``tokens [batch, pos]`` of every edge's term ``A_ij v_j``,
    ``messages [layer, head, query, key, d_head]``, and of every MLP's output ``mlp [1, layer, pos,
    d_model]``, as :func:`patched_logits` takes them in place of a corrupted run."""
    run = record_attention(model, tokens, gate_bias=gate_bias, dense=dense)
    messages = torch.einsum("blhqk,blkhd->lhqkd", run["A"], run["v"]) / len(tokens)
    return {"messages": messages, "mlp": run["mlp"].mean(0, keepdim=True)}


def patched_logits(model, tokens: torch.Tensor, corrupted: dict, keep: torch.Tensor,
                   keep_mlp: torch.Tensor | None = None, *, gate_bias: float | None = None,
                   dense: bool = False) -> torch.Tensor:
    """Logits of the clean ``tokens [pair, pos]`` with patches, for several variants at once.

    ``corrupted``: :func:`record_attention` of the corrupted tokens, or :func:`mean_record` of
    some reference tokens (mean ablation: every patched term gets its mean). ``keep [variant, layer, head,
    query, key]``: 1 keeps the run's own edge term, 0 puts in the corrupted one. ``keep_mlp
    [variant, layer]``: 0 replaces that MLP's output with the corrupted one (default: keep all).
    Returns ``[variant * pair, pos, vocab]`` (variant-major).
    """
    check_tokens(model, tokens)
    n_variants, n_pairs = keep.shape[0], tokens.shape[0]
    n_layers = model.cfg.n_layers
    if keep.ndim != 5 or keep.shape[1:] != (n_layers, model.cfg.n_heads, tokens.shape[1], tokens.shape[1]):
        raise ValueError(f"keep must be [variant, layer, head, query, key] for this model, got {list(keep.shape)}")
    if keep_mlp is not None and tuple(keep_mlp.shape) != (n_variants, n_layers):
        raise ValueError(f"keep_mlp must be [variant, layer] = {[n_variants, n_layers]}, got {list(keep_mlp.shape)}")
    for name, mask in (("keep", keep), ("keep_mlp", keep_mlp)):
        if mask is not None and not ((mask == 0) | (mask == 1)).all():
            raise ValueError(f"{name} must hold only 0 (patch in the corrupted value) and 1 (keep the run's own)")
    keep = keep.float().repeat_interleave(n_pairs, dim=0)  # [variant * pair, layer, head, q, k]
    keep_mlp = None if keep_mlp is None else keep_mlp.float().repeat_interleave(n_pairs, dim=0)
    tile = lambda t: t.repeat(n_variants, *[1] * (t.ndim - 1))  # noqa: E731  (pairs -> variants x pairs)
    means = "messages" in corrupted  # mean ablation: one value per edge and MLP, the same for every run
    if means:
        mlp_corrupted = corrupted["mlp"]  # [1, layer, pos, d_model]: broadcasts over the batch
    else:
        A_corrupted, v_corrupted, mlp_corrupted = tile(corrupted["A"]), tile(corrupted["v"]), tile(corrupted["mlp"])
    current = {}

    def store(kind, layer):
        def hook(tensor, hook):
            current[kind, layer] = tensor
        return hook

    def mix_z(layer):
        def hook(z, hook):  # z: [batch, pos, head, d_head] = sum_k A[h, q, k] v[k, h]
            mask = keep[:, layer]
            own = torch.einsum("bhqk,bkhd->bqhd", mask * current["A", layer], current["v", layer])
            if means:
                return own + torch.einsum("bhqk,hqkd->bqhd", 1 - mask, corrupted["messages"][layer])
            return own + torch.einsum("bhqk,bkhd->bqhd", (1 - mask) * A_corrupted[:, layer], v_corrupted[:, layer])
        return hook

    def mix_mlp(layer):
        def hook(out, hook):  # [batch, pos, d_model]
            kept = keep_mlp[:, layer, None, None]
            return kept * out + (1 - kept) * mlp_corrupted[:, layer]
        return hook

    hooks = []
    for layer in range(n_layers):
        hooks += [(f"blocks.{layer}.attn.hook_pattern", store("A", layer)), (f"blocks.{layer}.attn.hook_v", store("v", layer)),
                  (f"blocks.{layer}.attn.hook_z", mix_z(layer))]
        if keep_mlp is not None:
            hooks.append((f"blocks.{layer}.hook_mlp_out", mix_mlp(layer)))
    with analysis_run(model, gate_bias=gate_bias, dense=dense):
        with model.hooks(fwd_hooks=hooks):
            return model(tokens.repeat(n_variants, 1))
