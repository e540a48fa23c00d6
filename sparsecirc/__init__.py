"""sparsecirc: sparse attention post-training on a toy addition transformer.

Method: Draye, Lei, Pan, Posner and Schölkopf, "Intrinsically Interpretable Attention via
Sparse Post-Training" (arXiv 2512.05865).

Modules, one idea each:
    data        the addition task: vocabulary, encoding, the dataset split
    model       ModelConfig -> a TransformerLens-native TransformerBridge
    checkpoint  weights + config + metrics in one validated file
    training    base training on the answer slots
    evaluation  exact match, per-digit accuracy, loss, failures
    paths       data/ (shipped) and runs/ (each run's outputs)
    plots       loss curves and attention patterns
"""

from .checkpoint import Checkpoint, load_checkpoint, read_checkpoint, save_checkpoint
from .data import VOCAB, AdditionSplit, AdditionTask, load_split, make_split, save_split
from .evaluation import Evaluation, answer_logits, answer_loss, evaluate, predict
from .model import ModelConfig, build_model, count_parameters
from .training import TrainConfig, train

__version__ = "0.1.0"

__all__ = [
    "VOCAB", "AdditionTask", "AdditionSplit", "make_split", "save_split", "load_split",
    "ModelConfig", "build_model", "count_parameters",
    "Checkpoint", "save_checkpoint", "read_checkpoint", "load_checkpoint",
    "TrainConfig", "train",
    "Evaluation", "evaluate", "predict", "answer_logits", "answer_loss",
]
