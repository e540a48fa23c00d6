"""Checkpoints: weights, config and metrics in one file, validated when loaded.

A checkpoint is a ``torch.save`` of a plain dict (loadable with ``weights_only=True``)::

    {"format": "sparsecirc.checkpoint/2", "kind": "base", "config": {...ModelConfig...},
     "config_digest": "<sha256 of the config>", "state_dict": {...}, "metrics": {...}, "extra": {...}}

``metrics`` and ``extra`` hold plain data only (str keys; str, int, float, bool, None, lists
and dicts of them), checked before anything is written. The digest catches a config edited
after saving whose weights still have the right shapes (``n_heads=8, d_head=8`` for 4 x 16,
another ``act_fn``), which would load and answer wrong.
"""

from __future__ import annotations

import functools
import hashlib
import json
import pickle
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .files import as_path, write_atomically
from .model import ModelConfig, build_model, config_of
from .sparse_attention import gate_bias_of, unusable_tensor

CHECKPOINT_FORMAT = "sparsecirc.checkpoint/2"  # /2 added the config digest


@dataclass
class Checkpoint:
    config: ModelConfig
    state_dict: dict
    metrics: dict = field(default_factory=dict)
    kind: str = "base"
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if not isinstance(self.config, ModelConfig):
            raise ValueError(f"config must be a ModelConfig, got {type(self.config).__name__}")
        for name in ("state_dict", "metrics", "extra"):
            if not isinstance(getattr(self, name), dict):
                raise ValueError(f"{name} must be a dict, got {type(getattr(self, name)).__name__}")
        if self.kind != ("sparse" if self.config.is_sparse else "base"):
            raise ValueError(f"kind must be 'sparse' for a sparse config and 'base' for a dense one; got "
                             f"{self.kind!r} for {self.config.name}")

    def build(self):
        """A model with these weights."""
        model = build_model(self.config, initialise=False)
        load_weights(model, self.state_dict, self.config)
        model.eval()
        return model


def config_digest(config: ModelConfig) -> str:
    """A fingerprint of ``config``: sha256 of its fields as sorted JSON."""
    return hashlib.sha256(json.dumps(config.to_dict(), sort_keys=True).encode()).hexdigest()


MAX_NESTING = 100  # levels of lists and dicts in metrics and extras (a run's history is 3)


def check_plain_data(value, where: str, _outer: tuple = ()) -> None:
    """Raise ``ValueError`` unless ``value`` is plain data a checkpoint can hold and read back:
    str, int, float, bool, None, or lists/tuples and str-keyed dicts of them, at most
    ``MAX_NESTING`` levels deep and holding no container inside itself."""
    if value is None or type(value) in (str, bool, int, float):  # exact types: a numpy float64 is a float too
        return
    if type(value) in (list, tuple, dict):
        if any(value is outer for outer in _outer):
            raise ValueError(f"{where[:80]} refers back to a list or dict it is part of (a cycle); a checkpoint holds "
                             f"only trees of plain data")
        if len(_outer) == MAX_NESTING:
            raise ValueError(f"{where.split('[')[0]} is nested more than {MAX_NESTING} levels deep; a checkpoint holds "
                             f"plain data at most {MAX_NESTING} levels of lists and dicts deep")
        items = value.items() if type(value) is dict else enumerate(value)
        for key, item in items:
            if type(value) is dict and type(key) is not str:
                raise ValueError(f"{where} has a non-str key {key!r}; checkpoint metrics and extras need str keys")
            check_plain_data(item, f"{where}[{key!r}]", _outer + (value,))
        return
    raise ValueError(f"{where} is a {type(value).__name__}; a checkpoint holds only str, int, float, bool, None "
                     f"and lists or dicts of them (convert it first, e.g. float(x), x.tolist(), str(path))")


def save_checkpoint(path, model, config: ModelConfig | None = None, metrics: dict | None = None, *,
                    kind: str | None = None, extra: dict | None = None, overwrite: bool = False,
                    replace_hint: str = "overwrite=True") -> Path:
    """Save ``model`` with its config and metrics. The config is the model's own
    (:func:`~sparsecirc.model.config_of`: a sparse model's carries its gate bias) and ``kind``
    follows from it (``"sparse"`` or ``"base"``); passing either is only a check that they
    agree, and is needed for a model not built by ``build_model``. An existing file is only
    replaced with ``overwrite=True``; everything is checked before anything is written, and
    the file is written to a fresh temporary name in the same folder, then moved into place
    (:func:`~sparsecirc.files.write_atomically`: a file that appears meanwhile is not replaced
    either). ``replace_hint`` is how the refusal tells the caller to replace a file."""
    path = as_path(path)
    if not isinstance(overwrite, bool):
        raise ValueError(f"overwrite must be True or False, got {overwrite!r}")
    if not isinstance(model, torch.nn.Module):
        raise ValueError(f"model must be a model (a torch.nn.Module, see build_model), got {type(model).__name__}")
    own = config_of(model)
    if config is None:
        if own is None:
            raise ValueError("this model was not built by build_model, so it carries no ModelConfig: pass config=")
        config = own
    elif not isinstance(config, ModelConfig):
        raise ValueError(f"config must be a ModelConfig, got {type(config).__name__}")
    elif own is not None and own != config:
        detail = ", ".join(f"{k}: model {a!r} vs given {b!r}" for k, (a, b) in own.differences(config).items())
        raise ValueError(f"the config given is not this model's own ({detail}); leave config out to save the "
                         f"model's own")
    if path.is_dir():
        raise ValueError(f"{path} is a directory; give a file path such as {path / (config.name + '.pt')}")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists; pass {replace_hint} to replace it, or choose another path")
    expected_kind = "sparse" if config.is_sparse else "base"
    if kind is None:
        kind = expected_kind
    if kind != expected_kind:
        raise ValueError(f"kind must be 'sparse' for a sparse config and 'base' for a dense one; got {kind!r} for "
                         f"{config.name}")
    for name, value in (("metrics", metrics), ("extra", extra)):
        if value is not None and not isinstance(value, dict):
            raise ValueError(f"{name} must be a dict, got {type(value).__name__}")
        check_plain_data(value, name)
    if gate_bias_of(model) != config.gate_bias:
        raise ValueError(f"the model's own gate bias is {gate_bias_of(model)} but the config says {config.gate_bias}; "
                         f"save a sparse model with its sparse config (config.sparse(gate_bias)), a dense one with a dense config")
    check_weights(model.state_dict(), config)  # before copying: a meta or sparse weight cannot be copied to the CPU
    state_dict = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    record = {
        "format": CHECKPOINT_FORMAT,
        "kind": kind,
        "config": config.to_dict(),
        "config_digest": config_digest(config),
        "state_dict": state_dict,
        "metrics": metrics or {},
        "extra": extra or {},
    }
    return write_atomically(path, lambda file: torch.save(record, file), overwrite=overwrite, replace_hint=replace_hint)


def check_archive(path: Path) -> None:
    """Raise ``ValueError`` unless ``path`` is a zip archive of uncompressed records whose sizes
    add up to no more than the file itself, as ``torch.save`` writes it: a compressed record
    could inflate to any size inside ``torch.load`` (a zip bomb), so it is refused unread."""
    size = path.stat().st_size
    try:
        with zipfile.ZipFile(path) as archive:
            records = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError) as err:
        raise ValueError(f"{path} is not a readable sparsecirc checkpoint (corrupt or another format): {err}") from None
    compressed = [r.filename for r in records if r.compress_type != zipfile.ZIP_STORED]
    if compressed:
        raise ValueError(f"{path} holds compressed records ({compressed[:3]}); torch.save never writes them, so this "
                         f"file was not written by sparsecirc and is refused unread")
    declared = sum(r.file_size for r in records)
    if declared > size or any(r.file_size != r.compress_size for r in records):
        raise ValueError(f"{path}: its records declare {declared:,} bytes in a file of {size:,}; refused unread")


def read_checkpoint(path) -> Checkpoint:
    """Read and validate a checkpoint file (format, config and its digest, weight names, shapes
    and types)."""
    path = as_path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}" + (" (it is a directory)" if path.is_dir() else ""))
    check_archive(path)
    try:
        record = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError) as err:
        raise ValueError(f"{path} is not a readable sparsecirc checkpoint (corrupt or another format): {err}") from None
    if isinstance(record, dict) and record.get("format") == "sparsecirc.checkpoint/1":
        raise ValueError(f"{path} was written by an older sparsecirc (format 'sparsecirc.checkpoint/1', without a "
                         f"config digest); train or sparsify it again to get a {CHECKPOINT_FORMAT!r} file")
    if not isinstance(record, dict) or record.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a sparsecirc checkpoint (expected format {CHECKPOINT_FORMAT!r})")
    missing = [key for key in ("config", "config_digest", "state_dict") if key not in record]
    if missing:
        raise ValueError(f"{path} is not a complete sparsecirc checkpoint: it lacks {missing}")
    if not isinstance(record["config"], dict) or not isinstance(record["state_dict"], dict):
        raise ValueError(f"{path}: config and state_dict must be dicts")
    try:
        config = ModelConfig.from_dict(record["config"])
    except (TypeError, ValueError) as err:
        raise ValueError(f"{path}: the config cannot be read: {err}") from None
    kind = record.get("kind", "base")
    if kind != ("sparse" if config.is_sparse else "base"):
        raise ValueError(f"{path}: kind {kind!r} does not match its config {config.name}")
    if record["config_digest"] != config_digest(config):
        raise ValueError(f"{path}: the config does not match the one the weights were saved with "
                         f"(edited after saving?); refusing to load weights under another config")
    for name in ("metrics", "extra"):
        if not isinstance(record.get(name, {}), dict):
            raise ValueError(f"{path}: {name} must be a dict")
    checkpoint = Checkpoint(config, record["state_dict"], record.get("metrics", {}),
                            record.get("kind", "base"), record.get("extra", {}))
    check_weights(checkpoint.state_dict, config, source=str(path))
    return checkpoint


@functools.lru_cache(maxsize=16)
def _expected_weights(config: ModelConfig) -> dict:
    """``{name: (shape, dtype)}`` of a ``config`` model's weights (built once per config)."""
    return {name: (tuple(value.shape), value.dtype) for name, value in build_model(config.dense(), initialise=False).state_dict().items()}


def check_weights(state_dict: dict, config: ModelConfig, source: str = "state dict") -> None:
    """Raise ``ValueError`` unless ``state_dict`` has exactly the weights of ``config``: str
    names; dense tensors on a real device (not sparse, not ``meta``), checked before any value;
    the same names and shapes; finite floating-point values."""
    expected = _expected_weights(config)
    not_names = [name for name in state_dict if type(name) is not str]
    if not_names:
        raise ValueError(f"{source}: weight names {not_names[:5]!r} are not str; weights are named by str, "
                         f"e.g. 'embed.weight'")
    not_tensors = sorted(k for k, v in state_dict.items() if not isinstance(v, torch.Tensor))
    if not_tensors:
        raise ValueError(f"{source}: weights {not_tensors[:5]} are not tensors")
    unusable = [(k, unusable_tensor(v)) for k, v in state_dict.items() if unusable_tensor(v)]
    if unusable:
        (name, why), more = unusable[0], f" (and {len(unusable) - 1} more weights)" if len(unusable) > 1 else ""
        raise ValueError(f"{source}: weight {name!r} is {why}{more}; weights must be dense (strided) tensors on a "
                         f"real device such as the CPU")
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{source} does not match config {config.name}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    wrong = [k for k, (shape, dtype) in expected.items() if shape != tuple(state_dict[k].shape)
             or dtype != state_dict[k].dtype]
    if wrong:
        raise ValueError(f"{source}: weight shapes or dtypes differ from config {config.name} for {wrong[:5]}")
    not_finite = [k for k, v in state_dict.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if not_finite:
        raise ValueError(f"{source}: weights {not_finite[:5]} hold NaN or infinite values")


def load_weights(model, state_dict: dict, config: ModelConfig) -> None:
    check_weights(state_dict, config)
    model.load_state_dict(state_dict)


def load_checkpoint(path, expected_config: ModelConfig | None = None):
    """``(model, checkpoint)`` from ``path``. With ``expected_config``, a checkpoint of any
    other config raises ``ValueError`` naming the fields that differ."""
    if expected_config is not None and not isinstance(expected_config, ModelConfig):
        raise ValueError(f"expected_config must be a ModelConfig or None, got {type(expected_config).__name__}")
    checkpoint = read_checkpoint(path)
    if expected_config is not None and checkpoint.config != expected_config:
        diffs = checkpoint.config.differences(expected_config)
        detail = ", ".join(f"{k}: checkpoint {a!r} vs expected {b!r}" for k, (a, b) in diffs.items())
        raise ValueError(f"{path} was saved for config {checkpoint.config.name}, not the expected one ({detail})")
    return checkpoint.build(), checkpoint
