"""Mask files: sparse tensors and shape-less density reads are refused with the fix (issue 12 #10, #11)."""

from __future__ import annotations

import pytest
import torch
from conftest import PlainModule, make_trainer, random_loader

from er_lightning.callbacks import StaticSparsity
from er_lightning.masking.io import load_masks, mask_file_densities, save_masks

SHAPES = {"net.conv1.weight": (8, 3, 3, 3), "net.conv2.weight": (16, 8, 3, 3), "net.fc.weight": (10, 16)}


def _masks(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: torch.rand(s, generator=g) < 0.25 for n, s in SHAPES.items()}


def test_sparse_coo_mask_file_gets_a_clear_error(tmp_path) -> None:  # noqa: ANN001
    masks = _masks()
    torch.save({n: m.to_sparse() for n, m in masks.items()}, tmp_path / "coo.pt")
    with pytest.raises(
        ValueError, match=r"mask 'net\.conv1\.weight' .* is a torch\.sparse_coo tensor.*mask\.to_dense\(\)"
    ):
        load_masks(tmp_path / "coo.pt")
    cb = StaticSparsity(distribution="from_mask", placement="scores", mask_file=str(tmp_path / "coo.pt"))
    with pytest.raises(ValueError, match="sparse_coo tensor"):
        make_trainer(tmp_path, [cb], max_steps=1).fit(PlainModule(), random_loader())


def test_mask_file_densities_checks_shapes_against_the_model(tmp_path) -> None:  # noqa: ANN001
    masks = _masks()
    save_masks(masks, tmp_path / "good.pt")
    expected = {n: int(m.sum()) / m.numel() for n, m in masks.items()}
    assert mask_file_densities(tmp_path / "good.pt", PlainModule()) == pytest.approx(expected)
    assert mask_file_densities(tmp_path / "good.pt", SHAPES) == pytest.approx(expected)

    bad = dict(
        masks, **{"net.conv2.weight": torch.ones(5, 5, dtype=torch.bool)}
    )  # density 1.0 of the wrong tensor
    save_masks(bad, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match=r"net\.conv2\.weight: file \(5, 5\) vs model \(16, 8, 3, 3\)"):
        mask_file_densities(tmp_path / "bad.pt", PlainModule())
    save_masks(dict(masks, **{"net.nope.weight": torch.ones(2, dtype=torch.bool)}), tmp_path / "extra.pt")
    with pytest.raises(
        ValueError, match=r"names \['net\.nope\.weight'\], which are not parameters of the PlainModule"
    ):
        mask_file_densities(tmp_path / "extra.pt", PlainModule())
    with pytest.raises(TypeError):
        mask_file_densities(tmp_path / "good.pt")  # type: ignore[call-arg]  # shapes are required
