"""Which parameters carry a mask, named by fully qualified name (FQN) as ``named_parameters()`` yields them."""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Sequence

from torch import nn
from torch.nn.utils import parametrize

__all__ = [
    "PARAMETRIZED_NAME",
    "default_targets",
    "original_fqn",
    "original_named_parameters",
    "select_targets",
]

_MASKABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)

#: ``<module>.parametrizations.<tensor>.original``: where ``torch.nn.utils.parametrize`` keeps a tensor.
PARAMETRIZED_NAME = re.compile(r"(^|\.)parametrizations\.([^.]+)\.original$")


def original_fqn(name: str) -> str:
    """``a.b.parametrizations.weight.original`` → ``a.b.weight``; other names are returned unchanged.

    Masks, checkpoints and logs keep the name a tensor had before a parametrization (supermask scores, STR
    thresholds) was attached to it.
    """
    return PARAMETRIZED_NAME.sub(lambda m: f"{m.group(1)}{m.group(2)}", name)


def original_named_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """``named_parameters()`` keyed by :func:`original_fqn`, so parametrized weights keep their plain names."""
    return {original_fqn(n): p for n, p in model.named_parameters()}


def default_targets(model: nn.Module) -> list[str]:
    """FQNs of every conv and linear ``weight`` in ``model``, in ``named_parameters()`` order.

    This is the default rule of the library (upstream masks every 2-D/4-D weight: the stem, 1×1 shortcuts and the
    classifier included). ``isinstance`` is used so parametrized subclasses still count.
    """
    owners: set[int] = set()
    for module in model.modules():
        if isinstance(module, _MASKABLE):
            owners.add(id(module))
    names = []
    for mod_name, module in model.named_modules():
        if id(module) not in owners:
            continue
        prefix = f"{mod_name}." if mod_name else ""
        # A parametrized weight is stored at ``<mod>.parametrizations.weight.original``; it is still the weight.
        if parametrize.is_parametrized(module, "weight"):
            names.append(f"{prefix}parametrizations.weight.original")
        elif isinstance(getattr(module, "weight", None), nn.Parameter):
            names.append(f"{prefix}weight")
    order = {n: i for i, (n, _) in enumerate(model.named_parameters())}
    present = [n for n in names if n in order]
    return sorted(present, key=order.__getitem__)


def select_targets(
    model: nn.Module,
    candidates: Sequence[str] | None = None,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    dense_first_layer: bool = False,
    dense_last_layer: bool = False,
) -> list[str]:
    """Choose the parameters to mask.

    Args:
        model: the module whose ``named_parameters()`` give the names.
        candidates: the starting set; defaults to :func:`default_targets`.
        include: glob patterns (``fnmatch``) over parameter names; when given, these replace ``candidates``
            (any parameter may be named, e.g. a bias).
        exclude: glob patterns removed from the set.
        dense_first_layer: leave the first selected layer dense (not masked).
        dense_last_layer: leave the last selected layer dense.

    Returns:
        FQNs in ``named_parameters()`` order.

    Raises:
        ValueError: a pattern matches no parameter (the message lists the names that exist), or nothing is left.
    """
    all_names = [n for n, _ in model.named_parameters()]
    base = list(candidates) if candidates is not None else default_targets(model)
    if include:
        chosen: list[str] = []
        for pattern in include:
            hits = [n for n in all_names if fnmatch.fnmatchcase(n, pattern)]
            if not hits:
                raise ValueError(
                    f"include pattern {pattern!r} matches no parameter; the model's parameters are: {all_names}"
                )
            chosen.extend(h for h in hits if h not in chosen)
        base = [n for n in all_names if n in chosen]
    for pattern in exclude or ():
        hits = [n for n in base if fnmatch.fnmatchcase(n, pattern)]
        if not hits:
            raise ValueError(
                f"exclude pattern {pattern!r} matches none of the masked parameters {base}; "
                f"the model's parameters are: {all_names}"
            )
        base = [n for n in base if n not in hits]
    if dense_first_layer and base:
        base = base[1:]
    if dense_last_layer and base:
        base = base[:-1]
    if not base:
        raise ValueError(
            "no parameter is left to mask; the model has no conv/linear weights or include/exclude/"
            f"dense_first_layer/dense_last_layer removed them all. Parameters: {all_names}"
        )
    return base
