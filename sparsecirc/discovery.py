"""Circuit discovery on attention edges, beside the circuit read off a sparse model's gates.

The unit is the sparse model's own: an attention edge (layer, head, query, key), the term
``A_qk v_k`` that key ``k`` adds to query ``q``'s head output (:mod:`.patching`). A *circuit* is
a keep mask ``[layer, head, query, key]``. Its faithfulness is the field's measure (ACDC,
EAP-IG, Edge Pruning)::

    faithfulness = (m(circuit) - m(empty)) / (m(full) - m(empty))

where ``m`` is the mean logit difference of notebook 05 on clean/corrupted pairs and
``m(circuit)`` runs the clean problems with every edge outside the circuit patched at once, to
its corrupted value (``ablation="corrupt"``) or to its mean (``"mean"``; see
:class:`~sparsecirc.circuit_size.Patcher`). MLPs and embeddings are not edges: they recompute
from what reaches them. Methods:

- :func:`attribution_scores`: EAP, one gradient per pair, and with ``ig_steps`` > 1 EAP-IG
  (integrated gradients between the corrupted and the clean embeddings);
- :func:`acdc`: the greedy search, removing edges in reverse topological order while the
  faithfulness lost stays under a threshold;
- :func:`read_off`: a sparse model's open edges, no search at all.

EAP and EAP-IG rank edges; the circuit of size ``n`` is the top ``n`` by ``|score|``
(:func:`faithfulness_curve`, :func:`edges_needed`).
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from .checks import as_int
from .circuit_size import Patcher, needed_for, top_edges
from .gates import causal_mask, n_causal_pairs
from .patching import PatchingPairs, logit_difference, record_attention
from .evaluation import check_task
from .sparse_attention import gate_bias_of

LEVELS = (0.8, 0.9, 0.95)
MAX_IG_STEPS = 1000
IG_STEPS = (5, 20)  # EAP-IG's step counts in discover
ACDC_THRESHOLDS = (0.0003, 0.001, 0.003, 0.01)  # ACDC's thresholds in discover


def _check_patcher(patcher) -> Patcher:
    if not isinstance(patcher, Patcher):
        raise ValueError(f"patcher must be a sparsecirc.circuit_size.Patcher (Patcher(model, pairs)), got "
                         f"{type(patcher).__name__}")
    return patcher


def _endpoints(patcher: Patcher) -> tuple[float, float]:
    """m(all) and m(empty), or ``ValueError`` if they are equal (faithfulness is then undefined)."""
    full, empty = patcher.endpoints()
    if math.isclose(full, empty, rel_tol=0, abs_tol=1e-6):
        raise ValueError(f"the metric is the same with every edge kept and with none ({full:.4g}): faithfulness is "
                         f"undefined on these pairs")
    return full, empty


def check_circuit(patcher: Patcher, circuit) -> torch.Tensor:
    """``circuit`` as a float keep mask ``[variant, layer, head, query, key]``; ``ValueError`` unless
    it is a tensor of 0s and 1s (or booleans) of shape ``[layer, head, query, key]`` or with a
    leading variant dim, keeping only causal edges (key <= query)."""
    shape = tuple(patcher.shape)
    if not isinstance(circuit, torch.Tensor):
        raise ValueError(f"a circuit must be a tensor [layer, head, query, key] = {list(shape)} of 0s and 1s, got "
                         f"{type(circuit).__name__}")
    mask = circuit[None] if circuit.ndim == 4 else circuit
    if mask.ndim != 5 or tuple(mask.shape[1:]) != shape or len(mask) == 0:
        raise ValueError(f"a circuit must be [layer, head, query, key] = {list(shape)} (or [n, ...] for several), got "
                         f"shape {list(circuit.shape)}")
    if mask.dtype != torch.bool and not ((mask == 0) | (mask == 1)).all():
        raise ValueError("a circuit must hold only 0 (edge outside the circuit) and 1 (edge in it)")
    outside = ~causal_mask(shape[-1], mask.device)
    if mask[..., outside].any():
        raise ValueError("a circuit keeps an edge from a later key to an earlier query, which no model has (only key "
                         "<= query)")
    return mask.float()


def faithfulness(patcher: Patcher, circuit: torch.Tensor) -> torch.Tensor:
    """Faithfulness of each circuit (see the module docstring): ``[variant]``, 1 for every edge
    kept and 0 for none."""
    mask = check_circuit(_check_patcher(patcher), circuit)
    full, empty = _endpoints(patcher)
    return (patcher.run(mask, desc="faithfulness") - empty) / (full - empty)


def faithfulness_curve(patcher: Patcher, scores: torch.Tensor, ks: list[int]) -> torch.Tensor:
    """Faithfulness of the top-``k`` edges by ``|scores|`` (``[layer, head, query, key]``) for each ``k``."""
    _check_patcher(patcher)
    if not isinstance(scores, torch.Tensor) or tuple(scores.shape) != tuple(patcher.shape):
        raise ValueError(f"scores must be a tensor [layer, head, query, key] = {list(patcher.shape)}, got "
                         f"{list(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__}")
    if not torch.isfinite(scores).all():
        raise ValueError("scores must be finite numbers")
    n_edges = n_attention_edges(patcher)
    checked = [as_int(k) for k in ks] if isinstance(ks, (list, tuple, range)) else None
    if not checked or any(k is None or not 0 <= k <= n_edges for k in checked):
        raise ValueError(f"ks must be a non-empty list of int edge counts in 0..{n_edges} (the causal edges), got "
                         f"{ks!r:.60}")
    return faithfulness(patcher, top_edges(scores, checked, causal_mask(scores.shape[-1], scores.device)))


def n_attention_edges(patcher: Patcher) -> int:
    """Causal attention edges of the patcher's model on its pairs: layers x heads x (key <= query) pairs."""
    n_layers, n_heads, seq_len, _ = patcher.shape
    return n_layers * n_heads * n_causal_pairs(seq_len)


def size_grid(n_edges: int) -> list[int]:
    """Circuit sizes to evaluate: every count to 64, then about 5% apart, up to ``n_edges``."""
    return sorted(k for k in set(range(65)) | {round(1.05 ** i) for i in range(200)} | {n_edges} if k <= n_edges)


def edges_needed(ks: list[int], curve: torch.Tensor, levels=LEVELS) -> dict[float, int | None]:
    """The smallest size in ``ks`` whose faithfulness reaches each level (``None``: none does)."""
    return {level: needed_for(list(ks), curve, level) for level in levels}


@contextmanager
def _eval_mode(model):
    was_training = model.training
    try:
        model.eval()
        yield
    finally:
        model.train(was_training)


def attribution_scores(model, pairs: PatchingPairs, ig_steps: int = 1) -> torch.Tensor:
    """EAP scores of every attention edge ``[layer, head, query, key]``, mean over pairs.

    The score of edge (l, h, q, k) on a pair is ``(A_qk v_k (clean) - A'_qk v'_k (corrupted)) .
    dm/dz_q``, the linear estimate of what patching that one term changes, with the gradient of
    the pair's logit difference at head (l, h)'s output ``z`` at query q. With ``ig_steps=1``
    the gradient is taken on the corrupted run, as TransformerLens' ``attribution_patch`` does,
    so summing over keys gives its node score of head (l, h) at position q. With ``ig_steps=k``
    (EAP-IG) it is the mean gradient over the token embeddings ``corrupted + (i/k)(clean -
    corrupted)``, ``i = 0..k-1``. The model runs with its own gates: a sparse model's edge
    closed on both problems of every pair scores exactly 0.
    """
    if not isinstance(pairs, PatchingPairs):
        raise ValueError(f"pairs must be PatchingPairs (see make_pairs), got {type(pairs).__name__}")
    steps = as_int(ig_steps)
    if steps is None or not 1 <= steps <= MAX_IG_STEPS:
        raise ValueError(f"ig_steps must be an int in 1..{MAX_IG_STEPS} (1: EAP), got {ig_steps!r:.40}")
    check_task(model, pairs.task)
    clean_tokens, corrupted_tokens, clean_targets, corrupted_targets = pairs.tokens()
    clean, corrupted = record_attention(model, clean_tokens), record_attention(model, corrupted_tokens)
    n_layers = model.cfg.n_layers
    embedded = []  # the token embeddings of the clean and corrupted problems, in one pass
    with torch.no_grad(), _eval_mode(model), model.hooks(fwd_hooks=[("hook_embed", lambda e, hook: embedded.append(e))]):
        model(torch.cat([clean_tokens, corrupted_tokens]))
    embeddings = dict(zip(("clean", "corrupted"), embedded[0].split(len(pairs))))
    grads = torch.zeros_like(clean["v"])  # [pair, layer, pos, head, d_head]: dm/dz, summed over the steps
    for step in range(steps):
        alpha = step / steps
        mixed = embeddings["corrupted"] + alpha * (embeddings["clean"] - embeddings["corrupted"])
        outputs = [None] * n_layers

        def keep_z(layer):
            def hook(z, hook):
                outputs[layer] = z
            return hook

        hooks = [("hook_embed", lambda embedding, hook: mixed)]
        hooks += [(f"blocks.{layer}.attn.hook_z", keep_z(layer)) for layer in range(n_layers)]
        with torch.enable_grad(), _eval_mode(model), model.hooks(fwd_hooks=hooks):
            logits = model(clean_tokens)
            metric = logit_difference(logits[:, pairs.task.prompt_len:], clean_targets, corrupted_targets).sum()
            for layer, grad in enumerate(torch.autograd.grad(metric, outputs)):
                grads[:, layer] += grad
    grads /= steps
    # sum over pairs and d_head of (term_clean - term_corrupted) . grad, each term A_qk v_k
    score = (torch.einsum("blhqk,blkhd,blqhd->lhqk", clean["A"], clean["v"], grads)
             - torch.einsum("blhqk,blkhd,blqhd->lhqk", corrupted["A"], corrupted["v"], grads))
    return score / len(pairs)


def _is_sparse(patcher: Patcher) -> bool:
    gating = patcher.gating
    return not gating["dense"] and (gating["gate_bias"] is not None or gate_bias_of(patcher.model) is not None)


def read_off(patcher: Patcher) -> torch.Tensor:
    """The sparse model's circuit on the patcher's pairs, with no search: every edge open on the
    clean or the corrupted problem of some pair ``[layer, head, query, key]`` (booleans). Every
    other edge carries nothing in either run, so patching it changes nothing."""
    if not _is_sparse(_check_patcher(patcher)):
        raise ValueError("read_off needs a sparse model (one with gates): a dense model's every causal edge is open")
    return patcher.edge_candidates()


def open_edges_per_input(patcher: Patcher) -> float:
    """Mean number of open edges on one clean problem of the pairs (the sparse model's per-input circuit)."""
    if not _is_sparse(_check_patcher(patcher)):
        raise ValueError("open_edges_per_input needs a sparse model (one with gates)")
    return float((patcher.clean_run["A"] > 0).sum(dim=(1, 2, 3, 4)).float().mean())


@dataclass
class ACDCResult:
    """The circuit ACDC kept ``[layer, head, query, key]`` (booleans), its ``faithfulness``, the
    ``threshold``, how many edges were ``tested`` and the ``seconds`` it took."""

    circuit: torch.Tensor
    faithfulness: float
    threshold: float
    tested: int
    seconds: float

    @property
    def n_edges(self) -> int:
        return int(self.circuit.sum())


def acdc(patcher: Patcher, threshold: float, progress: bool = True) -> ACDCResult:
    """ACDC's greedy search over attention edges (Conmy et al. 2023).

    Start from every edge; visit the edges in reverse topological order (last layer first; in a
    layer, head by head, last query and key first) and remove each one for good if the
    faithfulness lost by removing it, given everything removed so far, is below ``threshold``
    (a fraction of the full effect, in [0, 1)). The rule is one-sided, as ACDC's: a removal
    that raises the metric is always accepted, so faithfulness can end above 1. Edges that carry
    no attention in any run of the pairs (a sparse model's closed ones) change nothing when
    patched and are removed untested.
    """
    _check_patcher(patcher)
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 <= threshold < 1:
        raise ValueError(f"threshold must be a number in [0, 1) (faithfulness an edge may cost), got {threshold!r:.40}")
    start = time.perf_counter()
    full, empty = _endpoints(patcher)
    current = patcher.edge_candidates().clone()
    order = sorted(map(tuple, current.nonzero().tolist()), key=lambda e: (-e[0], e[1], -e[2], -e[3]))
    kept = float(patcher.run(current.float()[None], desc="ACDC")[0])
    for edge in tqdm(order, desc="ACDC", disable=not progress, mininterval=1.0):
        current[edge] = False
        without = float(patcher.run(current.float()[None], desc="ACDC")[0])
        if (kept - without) / (full - empty) < threshold:
            kept = without
        else:
            current[edge] = True
    return ACDCResult(current, (kept - empty) / (full - empty), float(threshold), len(order),
                      time.perf_counter() - start)


ResidualEdge = tuple  # (writer Node, reader Node) as TransformerLens' enumerate_edges gives them


def _pair_metric(pairs: PatchingPairs, n: int, clean_targets, corrupted_targets):
    def metric(logits):  # [1, pos, vocab] -> the logit difference of pair n
        return logit_difference(logits[:, pairs.task.prompt_len:], clean_targets[n:n + 1], corrupted_targets[n:n + 1]).sum()
    return metric


def residual_edge_scores(model, pairs: PatchingPairs) -> tuple[list[ResidualEdge], torch.Tensor]:
    """EAP over the field's unit, residual edges from a writer (embedding, head output, MLP output
    at a position) to a reader (a head's q, k or v input, an MLP's input, the logits) at the same
    position: TransformerLens' ``attribution_patch`` at edge granularity, pair by pair (the
    library takes one metric per example), averaged. Returns the edges, in the library's order,
    and their mean scores ``[edge]``."""
    from transformer_lens.tools.analysis.attribution_patching import EdgeAttributionConfig, attribution_patch

    if not isinstance(pairs, PatchingPairs):
        raise ValueError(f"pairs must be PatchingPairs (see make_pairs), got {type(pairs).__name__}")
    check_task(model, pairs.task)
    clean, corrupted, clean_targets, corrupted_targets = pairs.tokens()
    totals: dict = {}
    with _eval_mode(model):
        for n in range(len(pairs)):
            result = attribution_patch(model, clean[n:n + 1], corrupted[n:n + 1],
                                       _pair_metric(pairs, n, clean_targets, corrupted_targets),
                                       EdgeAttributionConfig(granularity="edge"))
            for edge, score in result.edge_scores.items():
                totals[edge] = totals.get(edge, 0.0) + score
    edges = list(totals)
    return edges, torch.tensor([totals[edge] for edge in edges]) / len(pairs)


def residual_faithfulness(model, pairs: PatchingPairs, circuits: list[list[ResidualEdge]],
                          progress: bool = True) -> list[float]:
    """Faithfulness of each circuit of residual edges (every other edge patched to its corrupted
    value): TransformerLens' ``faithfulness`` pair by pair, then ``(mean m(circuit) - mean
    m(corrupted)) / (mean m(clean) - mean m(corrupted))`` over the pairs, as for attention edges.
    An empty list is the empty circuit; an edge not in the model's graph is a ``ValueError`` (the
    library's, at the first pair). Everything is a writer here, the embeddings too, so the empty
    circuit is the corrupted run itself."""
    from transformer_lens.tools.analysis.attribution_patching import faithfulness as library_faithfulness

    if not isinstance(pairs, PatchingPairs):
        raise ValueError(f"pairs must be PatchingPairs (see make_pairs), got {type(pairs).__name__}")
    if not isinstance(circuits, (list, tuple)) or not circuits or not all(isinstance(c, (list, tuple)) for c in circuits):
        raise ValueError("circuits must be a non-empty list of circuits, each a list of (writer, reader) edges")
    if any(not isinstance(edge, tuple) or len(edge) not in (2, 3) for circuit in circuits for edge in circuit):
        raise ValueError("each edge of a circuit must be a (writer, reader) pair of TransformerLens Nodes, as "
                         "residual_edge_scores returns them")
    check_task(model, pairs.task)
    clean, corrupted, clean_targets, corrupted_targets = pairs.tokens()
    values = []
    with _eval_mode(model):
        for circuit in tqdm(circuits, desc="residual faithfulness", disable=not progress, mininterval=1.0):
            kept = full = empty = 0.0
            for n in range(len(pairs)):
                result = library_faithfulness(model, clean[n:n + 1], corrupted[n:n + 1],
                                              _pair_metric(pairs, n, clean_targets, corrupted_targets), list(circuit))
                gap = result.full_metric - result.corrupt_metric
                kept += result.corrupt_metric + result.recovered * gap
                full, empty = full + result.full_metric, empty + result.corrupt_metric
            values.append((kept - empty) / (full - empty))
    return values


def describe_residual_edge(edge: ResidualEdge, position_labels: list[str] | None = None) -> str:
    """``'L3H3 output at s0 -> logits at s0'``: a residual edge in words (positions by label if given)."""
    def name(node):
        where = node.position if position_labels is None else position_labels[node.position]
        head = "" if node.head is None else f"H{node.head}"
        what = {"embed": "embedding", "attn_head_out": "output", "mlp_out": "MLP output", "q_input": "q input",
                "k_input": "k input", "v_input": "v input", "mlp_in": "MLP input", "logits": "logits"}[node.kind]
        layer = "" if node.layer is None or node.kind == "logits" else f"L{node.layer}{head} "
        return f"{layer}{what} at {where}"
    return f"{name(edge[0])} -> {name(edge[1])}"


def residual_heads(edges: list[ResidualEdge]) -> set[tuple[int, int]]:
    """The (layer, head) pairs a circuit of residual edges touches: as a writer or a reader."""
    return {(node.layer, node.head) for edge in edges for node in edge[:2] if node.head is not None}


def heads_touched(circuit: torch.Tensor) -> int:
    """Heads with at least one edge in ``circuit`` ``[layer, head, query, key]``."""
    return int(circuit.flatten(2).any(-1).sum())


def jaccard(first: torch.Tensor, second: torch.Tensor) -> float:
    """|first & second| / |first | second| of two circuits (masks of one shape); 1.0 for two empty ones."""
    if not isinstance(first, torch.Tensor) or not isinstance(second, torch.Tensor) or first.shape != second.shape:
        raise ValueError("jaccard needs two circuit masks of the same shape")
    first, second = first.bool(), second.bool()
    union = int((first | second).sum())
    return 1.0 if union == 0 else int((first & second).sum()) / union


@dataclass
class MethodResult:
    """One method on one model. ``sizes`` and ``faithfulness``: its curve (circuit size, in the
    method's ``unit``, against faithfulness with corrupt ablation); ``needed``: the smallest size
    reaching each level (``None``: none does); ``circuit``: the smallest of its circuits reaching
    90% (else its largest), a mask ``[layer, head, query, key]`` or a list of residual edges;
    ``heads``: heads that circuit touches; ``seconds``: the search or scoring time (evaluating
    the curve not counted); ``mean_ablation``: that circuit's faithfulness with mean ablation;
    ``jaccard_read_off``: its overlap with the sparse model's read-off, |C & R| / |C | R| (heads, for
    residual edges); ``contains_read_off``: the share of the read-off it contains, |C & R| / |R|
    (Jaccard alone is small whenever C is much larger than R, even when C contains all of R)."""

    model: str
    method: str
    unit: str
    sizes: list[int]
    faithfulness: list[float]
    needed: dict[float, int | None]
    circuit: object = field(repr=False)
    heads: int
    seconds: float
    mean_ablation: float | None = None
    jaccard_read_off: float | None = None
    contains_read_off: float | None = None

    @classmethod
    def from_row(cls, row: dict) -> "MethodResult":
        """Back from :meth:`row` (as saved by ``benchmarks/discovery.py``), without its circuit."""
        needed = {level: row[f"edges_{round(level * 100)}"] for level in LEVELS}
        return cls(row["model"], row["method"], row["unit"], row["sizes"], row["faithfulness"], needed, None,
                   row["heads"], row["seconds"], row["mean_ablation"], row["jaccard_read_off"],
                   row.get("contains_read_off"))

    def row(self) -> dict:
        """A JSON-ready summary (no circuit)."""
        return {"model": self.model, "method": self.method, "unit": self.unit,
                **{f"edges_{round(level * 100)}": n for level, n in self.needed.items()}, "heads": self.heads,
                "seconds": round(self.seconds, 2), "mean_ablation": self.mean_ablation,
                "jaccard_read_off": self.jaccard_read_off, "contains_read_off": self.contains_read_off,
                "sizes": self.sizes,
                "faithfulness": [round(value, 4) for value in self.faithfulness]}


def _from_points(points: list[tuple[int, float, object]], levels=LEVELS):
    """(size, faithfulness, circuit) points -> needed per level and the circuit at 90% (else the largest)."""
    points = sorted(points, key=lambda point: point[0])
    needed = {level: next((size for size, value, _ in points if value >= level), None) for level in levels}
    at_90 = next((circuit for size, value, circuit in points if value >= 0.9), points[-1][2])
    return needed, at_90


def _check_options(ig_steps, acdc_thresholds) -> None:
    if not isinstance(ig_steps, (list, tuple)) or any(as_int(k) is None or not 2 <= as_int(k) <= MAX_IG_STEPS
                                                      for k in ig_steps):
        raise ValueError(f"ig_steps must be a list of ints in 2..{MAX_IG_STEPS} (EAP itself is k = 1), got "
                         f"{ig_steps!r:.40}")
    if not isinstance(acdc_thresholds, (list, tuple)) or not acdc_thresholds or any(
            isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 <= t < 1 for t in acdc_thresholds):
        raise ValueError(f"acdc_thresholds must be a non-empty list of numbers in [0, 1), got {acdc_thresholds!r:.40}")


def attention_discovery(model, pairs: PatchingPairs, name: str, *, ig_steps=IG_STEPS,
                        acdc_thresholds=ACDC_THRESHOLDS, progress: bool = True) -> list[MethodResult]:
    """EAP, EAP-IG (each ``ig_steps``), ACDC (each threshold) and, on a sparse model, the read-off,
    at the attention-edge unit on ``pairs``."""
    _check_options(ig_steps, acdc_thresholds)
    patcher, means = Patcher(model, pairs, progress=False), Patcher(model, pairs, progress=False, ablation="mean")
    ks = size_grid(n_attention_edges(patcher))
    results = []

    def result(method, sizes, values, needed, circuit, seconds):
        mean = float(faithfulness(means, circuit)[0])
        results.append(MethodResult(name, method, "attention edge", list(sizes), [float(v) for v in values], needed,
                                    circuit.bool(), heads_touched(circuit), seconds, mean))

    for steps in (1, *ig_steps):
        start = time.perf_counter()
        scores = attribution_scores(model, pairs, steps)
        seconds = time.perf_counter() - start
        curve = faithfulness_curve(patcher, scores, ks)
        needed = edges_needed(ks, curve)
        size = needed[0.9] if needed[0.9] is not None else ks[-1]
        circuit = top_edges(scores, [size], causal_mask(scores.shape[-1]))[0]
        result("EAP" if steps == 1 else f"EAP-IG (k={steps})", ks, curve.tolist(), needed, circuit, seconds)
    found = [acdc(patcher, threshold, progress=progress) for threshold in acdc_thresholds]
    needed, circuit = _from_points([(f.n_edges, f.faithfulness, f.circuit) for f in found])
    found.sort(key=lambda f: f.n_edges)
    result("ACDC", [f.n_edges for f in found], [f.faithfulness for f in found], needed, circuit.float(),
           sum(f.seconds for f in found))
    if _is_sparse(patcher):
        start = time.perf_counter()
        circuit = read_off(patcher)
        seconds = time.perf_counter() - start
        value = float(faithfulness(patcher, circuit)[0])
        size = int(circuit.sum())
        result("read-off", [size], [value], {level: size if value >= level else None for level in LEVELS},
               circuit.float(), seconds)
    return results


def residual_sizes(n_edges: int) -> list[int]:
    """Residual-circuit sizes to evaluate: 0, then about 1.5x apart, up to ``n_edges``."""
    return sorted({0, n_edges} | {round(1.5 ** i) for i in range(40) if 1.5 ** i < n_edges})


def residual_discovery(model, pairs: PatchingPairs, name: str, progress: bool = True) -> MethodResult:
    """EAP over residual edges (TransformerLens' own) and its faithfulness curve on ``pairs``."""
    start = time.perf_counter()
    edges, scores = residual_edge_scores(model, pairs)
    seconds = time.perf_counter() - start
    order = scores.abs().argsort(descending=True, stable=True).tolist()
    # only edges with a score are ranked: the order among zeros would be the library's index order.
    # (A sparse model's gates pass no gradient, so an edge that matters by flipping a gate scores 0.)
    scored = int((scores != 0).sum())
    sizes = sorted(set(residual_sizes(scored)) | {len(edges)})
    circuits = [[edges[i] for i in order[:size]] for size in sizes]
    values = residual_faithfulness(model, pairs, circuits, progress)
    needed, circuit = _from_points(list(zip(sizes, values, circuits)))
    return MethodResult(name, "EAP (TransformerLens)", "residual edge", sizes, values, needed, circuit,
                        len(residual_heads(circuit)), seconds)


def discover(dense, sparse, pairs: PatchingPairs, residual_pairs: PatchingPairs | None = None,
             progress: bool = True, **options) -> list[MethodResult]:
    """Every method on both models (see :func:`attention_discovery`, ``options`` go to it), and,
    with ``residual_pairs``, EAP over residual edges on them; each circuit's overlap with the
    sparse model's read-off is filled in. ``dense`` must run without gates and ``sparse`` with
    them, both built for the pairs' task with the same shape."""
    for name, pair_set in (("pairs", pairs), ("residual_pairs", residual_pairs)):
        if pair_set is not None and not isinstance(pair_set, PatchingPairs):
            raise ValueError(f"{name} must be PatchingPairs (see make_pairs), got {type(pair_set).__name__}")
    if pairs is None:
        raise ValueError("pairs must be PatchingPairs (see make_pairs), got None")
    if residual_pairs is not None and residual_pairs.task != pairs.task:
        raise ValueError("pairs and residual_pairs must be of the same task")
    for model in (dense, sparse):
        check_task(model, pairs.task)
    if gate_bias_of(dense) is not None or gate_bias_of(sparse) is None:
        raise ValueError(f"dense must be a model without gates and sparse one with them; got gate biases "
                         f"{gate_bias_of(dense)} (dense) and {gate_bias_of(sparse)} (sparse)")
    if (dense.cfg.n_layers, dense.cfg.n_heads) != (sparse.cfg.n_layers, sparse.cfg.n_heads):
        raise ValueError("dense and sparse must have the same layers and heads (the read-off is compared edge by edge)")
    unknown = set(options) - {"ig_steps", "acdc_thresholds"}
    if unknown:
        raise ValueError(f"unknown options {sorted(unknown)}; discover takes ig_steps and acdc_thresholds")
    results = attention_discovery(dense, pairs, "dense", progress=progress, **options)  # checks the options first
    results += attention_discovery(sparse, pairs, "sparse", progress=progress, **options)
    if residual_pairs is not None:
        results += [residual_discovery(dense, residual_pairs, "dense", progress),
                    residual_discovery(sparse, residual_pairs, "sparse", progress)]
    read = next(r.circuit for r in results if r.method == "read-off")
    read_heads = {tuple(head) for head in read.flatten(2).any(-1).nonzero().tolist()}
    for r in results:
        if r.unit == "attention edge":
            r.jaccard_read_off = jaccard(r.circuit, read)
            r.contains_read_off = int((r.circuit & read).sum()) / max(1, int(read.sum()))
        else:
            heads = residual_heads(r.circuit)
            r.jaccard_read_off = len(heads & read_heads) / max(1, len(heads | read_heads))
            r.contains_read_off = len(heads & read_heads) / max(1, len(read_heads))
    return results


def check_attention_scores(yours, model, pairs: PatchingPairs) -> str:
    """For the exercise of notebook 07: compare your EAP scores with :func:`attribution_scores`
    and say what is wrong, or ``"correct"``."""
    if yours is None:
        return "not yet: your function returned None; it should return a tensor [layer, head, query, key]"
    expected = attribution_scores(model, pairs)
    if not isinstance(yours, torch.Tensor):
        return f"not yet: expected a tensor, got {type(yours).__name__}"
    if tuple(yours.shape) != tuple(expected.shape):
        return f"not yet: expected shape [layer, head, query, key] = {list(expected.shape)}, got {list(yours.shape)}"
    if torch.allclose(yours, -expected, rtol=1e-3, atol=1e-5) and expected.abs().max() > 0:
        return "almost: the sign is flipped; the difference is (clean term - corrupted term) . gradient"
    if torch.allclose(yours * len(pairs), expected, rtol=1e-3, atol=1e-5) or \
            torch.allclose(yours, expected * len(pairs), rtol=1e-3, atol=1e-5):
        return f"almost: off by a factor of {len(pairs)} pairs; take the mean over pairs"
    if not torch.allclose(yours, expected, rtol=1e-3, atol=1e-5):
        worst = (yours - expected).abs().argmax().item()
        index = list(torch.unravel_index(torch.tensor(worst), expected.shape))
        return (f"not yet: edge (layer, head, query, key) = {[int(i) for i in index]} scores "
                f"{yours.flatten()[worst].item():.4g}, expected {expected.flatten()[worst].item():.4g}")
    return "correct"


def check_top_edges_faithfulness(yours, patcher: Patcher, scores: torch.Tensor, n: int) -> str:
    """For the second exercise of notebook 07: is ``yours`` the faithfulness of the top ``n`` edges
    by ``|scores|``? Says what is wrong, or ``"correct"``."""
    if yours is None:
        return "not yet: at_same_size is None; it should be the faithfulness (a number) of the top-n circuit"
    if isinstance(yours, torch.Tensor) and yours.numel() == 1:
        yours = yours.item()
    if isinstance(yours, bool) or not isinstance(yours, (int, float)):
        return f"not yet: expected a number, got {type(yours).__name__} (a tensor of several values? take .item())"
    expected = faithfulness_curve(patcher, scores, [n]).item()
    if abs(yours - expected) <= 1e-4:
        return "correct"
    by_signed = faithfulness(patcher, top_edges(scores.clamp(min=0), [n], causal_mask(scores.shape[-1]))).item()
    if abs(yours - by_signed) <= 1e-4:
        return "almost: rank the edges by the size of their score, |score|, not by its signed value"
    return (f"not yet: got {yours:.4f}, expected {expected:.4f}: keep the {n} edges of largest |score| and patch "
            f"every other edge (discovery.faithfulness_curve does both)")
