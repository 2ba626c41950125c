"""Saving and loading masks (``torch.save`` of FQN → bool tensor), with validation of files from elsewhere."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from er_lightning.masking.targets import original_named_parameters

__all__ = ["SPARSE_CHECKPOINT_KEY", "save_masks", "load_masks", "check_masks_match", "mask_file_densities"]

#: Top-level checkpoint entry in which every sparsity callback names itself (``{state_key: class path}``), so that
#: a module resumed without the callback can tell that the checkpoint was trained sparse.
SPARSE_CHECKPOINT_KEY = "er_lightning_sparsity"


def save_masks(masks: Mapping[str, Tensor], path: str | os.PathLike[str]) -> None:
    """Write ``{fqn: bool tensor}`` (on CPU) to ``path`` with ``torch.save``."""
    torch.save({n: m.detach().to("cpu", torch.bool) for n, m in masks.items()}, os.fspath(path))


def check_masks_match(
    masks: Mapping[str, Tensor], shapes: Mapping[str, Sequence[int]], source: str = "masks"
) -> None:
    """Raise ``ValueError`` listing every missing name, extra name and shape mismatch between masks and a model."""
    missing = [n for n in shapes if n not in masks]
    extra = [n for n in masks if n not in shapes]
    wrong = [
        f"{n}: file {tuple(masks[n].shape)} vs model {tuple(shapes[n])}"
        for n in shapes
        if n in masks and tuple(masks[n].shape) != tuple(shapes[n])
    ]
    if missing or extra or wrong:
        parts = []
        if missing:
            parts.append(f"missing from {source}: {missing}")
        if extra:
            parts.append(f"in {source} but not masked in the model: {extra}")
        if wrong:
            parts.append(f"shape mismatches: {wrong}")
        raise ValueError(f"{source} do not match the model's masked parameters; " + "; ".join(parts))


def load_masks(
    path: str | os.PathLike[str], shapes: Mapping[str, Sequence[int]] | None = None
) -> dict[str, Tensor]:
    """Read a mask file safely (``weights_only=True``) and validate it.

    Accepts bool tensors, or numeric tensors holding only 0 and 1 (converted to bool).

    Args:
        path: file written by :func:`save_masks` (or any ``{name: 0/1 tensor}`` dict).
        shapes: when given, names and shapes must match exactly (FQN → shape of the masked parameters).

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: not a dict of name → tensor, values other than 0/1, or a mismatch with ``shapes``.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"mask file not found: {path!r}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - report any unpickling refusal with the path
        raise ValueError(f"cannot read mask file {path!r} with weights_only=True: {err}") from err
    if not isinstance(obj, Mapping) or not all(
        isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items()
    ):
        raise ValueError(
            f"mask file {path!r} must hold a dict of parameter name -> tensor, got {type(obj).__name__}"
        )
    out: dict[str, Tensor] = {}
    for name, value in obj.items():
        if value.layout != torch.strided:
            raise ValueError(
                f"mask {name!r} in {path!r} is a {value.layout} tensor; mask files hold dense tensors, so save "
                "mask.to_dense() (save_masks writes dense bool tensors)"
            )
        if value.dtype != torch.bool:
            if value.is_floating_point() or value.is_complex():
                bad = ~((value == 0) | (value == 1))
            else:
                bad = ~((value == 0) | (value == 1))
            if bool(bad.any()):
                raise ValueError(f"mask {name!r} in {path!r} holds values other than 0 and 1")
            value = value != 0
        out[name] = value
    if shapes is not None:
        check_masks_match(out, shapes, source=f"mask file {path!r}")
    return out


def mask_file_densities(
    path: str | os.PathLike[str], shapes: Mapping[str, Sequence[int]] | nn.Module
) -> dict[str, float]:
    """Per-layer kept fractions of a mask file, validated against the model that will use them.

    Feeds ``distribution="custom"`` of any callback, e.g. a dynamic sparse run started from the layer ratios of an
    IMP level or of a SNIP mask (ER_imp / ER_snip starts)::

        RigL(density=0.05, distribution="custom", custom_densities=mask_file_densities("imp_masks/level_8.pt", module))

    Args:
        path: a mask file (:func:`save_masks`).
        shapes: the module the densities are for (every tensor of the file must be one of its parameters, with
            the same shape; parametrized weights count under their plain names), or ``{fqn: shape}`` of exactly
            the masked parameters. Required: a density read from a tensor of the wrong shape means nothing.

    Raises:
        ValueError: as :func:`load_masks`, or a name or shape that does not match ``shapes``.
    """
    source = f"mask file {os.fspath(path)!r}"
    masks = load_masks(path)
    if isinstance(shapes, nn.Module):
        named = original_named_parameters(shapes)
        unknown = [n for n in masks if n not in named]
        if unknown:
            raise ValueError(
                f"{source} names {unknown}, which are not parameters of the {type(shapes).__name__}; its "
                f"parameters are {list(named)}"
            )
        shapes = {n: tuple(named[n].shape) for n in masks}
    elif not isinstance(shapes, Mapping):
        raise TypeError(
            f"shapes must be the module the densities are for or a {{name: shape}} mapping, got {type(shapes).__name__}"
        )
    check_masks_match(masks, shapes, source=source)
    return {name: float(mask.float().mean()) for name, mask in masks.items()}
