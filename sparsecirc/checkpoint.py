"""Checkpoints: weights, config and metrics in one file, validated when loaded.

A checkpoint is a ``torch.save`` of a plain dict (loadable with ``weights_only=True``)::

    {"format": "sparsecirc.checkpoint/1", "kind": "base", "config": {...ModelConfig...},
     "state_dict": {...}, "metrics": {...}, "extra": {...}}
"""

from __future__ import annotations

import pickle
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .model import ModelConfig, build_model

CHECKPOINT_FORMAT = "sparsecirc.checkpoint/1"


@dataclass
class Checkpoint:
    config: ModelConfig
    state_dict: dict
    metrics: dict = field(default_factory=dict)
    kind: str = "base"
    extra: dict = field(default_factory=dict)

    def build(self):
        """A model with these weights."""
        model = build_model(self.config)
        load_weights(model, self.state_dict, self.config)
        model.eval()
        return model


def save_checkpoint(path, model, config: ModelConfig, metrics: dict | None = None, *,
                    kind: str = "base", extra: dict | None = None, overwrite: bool = False) -> Path:
    """Save ``model`` with its config and metrics. An existing file is only replaced with
    ``overwrite=True``."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists; pass overwrite=True to replace it, or choose another path")
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "format": CHECKPOINT_FORMAT,
        "kind": kind,
        "config": config.to_dict(),
        "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
        "metrics": metrics or {},
        "extra": extra or {},
    }
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(record, tmp)
    tmp.replace(path)
    return path


def read_checkpoint(path) -> Checkpoint:
    """Read and validate a checkpoint file (format, config fields, weight names and shapes)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        record = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError) as err:
        raise ValueError(f"{path} is not a readable sparsecirc checkpoint (corrupt or another format): {err}") from None
    if not isinstance(record, dict) or record.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a sparsecirc checkpoint (expected format {CHECKPOINT_FORMAT!r})")
    config = ModelConfig.from_dict(record["config"])
    checkpoint = Checkpoint(config, record["state_dict"], record.get("metrics", {}),
                            record.get("kind", "base"), record.get("extra", {}))
    check_weights(checkpoint.state_dict, config, source=str(path))
    return checkpoint


def check_weights(state_dict: dict, config: ModelConfig, source: str = "state dict") -> None:
    expected = build_model(config).state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{source} does not match config {config.name}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    wrong = [k for k in expected if tuple(expected[k].shape) != tuple(state_dict[k].shape)]
    if wrong:
        raise ValueError(f"{source}: weight shapes differ from config {config.name} for {wrong[:5]}")


def load_weights(model, state_dict: dict, config: ModelConfig) -> None:
    check_weights(state_dict, config)
    model.load_state_dict(state_dict)


def load_checkpoint(path, expected_config: ModelConfig | None = None):
    """``(model, checkpoint)`` from ``path``. With ``expected_config``, a checkpoint of any
    other config raises ``ValueError`` naming the fields that differ."""
    checkpoint = read_checkpoint(path)
    if expected_config is not None and checkpoint.config != expected_config:
        diffs = checkpoint.config.differences(expected_config)
        detail = ", ".join(f"{k}: checkpoint {a!r} vs expected {b!r}" for k, (a, b) in diffs.items())
        raise ValueError(f"{path} was saved for config {checkpoint.config.name}, not the expected one ({detail})")
    return checkpoint.build(), checkpoint
