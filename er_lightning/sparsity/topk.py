"""Scores to masks with an exact number kept, ties broken deterministically.

``torch.topk`` may order equal values differently across devices and builds, which would let two ranks (or a
resumed run) disagree on a mask. Here ties are broken by flat index, lowest index first, using a stable sort, so
the same scores give the same mask everywhere.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

__all__ = ["topk_mask", "global_topk_masks", "exact_count"]


def exact_count(density: float, numel: int) -> int:
    """Number of entries kept for ``density`` of ``numel``: ``round(density * numel)``, clipped to [0, numel]."""
    return int(min(max(round(density * numel), 0), numel))


def _top_indices(flat: Tensor, k: int) -> Tensor:
    # Stable descending sort: among equal scores the lower flat index comes first.
    order = torch.sort(flat, descending=True, stable=True).indices
    return order[:k]


def topk_mask(scores: Tensor, k: int, candidates: Tensor | None = None) -> Tensor:
    """Bool mask shaped like ``scores`` with exactly ``k`` entries set: the ``k`` largest scores.

    Args:
        scores: any shape; NaNs are treated as the smallest value.
        k: number of entries to keep, ``0 <= k <= number of candidates``.
        candidates: optional bool mask; only these positions may be chosen.

    Raises:
        ValueError: ``k`` is negative or larger than the number of candidates.
    """
    flat = scores.detach().reshape(-1).to(torch.float64 if scores.dtype == torch.float64 else torch.float32)
    flat = torch.nan_to_num(flat, nan=float("-inf"))
    n = flat.numel()
    if candidates is not None:
        cand = candidates.reshape(-1).to(device=flat.device, dtype=torch.bool)
        available = int(cand.sum())
        flat = torch.where(cand, flat, torch.full_like(flat, float("-inf")))
    else:
        cand = None
        available = n
    if not 0 <= k <= available:
        raise ValueError(f"k must be in [0, {available}] (the number of candidates), got {k}")
    out = torch.zeros(n, dtype=torch.bool, device=scores.device)
    if k == 0:
        return out.view(scores.shape)
    if cand is not None:
        # -inf scores of candidates must still beat non-candidates: rank candidates first, then by score.
        key = torch.where(cand, flat, torch.full_like(flat, float("-inf")))
        order = torch.sort(key, descending=True, stable=True).indices
        if int(cand[order[:k]].sum()) != k:  # some candidates carry -inf/NaN scores
            cand_idx = torch.nonzero(cand).view(-1)
            sub = _top_indices(flat[cand_idx], k)
            out[cand_idx[sub]] = True
            return out.view(scores.shape)
        out[order[:k]] = True
        return out.view(scores.shape)
    out[_top_indices(flat, k)] = True
    return out.view(scores.shape)


def global_topk_masks(
    scores: Mapping[str, Tensor], k: int, candidates: Mapping[str, Tensor] | None = None
) -> dict[str, Tensor]:
    """Keep the ``k`` largest scores over all tensors together (global magnitude pruning and friends).

    Ties are broken by position in the concatenation of ``scores`` in mapping order, so the result depends only
    on the values, not on the device.

    Returns:
        Bool masks with the same keys, order and shapes as ``scores``; exactly ``k`` entries set in total.
    """
    names = list(scores)
    if not names:
        raise ValueError("global_topk_masks needs at least one score tensor")
    device = scores[names[0]].device
    flat = torch.cat([scores[n].detach().reshape(-1).float().to(device) for n in names])
    cand = None
    if candidates is not None:
        missing = [n for n in names if n not in candidates]
        if missing:
            raise ValueError(f"candidates lack entries for {missing}")
        cand = torch.cat([candidates[n].reshape(-1).to(device=device, dtype=torch.bool) for n in names])
    mask = topk_mask(flat, k, cand)
    out: dict[str, Tensor] = {}
    start = 0
    for n in names:
        numel = scores[n].numel()
        out[n] = mask[start : start + numel].view(scores[n].shape).to(scores[n].device)
        start += numel
    return out
