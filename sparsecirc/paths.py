"""Where things live: shipped reference artefacts in ``data/``, run outputs in ``runs/``.

Notebooks and the CLI never write over ``data/``; each notebook run writes into a new
time-stamped folder under ``runs/`` (or under ``$SPARSECIRC_RUNS`` if set, as the tests do).
Notebook 04 draws the README's figures into ``figures/`` (or ``$SPARSECIRC_FIGURES`` if set:
the tests send them to their own throwaway folder, so a test run changes no tracked file).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

_PACKAGE_ROOT = Path(__file__).resolve().parent.parent


def repo_root() -> Path:
    """The checkout holding ``data/`` (the package is installed editable from it)."""
    if (_PACKAGE_ROOT / "pyproject.toml").is_file() and (_PACKAGE_ROOT / "data").is_dir():
        return _PACKAGE_ROOT
    raise FileNotFoundError(
        f"cannot find the sparsecirc checkout with data/ above {Path(__file__).resolve()}; "
        "install the package editable from a clone (pip install -e .)"
    )


def data_dir() -> Path:
    return repo_root() / "data"


SHIPPED_OPERAND_DIGITS = (2, 3)  # the widths with a shipped split and reference models


def _shipped(operand_digits: int) -> int:
    if operand_digits not in SHIPPED_OPERAND_DIGITS:
        raise ValueError(f"reference files are shipped for operand_digits in {SHIPPED_OPERAND_DIGITS}, got {operand_digits!r}")
    return operand_digits


def reference_dataset_path(operand_digits: int = 2) -> Path:
    return data_dir() / f"add_d{_shipped(operand_digits)}_a5.json"


def reference_base_checkpoint_path(operand_digits: int = 2) -> Path:
    return data_dir() / "reference" / f"add_d{_shipped(operand_digits)}_l4_h4_base.pt"


def reference_sparse_checkpoint_path(operand_digits: int = 2) -> Path:
    return data_dir() / "reference" / f"add_d{_shipped(operand_digits)}_l4_h4_sparse.pt"


def portable(path) -> str:
    """``path`` as the CLI prints and records it: relative to the current folder or to the checkout
    if inside either (so nothing it writes names a folder of this machine the caller did not
    name), else as the caller gave it (they named that folder, and need it to find the file)."""
    given = Path(path)
    resolved = given.resolve()
    for root in (Path.cwd(), _PACKAGE_ROOT):
        if resolved.is_relative_to(root.resolve()):
            return resolved.relative_to(root.resolve()).as_posix()
    return str(given)


def figures_dir() -> Path:
    """``figures/``: the pictures notebook 04 draws, tracked so the README can show them
    (``$SPARSECIRC_FIGURES`` instead, if set)."""
    env = os.environ.get("SPARSECIRC_FIGURES")
    return Path(env) if env else repo_root() / "figures"


def runs_root() -> Path:
    env = os.environ.get("SPARSECIRC_RUNS")
    return Path(env) if env else repo_root() / "runs"


def new_run_dir(name: str) -> Path:
    """A new, empty folder ``runs/<name>/<YYYYmmdd-HHMMSS>`` (suffixed if that exists)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = runs_root() / name
    candidate, n = base / stamp, 1
    while candidate.exists():
        n += 1
        candidate = base / f"{stamp}-{n}"
    candidate.mkdir(parents=True)
    return candidate
