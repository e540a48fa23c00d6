"""The gate of one attention edge: its logit, a hard sample with a straight-through gradient,
its expected value, and its deterministic value. (method.md section 3; Draye et al. 2025.)

Every edge (query i, key j <= i) in every head gets a binary gate read off the same score the
softmax uses::

    g_ij = q_i . k_j / sqrt(d_head) + bias

- sample:        m_ij = 1[g_ij + logistic noise > 0]  ~ Bernoulli(sigmoid(g_ij)); the backward
                 pass uses the gradient of sigmoid(g_ij + noise) (straight-through)
- expected:      E[m_ij] = sigmoid(g_ij), summed over causal pairs = expected open edges
- deterministic: m_ij = 1[g_ij > 0]
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


def gate_logits(q: torch.Tensor, k: torch.Tensor, bias: float) -> torch.Tensor:
    """Gate logits ``[batch, head, query, key]`` from ``q``, ``k`` ``[batch, pos, head, d_head]``.

    Entries off the causal triangle (key > query) are computed but meaningless: the softmax
    pattern is exactly 0 there, so a gate cannot change anything, and :func:`expected_edges`
    and the recorded masks leave them out. Skipping a mask here keeps training fast.
    """
    d_head = q.shape[-1]
    scores = torch.matmul(q.transpose(1, 2), k.permute(0, 2, 3, 1))
    return scores.mul_(1.0 / math.sqrt(d_head)).add_(bias)


def logistic_noise(shape, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    """Standard logistic samples, ``logit(u)`` for ``u ~ Uniform(0, 1)``."""
    return torch.logit(torch.rand(shape, generator=generator, device=device), eps=_EPS)


def sample_gates(logits: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Hard 0/1 gates, Bernoulli(sigmoid(logits)), with a straight-through gradient: the forward
    value is the hard sample, the gradient is that of ``sigmoid(logits + noise)``."""
    noisy = logits + logistic_noise(logits.shape, generator, logits.device)
    soft = torch.sigmoid(noisy)
    return (noisy > 0).to(logits.dtype) + (soft - soft.detach())


def deterministic_gates(logits: torch.Tensor) -> torch.Tensor:
    """1 where the logit is positive, else 0 (no gradient)."""
    return (logits > 0).to(logits.dtype)


def expected_gates(logits: torch.Tensor) -> torch.Tensor:
    """``sigmoid(logits)`` on causal pairs, 0 elsewhere: the probability that each gate is open.
    ``logits``: ``[..., query, key]``."""
    return torch.sigmoid(logits) * causal_mask(logits.shape[-1], logits.device)


def expected_edges(logits: torch.Tensor) -> torch.Tensor:
    """Expected number of open edges, summed over the causal pairs: ``[..., query, key]`` -> ``[...]``."""
    return expected_gates(logits).sum(dim=(-2, -1))
