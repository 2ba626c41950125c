from __future__ import annotations

import pytest
import torch
from torch import nn

from er_lightning.masking import MaskedParams, default_targets, load_masks, save_masks, select_targets
from er_lightning.masking.dist import mask_checksums


def _net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 2))


def test_default_targets_are_conv_and_linear_weights():
    assert default_targets(_net()) == ["0.weight", "3.weight"]


def test_default_targets_follow_parametrized_weights():
    net = _net()
    torch.nn.utils.parametrize.register_parametrization(net[0], "weight", nn.Identity())
    assert default_targets(net) == ["0.parametrizations.weight.original", "3.weight"]


def test_select_targets_patterns_and_switches():
    net = _net()
    assert select_targets(net, exclude=["3.*"]) == ["0.weight"]
    assert select_targets(net, include=["*.bias"]) == ["0.bias", "1.bias", "3.bias"]
    assert select_targets(net, dense_first_layer=True) == ["3.weight"]
    assert select_targets(net, dense_last_layer=True) == ["0.weight"]
    with pytest.raises(ValueError, match=r"matches no parameter.*0\.weight"):
        select_targets(net, include=["nothing*"])
    with pytest.raises(ValueError, match="exclude pattern"):
        select_targets(net, exclude=["nothing*"])
    with pytest.raises(ValueError, match="no parameter is left"):
        select_targets(net, dense_first_layer=True, dense_last_layer=True)


def test_apply_and_mask_grads_zero_exactly():
    lin = nn.Linear(30, 20)
    mask = torch.rand(20, 30, generator=torch.Generator().manual_seed(0)) < 0.3
    mp = MaskedParams({"weight": lin.weight}, {"weight": mask})
    mp.apply_()
    assert torch.count_nonzero(lin.weight) == int(mask.sum())
    assert (lin.weight[~mask] == 0).all()
    lin(torch.randn(5, 30)).sum().backward()
    assert (lin.weight.grad[~mask] != 0).any()  # dense gradient before masking
    mp.mask_grads_()
    assert (lin.weight.grad[~mask] == 0).all()
    assert (lin.weight.grad[mask] != 0).all()


def test_mask_shape_mismatch_raises():
    lin = nn.Linear(3, 2)
    with pytest.raises(ValueError, match="shape"):
        MaskedParams({"weight": lin.weight}, {"weight": torch.ones(3, 2, dtype=torch.bool)})


@pytest.mark.parametrize("opt_name", ["sgd", "adam", "adamw"])
def test_zero_optimizer_state_clears_every_param_shaped_tensor(opt_name):
    lin = nn.Linear(6, 5, bias=False)
    opt = {
        "sgd": lambda: torch.optim.SGD(lin.parameters(), lr=0.1, momentum=0.9),
        "adam": lambda: torch.optim.Adam(lin.parameters(), lr=0.1, amsgrad=True),
        "adamw": lambda: torch.optim.AdamW(lin.parameters(), lr=0.1),
    }[opt_name]()
    lin(torch.randn(4, 6)).sum().backward()
    opt.step()
    mask = torch.zeros(5, 6, dtype=torch.bool)
    mask[:2] = True
    mp = MaskedParams({"weight": lin.weight}, {"weight": mask})
    extra = torch.zeros(5, 6, dtype=torch.bool)
    extra[0, 0] = True
    mp.zero_optimizer_state_([opt], extra={"weight": extra})
    tensors = [v for v in opt.state[lin.weight].values() if v.shape == lin.weight.shape]
    assert tensors
    for t in tensors:
        assert (t[~mask] == 0).all()
        assert t[0, 0] == 0
        assert (t[1] != 0).all()


def test_save_and_load_masks_roundtrip_and_validation(tmp_path):
    masks = {"a": torch.rand(3, 4) < 0.5, "b": torch.rand(2, 2) < 0.5}
    path = tmp_path / "m.pt"
    save_masks(masks, path)
    loaded = load_masks(path, {"a": (3, 4), "b": (2, 2)})
    assert all(torch.equal(loaded[k], masks[k]) for k in masks)
    with pytest.raises(ValueError, match=r"missing from .*'c'.*but not masked in the model: \['b'\]"):
        load_masks(path, {"a": (3, 4), "c": (1,)})
    with pytest.raises(ValueError, match=r"a: file \(3, 4\) vs model \(4, 3\)"):
        load_masks(path, {"a": (4, 3), "b": (2, 2)})
    torch.save({"a": torch.full((2,), 0.5)}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="other than 0 and 1"):
        load_masks(tmp_path / "bad.pt")
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(ValueError, match="dict of parameter name"):
        load_masks(tmp_path / "list.pt")
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_masks(tmp_path / "nope.pt")


def test_checksums_distinguish_positions():
    a = torch.zeros(10, dtype=torch.bool)
    b = a.clone()
    a[1] = True
    b[2] = True
    assert not torch.equal(mask_checksums({"x": a}), mask_checksums({"x": b}))
    assert torch.equal(mask_checksums({"x": a}), mask_checksums({"x": a.clone()}))
