"""Edge-level gating of attention through TransformerLens hooks.

``with sparse_attention(model, mode="sample", bias=4.0) as gates:`` hooks every attention layer
of a ``TransformerBridge``; inside, each forward pass multiplies every head's attention pattern
by one gate per (query, key) edge, with no renormalisation::

    out_i = sum_j softmax(scores)_ij * m_ij * v_j

The gate logits are computed from ``hook_q`` and ``hook_k`` (``q.k / sqrt(d_head) + bias``),
and the gated pattern is returned from ``hook_pattern``. (``hook_attn_scores`` cannot be used:
on a ``boot_native`` bridge it fires after the softmax and edits returned there are dropped.)
All hooks are removed when the block exits, also when an exception is raised inside it.

Modes: ``"sample"`` (hard Bernoulli gates, straight-through gradient: training),
``"deterministic"`` (open iff logit > 0: evaluation), ``"dense"`` (no gates). Any mode takes a
fixed ``edge_mask`` on top, built with :func:`mask_closing` or :func:`mask_keeping`.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch

from .gates import DEFAULT_BIAS, causal_mask, deterministic_gates, expected_edges, gate_logits, sample_gates

MODES = ("sample", "deterministic", "dense")


@dataclass(frozen=True, order=True)
class Edge:
    """One attention edge: in ``layer``, ``head``, position ``query`` reads position ``key``."""

    layer: int
    head: int
    query: int
    key: int


def attention_shape(model) -> tuple[int, int, int]:
    """``(n_layers, n_heads, n_ctx)`` of a bridge."""
    return model.cfg.n_layers, model.cfg.n_heads, model.cfg.n_ctx


def check_attention_hooks(model) -> None:
    """Raise ``ValueError`` if any layer lacks ``hook_q``, ``hook_k`` or ``hook_pattern``."""
    n_layers = model.cfg.n_layers
    needed = [f"blocks.{l}.attn.{h}" for l in range(n_layers) for h in ("hook_q", "hook_k", "hook_pattern")]
    missing = [name for name in needed if name not in model.hook_dict]
    if missing:
        raise ValueError(f"this model lacks the attention hooks edge gating needs: {missing[:6]}")


def check_edge(model, edge: Edge) -> None:
    n_layers, n_heads, n_ctx = attention_shape(model)
    if not 0 <= edge.layer < n_layers:
        raise ValueError(f"{edge}: layer must be in 0..{n_layers - 1}")
    if not 0 <= edge.head < n_heads:
        raise ValueError(f"{edge}: head must be in 0..{n_heads - 1}")
    if not 0 <= edge.query < n_ctx or not 0 <= edge.key < n_ctx:
        raise ValueError(f"{edge}: positions must be in 0..{n_ctx - 1}")
    if edge.key > edge.query:
        raise ValueError(f"{edge}: not a causal edge; a query can only read keys at or before it")


def _edge_mask(model, edges, background: float) -> torch.Tensor:
    """``[layer, head, query, key]`` filled with ``background``, ``edges`` set to the other value."""
    n_layers, n_heads, n_ctx = attention_shape(model)
    mask = torch.full((n_layers, n_heads, n_ctx, n_ctx), background)
    for edge in edges:
        check_edge(model, edge)
        mask[edge.layer, edge.head, edge.query, edge.key] = 1.0 - background
    return mask


def mask_closing(model, edges) -> torch.Tensor:
    """A ``[layer, head, query, key]`` mask of ones with ``edges`` set to 0 (closed)."""
    return _edge_mask(model, edges, background=1.0)


def mask_keeping(model, edges) -> torch.Tensor:
    """A ``[layer, head, query, key]`` mask of zeros with only ``edges`` set to 1 (open)."""
    return _edge_mask(model, edges, background=0.0)


class EdgeGates:
    """What the gates did in the latest forward pass inside a :func:`sparse_attention` block.

    Per layer, the hooks store the gate logits and the gates applied; the properties stack them.
    """

    def __init__(self, mode: str, bias: float, n_layers: int, n_heads: int):
        self.mode, self.bias, self.n_layers, self.n_heads = mode, bias, n_layers, n_heads
        self._q: list[torch.Tensor | None] = [None] * n_layers
        self._k: list[torch.Tensor | None] = [None] * n_layers
        self._logits: list[torch.Tensor | None] = [None] * n_layers
        self._masks: list[torch.Tensor | None] = [None] * n_layers
        self._patterns: list[torch.Tensor | None] = [None] * n_layers

    def _stacked(self, items, what):
        if any(item is None for item in items):
            raise RuntimeError(f"no {what} recorded yet: run a forward pass inside the sparse_attention block")
        return torch.stack(items, dim=1)

    @property
    def logits(self) -> torch.Tensor:
        """Gate logits ``[batch, layer, head, query, key]``, ``-inf`` off the causal triangle."""
        if self.mode == "dense":
            raise RuntimeError("dense mode computes no gate logits")
        logits = self._stacked(self._logits, "gate logits")
        return logits.masked_fill(~causal_mask(logits.shape[-1], logits.device), float("-inf"))

    @property
    def masks(self) -> torch.Tensor:
        """The gates applied ``[batch, layer, head, query, key]``: 0/1 values, fixed mask included."""
        return self._stacked(self._masks, "gate masks")

    @property
    def expected_edges(self) -> torch.Tensor:
        """Expected open edges ``[batch, layer, head]``: sum of sigmoid(logit) over causal pairs.
        Differentiable: this is the sparsity penalty."""
        if self.mode == "dense":
            raise RuntimeError("dense mode computes no gate logits")
        return expected_edges(self._stacked(self._logits, "gate logits"))

    @property
    def weights(self) -> torch.Tensor:
        """Attention actually used ``[batch, layer, head, query, key]``: the softmax pattern times
        the gates (no gradient). Zero on closed edges; the whole causal pattern in dense mode."""
        return self._stacked(self._patterns, "attention patterns") * self.masks.detach()

    @property
    def open_edges(self) -> torch.Tensor:
        """Edges actually open ``[batch, layer, head]`` in the latest pass (no gradient)."""
        return self.masks.detach().sum(dim=(-2, -1))

    def open_edge_list(self, index: int = 0) -> list[Edge]:
        """The open edges of input ``index`` of the latest batch."""
        where = (self.masks[index].detach() > 0).nonzero().tolist()
        return [Edge(*map(int, w)) for w in where]


@contextmanager
def sparse_attention(model, mode: str = "deterministic", bias: float = DEFAULT_BIAS,
                     edge_mask: torch.Tensor | None = None, generator: torch.Generator | None = None):
    """Gate every attention edge of ``model`` inside the ``with`` block; yields :class:`EdgeGates`.

    ``edge_mask``: optional ``[layer, head, query, key]`` or ``[batch, layer, head, query, key]``
    tensor multiplied into the gates (see :func:`mask_closing`, :func:`mask_keeping`).
    ``generator`` seeds the gate samples in ``"sample"`` mode.
    """
    if mode not in MODES:
        raise ValueError(f"unknown gating mode {mode!r}; choose one of {MODES}")
    bias = float(bias)
    if not torch.isfinite(torch.tensor(bias)):
        raise ValueError(f"gate bias must be a finite number, got {bias}")
    check_attention_hooks(model)
    n_layers, n_heads, n_ctx = attention_shape(model)
    if edge_mask is not None:
        expected_tail = (n_layers, n_heads, n_ctx, n_ctx)
        if edge_mask.ndim not in (4, 5) or tuple(edge_mask.shape[-4:]) != expected_tail:
            raise ValueError(f"edge_mask must have shape [layer, head, query, key] = {list(expected_tail)} "
                             f"(optionally with a leading batch dim), got {list(edge_mask.shape)}")
    gates = EdgeGates(mode, bias, n_layers, n_heads)

    def store_q(layer):
        def hook(q, hook):
            gates._q[layer] = q
        return hook

    def store_k(layer):
        def hook(k, hook):
            gates._k[layer] = k
        return hook

    def gate_pattern(layer):
        def hook(pattern, hook):  # pattern: [batch, head, query, key]
            n_pos = pattern.shape[-1]
            if mode == "dense":
                mask = causal_mask(n_pos, pattern.device).to(pattern.dtype).expand_as(pattern)
            else:
                logits = gate_logits(gates._q[layer], gates._k[layer], bias)
                gates._logits[layer] = logits
                mask = sample_gates(logits, generator) if mode == "sample" else deterministic_gates(logits)
            if edge_mask is not None:
                fixed = edge_mask[..., layer, :, :n_pos, :n_pos].to(pattern.dtype)
                mask = mask * fixed
            gates._masks[layer] = mask * causal_mask(n_pos, pattern.device)  # recorded gates: causal pairs only
            gates._patterns[layer] = pattern.detach()
            gates._q[layer] = gates._k[layer] = None
            return pattern * mask
        return hook

    fwd_hooks = []
    for layer in range(n_layers):
        if mode != "dense":
            fwd_hooks += [(f"blocks.{layer}.attn.hook_q", store_q(layer)),
                          (f"blocks.{layer}.attn.hook_k", store_k(layer))]
        fwd_hooks.append((f"blocks.{layer}.attn.hook_pattern", gate_pattern(layer)))
    with model.hooks(fwd_hooks=fwd_hooks):
        yield gates


def analysis_gates(model, gate_bias: float | None = None, edge_mask: torch.Tensor | None = None):
    """The gating a trained model is analysed with: deterministic gates at ``gate_bias`` (a sparse
    model) or none (``gate_bias=None``, a dense model), with ``edge_mask`` closing edges on top."""
    if gate_bias is None:
        return sparse_attention(model, "dense", edge_mask=edge_mask)
    return sparse_attention(model, "deterministic", gate_bias, edge_mask)


def attached_hook_count(model) -> int:
    """Forward and backward hooks attached to any hook point of ``model`` (0 when clean)."""
    return sum(len(point._forward_hooks) + len(point._backward_hooks) for point in model.hook_dict.values())
