"""Edge-level gating of attention; a sparse model carries its own.

Each forward pass multiplies every head's attention pattern by one gate per (query, key) edge,
with no renormalisation::

    out_i = sum_j softmax(scores)_ij * m_ij * v_j

:meth:`EdgeGates.gate` applies the gate of :mod:`sparsecirc.gates` for every model. A
:class:`~sparsecirc.transformer.GatedTransformer` (what ``build_model`` makes) calls it in its own
forward pass with the score its softmax read. A TransformerLens ``TransformerBridge`` is gated
through hooks: the gate logits are computed from ``hook_q`` and ``hook_k`` (``q.k / sqrt(d_head)
+ gate_bias``), and the gated pattern is returned from ``hook_pattern``. (``hook_attn_scores``
cannot be used there: on a ``boot_native`` bridge it fires after the softmax and edits returned
there are dropped.)

A *sparse model* is its gates: :func:`set_gate_bias` (called by ``build_model`` and
``load_checkpoint`` for a sparse config, and by ``sparsify`` when it ends) sets the model's own
gating (on a bridge: permanent hooks), so every forward pass, ``model(tokens)`` and
``model.run_with_cache(tokens)`` included, runs with deterministic gates at the model's own
bias, and caches and patches on ``hook_pattern`` see the gated pattern.

``with sparse_attention(model, mode) as gates:`` gates differently for the length of a block,
and ``gates`` records what the gates did. Modes: ``"sample"`` (hard Bernoulli gates,
straight-through gradient: training), ``"deterministic"`` (open iff logit > 0: evaluation),
``"dense"`` (no gates: the only way to run a sparse model's weights ungated, asked for by
name). Any mode takes a fixed ``edge_mask`` of 0s and 1s on top, built with
:func:`mask_closing` or :func:`mask_keeping`. Blocks do not nest.
"""

from __future__ import annotations

import functools
import math
import operator
import weakref
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from . import gates as edge_gates  # called through the module: the gate is defined there, once
from .gates import causal_mask, expected_edges

MODES = ("sample", "deterministic", "dense")


@dataclass(frozen=True, order=True)
class Edge:
    """One attention edge: in ``layer``, ``head``, position ``query`` reads position ``key``."""

    layer: int
    head: int
    query: int
    key: int

    def __post_init__(self):
        for name in ("layer", "head", "query", "key"):
            value = getattr(self, name)
            try:
                number = None if isinstance(value, bool) else operator.index(value)
            except TypeError:
                number = None
            if number is None or number < 0:
                raise ValueError(f"Edge {name} must be a non-negative int, got {value!r}")
            object.__setattr__(self, name, number)


def attention_shape(model) -> tuple[int, int, int]:
    """``(n_layers, n_heads, n_ctx)`` of a bridge."""
    return model.cfg.n_layers, model.cfg.n_heads, model.cfg.n_ctx


def check_attention_hooks(model) -> None:
    """Raise ``ValueError`` unless ``model`` is a TransformerLens bridge whose every layer has
    ``hook_q``, ``hook_k`` and ``hook_pattern``."""
    if not hasattr(model, "cfg") or not hasattr(model, "hook_dict"):
        raise ValueError(f"edge gating needs a GatedTransformer (see build_model) or a TransformerLens TransformerBridge, "
                         f"got {type(model).__name__}")
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
    check_attention_hooks(model)
    if isinstance(edges, (str, bytes, torch.Tensor)) or not hasattr(edges, "__iter__"):
        raise ValueError(f"edges must be a list of Edge(layer, head, query, key) or 4-tuples, got "
                         f"{type(edges).__name__} {edges!r:.40}")
    n_layers, n_heads, n_ctx = attention_shape(model)
    mask = torch.full((n_layers, n_heads, n_ctx, n_ctx), background)
    for edge in edges:
        if not isinstance(edge, Edge):
            if not isinstance(edge, (tuple, list)) or len(edge) != 4:
                raise ValueError(f"edges must be Edge(layer, head, query, key) or 4-tuples, got {edge!r}")
            edge = Edge(*edge)
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
    """What the gates did in the latest forward pass: per layer, the gate logits, the gates
    applied and the softmax pattern; the properties stack them over layers. One is yielded by
    every :func:`sparse_attention` block."""

    def __init__(self, mode: str, gate_bias: float | None, n_layers: int, n_heads: int,
                 edge_mask: torch.Tensor | None = None, generator: torch.Generator | None = None, record: bool = True):
        if mode not in MODES:
            raise ValueError(f"unknown gating mode {mode!r}; choose one of {MODES}")
        for name, value in (("n_layers", n_layers), ("n_heads", n_heads)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if mode != "dense":
            gate_bias = _check_gate_bias(gate_bias)
        elif gate_bias is not None:
            raise ValueError("dense mode runs without gates and takes no gate_bias")
        self.mode, self.gate_bias, self.n_layers, self.n_heads = mode, gate_bias, n_layers, n_heads
        self.edge_mask, self.generator, self.record = edge_mask, generator, record
        self._q: list[torch.Tensor | None] = [None] * n_layers
        self._k: list[torch.Tensor | None] = [None] * n_layers
        self._logits: list[torch.Tensor | None] = [None] * n_layers
        self._masks: list[torch.Tensor | None] = [None] * n_layers
        self._patterns: list[torch.Tensor | None] = [None] * n_layers

    def gate(self, layer: int, pattern: torch.Tensor, scores: torch.Tensor | None = None,
             causal: torch.Tensor | None = None, on_logits=None, on_gates=None) -> torch.Tensor:
        """The gated ``pattern [batch, head, query, key]`` of ``layer``; records what it did.

        ``scores``: the layer's ``q.k / sqrt(d_head)`` the softmax read (a
        :class:`~sparsecirc.transformer.GatedTransformer` passes them); without them the gate
        logits are computed from the q and k the bridge's hooks stored. ``causal``: ``[query,
        key]`` booleans of this run (default: the square triangle; the queries are the last
        positions). ``on_logits``, ``on_gates``: hook points the logits and the gates pass."""
        n_q, n_k = pattern.shape[-2:]
        if self.edge_mask is not None and self.edge_mask.ndim == 5 and len(self.edge_mask) not in (1, len(pattern)):
            raise ValueError(f"the edge_mask has a batch of {len(self.edge_mask)} masks but the input a batch of "
                             f"{len(pattern)}: give one mask per input, or one [layer, head, query, key] mask for all")
        if causal is None:
            causal = causal_mask(n_k, pattern.device)[n_k - n_q:]
        if self.mode == "dense":
            mask = causal.to(pattern.dtype).expand_as(pattern)
        else:
            if scores is not None:
                logits = edge_gates.gate_logits_from_scores(scores, self.gate_bias)
            else:
                logits = edge_gates.gate_logits(self._q[layer], self._k[layer], self.gate_bias)
            if on_logits is not None:
                logits = on_logits(logits)
            if self.mode == "sample":
                mask = edge_gates.sample_gates(logits, self.generator)
            else:
                mask = edge_gates.deterministic_gates(logits)
        if self.edge_mask is not None:
            mask = edge_gates.restrict(mask, self.edge_mask[..., layer, :, n_k - n_q:n_k, :n_k])
        if on_gates is not None and self.mode != "dense":
            mask = on_gates(mask)
        self._q[layer] = self._k[layer] = None
        if self.record:  # a model's own gates record nothing: no tensors (or graphs) outlive the pass
            if self.mode != "dense":
                self._logits[layer] = logits
            self._masks[layer] = edge_gates.restrict(mask, causal)  # recorded: causal pairs only
            self._patterns[layer] = pattern.detach()
        return edge_gates.gated_pattern(pattern, mask)

    def open_edges_in(self, layer: int) -> torch.Tensor:
        """Edges open in ``layer`` in the latest pass, summed over its heads ``[batch]``."""
        if self._masks[layer] is None:
            raise RuntimeError("no gate masks recorded yet: run a forward pass inside the sparse_attention block")
        return edge_gates.count_open_edges(self._masks[layer].detach()).sum(-1)

    def _stacked(self, items, what):
        if any(item is None for item in items):
            raise RuntimeError(f"no {what} recorded yet: run a forward pass inside the sparse_attention block")
        return torch.stack(items, dim=1)

    def _require_logits(self) -> torch.Tensor:
        if self.mode == "dense":
            raise RuntimeError("dense mode computes no gate logits")
        return self._stacked(self._logits, "gate logits")

    @property
    def raw_logits(self) -> torch.Tensor:
        """Gate logits ``[batch, layer, head, query, key]`` as computed, with gradient; off the
        causal triangle the values are meaningless (see :func:`~sparsecirc.gates.gate_logits`)."""
        return self._require_logits()

    @property
    def logits(self) -> torch.Tensor:
        """Gate logits ``[batch, layer, head, query, key]``, ``-inf`` off the causal triangle."""
        logits = self._require_logits()
        return logits.masked_fill(~causal_mask(logits.shape[-1], logits.device), float("-inf"))

    @property
    def masks(self) -> torch.Tensor:
        """The gates applied ``[batch, layer, head, query, key]``: 0/1 values, fixed mask included."""
        return self._stacked(self._masks, "gate masks")

    @property
    def expected_edges(self) -> torch.Tensor:
        """Expected open edges ``[batch, layer, head]``: sum of sigmoid(logit) over causal pairs.
        Differentiable: this is the sparsity penalty."""
        return expected_edges(self._require_logits())

    @property
    def weights(self) -> torch.Tensor:
        """Attention actually used ``[batch, layer, head, query, key]``: the softmax pattern times
        the gates (no gradient). Zero on closed edges; the whole causal pattern in dense mode."""
        return edge_gates.gated_pattern(self._stacked(self._patterns, "attention patterns"), self.masks.detach())

    @property
    def open_edges(self) -> torch.Tensor:
        """Edges actually open ``[batch, layer, head]`` in the latest pass (no gradient)."""
        return edge_gates.count_open_edges(self.masks.detach())

    def open_edge_list(self, index: int = 0) -> list[Edge]:
        """The open edges of input ``index`` of the latest batch."""
        where = (self.masks[index].detach() > 0).nonzero().tolist()
        return [Edge(*map(int, w)) for w in where]


class NativeGating:
    """What a model's gates do now: the open :func:`sparse_attention` block's gates if there is
    one, else deterministic gates at the model's own ``gate_bias`` (a sparse model), else nothing
    (a dense model). A :class:`~sparsecirc.transformer.GatedTransformer` holds one and gates in
    its own forward pass; other TransformerLens models get a :class:`_ModelGating`, which gates
    through hooks."""

    def __init__(self, n_layers: int, n_heads: int, gate_bias: float | None = None):
        self.n_layers, self.n_heads = n_layers, n_heads
        self.block: EdgeGates | None = None
        self.set_gate_bias(gate_bias)

    def active(self) -> EdgeGates | None:
        return self.block if self.block is not None else self.own

    def set_gate_bias(self, gate_bias: float | None) -> None:
        self.gate_bias = gate_bias
        self.own = None if gate_bias is None else EdgeGates("deterministic", gate_bias, self.n_layers, self.n_heads,
                                                            record=False)


class _ModelGating(NativeGating):
    """The permanent gating hooks of a TransformerLens bridge (``hook_q``, ``hook_k``,
    ``hook_pattern``), gating as :class:`NativeGating` says."""

    def __init__(self, model, gate_bias: float | None = None):
        n_layers, n_heads, _ = attention_shape(model)
        super().__init__(n_layers, n_heads, gate_bias)
        self.owner = weakref.ref(model)
        self.handles: list[tuple] = []  # (hook point, LensHandle, stores q or k: kept last on its point)

    def attach(self, model) -> None:
        """Add the hooks: on ``hook_q`` and ``hook_k`` they store q and k, on ``hook_pattern``
        (first of its hooks) they gate the pattern."""
        for layer in range(self.n_layers):
            for name, hook in zip(("hook_q", "hook_k", "hook_pattern"), self._hooks(layer)):
                point = model.hook_dict[f"blocks.{layer}.attn.{name}"]
                handle = point.add_hook(hook, is_permanent=True, prepend=name == "hook_pattern")
                self.handles.append((point, handle, name != "hook_pattern"))

    def attached(self) -> bool:
        return all(handle in point.fwd_hooks and handle.hook.id in point._forward_hooks
                   for point, handle, _ in self.handles)

    def keep_stores_last(self) -> None:
        """Move the q/k store hooks behind any hook added since, so the gate logits read q and k
        as the other hooks left them (a patched q changes the gates as it changes the softmax)."""
        for point, handle, stores in self.handles:
            if stores and next(reversed(point._forward_hooks)) != handle.hook.id:
                point._forward_hooks.move_to_end(handle.hook.id)

    def _hooks(self, layer: int):
        def store_q(q, hook):
            gates = self.active()
            if gates is not None and gates.mode != "dense":
                gates._q[layer] = q

        def store_k(k, hook):
            gates = self.active()
            if gates is not None and gates.mode != "dense":
                gates._k[layer] = k

        def gate_pattern(pattern, hook):  # pattern: [batch, head, query, key]
            gates = self.active()
            return None if gates is None else gates.gate(layer, pattern)

        for hook in (store_q, store_k, gate_pattern):
            hook._sparsecirc_gate = True
        return store_q, store_k, gate_pattern


_GATING_ATTRIBUTE = "_sparsecirc_gating"


def _hook_points(model):
    return {id(point): point for point in model.hook_dict.values()}.values()  # hook_dict also holds aliases


def _before_forward(model, args) -> None:
    """A forward pre-hook on the whole model (a torch hook: TransformerLens' ``reset_hooks``
    leaves it alone) for ``model(tokens)``."""
    _gating(model, create=False)


def _before_blocks(model_ref, block, args) -> None:
    """The same on the first block, for ``run_with_cache`` and ``run_with_hooks``, which call
    ``model.forward`` directly."""
    model = model_ref()
    if model is not None:
        _gating(model, create=False)


def _gating(model, create: bool = True) -> _ModelGating | None:
    """The model's gating, with its hooks attached (permanent) on first use. Repaired where it
    was broken: gating hooks removed (``reset_hooks(including_permanent=True)``) come back, and
    a ``copy.deepcopy`` of a model, whose copied hooks still serve the original, gets its own."""
    gating = model.__dict__.get(_GATING_ATTRIBUTE)
    if type(gating) is NativeGating:  # a GatedTransformer gates in its own forward pass
        return gating
    if gating is None and not create:
        return None
    if gating is None or gating.owner() is not model or not gating.attached():
        check_attention_hooks(model)
        for point in _hook_points(model):  # drop hooks that serve another model's gating
            for handle in [h for h in point.fwd_hooks if getattr(h.user_hook, "_sparsecirc_gate", False)]:
                point._forward_hooks.pop(handle.hook.id, None)
                point.fwd_hooks.remove(handle)
        gating = _ModelGating(model, None if gating is None else gating.gate_bias)
        gating.attach(model)
        model.__dict__[_GATING_ATTRIBUTE] = gating
        if _before_forward not in model._forward_pre_hooks.values():
            model.register_forward_pre_hook(_before_forward)
        first_block = model.blocks[0]
        for key, hook in list(first_block._forward_pre_hooks.items()):
            if getattr(hook, "_sparsecirc_gate", False):  # a copied model's hook still points at the original
                del first_block._forward_pre_hooks[key]
        hook = functools.partial(_before_blocks, weakref.ref(model))
        hook._sparsecirc_gate = True
        first_block.register_forward_pre_hook(hook)
    gating.keep_stores_last()
    return gating


def _check_gate_bias(gate_bias) -> float:
    if isinstance(gate_bias, bool) or not isinstance(gate_bias, (int, float)) or not math.isfinite(gate_bias):
        raise ValueError(f"gate_bias must be a finite number, got {gate_bias!r}")
    return float(gate_bias)


def gate_bias_of(model) -> float | None:
    """The model's own gate bias: a number for a sparse model, ``None`` for a dense one."""
    gating = getattr(model, "__dict__", {}).get(_GATING_ATTRIBUTE)
    return None if gating is None else gating.gate_bias


def set_gate_bias(model, gate_bias: float | None) -> None:
    """Make ``model`` a sparse model gated at ``gate_bias`` on every forward pass from now on
    (deterministic gates), or, with ``None``, a dense model again."""
    if gate_bias is not None:
        gate_bias = _check_gate_bias(gate_bias)
    if gate_bias is None and gate_bias_of(model) is None:
        return
    check_attention_hooks(model)
    gating = _gating(model)
    if gating.block is not None:
        raise ValueError("cannot change the gate bias inside a sparse_attention block")
    gating.set_gate_bias(gate_bias)


def unusable_tensor(tensor: torch.Tensor) -> str | None:
    """What keeps ``tensor`` from being read as plain values, or ``None``: a sparse, nested or
    ``meta`` tensor (the last holds no values at all). A dense tensor on any real device is fine."""
    if tensor.is_nested or tensor.layout != torch.strided:
        return "nested" if tensor.is_nested else f"sparse ({str(tensor.layout).removeprefix('torch.')})"
    return "on the meta device (it holds no values)" if tensor.is_meta else None


def check_edge_mask(model, edge_mask: torch.Tensor) -> None:
    """Raise ``ValueError`` unless ``edge_mask`` is a ``[layer, head, query, key]`` (optionally
    ``[batch, ...]``) tensor of 0s and 1s for ``model``."""
    n_layers, n_heads, n_ctx = attention_shape(model)
    expected_tail = (n_layers, n_heads, n_ctx, n_ctx)
    if not isinstance(edge_mask, torch.Tensor):
        raise ValueError(f"edge_mask must be a tensor, got {type(edge_mask).__name__}")
    if unusable_tensor(edge_mask):
        raise ValueError(f"edge_mask is {unusable_tensor(edge_mask)}; it must be a dense tensor of 0s and 1s on a "
                         f"real device (build it with mask_closing or mask_keeping)")
    if edge_mask.ndim not in (4, 5) or tuple(edge_mask.shape[-4:]) != expected_tail:
        raise ValueError(f"edge_mask must have shape [layer, head, query, key] = {list(expected_tail)} "
                         f"(optionally with a leading batch dim), got {list(edge_mask.shape)}")
    if edge_mask.ndim == 5 and len(edge_mask) == 0:
        raise ValueError("edge_mask has a batch of 0 masks; give one mask per input, or one [layer, head, query, key] "
                         "mask for every input")
    if not ((edge_mask == 0) | (edge_mask == 1)).all():
        raise ValueError("edge_mask must hold only 0 (closed) and 1 (open); build it with mask_closing or mask_keeping")


@contextmanager
def sparse_attention(model, mode: str = "deterministic", gate_bias: float | None = None,
                     edge_mask: torch.Tensor | None = None, generator: torch.Generator | None = None):
    """Gate every attention edge of ``model`` as ``mode`` says inside the ``with`` block; yields
    :class:`EdgeGates`. On exit the model's own gating is back, also after an exception.

    ``gate_bias``: default the model's own (a sparse model); a dense model has none, so gating
    it needs one given by name (the recipe's is ``SparsifyConfig().gate_bias``). ``"dense"``
    mode takes none. ``edge_mask``: optional ``[layer, head, query, key]`` or ``[batch, layer,
    head, query, key]`` tensor of 0s and 1s multiplied into the gates (see :func:`mask_closing`,
    :func:`mask_keeping`). ``generator`` seeds the gate samples in ``"sample"`` mode.
    """
    if mode not in MODES:
        raise ValueError(f"unknown gating mode {mode!r}; choose one of {MODES}")
    check_attention_hooks(model)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ValueError(f"generator must be a torch.Generator or None, got {type(generator).__name__} {generator!r:.40}")
    if edge_mask is not None:
        check_edge_mask(model, edge_mask)
    if mode == "dense":
        if gate_bias is not None:
            raise ValueError("dense mode runs without gates and takes no gate_bias")
    elif gate_bias is None:
        gate_bias = gate_bias_of(model)
        if gate_bias is None:
            raise ValueError(f"{mode} gates on a dense model need a gate_bias: pass gate_bias= "
                             f"(the recipe's is SparsifyConfig().gate_bias)")
    else:
        gate_bias = _check_gate_bias(gate_bias)
    gating = _gating(model)
    if gating.block is not None:
        raise ValueError("sparse_attention blocks do not nest: this model is already inside one. Close it first; "
                         "predict, evaluate, circuit_graph and the other analysis functions open their own, so "
                         "call them outside it and choose the gating with dense=True or gate_bias=")
    n_layers, n_heads, _ = attention_shape(model)
    gating.block = EdgeGates(mode, gate_bias, n_layers, n_heads, edge_mask, generator)
    try:
        yield gating.block
    finally:
        gating.block = None


@contextmanager
def analysis_run(model, *, gate_bias: float | None = None, dense: bool = False,
                 edge_mask: torch.Tensor | None = None):
    """Run ``model`` for analysis inside the block: eval mode, no gradient, and its gating, as
    :class:`EdgeGates` records. The gating is the model's own (deterministic gates at its bias
    for a sparse model, none for a dense one) unless asked otherwise by name: ``gate_bias=``
    gates at that bias, ``dense=True`` runs without gates. ``edge_mask`` closes edges on top.
    The model's train/eval mode is restored on exit, also after an exception."""
    check_attention_hooks(model)
    if not isinstance(dense, bool):
        raise ValueError(f"dense must be True or False, got {dense!r}")
    if dense and gate_bias is not None:
        raise ValueError("pass either dense=True (no gates) or a gate_bias, not both")
    if edge_mask is not None and isinstance(edge_mask, torch.Tensor) and edge_mask.ndim != 4:
        raise ValueError(f"edge_mask must be one [layer, head, query, key] mask for every input here, got shape "
                         f"{list(edge_mask.shape)}")
    gated = not dense and (gate_bias is not None or gate_bias_of(model) is not None)
    mode = "deterministic" if gated else "dense"
    was_training = model.training
    try:
        with torch.no_grad(), sparse_attention(model, mode, gate_bias if gated else None, edge_mask) as gates:
            model.eval()
            yield gates
    finally:
        model.train(was_training)


def batch_slices(n: int, batch_size: int) -> list[slice]:
    """``slice``s covering ``range(n)`` in batches of ``batch_size`` (a positive int)."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    return [slice(start, min(start + batch_size, n)) for start in range(0, n, batch_size)]
