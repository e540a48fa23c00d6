"""Circuit size by activation patching: how many heads and edges explain the behaviour.

1. Effects: patch one component (head, MLP) or one edge at a time with its corrupted value in
   the clean run; its effect is the drop of the mean logit difference (see :mod:`.patching`).
2. Curves: rank by |effect|, keep the top k clean and patch all the rest; the *explained effect*
   is ``(M_k - M_corrupted) / (M_clean - M_corrupted)``: 1 with everything kept, 0 with nothing.
3. Circuit size: the smallest k whose explained effect reaches a level such as 0.9.

Heads and edges are ranked with the MLPs left unpatched (they recompute from what reaches them).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from .checks import as_int
from .evaluation import check_task
from .gates import causal_mask, n_causal_pairs
from .patching import PatchingPairs, logit_difference, mean_record, patched_logits, record_attention

ABLATIONS = ("corrupt", "mean")


@dataclass
class PatchingEffects:
    """Mean logit difference of the clean and corrupted runs, and the effect of patching each
    head ``[layer, head]``, MLP ``[layer]`` and edge ``[layer, head, query, key]`` alone.
    ``edge_candidates``: edges open in some run (all causal edges for a dense model); any other
    edge carries nothing in either run, so its effect is exactly 0 and is not computed."""

    clean: float
    corrupted: float
    head_effects: torch.Tensor
    mlp_effects: torch.Tensor
    edge_effects: torch.Tensor
    edge_candidates: torch.Tensor

    @property
    def full_effect(self) -> float:
        return self.clean - self.corrupted


class Patcher:
    """Runs batches of patched variants of one set of pairs on one model."""

    def __init__(self, model, pairs: PatchingPairs, *, gate_bias: float | None = None, dense: bool = False,
                 batch_limit: int = 4096, progress: bool = True, ablation: str = "corrupt"):
        """The model runs with its own gating (a sparse model: deterministic gates at its bias)
        unless asked otherwise (``gate_bias=``, ``dense=True``). ``ablation``: what a patched
        term becomes, ``"corrupt"`` (its value in the pair's corrupted run) or ``"mean"`` (its
        mean over the clean and corrupted problems of all pairs)."""
        if not isinstance(pairs, PatchingPairs):
            raise ValueError(f"pairs must be PatchingPairs (see make_pairs), got {type(pairs).__name__}")
        if ablation not in ABLATIONS:
            raise ValueError(f"ablation must be one of {ABLATIONS}, got {ablation!r:.40}")
        check_task(model, pairs.task)
        if isinstance(batch_limit, bool) or not isinstance(batch_limit, int) or batch_limit < 1:
            raise ValueError(f"batch_limit must be a positive int, got {batch_limit!r}")
        self.model, self.pairs, self.progress = model, pairs, progress
        self.gating = {"gate_bias": gate_bias, "dense": dense}
        self.clean_tokens, corrupted_tokens, self.clean_targets, self.corrupted_targets = pairs.tokens()
        self.clean_run = record_attention(model, self.clean_tokens, **self.gating)
        self.corrupted_run = record_attention(model, corrupted_tokens, **self.gating)
        self.ablation, self.corrupted_attention = ablation, self.corrupted_run["A"]
        if ablation == "mean":
            self.corrupted_run = mean_record(model, torch.cat([self.clean_tokens, corrupted_tokens]), **self.gating)
        self.variants_per_pass = max(1, batch_limit // len(pairs))
        self.shape = (model.cfg.n_layers, model.cfg.n_heads, self.clean_tokens.shape[1], self.clean_tokens.shape[1])
        self._endpoints = None

    def endpoints(self) -> tuple[float, float]:
        """Mean metric with every edge kept (the clean run) and with every edge patched."""
        if self._endpoints is None:
            self._endpoints = (float(self.run(torch.ones(1, *self.shape))[0]), float(self.run(torch.zeros(1, *self.shape))[0]))
        return self._endpoints

    def metric(self, logits: torch.Tensor) -> torch.Tensor:
        """Mean logit difference per variant: ``[variant * pair, pos, vocab] -> [variant]``."""
        answers = logits[:, self.pairs.task.prompt_len:]
        return logit_difference(answers, self.clean_targets, self.corrupted_targets).view(-1, len(self.pairs)).mean(-1)

    def run(self, keep: torch.Tensor, keep_mlp: torch.Tensor | None = None, desc: str = "patching") -> torch.Tensor:
        """Mean metric for each variant: ``keep [variant, layer, head, q, k]``, ``keep_mlp
        [variant, layer]`` (see :func:`.patching.patched_logits`). Returns ``[variant]``."""
        for name, mask in (("keep", keep), ("keep_mlp", keep_mlp)):
            if mask is not None and not isinstance(mask, torch.Tensor):
                raise ValueError(f"{name} must be a tensor of 0s and 1s, got {type(mask).__name__}")
        if keep.ndim != 5 or keep.shape[0] == 0:
            raise ValueError(f"keep must be [variant, layer, head, query, key] = [n, {', '.join(map(str, self.shape))}] "
                             f"with at least one variant, got {list(keep.shape)}")
        results = []
        starts = range(0, keep.shape[0], self.variants_per_pass)
        for start in tqdm(starts, desc=desc, disable=not self.progress or len(starts) < 4, leave=False):
            end = start + self.variants_per_pass
            logits = patched_logits(self.model, self.clean_tokens, self.corrupted_run, keep[start:end],
                                    None if keep_mlp is None else keep_mlp[start:end], **self.gating)
            results.append(self.metric(logits))
        return torch.cat(results)

    def edge_candidates(self) -> torch.Tensor:
        """``[layer, head, q, k]``: causal edges with attention in the clean or corrupted run of some pair."""
        used = (self.clean_run["A"] > 0).any(0) | (self.corrupted_attention > 0).any(0)
        return used & causal_mask(self.shape[-1])

    def effects(self) -> PatchingEffects:
        n_layers, n_heads = self.shape[:2]
        everything = torch.ones(1, *self.shape)
        clean, corrupted = self.endpoints()
        heads = torch.ones(n_layers * n_heads, *self.shape)
        for index in range(n_layers * n_heads):
            heads[index, index // n_heads, index % n_heads] = 0
        head_effects = clean - self.run(heads, desc="heads").view(n_layers, n_heads)
        mlp_keep = 1 - torch.eye(n_layers)
        mlp_effects = clean - self.run(everything.expand(n_layers, *self.shape), mlp_keep, desc="MLPs")
        candidates = self.edge_candidates()
        where = candidates.nonzero()
        edges = torch.ones(len(where), *self.shape)
        edges[torch.arange(len(where)), where[:, 0], where[:, 1], where[:, 2], where[:, 3]] = 0
        edge_effects = torch.zeros(self.shape)
        if len(where):
            edge_effects[candidates] = clean - self.run(edges, desc="edges")
        return PatchingEffects(clean, corrupted, head_effects, mlp_effects, edge_effects, candidates)

    def _check_curve(self, effects, ks, n: int, what: str) -> list[int]:
        if not isinstance(effects, PatchingEffects):
            raise ValueError(f"effects must be the PatchingEffects of Patcher.effects(), got {type(effects).__name__}")
        return _check_ks(ks, f"ks must be a non-empty list of int counts of {what} in 0..{n}", n)

    def edge_curve(self, effects: PatchingEffects, ks: list[int]) -> torch.Tensor:
        """Explained effect keeping the top-``k`` edges by |effect|, for each ``k`` in ``ks``."""
        ks = self._check_curve(effects, ks, effects.edge_effects.numel() if isinstance(effects, PatchingEffects) else 0,
                               "edges")
        return self._explained(self.run(top_edges(effects.edge_effects, ks), desc="edge curve"), effects)

    def head_curve(self, effects: PatchingEffects, ks: list[int]) -> torch.Tensor:
        """Explained effect keeping the top-``k`` heads by |effect|, for each ``k`` in ``ks``."""
        n_layers, n_heads = self.shape[:2]
        ks = self._check_curve(effects, ks, n_layers * n_heads, "heads")
        order = effects.head_effects.abs().flatten().argsort(descending=True, stable=True)
        keep = torch.zeros(len(ks), n_layers * n_heads, *self.shape[2:])
        for row, k in enumerate(ks):
            keep[row, order[:k]] = 1
        return self._explained(self.run(keep.view(len(ks), *self.shape), desc="head curve"), effects)

    def curves(self, effects: PatchingEffects) -> dict[str, tuple[list[int], torch.Tensor]]:
        """Both curves at the usual points: ``{"heads": (ks, explained), "edges": (ks, explained)}``,
        every head count, and edge counts 0-64 then about 10% apart up to every causal edge."""
        if not isinstance(effects, PatchingEffects):
            raise ValueError(f"effects must be the PatchingEffects of Patcher.effects(), got {type(effects).__name__}")
        n_layers, n_heads, seq_len, _ = self.shape
        n_edges = n_layers * n_heads * n_causal_pairs(seq_len)
        head_ks = list(range(n_layers * n_heads + 1))
        edge_ks = sorted(k for k in set(range(65)) | {round(1.1 ** i) for i in range(90)} | {n_edges} if k <= n_edges)
        return {"heads": (head_ks, self.head_curve(effects, head_ks)), "edges": (edge_ks, self.edge_curve(effects, edge_ks))}

    @staticmethod
    def _explained(metric: torch.Tensor, effects: PatchingEffects) -> torch.Tensor:
        return (metric - effects.corrupted) / effects.full_effect


def top_edges(scores: torch.Tensor, ks: list[int], allowed: torch.Tensor | None = None) -> torch.Tensor:
    """Keep masks ``[len(ks), layer, head, query, key]``: row ``i`` keeps the ``ks[i]`` edges of
    largest ``|scores|`` (``[layer, head, query, key]``; ties in index order), edges outside
    ``allowed`` (booleans broadcasting to ``scores``) last."""
    rank = scores.abs() if allowed is None else scores.abs().masked_fill(~allowed, -1.0)
    order = rank.flatten().argsort(descending=True, stable=True)
    keep = torch.zeros(len(ks), order.numel())
    for row, k in enumerate(ks):
        keep[row, order[:k]] = 1
    return keep.view(len(ks), *scores.shape)


def _check_ks(ks, allowed: str, largest: int | None = None) -> list[int]:
    """``ks`` as a list of ints, or ``ValueError`` saying ``allowed``: non-empty, ints (not bools),
    non-negative and at most ``largest``."""
    if isinstance(ks, (str, bytes)) or not hasattr(ks, "__iter__"):
        raise ValueError(f"{allowed}, got {type(ks).__name__} {ks!r:.40}")
    checked = []
    for k in ks:
        number = as_int(k)
        if number is None or number < 0 or (largest is not None and number > largest):
            raise ValueError(f"{allowed}; it holds {k!r:.40} ({type(k).__name__})")
        checked.append(number)
    if not checked:
        raise ValueError(f"{allowed}, got an empty list")
    return checked


def needed_for(ks: list[int], explained: torch.Tensor, level: float = 0.9) -> int | None:
    """The smallest ``k`` in ``ks`` (ascending) whose explained effect reaches ``level``."""
    ks = _check_ks(ks, "ks must be a non-empty ascending list of non-negative int counts")
    if any(a >= b for a, b in zip(ks, ks[1:])):
        raise ValueError(f"ks must be strictly ascending (the smallest count that reaches the level is wanted), got "
                         f"{ks[:10]}")
    if not isinstance(explained, torch.Tensor) or explained.ndim != 1 or len(explained) != len(ks):
        got = f"shape {list(explained.shape)}" if isinstance(explained, torch.Tensor) else type(explained).__name__
        raise ValueError(f"explained must be a 1-D tensor with one value per k ({len(ks)}), as edge_curve and "
                         f"head_curve return, got {got}")
    if isinstance(level, bool) or not isinstance(level, (int, float)) or not math.isfinite(level):
        raise ValueError(f"level must be a finite number (a fraction of the effect, e.g. 0.9), got {level!r}")
    for k, value in zip(ks, explained.tolist()):
        if value >= level:
            return k
    return None
