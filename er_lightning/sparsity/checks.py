"""Argument checks shared by every layer: one message format for the same mistake everywhere.

Each check returns the validated value and raises ``TypeError`` (wrong kind) or ``ValueError`` (out of range),
saying what was given and what is allowed.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

__all__ = ["check_bool", "check_choice", "check_density", "check_int", "check_patterns"]


def check_density(value: object, what: str = "density") -> float:
    """A finite number in (0, 1], the fraction of weights kept (bools rejected)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
        raise ValueError(
            f"{what} must be a finite number in (0, 1] (the fraction of weights kept), got {value!r}"
        )
    if not 0.0 < float(value) <= 1.0:
        raise ValueError(
            f"{what} must be a finite number in (0, 1] (the fraction of weights kept), got {value!r}"
        )
    return float(value)


def check_int(value: object, what: str, minimum: int | None = 1) -> int:
    """An ``int`` (bools rejected), at least ``minimum`` unless that is ``None``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{what} must be an int, got {type(value).__name__} {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{what} must be >= {minimum}, got {value}")
    return value


def check_bool(value: object, what: str) -> bool:
    """``True`` or ``False``; strings such as ``"False"`` and numbers are refused (``bool("False")`` is ``True``)."""
    if not isinstance(value, bool):
        raise TypeError(f"{what} must be True or False, got {type(value).__name__} {value!r}")
    return value


def check_choice(value: object, what: str, allowed: Sequence[str]) -> str:
    """One of ``allowed``; the message lists them."""
    if value not in allowed:
        raise ValueError(f"{what} must be one of {list(allowed)}, got {value!r}")
    return str(value)


def check_patterns(value: object, what: str) -> list[str] | None:
    """``None`` or a list of non-empty glob strings; a bare string is refused (it would be read letter by letter)."""
    if value is None:
        return None
    if isinstance(value, str):
        raise TypeError(
            f"{what} must be a list of glob patterns, got the string {value!r}; write [{value!r}] for one pattern"
        )
    if not isinstance(value, Sequence) or not all(isinstance(p, str) and p for p in value):
        raise TypeError(f"{what} must be a list of non-empty glob strings, got {value!r}")
    return list(value)
