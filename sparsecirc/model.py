"""The model's config: a dataclass, and the :class:`~sparsecirc.transformer.GatedTransformer` it builds."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace

import torch

from .data import AdditionTask
from .sparse_attention import NativeGating, gate_bias_of, set_gate_bias
from .transformer import GatedTransformer, bridge_config, native_initial_weights


SIZE_LIMITS = {"n_layers": 48, "n_heads": 64, "d_head": 256, "d_model": 4096, "d_mlp": 16384}
MAX_PARAMETERS = 100_000_000


@dataclass(frozen=True)
class ModelConfig:
    """Everything that fixes a model's shape and initial weights.

    Defaults: 4 layers as in the paper's Figure 1, 4 heads of 16 dims each, d_model 64,
    d_mlp 256, ReLU MLPs, LayerNorm, learned absolute positions (about 200k parameters).
    """

    operand_digits: int = 2
    answer_digits: int = 5
    n_layers: int = 4
    n_heads: int = 4
    d_head: int = 16
    d_model: int = 64
    d_mlp: int = 256
    act_fn: str = "relu"
    seed: int = 0
    gate_bias: float | None = None  # None: dense attention; a number: a sparse model, gated with this bias

    def __post_init__(self):
        self.task  # validates the widths
        for name, largest in SIZE_LIMITS.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
            if value > largest:  # checked before anything is built: a tiny file cannot ask for hours of work
                raise ValueError(f"{name} must be at most {largest} (a model for a laptop CPU), got {value}")
        if self.approximate_parameters > MAX_PARAMETERS:
            raise ValueError(f"this config has about {self.approximate_parameters:,} parameters; at most "
                             f"{MAX_PARAMETERS:,} are allowed (a model for a laptop CPU)")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**63:
            raise ValueError(f"seed must be an int in 0..2**63-1, got {self.seed!r}")
        if self.gate_bias is not None and (isinstance(self.gate_bias, bool) or not isinstance(self.gate_bias, (int, float))
                                           or not math.isfinite(self.gate_bias)):
            raise ValueError(f"gate_bias must be None (dense) or a finite number, got {self.gate_bias!r}")
        if self.act_fn not in ("relu", "gelu", "gelu_new", "silu"):
            raise ValueError(f"act_fn must be one of relu, gelu, gelu_new, silu; got {self.act_fn!r}")

    @property
    def approximate_parameters(self) -> int:
        """Weights of the attention and MLP layers (biases, norms and embeddings left out)."""
        return self.n_layers * (4 * self.d_model * self.n_heads * self.d_head + 2 * self.d_model * self.d_mlp)

    @property
    def task(self) -> AdditionTask:
        return AdditionTask(self.operand_digits, self.answer_digits)

    @property
    def is_sparse(self) -> bool:
        return self.gate_bias is not None

    @property
    def name(self) -> str:
        """E.g. ``add_d2_l4_h4`` (dense) or ``add_d2_l4_h4_sparse``: task digits, layers, heads."""
        return f"add_d{self.operand_digits}_l{self.n_layers}_h{self.n_heads}" + ("_sparse" if self.is_sparse else "")

    def dense(self) -> "ModelConfig":
        """The same model without gates."""
        return replace(self, gate_bias=None)

    def sparse(self, gate_bias: float) -> "ModelConfig":
        if isinstance(gate_bias, bool) or not isinstance(gate_bias, (int, float)):
            raise ValueError(f"a sparse config needs a finite number as gate_bias, got {gate_bias!r}")
        return replace(self, gate_bias=float(gate_bias))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, record: dict) -> "ModelConfig":
        if not isinstance(record, dict):
            raise ValueError(f"a model config record must be a dict of fields, got {type(record).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = set(record) - known
        if unknown:
            raise ValueError(f"unknown model config fields {sorted(unknown)}; known: {sorted(known)}")
        return cls(**record)

    def differences(self, other: "ModelConfig") -> dict[str, tuple]:
        """``{field: (self value, other value)}`` for every field that differs."""
        mine, theirs = self.to_dict(), other.to_dict()
        return {k: (mine[k], theirs[k]) for k in mine if mine[k] != theirs[k]}


def build_model(config: ModelConfig = ModelConfig(), initialise: bool = True) -> GatedTransformer:
    """A freshly initialised :class:`~sparsecirc.transformer.GatedTransformer` for ``config``
    (CPU, float32), a TransformerLens ``HookedRootModule``.

    Input ``[batch, seq_len]`` token ids; output logits ``[batch, seq_len, d_vocab=13]``.
    The same ``config.seed`` gives the same weights (those of TransformerLens' ``boot_native``)
    without touching the global RNG. A sparse config (``gate_bias`` set) gives a sparse model:
    every forward pass runs with its gates. ``initialise=False`` skips the initialisation, for
    weights about to be loaded.
    """
    if not isinstance(config, ModelConfig):
        raise ValueError(f"config must be a ModelConfig, got {type(config).__name__}")
    if not isinstance(initialise, bool):
        raise ValueError(f"initialise must be True or False, got {initialise!r}")
    cfg = bridge_config(config)
    with torch.random.fork_rng(devices=[]):  # nn.Linear's own initialisation would draw from the global RNG
        model = GatedTransformer(cfg, NativeGating(config.n_layers, config.n_heads))
    if initialise:
        model.load_state_dict(native_initial_weights(cfg))
    model.__dict__[_CONFIG_ATTRIBUTE] = config.dense()  # the gate bias lives in the model's gating
    set_gate_bias(model, config.gate_bias)
    return model


_CONFIG_ATTRIBUTE = "_sparsecirc_config"


def config_of(model) -> ModelConfig | None:
    """The :class:`ModelConfig` of a model built by :func:`build_model` (``None`` for any other
    model), with the gate bias the model has now: ``sparsify`` turns a dense model sparse, and
    its config follows. The task, the kind (``is_sparse``) and the name derive from it."""
    built = getattr(model, "__dict__", {}).get(_CONFIG_ATTRIBUTE)
    if built is None:
        return None
    gate_bias = gate_bias_of(model)
    return built if gate_bias is None else built.sparse(gate_bias)


def task_of(model) -> AdditionTask | None:
    """The task ``model`` was built for by :func:`build_model` (``None`` for any other model)."""
    config = config_of(model)
    return None if config is None else config.task


def count_parameters(model) -> int:
    if not isinstance(model, torch.nn.Module):
        raise ValueError(f"count_parameters needs a model (a torch.nn.Module), got {type(model).__name__}")
    return sum(p.numel() for p in model.parameters())
