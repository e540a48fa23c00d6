"""Small checks shared by the doors of the package."""

from __future__ import annotations

import operator


def as_int(value) -> int | None:
    """``value`` as an int if it is an integer (an int or a numpy integer, not a bool), else ``None``."""
    if isinstance(value, bool):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None
