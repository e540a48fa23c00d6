"""The gate of one attention edge: its logit, a hard sample with a straight-through gradient,
its expected value, and its deterministic value. (method.md section 3; Draye et al. 2025.)

Every edge (query i, key j <= i) in every head gets a binary gate read off the same score the
softmax uses::

    g_ij = q_i . k_j / sqrt(d_head) + bias

- sample:        m_ij = 1[g_ij + logistic noise > 0]  ~ Bernoulli(sigmoid(g_ij)); the backward
                 pass uses the gradient of sigmoid(g_ij + noise) (straight-through)
- expected:      E[m_ij] = sigmoid(g_ij), summed over causal pairs = expected open edges
- deterministic: m_ij = 1[g_ij > 0]

and is used as ``pattern_ij * m_ij`` with no renormalisation; the open edges of an input are the
gates summed over its causal pairs. Every path computes these here, through
:meth:`sparsecirc.sparse_attention.EdgeGates.gate`: the forward pass of
:class:`~sparsecirc.transformer.GatedTransformer` (training, evaluation, analysis, the prefix-sharing
run of whole enumerations) and the gating hooks of a TransformerLens bridge.
"""

from __future__ import annotations

import math

import torch

_EPS = 1e-6  # keeps the logistic noise finite


def causal_mask(n_pos: int, device=None) -> torch.Tensor:
    """``[query, key]`` booleans, True where key <= query."""
    return torch.ones(n_pos, n_pos, dtype=torch.bool, device=device).tril()


def n_causal_pairs(n_pos: int) -> int:
    return n_pos * (n_pos + 1) // 2


def scaled_scores(q: torch.Tensor, k_t: torch.Tensor) -> torch.Tensor:
    """``q.k / sqrt(d_head)`` ``[batch, head, query, key]`` from ``q`` ``[batch, head, query,
    d_head]`` and the keys transposed, ``k_t`` ``[batch, head, d_head, key]``: the score the
    softmax and the gate share."""
    return torch.matmul(q, k_t).mul_(1.0 / math.sqrt(q.shape[-1]))


def gate_logits_from_scores(scores: torch.Tensor, bias: float, in_place: bool = False) -> torch.Tensor:
    """``scores + bias``: the gate logits of :func:`scaled_scores` (``in_place`` reuses them)."""
    return scores.add_(bias) if in_place else scores + bias


def gate_logits(q: torch.Tensor, k: torch.Tensor, bias: float) -> torch.Tensor:
    """Gate logits ``[batch, head, query, key]`` from ``q``, ``k`` ``[batch, pos, head, d_head]``
    as the bridge's hooks give them.

    Entries off the causal triangle (key > query) are computed but meaningless: the softmax
    pattern is exactly 0 there, so a gate cannot change anything, and :func:`expected_edges`
    and the recorded masks leave them out. Skipping a mask here keeps training fast.
    """
    return gate_logits_from_scores(scaled_scores(q.transpose(1, 2), k.permute(0, 2, 3, 1)), bias, in_place=True)


def logistic_noise(shape, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    """Standard logistic samples, ``logit(u)`` for ``u ~ Uniform(0, 1)``."""
    return torch.logit(torch.rand(shape, generator=generator, device=device), eps=_EPS)


def sample_gates(logits: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Hard 0/1 gates, Bernoulli(sigmoid(logits)), with a straight-through gradient: the forward
    value is the hard sample, the gradient is that of ``sigmoid(logits + noise)``."""
    noisy = logits + logistic_noise(logits.shape, generator, logits.device)
    soft = torch.sigmoid(noisy)
    return (noisy > 0).to(logits.dtype) + (soft - soft.detach())


def open_gates(logits: torch.Tensor, allowed: torch.Tensor | None = None) -> torch.Tensor:
    """The deterministic threshold as booleans: True where the logit is positive (and
    ``allowed``, a boolean mask broadcast against ``logits``, e.g. causal and open in an edge mask)."""
    gates = logits > 0
    return gates if allowed is None else gates.logical_and_(allowed)


def deterministic_gates(logits: torch.Tensor) -> torch.Tensor:
    """1 where the logit is positive, else 0 (no gradient)."""
    return open_gates(logits).to(logits.dtype)


def restrict(gates: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``gates`` times a fixed 0/1 ``mask`` broadcast against them (an edge mask, the causal
    triangle), in the gates' dtype."""
    return gates * mask.to(gates.dtype)


def gated_pattern(pattern: torch.Tensor, gates: torch.Tensor, in_place: bool = False) -> torch.Tensor:
    """The attention the values see: ``pattern * gates``, with no renormalisation, so a closed
    edge's share of the softmax is dropped, not handed to the open ones. ``pattern`` ``[batch,
    head, query, key]``; ``gates`` 0/1 (or booleans) broadcast against it."""
    return pattern.mul_(gates) if in_place else pattern * gates


def count_open_edges(gates: torch.Tensor) -> torch.Tensor:
    """Open edges ``[..., query, key]`` -> ``[...]``: the gates summed over query and key. The
    gates must already be 0 off the causal triangle (:func:`restrict` them, or pass ``allowed``
    to :func:`open_gates`)."""
    return gates.sum(dim=(-2, -1))


def expected_gates(logits: torch.Tensor) -> torch.Tensor:
    """``sigmoid(logits)`` on causal pairs, 0 elsewhere: the probability that each gate is open.
    ``logits``: ``[..., query, key]``."""
    return torch.sigmoid(logits) * causal_mask(logits.shape[-1], logits.device)


def expected_edges(logits: torch.Tensor) -> torch.Tensor:
    """Expected number of open edges, summed over the causal pairs: ``[..., query, key]`` -> ``[...]``."""
    return expected_gates(logits).sum(dim=(-2, -1))
