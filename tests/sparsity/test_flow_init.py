from __future__ import annotations

import math

import pytest
import torch

from er_lightning.sparsity.flow import preserve_flow_
from er_lightning.sparsity.init import he_sparse_, looks_linear_, ortho_repair_


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_flow_repairs_linear_units_once_each():
    mask = torch.zeros(6, 5, dtype=torch.bool)
    mask[0, 0] = True
    fixed_out, fixed_in = preserve_flow_(mask, generator=_gen())
    assert fixed_out == 5  # rows 1..5 had no input
    assert mask.any(dim=1).all()
    assert mask.any(dim=0).all()
    assert fixed_in <= 4


def test_flow_repairs_several_dead_conv_input_channels():
    # upstream loses the conv input-side repair when two or more input channels are dead (Q5); we do not
    mask = torch.zeros(4, 5, 3, 3, dtype=torch.bool)
    mask[:, 0] = True
    fixed_out, fixed_in = preserve_flow_(mask, generator=_gen())
    assert (fixed_out, fixed_in) == (0, 4)
    assert mask.any(dim=(0, 2, 3)).all()
    assert int(mask.sum()) == 4 * 9 + 4


def test_he_sparse_std():
    w = torch.empty(256, 128, 3, 3)
    he_sparse_(w, 0.1, generator=_gen())
    expected = math.sqrt(2 / (128 * 9 * 0.1))
    assert abs(w.std().item() - expected) / expected < 0.01


def test_looks_linear_first_layer_mirrors():
    w = torch.empty(8, 3, 3, 3)
    looks_linear_(w, 1.0, first=True, generator=_gen())
    assert torch.allclose(w[:4], -w[4:])
    w2 = torch.empty(6, 4)
    looks_linear_(w2, 0.25, first=False, generator=_gen())
    assert torch.allclose(w2[:3, :2], -w2[:3, 2:])
    assert torch.allclose(w2[:3], -w2[3:])


def test_ortho_repair_decreases_objective_and_keeps_mask():
    w = torch.randn(8, 16, generator=_gen())
    mask = torch.rand(8, 16, generator=_gen(1)) < 0.5
    w *= mask
    eye = torch.eye(8)
    before = torch.linalg.matrix_norm(w @ w.T - eye).item()
    after = ortho_repair_(w, mask, steps=200, lr=1e-2)
    assert after < before
    assert (w[~mask] == 0).all()
    with pytest.raises(ValueError, match="steps"):
        ortho_repair_(w, mask, steps=0)
