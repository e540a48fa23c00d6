"""A lean forward pass for evaluation that computes each operand prefix once.

In ``a + b = _ _ _`` the first ``2 * operand_digits`` positions (the digits of ``a``, ``+`` and
all digits of ``b`` but its units) see nothing of the rest, so under causal attention their
activations depend on that prefix alone. On all 1,000,000 problems of 3-digit addition there are
only 100,000 such prefixes: this pass runs the prefix positions once per distinct prefix and
only the remaining positions per problem, and in the last layer it runs the attention output
and MLP only at the answer slots. That halves the work of :func:`~sparsecirc.evaluate` on a
whole enumeration; on a random sample it does the same work as the bridge.

It computes the same function as the TransformerLens bridge that :func:`~sparsecirc.build_model`
builds, gating included (softmax pattern times deterministic gates ``1[q.k / sqrt(d_head) + bias
> 0]``, times a fixed edge mask, no renormalisation), up to float rounding. It only serves models
built by ``build_model`` with no hooks of anyone else attached (:func:`shared_prefix_supported`);
:func:`~sparsecirc.evaluate` falls back to the bridge for every other model.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .data import AdditionTask
from . import gates as edge_gates  # called through the module: the gate is defined there, once
from .model import task_of
from .sparse_attention import _before_blocks, _before_forward

_ACTIVATIONS = {"relu": torch.relu_,  # in place: applied to a fresh hidden layer
                "gelu": F.gelu, "gelu_new": functools.partial(F.gelu, approximate="tanh"),
                "silu": F.silu}
_BRIDGE_NORM_PRE_HOOKS = ("_capture_pre_ln1", "_capture_mlp_in")  # the bridge's own, on ln1 and ln2
MAX_OPERAND_DIGITS = 9  # the prefix key a * 10**(d-1) + b // 10 stays within int64


def _is_known_pre_hook(module, hook) -> bool:
    """sparsecirc's own pre-hooks (model and first block), or the bridge's own on a norm."""
    if hook is _before_forward or (isinstance(hook, functools.partial) and hook.func is _before_blocks):
        return True
    return (type(module).__name__ == "NormalizationBridge"
            and getattr(getattr(hook, "__func__", hook), "__name__", "") in _BRIDGE_NORM_PRE_HOOKS)


def shared_prefix_supported(model) -> bool:
    """True if ``model`` was built by ``build_model`` (LayerNorm, learned positions, a plain MLP,
    float32 on the CPU, at most ``MAX_OPERAND_DIGITS`` digits) and carries no hooks but
    sparsecirc's gating and the bridge's own: the lean pass then computes what the bridge would.
    A model with any user hook (``add_hook``, a torch forward hook) is run through the bridge, so
    the hook fires."""
    task = task_of(model)
    if task is None or task.operand_digits > MAX_OPERAND_DIGITS:
        return False
    if any(p.dtype != torch.float32 or p.device.type != "cpu" for p in model.parameters()):
        return False
    cfg = model.cfg
    if (str(cfg.normalization_type).upper() != "LN" or cfg.act_fn not in _ACTIVATIONS or cfg.attn_only
            or cfg.gated_mlp or cfg.n_key_value_heads not in (None, cfg.n_heads) or cfg.final_rms
            or (cfg.positional_embedding_type or "standard") != "standard" or cfg.dtype != torch.float32
            or cfg.attn_scores_soft_cap > 0 or cfg.output_logits_soft_cap > 0 or cfg.attention_dir != "causal"
            or (cfg.use_attn_scale and cfg.attn_scale > 0)):
        return False
    for module in model.modules():
        handles = getattr(module, "fwd_hooks", None)
        if handles is not None:  # a HookPoint: only sparsecirc's gating hooks
            if any(not getattr(handle.user_hook, "_sparsecirc_gate", False) for handle in handles):
                return False
            if len(module._forward_hooks) != len(handles) or module._forward_pre_hooks or module.bwd_hooks:
                return False
        elif module._forward_hooks or not all(_is_known_pre_hook(module, hook)
                                              for hook in module._forward_pre_hooks.values()):
            return False
    return True


def _softmax_(scores: torch.Tensor) -> torch.Tensor:
    """``softmax(scores, dim=-1)`` in place, written out: on rows of 11-13 keys ``torch.softmax`` takes a
    slow path on the CPU (1.1 ms against 0.15 ms for [256, 4, 11, 11], see
    ``benchmarks/results/speed.md``). Every row holds at least one finite score (the diagonal)."""
    scores.sub_(scores.amax(dim=-1, keepdim=True)).exp_()
    return scores.div_(scores.sum(dim=-1, keepdim=True))


@dataclass
class _Layer:
    ln1: tuple[torch.Tensor, torch.Tensor]
    w_qkv: torch.Tensor  # [d_model, 3 * d_model]: q, k, v side by side
    b_qkv: torch.Tensor
    w_o: torch.Tensor  # [d_model, d_model]
    b_o: torch.Tensor
    ln2: tuple[torch.Tensor, torch.Tensor]
    w_in: torch.Tensor  # [d_model, d_mlp]
    b_in: torch.Tensor
    w_out: torch.Tensor  # [d_mlp, d_model]
    b_out: torch.Tensor


def _weights(model):
    """The bridge's parameters, laid out for ``addmm`` (inputs times weights)."""
    sd = {name: value.detach() for name, value in model.state_dict().items()}
    layers = []
    for layer in range(model.cfg.n_layers):
        p = f"blocks.{layer}."
        layers.append(_Layer(
            ln1=(sd[p + "ln1.weight"], sd[p + "ln1.bias"]),
            w_qkv=torch.cat([sd[p + f"attn.{x}.weight"] for x in "qkv"]).T.contiguous(),
            b_qkv=torch.cat([sd[p + f"attn.{x}.bias"] for x in "qkv"]),
            w_o=sd[p + "attn.o.weight"].T.contiguous(), b_o=sd[p + "attn.o.bias"],
            ln2=(sd[p + "ln2.weight"], sd[p + "ln2.bias"]),
            w_in=sd[p + "mlp.in.weight"].T.contiguous(), b_in=sd[p + "mlp.in.bias"],
            w_out=sd[p + "mlp.out.weight"].T.contiguous(), b_out=sd[p + "mlp.out.bias"]))
    return (sd["embed.weight"], sd["pos_embed.weight"], layers, (sd["ln_final.weight"], sd["ln_final.bias"]),
            sd["unembed.weight"].T.contiguous(), sd["unembed.bias"])


class SharedPrefixForward:
    """The lean pass for one model and one gating: call it on operands ``[n, 2]`` and their
    tokens to get the answer-slot logits ``[n, answer_digits, d_vocab]`` and, if
    ``count_edges``, the open edges per input and layer ``[n, layer]`` (else ``None``).

    ``gate_bias``: deterministic gates at this bias (``None``: no gates). ``edge_mask``:
    ``[layer, head, query, key]`` 0s and 1s multiplied into the gates. The caller has checked
    both (see :func:`~sparsecirc.sparse_attention.analysis_run`); edges are counted only with
    gates or a mask."""

    def __init__(self, model, task: AdditionTask, gate_bias: float | None, edge_mask: torch.Tensor | None,
                 count_edges: bool):
        cfg = model.cfg
        self.task, self.gate_bias, self.count_edges = task, gate_bias, count_edges
        self.n_heads, self.d_head, self.eps = cfg.n_heads, cfg.d_head, cfg.eps
        self.act = _ACTIVATIONS[cfg.act_fn]
        self.embed, self.pos, self.layers, self.ln_final, self.w_u, self.b_u = _weights(model)
        n_pos = task.seq_len
        self.n_prefix = 2 * task.operand_digits  # a, "+", b without its units
        allowed = edge_gates.causal_mask(n_pos)  # [query, key]
        self.masked = edge_mask is not None
        if edge_mask is None:
            self.open_allowed = [allowed] * cfg.n_layers
        else:
            self.open_allowed = [allowed & (edge_mask[layer] > 0) for layer in range(cfg.n_layers)]  # [head, q, k]
        self.causal = allowed

    def _norm(self, x, weight_bias):
        return F.layer_norm(x, x.shape[-1:], weight_bias[0], weight_bias[1], self.eps)

    def _attention_out(self, layer: _Layer, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """``x + W_O z`` for ``x`` ``[batch, pos, d_model]`` and ``z`` ``[batch, head, pos, d_head]``."""
        return x + torch.addmm(layer.b_o, z.transpose(1, 2).flatten(2).flatten(0, 1), layer.w_o).view_as(x)

    def _mlp(self, layer: _Layer, x: torch.Tensor) -> torch.Tensor:
        """``x + mlp(ln2(x))`` for ``x`` ``[batch, pos, d_model]``."""
        hidden = torch.addmm(layer.b_in, self._norm(x, layer.ln2).flatten(0, 1), layer.w_in)
        return x + torch.addmm(layer.b_out, self.act(hidden), layer.w_out).view_as(x)

    def _attend(self, layer: int, q, k_t, v, queries: slice):
        """Gated attention of queries at positions ``queries`` over keys ``0..``: ``q`` ``[batch,
        head, query, d_head]``, ``k_t`` ``[batch, head, d_head, key]``, ``v`` ``[batch, head, key,
        d_head]`` -> ``z`` of ``q``'s shape and the open edges per input ``[batch]`` (``None`` when
        not counted)."""
        n_keys = k_t.shape[3]
        scores = edge_gates.scaled_scores(q, k_t)  # [batch, head, q, k]
        pattern = _softmax_(scores.masked_fill(~self.causal[queries, :n_keys], float("-inf")))
        allowed = self.open_allowed[layer][..., queries, :n_keys]  # causal, and open in the edge mask
        if self.gate_bias is not None:
            gates = edge_gates.open_gates(edge_gates.gate_logits_from_scores(scores, self.gate_bias, in_place=True),
                                          allowed)
        else:
            gates = allowed if self.masked else None
        if gates is not None:
            pattern = edge_gates.gated_pattern(pattern, gates, in_place=True)
        counted = edge_gates.count_open_edges(gates.expand_as(pattern)).sum(dim=1) if self.count_edges else None
        return torch.matmul(pattern, v), counted

    def __call__(self, operands: torch.Tensor, tokens: torch.Tensor):
        """``operands`` ``[n, 2]`` and their ``tokens`` ``[n, seq_len]`` (``task.encode_operands``)."""
        task, h, d = self.task, self.n_heads, self.d_head
        n, n_pos = tokens.shape
        n_pre, n_rest, first_answer = self.n_prefix, n_pos - self.n_prefix, task.prompt_len
        prefix_key = operands[:, 0] * 10 ** (task.operand_digits - 1) + operands[:, 1] // 10
        keys, inverse = torch.unique(prefix_key, return_inverse=True)
        first = torch.empty_like(keys).scatter_(0, inverse, torch.arange(n))  # a row holding each prefix
        x_pre = self.embed[tokens[first, :n_pre]] + self.pos[:n_pre]  # [prefixes, n_pre, d_model]
        x = self.embed[tokens[:, n_pre:]] + self.pos[n_pre:]  # [n, n_rest, d_model]
        k_t_all = x.new_empty(n, h, d, n_pos)  # keys transposed, ready for q @ k
        v_all = x.new_empty(n, h, n_pos, d)
        open_edges = torch.zeros(n, len(self.layers), dtype=torch.long) if self.count_edges else None
        for index, layer in enumerate(self.layers):
            last = index == len(self.layers) - 1
            # q, k, v [3, batch, head, pos, d_head]
            qkv_pre = torch.addmm(layer.b_qkv, self._norm(x_pre, layer.ln1).flatten(0, 1), layer.w_qkv) \
                .view(len(keys), n_pre, 3, h, d).permute(2, 0, 3, 1, 4).contiguous()
            qkv = torch.addmm(layer.b_qkv, self._norm(x, layer.ln1).flatten(0, 1), layer.w_qkv) \
                .view(n, n_rest, 3, h, d).permute(2, 0, 3, 1, 4)
            k_t_pre = qkv_pre[1].transpose(-2, -1)
            k_t_all[..., :n_pre], v_all[:, :, :n_pre] = k_t_pre[inverse], qkv_pre[2][inverse]
            k_t_all[..., n_pre:], v_all[:, :, n_pre:] = qkv[1].transpose(-2, -1), qkv[2]
            if not last or self.count_edges:
                z_pre, counted = self._attend(index, qkv_pre[0], k_t_pre, qkv_pre[2], slice(0, n_pre))
                if counted is not None:
                    open_edges[:, index] += counted[inverse]
            # In the last layer only the answer slots go on to the output.
            start = first_answer if last and not self.count_edges else n_pre
            z, counted = self._attend(index, qkv[0][:, :, start - n_pre:].contiguous(), k_t_all, v_all,
                                      slice(start, n_pos))
            if counted is not None:
                open_edges[:, index] += counted
            if last:
                z, x = z[:, :, first_answer - start:], x[:, first_answer - n_pre:]
            else:
                x_pre = self._mlp(layer, self._attention_out(layer, x_pre, z_pre))
            x = self._mlp(layer, self._attention_out(layer, x, z))
        logits = torch.addmm(self.b_u, self._norm(x, self.ln_final).flatten(0, 1), self.w_u)
        return logits.view(n, task.answer_digits, -1), open_edges
