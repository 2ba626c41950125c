"""FLOPs accounting against hand-computed numbers (2 FLOPs per multiply-add, as torch counts them)."""

from __future__ import annotations

import logging

import pytest
import torch
from conftest import PlainModule, TinyNet, make_trainer, random_loader
from torch import nn
from torch.nn.utils import parametrize

from er_lightning.callbacks import SET, RigL, StaticSparsity
from er_lightning.masking.flops import count_flops, flops_table

# TinyNet on a batch of 2 images 3x8x8 (padding 1 keeps 8x8): 2 * N * H * W * C_out * C_in * k * k
CONV1 = 2 * 2 * 8 * 8 * 8 * 3 * 9  # 55,296
CONV2 = 2 * 2 * 8 * 8 * 16 * 8 * 9  # 294,912
FC = 2 * 2 * 16 * 10  # 640
PARAMS = 216 + 8 + 8 + 1152 + 16 + 16 + 160 + 10  # conv1, bn1, conv2, bn2, fc weight and bias


def _first(shape: tuple[int, ...], kept: int) -> torch.Tensor:
    mask = torch.zeros(shape, dtype=torch.bool).flatten()
    mask[:kept] = True
    return mask.view(shape)


def _masks() -> dict[str, torch.Tensor]:
    return {
        "conv1.weight": _first((8, 3, 3, 3), 54),  # 1/4
        "conv2.weight": _first((16, 8, 3, 3), 288),  # 1/4
        "fc.weight": _first((10, 16), 80),  # 1/2
    }


def test_counts_equal_hand_computed_numbers() -> None:
    net = TinyNet()
    count = count_flops(net, torch.randn(2, 3, 8, 8), _masks())
    assert {n: c.dense for n, c in count.layers.items()} == {
        "conv1.weight": CONV1,
        "conv2.weight": CONV2,
        "fc.weight": FC,
    }
    assert count.other == 0
    assert count.examples == 2
    assert count.dense == CONV1 + CONV2 + FC == 350_848
    sparse = CONV1 / 4 + CONV2 / 4 + FC / 2
    assert count.sparse == pytest.approx(sparse)
    assert count.inference_ratio == pytest.approx(sparse / 350_848)
    assert count.params == PARAMS
    assert count.kept_params == PARAMS - (216 - 54) - (1152 - 288) - (160 - 80)
    # RigL App. H: 3 f_S per step, 2 f_S + f_D with the dense weight gradient, against 3 f_D
    assert count.train_step_ratio() == pytest.approx(sparse / 350_848)
    assert count.train_step_ratio(float(count.dense)) == pytest.approx((2 * sparse + 350_848) / (3 * 350_848))
    # a mask change recounts without a forward pass
    half = count.with_kept({"conv2.weight": 576})
    assert half.sparse == pytest.approx(CONV1 / 4 + CONV2 / 2 + FC / 2)


def test_unmasked_ops_count_dense_and_parametrized_weights_are_attributed() -> None:
    net = TinyNet()
    masks = _masks()
    del masks["fc.weight"]  # fc stays dense: its FLOPs are "other"

    class Scale(nn.Module):
        def forward(self, w: torch.Tensor) -> torch.Tensor:
            return w * 2  # a computed weight: no storage shared with the parameter

    parametrize.register_parametrization(net.conv1, "weight", Scale())
    count = count_flops(net, torch.randn(2, 3, 8, 8), masks)
    assert count.layers["conv1.weight"].dense == CONV1
    assert count.layers["conv2.weight"].dense == CONV2
    assert count.other == FC
    assert count.sparse == pytest.approx(CONV1 / 4 + CONV2 / 4 + FC)


def test_counting_leaves_the_model_alone() -> None:
    net = TinyNet()
    net.train()
    net.bn2.eval()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x = torch.randn(4, 3, 8, 8)
    rng = torch.get_rng_state()
    count_flops(net, x, _masks())
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())  # BN statistics included
    assert torch.equal(rng, torch.get_rng_state())
    assert net.training and net.bn1.training and not net.bn2.training


def test_bad_masks_raise() -> None:
    with pytest.raises(ValueError, match="does not have"):
        count_flops(TinyNet(), torch.randn(1, 3, 8, 8), {"conv9.weight": torch.ones(2, dtype=torch.bool)})
    with pytest.raises(ValueError, match="shape"):
        count_flops(TinyNet(), torch.randn(1, 3, 8, 8), {"fc.weight": torch.ones(2, dtype=torch.bool)})


def test_table_has_layers_and_whole_model() -> None:
    count = count_flops(TinyNet(), torch.randn(2, 3, 8, 8), _masks())
    table = flops_table(count, {"conv1.weight": 0.25})
    lines = table.splitlines()
    conv1 = next(line for line in lines if line.startswith("conv1.weight"))
    assert "8x3x3x3" in conv1 and "0.2500" in conv1 and f"{CONV1 / 2 / 1e6:.4f}" in conv1
    whole = next(line for line in lines if line.startswith("whole model"))
    assert f"{PARAMS:,}" in whole and f"{350_848 / 2 / 1e6:.4f}" in whole


def _expected_ratio(module: PlainModule, masks: dict[str, torch.Tensor]) -> tuple[float, float]:
    """Sparse / dense forward FLOPs from the hand formula for a 16-image batch of 8x8 inputs."""
    dense = {"net.conv1.weight": CONV1 * 8, "net.conv2.weight": CONV2 * 8, "net.fc.weight": FC * 8}
    sparse = sum(dense[n] * float(m.float().mean()) for n, m in masks.items())
    return sparse / sum(dense.values()), sum(dense.values())


def test_callback_logs_inference_ratio_and_table(tmp_path, tiny_module, caplog) -> None:
    cb = StaticSparsity(density=0.2, seed=0)
    trainer = make_trainer(tmp_path, [cb], max_steps=3)
    with caplog.at_level(logging.INFO):
        trainer.fit(tiny_module, train_dataloaders=random_loader())
    ratio, _ = _expected_ratio(tiny_module, cb.masked.masks)
    metrics = trainer.callback_metrics
    assert float(metrics["flops/inference_ratio"]) == pytest.approx(ratio, rel=1e-6)
    # a fixed mask: every step costs 3 f_S, so step and cumulative ratios equal the inference ratio
    assert float(metrics["flops/train_step_ratio"]) == pytest.approx(ratio, rel=1e-6)
    assert float(metrics["flops/train_cumulative_ratio"]) == pytest.approx(ratio, rel=1e-6)
    text = caplog.text
    assert "forward FLOPs on one training batch (16 examples)" in text
    assert "whole model" in text and "net.conv2.weight" in text


@pytest.mark.parametrize(("cls", "dense_gradient"), [(RigL, True), (SET, False)])
def test_rigl_update_steps_add_the_dense_weight_gradient(tmp_path, cls, dense_gradient) -> None:
    torch.manual_seed(0)
    module = PlainModule()
    cb = cls(density=0.2, update_every_steps=2, drop_fraction=0.3, stop_updates_at=1.0, seed=0)
    trainer = make_trainer(tmp_path, [cb], max_steps=4)
    trainer.fit(module, train_dataloaders=random_loader())
    r, _ = _expected_ratio(module, cb.masked.masks)  # counts are conserved: f_S is the same at every step
    update = (2 * r + 1) / 3 if dense_gradient else r  # (2 f_S + f_D) / 3 f_D at the one update (step 2)
    assert cb._flops_steps == 4
    assert float(trainer.callback_metrics["flops/train_cumulative_ratio"]) == pytest.approx(
        (3 * r + update) / 4, rel=1e-6
    )
    assert float(trainer.callback_metrics["flops/train_step_ratio"]) == pytest.approx(r, rel=1e-6)


def test_supermask_counts_b_forward_and_the_er_support_gradient(tmp_path) -> None:
    from er_lightning.callbacks import Supermask

    torch.manual_seed(0)
    module = PlainModule()
    cb = Supermask(density=0.2, er_density=0.5, seed=3)
    trainer = make_trainer(tmp_path, [cb], max_steps=2)
    trainer.fit(module, train_dataloaders=random_loader())
    # forward with B (density 0.2 inside an ER 0.5 support), weight gradient on the whole support
    r_b = float(trainer.callback_metrics["flops/inference_ratio"])
    r_er, _ = _expected_ratio(module, cb.masked.masks)
    assert r_b < r_er
    assert float(trainer.callback_metrics["flops/train_step_ratio"]) == pytest.approx(
        (2 * r_b + r_er) / 3, rel=1e-6
    )


def test_sparse_compute_layers_are_counted_as_their_dense_ops_scale(tmp_path, tiny_module) -> None:
    # compute="sparse" routes the masked layers through kernels FlopCounterMode cannot see; the count forces the
    # dense path for its one forward, so the numbers are those of the dense-formula accounting
    from pytorch_lightning.callbacks import Callback

    cb = StaticSparsity(density=0.2, seed=0, compute="sparse")
    calls: list[int] = []

    class SparseCalls(Callback):
        def on_train_end(self, trainer, pl_module):  # noqa: ANN001
            calls.extend(r.sparse_calls for r in cb.router.routes.values())

    trainer = make_trainer(tmp_path, [cb, SparseCalls()], max_steps=2)
    trainer.fit(tiny_module, train_dataloaders=random_loader())
    ratio, _ = _expected_ratio(tiny_module, cb.masked.masks)
    assert float(trainer.callback_metrics["flops/inference_ratio"]) == pytest.approx(ratio, rel=1e-6)
    assert calls and all(c > 0 for c in calls)  # training itself ran through the sparse kernels
