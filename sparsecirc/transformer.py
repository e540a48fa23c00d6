"""The model: a small decoder-only transformer in plain PyTorch whose attention is gated edge by edge.

One forward pass serves training, evaluation and analysis. It is a TransformerLens
``HookedRootModule``: ``model(tokens)``, ``run_with_cache``, ``run_with_hooks`` and ``hooks()``
work on it, and every activation passes a ``HookPoint`` named as in TransformerLens for what it
carries (the LayerNorms have no ``hook_scale``)::

    hook_embed, hook_pos_embed                      [batch, pos, d_model]
    blocks.{l}.hook_resid_pre, ln1.hook_normalized  [batch, pos, d_model]
    blocks.{l}.attn.hook_q_input, hook_k_input, hook_v_input  [batch, pos, head, d_model] (with cfg.use_split_qkv_input)
    blocks.{l}.attn.hook_q, hook_k, hook_v          [batch, pos, head, d_head]
    blocks.{l}.attn.hook_attn_scores                [batch, head, query, key]  q.k / sqrt(d_head), -inf off the causal triangle
    blocks.{l}.attn.hook_gate_logits                [batch, head, query, key]  scores + gate bias (gated runs only)
    blocks.{l}.attn.hook_gates                      [batch, head, query, key]  the 0/1 gates applied (gated runs only)
    blocks.{l}.attn.hook_pattern                    [batch, head, query, key]  softmax(scores) x gates: what the values see
    blocks.{l}.attn.hook_z                          [batch, pos, head, d_head]
    blocks.{l}.attn.hook_result                     [batch, pos, head, d_model] (with cfg.use_attn_result)
    blocks.{l}.hook_attn_out, hook_resid_mid, hook_mlp_in, ln2.hook_normalized, hook_mlp_out, hook_resid_post
    blocks.{l}.mlp.hook_pre, hook_post              [batch, pos, d_mlp]
    ln_final.hook_normalized                        [batch, pos, d_model]

The score is computed once per layer and read twice: by the softmax and by the gates
(:mod:`sparsecirc.gates` defines the gate; :class:`~sparsecirc.sparse_attention.EdgeGates` applies
it). Parameter names and shapes are those of TransformerLens' native bridge (``embed.weight``,
``blocks.0.attn.q.weight`` ...), so checkpoints of either load into the other.

:meth:`GatedTransformer.run_shared_prefix` runs the same blocks over a whole enumeration of
problems computing each operand prefix once (a key/value cache of the prefix positions).
"""

from __future__ import annotations

import copy
import functools
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.modules import module as torch_module
from transformer_lens.config import TransformerBridgeConfig
from transformer_lens import HookedRootModule
from transformer_lens.hook_points import HookPoint

from . import gates as edge_gates
from .data import VOCAB

ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "gelu_new": functools.partial(F.gelu, approximate="tanh"),
               "silu": F.silu}


class _Softmax(torch.autograd.Function):
    """``softmax(x, dim=-1)`` written out. On rows of 11-13 keys ``torch.softmax`` takes a slow CPU
    path (1.1 ms against 0.15 ms for [256, 4, 11, 11]; ``benchmarks/results/speed.md``)."""

    @staticmethod
    def forward(ctx, scores):
        pattern = (scores - scores.amax(dim=-1, keepdim=True)).exp_()
        pattern = pattern.div_(pattern.sum(dim=-1, keepdim=True))
        ctx.save_for_backward(pattern)
        return pattern

    @staticmethod
    def backward(ctx, grad):
        (pattern,) = ctx.saved_tensors
        return pattern * (grad - (grad * pattern).sum(dim=-1, keepdim=True))


def softmax(scores: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dim; every row must hold a finite score (the causal diagonal does)."""
    return _Softmax.apply(scores)


class LayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` with its output on ``hook_normalized``."""

    def __init__(self, d_model: int, eps: float):
        super().__init__(d_model, eps=eps)
        self.hook_normalized = HookPoint()

    def forward(self, x):
        return self.hook_normalized(super().forward(x))


class Attention(nn.Module):
    """Causal multi-head attention whose pattern is multiplied by one gate per edge."""

    def __init__(self, cfg: TransformerBridgeConfig, layer: int):
        super().__init__()
        self.cfg, self.layer = cfg, layer
        inner = cfg.n_heads * cfg.d_head
        self.q, self.k, self.v = (nn.Linear(cfg.d_model, inner) for _ in range(3))
        self.o = nn.Linear(inner, cfg.d_model)
        for name in ("q_input", "k_input", "v_input", "q", "k", "v", "attn_scores", "gate_logits", "gates", "pattern",
                     "z", "result"):
            setattr(self, f"hook_{name}", HookPoint())

    def forward(self, x, gates, past: tuple | None = None, keep_from: int = 0):
        """``x`` ``[batch, pos, d_model]`` (the last ``pos`` positions when ``past`` holds the
        keys and values of the earlier ones, each ``[batch, head, earlier, d_head]``), or with
        ``cfg.use_split_qkv_input`` a tuple of the q, k and v inputs, each ``[batch, pos, head,
        d_model]`` -> the attention output ``[batch, pos - keep_from, d_model]`` and this run's
        ``(k, v)``. ``gates``: the active :class:`~sparsecirc.sparse_attention.EdgeGates`, or ``None`` (dense)."""
        h, d = self.cfg.n_heads, self.cfg.d_head
        if isinstance(x, tuple):  # one input per head and per q, k, v: each projected by its head's rows
            b, n_q = x[0].shape[:2]
            q, k, v = (torch.einsum("bphm,hdm->bphd", inputs, linear.weight.view(h, d, -1)) + linear.bias.view(h, d)
                       for inputs, linear in zip(x, (self.q, self.k, self.v)))
        else:
            b, n_q, _ = x.shape
            weight = torch.cat([self.q.weight, self.k.weight, self.v.weight])
            bias = torch.cat([self.q.bias, self.k.bias, self.v.bias])
            q, k, v = F.linear(x, weight, bias).view(b, n_q, 3, h, d).unbind(2)  # each [batch, pos, head, d_head]
        q, k, v = self.hook_q(q).transpose(1, 2), self.hook_k(k).transpose(1, 2), self.hook_v(v).transpose(1, 2)
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        n_k = k.shape[2]
        causal = edge_gates.causal_mask(n_k, q.device)[n_k - n_q:]  # [query, key]: queries are the last positions
        scores = edge_gates.scaled_scores(q, k.transpose(-1, -2)).masked_fill_(~causal, float("-inf"))
        scores = self.hook_attn_scores(scores)
        pattern = softmax(scores)
        if gates is not None:
            pattern = gates.gate(self.layer, pattern, scores=scores, causal=causal,
                                 on_logits=self.hook_gate_logits, on_gates=self.hook_gates)
        pattern = self.hook_pattern(pattern)
        if keep_from:
            pattern = pattern[:, :, keep_from:]
        z = self.hook_z(torch.matmul(pattern, v).transpose(1, 2))  # [batch, pos, head, d_head]
        if self.cfg.use_attn_result:
            w_o = self.o.weight.view(self.cfg.d_model, h, d)
            result = self.hook_result(torch.einsum("bphd,mhd->bphm", z, w_o))  # [batch, pos, head, d_model]
            out = result.sum(dim=2) + self.o.bias
        else:
            out = self.o(z.reshape(b, n_q - keep_from, h * d))
        return out, (k, v)


class MLP(nn.Module):
    def __init__(self, cfg: TransformerBridgeConfig):
        super().__init__()
        self.add_module("in", nn.Linear(cfg.d_model, cfg.d_mlp))
        self.out = nn.Linear(cfg.d_mlp, cfg.d_model)
        self.act = ACTIVATIONS[cfg.act_fn]
        self.hook_pre, self.hook_post = HookPoint(), HookPoint()

    def forward(self, x):
        linear_in = getattr(self, "in")
        pre = self.hook_pre(linear_in(x))
        if self.act is F.relu and not pre.requires_grad and not self._anything_may_hold(linear_in):
            post = F.relu_(pre)  # nothing else holds pre: reuse its buffer (a fresh one meets cold memory)
        else:
            post = self.act(pre)
        return self.out(self.hook_post(post))

    def _anything_may_hold(self, linear_in) -> bool:
        """Whether a hook may keep the pre-activation: on ``hook_pre``, on the ``in`` layer whose
        output it is, or a global torch module hook."""
        return bool(self.hook_pre._forward_hooks or self.hook_pre._forward_pre_hooks or linear_in._forward_hooks
                    or torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks)


class Block(nn.Module):
    def __init__(self, cfg: TransformerBridgeConfig, layer: int):
        super().__init__()
        self.ln1, self.ln2 = LayerNorm(cfg.d_model, cfg.eps), LayerNorm(cfg.d_model, cfg.eps)
        self.attn, self.mlp = Attention(cfg, layer), MLP(cfg)
        for name in ("resid_pre", "attn_out", "resid_mid", "mlp_in", "mlp_out", "resid_post"):
            setattr(self, f"hook_{name}", HookPoint())

    def forward(self, x, gates, past=None, keep_from: int = 0):
        x = self.hook_resid_pre(x)
        if self.attn.cfg.use_split_qkv_input:  # each head's q, k, v reads its own copy of the residual stream
            copies = x.unsqueeze(2).expand(-1, -1, self.attn.cfg.n_heads, -1)  # [batch, pos, head, d_model]
            attn_in = tuple(self.ln1(getattr(self.attn, f"hook_{name}_input")(copies.clone())) for name in "qkv")
        else:
            attn_in = self.ln1(x)
        attn_out, kv = self.attn(attn_in, gates, past, keep_from)
        x = self.hook_resid_mid(x[:, keep_from:] + self.hook_attn_out(attn_out))
        mlp_out = self.hook_mlp_out(self.mlp(self.ln2(self.hook_mlp_in(x))))
        return self.hook_resid_post(x + mlp_out), kv


def bridge_config(config) -> TransformerBridgeConfig:
    """The TransformerLens config of a :class:`~sparsecirc.model.ModelConfig` (``model.cfg``)."""
    return TransformerBridgeConfig(
        n_layers=config.n_layers, d_model=config.d_model, n_heads=config.n_heads, d_head=config.d_head,
        d_mlp=config.d_mlp, d_vocab=len(VOCAB), n_ctx=config.task.seq_len, act_fn=config.act_fn,
        normalization_type="LN", seed=config.seed)


class GatedTransformer(HookedRootModule):
    """A decoder-only transformer (learned positions, pre-LayerNorm, MLPs) with gated attention.

    Input ``[batch, pos]`` token ids; output logits ``[batch, pos, d_vocab]``. ``cfg`` is a
    TransformerLens ``TransformerBridgeConfig``. The gating (which gates, at which bias) is the
    model's own (:mod:`sparsecirc.sparse_attention`): none for a dense model, deterministic gates
    at its bias for a sparse one, or what an open ``sparse_attention`` block asks for.
    """

    def __init__(self, cfg: TransformerBridgeConfig, gating):
        if not isinstance(cfg, TransformerBridgeConfig):
            raise ValueError(f"cfg must be a TransformerBridgeConfig; build a model with "
                             f"sparsecirc.build_model(ModelConfig(...)), got {type(cfg).__name__}")
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.d_vocab, cfg.d_model)
        self.pos_embed = nn.Embedding(cfg.n_ctx, cfg.d_model)
        self.hook_embed, self.hook_pos_embed = HookPoint(), HookPoint()
        self.blocks = nn.ModuleList(Block(cfg, layer) for layer in range(cfg.n_layers))
        self.ln_final = LayerNorm(cfg.d_model, cfg.eps)
        self.unembed = nn.Linear(cfg.d_model, cfg.d_vocab)
        self.__dict__["_sparsecirc_gating"] = gating  # see sparsecirc.sparse_attention
        self.setup()

    @property
    def gating(self):
        """The model's :class:`~sparsecirc.sparse_attention.NativeGating`."""
        return self.__dict__["_sparsecirc_gating"]

    def forward(self, tokens: torch.Tensor, output_from: int = 0) -> torch.Tensor:
        """Logits ``[batch, pos - output_from, d_vocab]`` of ``tokens`` ``[batch, pos]``. With
        ``output_from``, the last layer computes its attention output and MLP only from that
        position on (every gate is still computed and recorded)."""
        self.check_tokens(tokens)
        n_pos = tokens.shape[1]
        if n_pos > self.cfg.n_ctx:
            raise ValueError(f"input length {n_pos} exceeds the model's context of {self.cfg.n_ctx}")
        x = self._embed(tokens, 0)
        gates = self.gating.active()
        for index, block in enumerate(self.blocks):
            x, _ = block(x, gates, keep_from=output_from if index == len(self.blocks) - 1 else 0)
        return self.unembed(self.ln_final(x))

    def check_tokens(self, tokens) -> None:
        """Raise ``ValueError`` unless ``tokens`` is a 2-D integer tensor ``[batch, pos]`` of vocabulary ids."""
        if not isinstance(tokens, torch.Tensor) or tokens.ndim != 2 or tokens.dtype not in (torch.long, torch.int):
            got = f"{tokens.dtype} of shape {list(tokens.shape)}" if isinstance(tokens, torch.Tensor) else type(tokens).__name__
            raise ValueError(f"tokens must be a 2-D long tensor [batch, pos] of token ids, got {got} (encode a "
                             f"problem with task.batch)")
        if tokens.numel() and not (0 <= int(tokens.min()) and int(tokens.max()) < self.cfg.d_vocab):
            raise ValueError(f"token ids must be in 0..{self.cfg.d_vocab - 1}, got values in "
                             f"{int(tokens.min())}..{int(tokens.max())}")

    def _embed(self, tokens, first_position: int):
        positions = self.pos_embed.weight[first_position:first_position + tokens.shape[1]]
        positions = positions.expand(tokens.shape[0], -1, -1).clone()  # a hook's in-place edit must not reach the weights
        return self.hook_embed(self.embed(tokens)) + self.hook_pos_embed(positions)

    def run_shared_prefix(self, tokens: torch.Tensor, prefix_key: torch.Tensor, n_prefix: int, output_from: int,
                          count_edges: bool):
        """The same forward pass over a batch whose inputs share their first ``n_prefix`` tokens
        in groups (``prefix_key`` ``[batch]``, equal where those tokens are equal): the prefix
        positions run once per group, the rest per input, reading the group's keys and values.
        Returns the logits from ``output_from`` on ``[batch, pos - output_from, d_vocab]`` and,
        with ``count_edges``, the open edges per input and layer ``[batch, layer]``."""
        gates = self.gating.active()
        if count_edges and (gates is None or not gates.record):
            raise ValueError("counting edges needs a recording sparse_attention block around the run "
                             "(evaluate and analysis_run open one)")
        if gates is not None and gates.edge_mask is not None and gates.edge_mask.ndim != 4:
            raise ValueError("run_shared_prefix takes one [layer, head, query, key] edge mask for every input")
        keys, inverse = torch.unique(prefix_key, return_inverse=True)
        first = torch.empty_like(keys).scatter_(0, inverse, torch.arange(len(prefix_key), device=keys.device))
        x_pre, x = self._embed(tokens[first, :n_prefix], 0), self._embed(tokens[:, n_prefix:], n_prefix)
        open_edges = torch.zeros(len(tokens), len(self.blocks), device=tokens.device) if count_edges else None
        for index, block in enumerate(self.blocks):
            last = index == len(self.blocks) - 1
            x_pre, (k, v) = block(x_pre, gates, keep_from=n_prefix if last else 0)  # last layer: only k, v (and gates)
            if count_edges:
                open_edges[:, index] += gates.open_edges_in(index)[inverse]
            x, _ = block(x, gates, past=(k[inverse], v[inverse]), keep_from=output_from - n_prefix if last else 0)
            if count_edges:
                open_edges[:, index] += gates.open_edges_in(index)
        return self.unembed(self.ln_final(x)), open_edges

    def has_user_hooks(self) -> bool:
        """True if any hook is attached to the model: a HookPoint's, or a torch module hook."""
        return any(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                   or getattr(module, "_backward_pre_hooks", None) for module in self.modules())

    def set_use_attn_result(self, use: bool) -> None:
        """Compute each head's output ``hook_result`` ``[batch, pos, head, d_model]`` (TransformerLens' flag)."""
        self.cfg.use_attn_result = bool(use)

    def set_use_hook_mlp_in(self, use: bool) -> None:
        """``hook_mlp_in`` always fires here; the flag is kept for TransformerLens' tools."""
        self.cfg.use_hook_mlp_in = bool(use)

    def set_use_split_qkv_input(self, use: bool) -> None:
        """Give each head's q, k and v input its own copy of the residual stream, ``attn.hook_q_input``,
        ``hook_k_input``, ``hook_v_input`` ``[batch, pos, head, d_model]`` (before ``ln1``), as
        TransformerLens' flag does: residual edges into one head can then be patched alone. The
        same computation, about 3x slower in attention."""
        self.cfg.use_split_qkv_input = bool(use)

    def set_use_attn_in(self, use: bool) -> None:
        if use:
            raise ValueError("this model has no per-head attention input (use_attn_in)")

    def __deepcopy__(self, memo):
        """A copy with its own weights and its own gating (same bias, no open block)."""
        clone = self.__class__.__new__(self.__class__)
        memo[id(self)] = clone
        block, self.gating.block = self.gating.block, None  # a block belongs to its with statement, not the model
        try:
            for key, value in self.__dict__.items():
                clone.__dict__[key] = copy.deepcopy(value, memo)
        finally:
            self.gating.block = block
        return clone

    def __getstate__(self):
        """Pickled with its own gating, never an open block's."""
        state = self.__dict__.copy()
        gating = copy.copy(state["_sparsecirc_gating"])
        gating.block = None
        state["_sparsecirc_gating"] = gating
        return state


def native_initial_weights(cfg: TransformerBridgeConfig) -> dict[str, torch.Tensor]:
    """The initial weights TransformerLens' ``boot_native`` gives for ``cfg`` (its ``"gpt2"``
    init: every weight drawn from N(0, std) with std ``cfg.initializer_range``, the output
    projections' divided by sqrt(2 n_layers), in module order from a generator seeded by
    ``cfg.seed``; biases 0, LayerNorm gains 1), under this module's parameter names (float32),
    without touching the global RNG when ``cfg.seed`` is set. Written here because TransformerLens'
    own, in ``model_bridge.sources.native``, costs 1.4 s of imports in every process that builds a
    fresh model; ``tests/test_transformer.py`` checks the two agree bit for bit."""
    if (cfg.init_mode or "gpt2").lower() != "gpt2" or cfg.positional_embedding_type != "standard":
        raise ValueError(f"only TransformerLens' 'gpt2' init with learned positions is supported, got init_mode "
                         f"{cfg.init_mode!r} and positional_embedding_type {cfg.positional_embedding_type!r}")
    std = cfg.initializer_range if cfg.initializer_range > 0 else 0.8 / math.sqrt(cfg.d_model)
    output_std = std * (1.0 / math.sqrt(2 * cfg.n_layers))  # the residual stream's writers (as TransformerLens rounds it)
    generator = None if cfg.seed is None else torch.Generator().manual_seed(cfg.seed)
    inner = cfg.n_heads * cfg.d_head

    def normal(rows: int, columns: int, scale: float) -> torch.Tensor:
        return torch.empty(rows, columns, dtype=torch.float32).normal_(0.0, scale, generator=generator)

    def layer_norm(name: str) -> dict[str, torch.Tensor]:
        return {f"{name}.weight": torch.ones(cfg.d_model), f"{name}.bias": torch.zeros(cfg.d_model)}

    weights = {"embed.weight": normal(cfg.d_vocab, cfg.d_model, std),
               "pos_embed.weight": normal(cfg.n_ctx, cfg.d_model, std)}
    for layer in range(cfg.n_layers):  # the draws' order is TransformerLens': q, k, v, o, then the MLP's in, out
        block = f"blocks.{layer}"
        weights.update(layer_norm(f"{block}.ln1"))
        for name in "qkv":
            weights[f"{block}.attn.{name}.weight"] = normal(inner, cfg.d_model, std)
            weights[f"{block}.attn.{name}.bias"] = torch.zeros(inner)
        weights[f"{block}.attn.o.weight"] = normal(cfg.d_model, inner, output_std)
        weights[f"{block}.attn.o.bias"] = torch.zeros(cfg.d_model)
        weights.update(layer_norm(f"{block}.ln2"))
        weights[f"{block}.mlp.in.weight"] = normal(cfg.d_mlp, cfg.d_model, std)
        weights[f"{block}.mlp.in.bias"] = torch.zeros(cfg.d_mlp)
        weights[f"{block}.mlp.out.weight"] = normal(cfg.d_model, cfg.d_mlp, output_std)
        weights[f"{block}.mlp.out.bias"] = torch.zeros(cfg.d_model)
    weights.update(layer_norm("ln_final"))
    weights["unembed.weight"] = normal(cfg.d_vocab, cfg.d_model, std)
    weights["unembed.bias"] = torch.zeros(cfg.d_vocab)
    return weights
