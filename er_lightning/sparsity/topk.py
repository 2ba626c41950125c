"""Scores to masks with an exact number kept, ties broken deterministically.

``torch.topk`` may order equal values differently across devices and builds, which would let two ranks (or a
resumed run) disagree on a mask. Here ties are always broken by flat index, lowest index first (and, for global
top-k, by position in the concatenation of the tensors in mapping order), so the same scores give the same mask
everywhere. NaN scores rank lowest.

Only the candidate positions are looked at, and a partial ``torch.topk`` finds the k-th value instead of a full
sort: O(n) rather than O(n log n). Dropping among the few active weights of a sparse layer, or growing a few among
many inactive ones, is the common case (VGG-16, 14.7M masked weights, loaded 2-core CPU: one RigL update took
about 16 s with full stable sorts and about 8 s with this).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

__all__ = ["topk_mask", "global_topk_masks", "exact_count"]


def exact_count(density: float, numel: int) -> int:
    """Number of entries kept for ``density`` of ``numel``: ``round(density * numel)``, clipped to [0, numel]."""
    return int(min(max(round(density * numel), 0), numel))


def _compare_dtype(*dtypes: torch.dtype) -> torch.dtype:
    # float64 scores (SynFlow products) keep their range; everything else is compared in float32
    return torch.float64 if torch.float64 in dtypes else torch.float32


def topk_mask(scores: Tensor, k: int, candidates: Tensor | None = None) -> Tensor:
    """Bool mask shaped like ``scores`` with exactly ``k`` entries set: the ``k`` largest scores.

    Args:
        scores: any shape; compared in float64 if they are float64, else in float32.
        k: number of entries to keep, ``0 <= k <= number of candidates``.
        candidates: optional bool mask shaped like ``scores``; only these positions may be chosen.

    Raises:
        ValueError: ``k`` is negative or larger than the number of candidates.
    """
    n = scores.numel()
    if candidates is None:
        idx = torch.arange(n, device=scores.device)
    else:
        idx = torch.nonzero(candidates.reshape(-1).to(device=scores.device, dtype=torch.bool)).view(-1)
    m = idx.numel()
    if not 0 <= k <= m:
        raise ValueError(f"k must be in [0, {m}] (the number of candidates), got {k}")
    out = torch.zeros(n, dtype=torch.bool, device=scores.device)
    if k == m:
        out[idx] = True
    elif k > 0:
        sub = scores.detach().reshape(-1).to(_compare_dtype(scores.dtype))[idx]
        sub = torch.nan_to_num(sub, nan=float("-inf"))
        kth = torch.topk(sub, k, largest=True, sorted=False).values.min()
        chosen = sub > kth
        # among values equal to the k-th, the lowest flat indices win (idx is ascending)
        ties = torch.nonzero(sub == kth).view(-1)[: k - int(torch.count_nonzero(chosen))]
        chosen[ties] = True
        out[idx[chosen]] = True
    return out.view(scores.shape)


def global_topk_masks(
    scores: Mapping[str, Tensor], k: int, candidates: Mapping[str, Tensor] | None = None
) -> dict[str, Tensor]:
    """Keep the ``k`` largest scores over all tensors together (global magnitude pruning and friends).

    Args:
        scores: name → scores; the order of the mapping sets the tie order.
        k: total number kept, at most the number of candidates.
        candidates: optional name → bool mask of the positions that may be kept; a name it lacks may keep any
            position, names it has beyond ``scores`` are ignored.

    Returns:
        Bool masks with the same keys, order and shapes as ``scores``; exactly ``k`` entries set in total.
    """
    names = list(scores)
    if not names:
        raise ValueError("global_topk_masks needs at least one score tensor")
    device = scores[names[0]].device
    dtype = _compare_dtype(*(s.dtype for s in scores.values()))
    flat = torch.cat([scores[n].detach().reshape(-1).to(device=device, dtype=dtype) for n in names])
    cand = None
    if candidates is not None:
        cand = torch.cat(
            [
                (candidates[n] if n in candidates else torch.ones(scores[n].shape, dtype=torch.bool))
                .reshape(-1)
                .to(device=device, dtype=torch.bool)
                for n in names
            ]
        )
    mask = topk_mask(flat, k, cand)
    out: dict[str, Tensor] = {}
    start = 0
    for n in names:
        numel = scores[n].numel()
        out[n] = mask[start : start + numel].view(scores[n].shape).to(scores[n].device)
        start += numel
    return out
