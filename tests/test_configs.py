"""The configs that reproduce the seed README's commands carry the settings the commands give."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from er_lightning.callbacks import GraNet, SoftThreshold, StaticSparsity, Supermask
from er_lightning.cli import main
from er_lightning.masking import default_targets
from er_lightning.sparsity import expected_density

ROOT = Path(__file__).resolve().parents[1]


def _build(config: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):  # noqa: ANN202
    monkeypatch.chdir(tmp_path)
    return main(["--config", str(ROOT / config)], run=False)


def _only(cli, cls):  # noqa: ANN001, ANN202
    found = [cb for cb in cli.trainer.callbacks if isinstance(cb, cls)]
    assert len(found) == 1
    return found[0]


def test_er_wlt_seed_command(tmp_path, monkeypatch):
    cli = _build("configs/er_wlt/resnet50_cifar100_balanced.yaml", tmp_path, monkeypatch)
    cb = _only(cli, StaticSparsity)
    assert (cb.density, cb.distribution, cb.seed, cb.redistribute) == (0.01, "balanced", 1, False)
    assert cli.trainer.max_epochs == 160
    assert cli.model.hparams.lr == 0.1
    model = cli.model.model
    params = dict(model.named_parameters())
    shapes = {n: tuple(params[n].shape) for n in default_targets(model)}
    assert len(shapes) == 54
    # upstream's capped balanced rule: the spec's golden expected density for ResNet-50 at 0.01
    assert expected_density(shapes, cb.resolve_densities(shapes)) == pytest.approx(0.009876, abs=1e-6)


def test_er_dst_seed_command(tmp_path, monkeypatch):
    cli = _build("configs/er_dst/granet_vgg16_cifar10.yaml", tmp_path, monkeypatch)
    cb = _only(cli, GraNet)
    assert cb.distribution == "balanced"
    assert cb.update_every_steps == 1000
    assert cb.flow_preservation is True
    assert cb.seed == 1
    assert cli.trainer.max_epochs == 160
    assert cli.model.hparams.weight_decay == 5e-4


def test_er_slt_seed_command(tmp_path, monkeypatch):
    cli = _build("configs/er_slt/resnet18_cifar10.yaml", tmp_path, monkeypatch)
    cb = _only(cli, Supermask)
    assert (cb.final_density, cb.er_density, cb.levels, cb.anneal, cb.seed) == (0.2, 0.5, 5, True, 2)
    assert cb.weight_init == "kn-zero-bias"
    assert cli.trainer.max_epochs == 500
    assert not any(isinstance(m, torch.nn.BatchNorm2d) and m.affine for m in cli.model.modules())


def test_str_seed_yaml(tmp_path, monkeypatch):
    cli = _build("configs/str/resnet18_cifar10_balanced.yaml", tmp_path, monkeypatch)
    cb = _only(cli, SoftThreshold)
    assert (cb.density, cb.distribution) == (0.3, "balanced")
    assert cli.model.hparams.label_smoothing == 0.1
    assert cli.trainer.max_epochs == 100


def test_rigl_config_decays_to_zero_at_the_stop(tmp_path, monkeypatch):
    from er_lightning.callbacks import RigL
    from er_lightning.sparsity.schedules import CosineDrop

    cli = _build("configs/er_dst/rigl_resnet18_cifar10_pyramidal.yaml", tmp_path, monkeypatch)
    cb = _only(cli, RigL)
    assert cb.drop_schedule == CosineDrop(0.3, floor=0.0, until="stop") and cb.stop_updates_at == 0.75
    # 72,000 steps, stop at 54,000: half-way to the stop the fraction is 0.15, at the last update (53,900) ~0
    assert cb.drop_schedule(27_000, 72_000, stop_step=54_000) == pytest.approx(0.15)
    assert cb.drop_schedule(53_900, 72_000, stop_step=54_000) < 1e-4


def test_set_config_comment_constant_drop_parses(tmp_path, monkeypatch):
    """The SET config says `drop_fraction: {value: 0.3}` is a ConstantDrop: check that it parses so."""
    from er_lightning.callbacks import SET
    from er_lightning.sparsity.schedules import ConstantDrop

    text = (ROOT / "configs/er_dst/set_resnet18_cifar10_erk.yaml").read_text()
    assert "drop_fraction: 0.5\n" in text and "`drop_fraction: {value: 0.3}`" in text
    edited = tmp_path / "set.yaml"
    edited.write_text(text.replace("drop_fraction: 0.5\n", "drop_fraction: {value: 0.3}\n"))
    monkeypatch.chdir(tmp_path)
    cli = main(["--config", str(edited)], run=False)
    assert _only(cli, SET).drop_schedule == ConstantDrop(0.3)
