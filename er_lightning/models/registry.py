"""Build a model by name: ``create_model("resnet18", num_classes=10)``."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from torch import nn

from er_lightning.models.resnet20 import resnet20
from er_lightning.models.resnet_cifar import resnet18, resnet34, resnet50
from er_lightning.models.small import small_cnn
from er_lightning.models.transformer import ViT, transformer_lm
from er_lightning.models.vgg import vgg16, vgg19

__all__ = ["MODEL_NAMES", "create_model"]

_FACTORIES: dict[str, Callable[..., nn.Module]] = {
    "resnet18": resnet18,
    "resnet34": resnet34,
    "resnet50": resnet50,
    "resnet20": resnet20,
    "vgg16": vgg16,
    "vgg19": vgg19,
    "small_cnn": small_cnn,
    "transformer_lm": transformer_lm,
    "vit": ViT,
}

#: Names accepted by :func:`create_model` (matched case-insensitively).
MODEL_NAMES: tuple[str, ...] = tuple(_FACTORIES)


def create_model(name: str, num_classes: int, **kwargs: Any) -> nn.Module:
    """Build the model registered under ``name`` with ``num_classes`` logits.

    Names are matched case-insensitively, so upstream's ``ResNet18`` works as well as ``resnet18``.

    Args:
        name: one of :data:`MODEL_NAMES`.
        num_classes: number of logits (10 for CIFAR-10, 100 for CIFAR-100, 200 for Tiny-ImageNet).
        **kwargs: keyword options of the factory, e.g. ``input_size=64``, ``bn_affine=False``, ``bias=True``,
            ``classifier="conv1x1"``; see the factory's docstring.

    Returns:
        The freshly initialised model; its ``forward`` returns logits of shape ``(N, num_classes)``.

    Raises:
        ValueError: unknown ``name`` (the message lists the valid names) or a bad option value.
        TypeError: ``name`` is not a string, or an option the factory does not take (the message lists those it
            takes).

    Example:
        >>> model = create_model("resnet18", 200, input_size=64)
        >>> model.classifier.weight.shape
        torch.Size([200, 512])
    """
    if not isinstance(name, str):
        raise TypeError(f"name must be a string, one of {list(MODEL_NAMES)}, got {name!r}")
    key = name.strip().lower()
    if key not in _FACTORIES:
        raise ValueError(f"unknown model {name!r}; valid names are {list(MODEL_NAMES)}")
    factory = _FACTORIES[key]
    accepted = [p for p in inspect.signature(factory).parameters if p != "num_classes"]
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise TypeError(f"{key} does not take option(s) {unknown}; it takes {accepted}")
    return factory(num_classes, **kwargs)
