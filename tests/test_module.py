from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize
from torch.optim import SGD, Adam, AdamW
from torch.optim.lr_scheduler import LambdaLR

from er_lightning.module import ParamGroup, SparseLightningModule, lr_multiplier


def tiny_backbone() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1, bias=False),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 8 * 8, 10),
    )


def attach(module: SparseLightningModule, *, total: int = 100, per_epoch: int = 10) -> None:
    """Attach a stand-in trainer: ``total`` optimiser steps, ``per_epoch`` batches per epoch."""
    module.trainer = SimpleNamespace(
        estimated_stepping_batches=total,
        num_training_batches=per_epoch,
        accumulate_grad_batches=1,
        max_epochs=total // per_epoch,
        global_step=0,
        optimizers=[],
    )


def lrs_at(module: SparseLightningModule, steps: list[int]) -> dict[int, float]:
    """Learning rate of the first group before optimiser step ``s`` for each ``s`` in ``steps``."""
    attach(module)
    config = module.configure_optimizers()
    opt, sched = config["optimizer"], config["lr_scheduler"]["scheduler"]
    out = {}
    for s in range(max(steps) + 1):
        if s in steps:
            out[s] = opt.param_groups[0]["lr"]
        opt.step()
        sched.step()
    return out


# ------------------------------------------------------------------------------------------ optimiser choice
def test_optimizer_classes_and_settings() -> None:
    m = SparseLightningModule(tiny_backbone(), optimizer="sgd", lr=0.1, momentum=0.9, nesterov=True)
    attach(m)
    cfg = m.configure_optimizers()
    opt = cfg["optimizer"]
    assert type(opt) is SGD
    assert opt.defaults["nesterov"] is True
    assert opt.defaults["momentum"] == 0.9
    assert opt.defaults["weight_decay"] == 5e-4
    assert isinstance(cfg["lr_scheduler"]["scheduler"], LambdaLR)
    assert cfg["lr_scheduler"]["interval"] == "step"

    for name, cls in (("adam", Adam), ("adamw", AdamW)):
        m = SparseLightningModule(
            tiny_backbone(), optimizer=name, lr=1e-3, betas=(0.8, 0.99), weight_decay=0.01
        )
        attach(m)
        opt = m.configure_optimizers()["optimizer"]
        assert type(opt) is cls
        assert opt.defaults["betas"] == (0.8, 0.99)
        assert opt.defaults["weight_decay"] == 0.01


# ------------------------------------------------------------------------------------------ schedules
def test_cosine_with_warmup_and_floor_hand_values() -> None:
    # 100 steps, 10 per epoch, 1 warm-up epoch = 10 steps, lr 0.1 -> 0.01 floor.
    m = SparseLightningModule(tiny_backbone(), lr=0.1, min_lr=0.01, lr_schedule="cosine", warmup_epochs=1)
    got = lrs_at(m, [0, 4, 9, 10, 55, 99])
    assert got[0] == pytest.approx(0.1 * 1 / 10)
    assert got[4] == pytest.approx(0.1 * 5 / 10)
    assert got[9] == pytest.approx(0.1)
    assert got[10] == pytest.approx(0.1)  # cosine starts at the top
    assert got[55] == pytest.approx(0.01 + 0.09 * 0.5)  # half-way through the 90 cosine steps
    expected_99 = 0.01 + 0.09 * 0.5 * (1 + math.cos(math.pi * 89 / 90))
    assert got[99] == pytest.approx(expected_99)
    assert lr_multiplier(150, schedule="cosine", total_steps=100, steps_per_epoch=10, floor=0.1) == 0.1


def test_multistep_default_milestones_are_half_and_three_quarters() -> None:
    # E = 10 epochs -> decays at epoch 5 (step 50) and 7.5 (step 75).
    m = SparseLightningModule(tiny_backbone(), lr=0.1, lr_schedule="multistep", gamma=0.1)
    got = lrs_at(m, [0, 49, 50, 74, 75, 99])
    assert got[0] == pytest.approx(0.1)
    assert got[49] == pytest.approx(0.1)
    assert got[50] == pytest.approx(0.01)
    assert got[74] == pytest.approx(0.01)
    assert got[75] == pytest.approx(0.001)
    assert got[99] == pytest.approx(0.001)


def test_multistep_explicit_milestones_and_constant() -> None:
    m = SparseLightningModule(tiny_backbone(), lr=0.2, lr_schedule="multistep", milestones=[2, 4], gamma=0.5)
    got = lrs_at(m, [19, 20, 39, 40])
    assert [got[s] for s in (19, 20, 39, 40)] == pytest.approx([0.2, 0.1, 0.1, 0.05])
    m = SparseLightningModule(tiny_backbone(), lr=0.3, lr_schedule="constant")
    assert set(lrs_at(m, [0, 50, 99]).values()) == {0.3}


def test_reset_lr_schedule_restarts_and_survives_checkpoint() -> None:
    m = SparseLightningModule(tiny_backbone(), lr=0.1, lr_schedule="cosine", warmup_epochs=1)
    attach(m)
    cfg = m.configure_optimizers()
    opt, sched = cfg["optimizer"], cfg["lr_scheduler"]["scheduler"]
    for _ in range(30):
        opt.step()
        sched.step()
    m.reset_lr_schedule(schedule_steps=40)  # new cycle: 10 warm-up steps, then 30 cosine steps
    assert m.lr_schedule_offset == 30
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1 / 10)  # first warm-up value again
    for _ in range(10 + 15):
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5)  # half-way through the new cosine

    ckpt: dict = {}
    m.on_save_checkpoint(ckpt)
    fresh = SparseLightningModule(tiny_backbone())
    fresh.on_load_checkpoint(ckpt)
    assert (fresh.lr_schedule_offset, fresh.schedule_steps) == (30, 40)
    fresh.on_load_checkpoint({})  # older checkpoints: defaults
    assert (fresh.lr_schedule_offset, fresh.schedule_steps) == (0, None)
    with pytest.raises(ValueError, match="schedule_steps"):
        m.reset_lr_schedule(schedule_steps=0)


def test_infinite_run_needs_constant_schedule() -> None:
    m = SparseLightningModule(tiny_backbone(), lr_schedule="cosine")
    m.trainer = SimpleNamespace(
        estimated_stepping_batches=float("inf"),
        num_training_batches=float("inf"),
        accumulate_grad_batches=1,
        max_epochs=-1,
    )
    with pytest.raises(ValueError, match="finite run length"):
        m.configure_optimizers()


# ------------------------------------------------------------------------------------------ parameter groups
def _groups_by_name(m: SparseLightningModule) -> dict[str, dict]:
    attach(m)
    opt = m.configure_optimizers()["optimizer"]
    names = {id(p): n for n, p in m.named_parameters()}
    return {g["name"]: {**g, "names": sorted(names[id(p)] for p in g["params"])} for g in opt.param_groups}


def test_no_bn_weight_decay_groups() -> None:
    m = SparseLightningModule(tiny_backbone(), weight_decay=1e-4, no_bn_weight_decay=True)
    groups = _groups_by_name(m)
    assert groups["default"]["names"] == ["model.0.weight", "model.4.weight"]
    assert groups["default"]["weight_decay"] == 1e-4
    assert groups["no_decay"]["names"] == ["model.1.bias", "model.1.weight", "model.4.bias"]
    assert groups["no_decay"]["weight_decay"] == 0.0


def test_param_group_first_match_wins_and_overrides() -> None:
    m = SparseLightningModule(
        tiny_backbone(),
        lr=0.1,
        param_groups=[
            ParamGroup(pattern="model.4.*", lr=0.01),
            ParamGroup(pattern=["*.weight"], weight_decay=0.0),
        ],
    )
    groups = _groups_by_name(m)
    assert groups["group0"]["names"] == ["model.4.bias", "model.4.weight"]
    assert groups["group0"]["lr"] == pytest.approx(0.01)
    assert groups["group1"]["names"] == ["model.0.weight", "model.1.weight"]
    assert groups["group1"]["weight_decay"] == 0.0
    assert groups["group1"]["lr"] == pytest.approx(0.1)
    assert groups["default"]["names"] == ["model.1.bias"]
    # dict form (as stored in hparams / checkpoints) is accepted too
    m2 = SparseLightningModule(tiny_backbone(), param_groups=[{"pattern": "*bias", "weight_decay": 0.0}])
    assert m2.hparams["param_groups"] == [{"pattern": "*bias", "weight_decay": 0.0, "lr": None}]


def test_param_group_pattern_matching_nothing_lists_names() -> None:
    m = SparseLightningModule(tiny_backbone(), param_groups=[ParamGroup(pattern="*.nothing")])
    attach(m)
    with pytest.raises(ValueError, match=r"'\*\.nothing' matches no parameter.*model\.0\.weight"):
        m.configure_optimizers()


def test_parametrized_weight_and_frozen_params() -> None:
    class Scale(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.scores = nn.Parameter(torch.ones(1))

        def forward(self, w: torch.Tensor) -> torch.Tensor:
            return w * self.scores

    m = SparseLightningModule(tiny_backbone())
    parametrize.register_parametrization(m.model[0], "weight", Scale())
    m.model[1].bias.requires_grad_(False)
    attach(m)
    opt = m.configure_optimizers()["optimizer"]
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    named = dict(m.named_parameters())
    assert id(named["model.0.parametrizations.weight.0.scores"]) in in_opt
    assert id(named["model.0.parametrizations.weight.original"]) in in_opt
    assert id(named["model.1.bias"]) not in in_opt
    assert len(in_opt) == sum(p.requires_grad for p in m.parameters())


# ------------------------------------------------------------------------------------------ loss, targets
@pytest.mark.filterwarnings("ignore:.*is not registered on the model")
def test_label_smoothing_reaches_the_loss() -> None:
    torch.manual_seed(0)
    m = SparseLightningModule(tiny_backbone(), label_smoothing=0.2)
    x, y = torch.randn(6, 1, 8, 8), torch.randint(0, 10, (6,))
    loss = m.training_step((x, y), 0)
    logits = m(x)
    assert loss.item() == pytest.approx(F.cross_entropy(logits, y, label_smoothing=0.2).item())
    assert loss.item() != pytest.approx(F.cross_entropy(logits, y).item())


def test_sparsifiable_parameters_are_conv_and_linear_weights() -> None:
    m = SparseLightningModule(tiny_backbone())
    assert m.sparsifiable_parameters() == ["model.0.weight", "model.4.weight"]


def test_backbone_by_name_and_top5_metric() -> None:
    m = SparseLightningModule("small_cnn", num_classes=3, model_kwargs={"input_size": 8})
    assert m.hparams.backbone == "small_cnn"
    assert m(torch.zeros(2, 1, 8, 8)).shape == (2, 3)
    assert m.val_acc_top5.top_k == 3  # min(5, num_classes)
    assert "model.classifier.weight" in m.sparsifiable_parameters()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"optimizer": "rmsprop"}, "optimizer must be one of"),
        ({"lr_schedule": "linear"}, "lr_schedule must be one of"),
        ({"optimizer": "adam", "nesterov": True}, "nesterov"),
        ({"lr": 0.1, "min_lr": 0.2}, "min_lr"),
        ({"label_smoothing": 1.0}, "label_smoothing"),
        ({"milestones": [80, 40]}, "milestones"),
        ({"model_kwargs": {"input_size": 8}}, "model_kwargs"),
    ],
)
def test_bad_arguments_raise(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        SparseLightningModule(tiny_backbone(), **kwargs)


def test_bad_backbone_type() -> None:
    with pytest.raises(TypeError, match="backbone"):
        SparseLightningModule(42)  # type: ignore[arg-type]


def test_constant_schedule_runs_without_a_run_length() -> None:
    """max_epochs=-1, max_steps=-1 with lr_schedule='constant' (issue 12 #11): no NaN, the lr stays put."""
    import pytorch_lightning as pl
    from pytorch_lightning.callbacks import Callback
    from torch.utils.data import DataLoader, TensorDataset

    class StopAfter3(Callback):
        lrs: list[float] = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):  # noqa: ANN001, ANN201
            self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])
            trainer.should_stop = len(self.lrs) >= 3

    module = SparseLightningModule(tiny_backbone(), lr=0.07, lr_schedule="constant")
    data = DataLoader(TensorDataset(torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))), batch_size=4)
    stop = StopAfter3()
    trainer = pl.Trainer(
        max_epochs=-1,
        max_steps=-1,
        callbacks=[stop],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, data)
    assert stop.lrs == [0.07, 0.07, 0.07]
    assert trainer.global_step == 3
