from __future__ import annotations

import pytest
import torch

from er_lightning.sparsity.topk import exact_count, global_topk_masks, topk_mask


def _reference(scores: torch.Tensor, k: int, cand: torch.Tensor) -> torch.Tensor:
    """Full stable descending sort: ties to the lowest index, NaN lowest, non-candidates never chosen."""
    dtype = torch.float64 if scores.dtype == torch.float64 else torch.float32
    flat = torch.nan_to_num(scores.reshape(-1).to(dtype), nan=float("-inf"))
    idx = torch.nonzero(cand.reshape(-1)).view(-1)
    order = torch.sort(flat[idx], descending=True, stable=True).indices[:k]
    out = torch.zeros(flat.numel(), dtype=torch.bool)
    out[idx[order]] = True
    return out.view(scores.shape)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_topk_mask_matches_a_stable_sort_with_ties_nans_and_infs(dtype):
    g = torch.Generator().manual_seed(0)
    for trial in range(60):
        n = int(torch.randint(1, 60, (1,), generator=g))
        scores = torch.randint(0, 5, (n,), generator=g).to(dtype)  # many ties
        if trial % 3 == 0:
            scores[torch.rand(n, generator=g) < 0.2] = float("nan")
        if trial % 4 == 0:
            scores[torch.rand(n, generator=g) < 0.2] = float("-inf")
        cand = torch.rand(n, generator=g) < 0.6
        m = int(cand.sum())
        for k in {0, m // 3, m // 2, max(m - 1, 0), m}:
            got = topk_mask(scores, k, cand)
            assert int(got.sum()) == k
            assert torch.equal(got, _reference(scores, k, cand)), (trial, k)
        full = topk_mask(scores, n // 2)
        assert torch.equal(full, _reference(scores, n // 2, torch.ones(n, dtype=torch.bool)))
    with pytest.raises(ValueError, match="k must be in"):
        topk_mask(torch.ones(3), 3, torch.tensor([True, False, True]))


def test_all_ties_keep_the_first_positions():
    assert topk_mask(torch.zeros(2, 3), 4).reshape(-1).tolist() == [True] * 4 + [False] * 2


def test_global_topk_masks_orders_ties_by_concatenation_and_keeps_float64_range():
    g = torch.Generator().manual_seed(1)
    scores = {
        "a": torch.randint(0, 4, (3, 5), generator=g).float(),
        "b": torch.randint(0, 4, (7,), generator=g).float(),
    }
    masks = {n: torch.rand(s.shape, generator=g) < 0.7 for n, s in scores.items()}
    flat_scores = torch.cat([s.reshape(-1) for s in scores.values()])
    flat_cand = torch.cat([m.reshape(-1) for m in masks.values()])
    for k in range(int(flat_cand.sum()) + 1):
        got = global_topk_masks(scores, k, candidates=masks)
        ref = _reference(flat_scores, k, flat_cand)
        assert torch.equal(torch.cat([got["a"].reshape(-1), got["b"]]), ref), k
    # 1e300 overflows float32: float64 scores must be compared in float64
    big = {n: s.double() * 1e300 for n, s in scores.items()}
    assert all(
        torch.equal(global_topk_masks(big, 5, masks)[n], global_topk_masks(scores, 5, masks)[n])
        for n in scores
    )
    # a name without candidates may keep anything
    only_a = global_topk_masks(scores, 20, {"a": torch.ones(3, 5, dtype=torch.bool)})
    assert int(only_a["a"].sum() + only_a["b"].sum()) == 20


def test_exact_count_rounds_and_clips():
    assert exact_count(0.1, 95) == 10  # 9.5 rounds half to even
    assert exact_count(0.05, 1728) == 86
    assert exact_count(1.5, 10) == 10
    assert exact_count(-0.1, 10) == 0
