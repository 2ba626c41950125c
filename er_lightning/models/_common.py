"""Argument checks and small building blocks shared by the model files."""

from __future__ import annotations

from typing import Literal, get_args

from torch import nn

__all__ = [
    "CLASSIFIER_KINDS",
    "ClassifierKind",
    "check_bool",
    "check_classifier",
    "check_positive_int",
    "make_classifier",
]

ClassifierKind = Literal["linear", "conv1x1"]
CLASSIFIER_KINDS: tuple[str, ...] = get_args(ClassifierKind)


def check_positive_int(value: object, name: str, minimum: int = 1) -> int:
    """Return ``value`` if it is an ``int`` (not a ``bool``) of at least ``minimum``, else raise.

    Raises:
        TypeError: ``value`` is not an ``int``.
        ValueError: ``value`` is smaller than ``minimum``.
    """
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r} of type {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value}")
    return value


def check_bool(value: object, name: str) -> bool:
    """Return ``value`` if it is a ``bool``, else raise ``TypeError`` (strings such as ``'False'`` are refused)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r} of type {type(value).__name__}")
    return value


def check_classifier(value: object, allowed: tuple[str, ...] = CLASSIFIER_KINDS) -> str:
    """Return ``value`` if it names an allowed classifier head, else raise ``ValueError`` listing the choices."""
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"classifier must be one of {list(allowed)}, got {value!r}")
    return value


def make_classifier(kind: str, in_features: int, num_classes: int, bias: bool) -> nn.Module:
    """Build the head applied to the pooled ``(N, in_features, 1, 1)`` feature map.

    Args:
        kind: ``"linear"`` for ``nn.Linear(in_features, num_classes)`` (the input is flattened first) or
            ``"conv1x1"`` for ``nn.Conv2d(in_features, num_classes, 1)`` as in STR's ResNets (the output is
            flattened afterwards).
        in_features: channels of the pooled feature map.
        num_classes: number of logits.
        bias: whether the head has a bias.
    """
    if kind == "linear":
        return nn.Linear(in_features, num_classes, bias=bias)
    return nn.Conv2d(in_features, num_classes, kernel_size=1, bias=bias)
