"""sparsecirc: sparse attention post-training on a toy addition transformer.

Method: Draye, Lei, Pan, Posner and Schölkopf, "Intrinsically Interpretable Attention via
Sparse Post-Training" (arXiv 2512.05865).

Modules, one idea each:
    data        the addition task: vocabulary, encoding, the dataset split
    model       ModelConfig -> a GatedTransformer that carries it (config_of)
    transformer GatedTransformer: the model, one gated forward pass, TransformerLens hook points
    checkpoint  weights + config + metrics in one validated file
    files       writing safely: writability checked first, temporary file, atomic publish
    training    base training on the answer slots
    evaluation  exact match, per-digit accuracy, loss, failures, open edges
    gates       the gate of one edge: logit, hard sample, straight-through gradient, expectation
    sparse_attention  edge gates: a sparse model's own, and `with sparse_attention(model, mode)`
    sparsify    the constrained (GECO-style) sparse post-training loop
    paths       data/ (shipped) and runs/ (each run's outputs)
    plots       training curves, attention patterns, edge counts
    circuit     one input's circuit as a networkx graph; pruning; edge frequencies
    circuit_plots  Figure-1-style drawings of circuit graphs; saving PNG + SVG
    patching    clean/corrupted pairs, the metric, batched patching of heads, MLPs, edges
    circuit_size  effects, explained-effect curves, heads and edges needed
    discovery   faithfulness; EAP, EAP-IG and ACDC on attention edges beside the sparse read-off
    explorer    one problem through both models, edges closed by hand (ipywidgets)
"""

from .circuit import circuit_graph, edge_frequency, frequency_graph, prune_to_answers, restrict_to_digit
from .circuit_size import Patcher, PatchingEffects, needed_for
from .checkpoint import Checkpoint, load_checkpoint, read_checkpoint, save_checkpoint
from .data import VOCAB, AdditionSplit, AdditionTask, load_split, make_split, save_split
from .evaluation import Evaluation, answer_logits, answer_loss, evaluate, predict
from .patching import PatchingPairs, make_pairs
from .model import ModelConfig, build_model, config_of, count_parameters
from .sparse_attention import (Edge, EdgeGates, analysis_run, gate_bias_of, mask_closing, mask_keeping, set_gate_bias,
                               sparse_attention)
from .sparsify import LagrangeMultiplier, SparsifyConfig, sparsify
from .training import TrainConfig, train
from .transformer import GatedTransformer

__version__ = "0.1.0"

_ON_FIRST_USE = ("Explorer", "ExplorerView", "explore")  # the explorer imports matplotlib and ipywidgets


def __getattr__(name: str):
    if name in _ON_FIRST_USE:
        from . import explorer

        return getattr(explorer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_ON_FIRST_USE))

__all__ = [
    "VOCAB", "AdditionTask", "AdditionSplit", "make_split", "save_split", "load_split",
    "ModelConfig", "build_model", "config_of", "count_parameters", "GatedTransformer",
    "Checkpoint", "save_checkpoint", "read_checkpoint", "load_checkpoint",
    "TrainConfig", "train",
    "Evaluation", "evaluate", "predict", "answer_logits", "answer_loss",
    "Edge", "EdgeGates", "sparse_attention", "analysis_run", "gate_bias_of", "set_gate_bias", "mask_closing",
    "mask_keeping",
    "SparsifyConfig", "LagrangeMultiplier", "sparsify",
    "circuit_graph", "prune_to_answers", "restrict_to_digit", "edge_frequency", "frequency_graph",
    "PatchingPairs", "make_pairs", "Patcher", "PatchingEffects", "needed_for",
    "explore", "ExplorerView", "Explorer",
]
