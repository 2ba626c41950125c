"""The two "your own model" examples run from their YAML configs: a transformer LM with RigL, a ViT with ERK."""

from __future__ import annotations

import logging
import re
import sys
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from er_lightning.callbacks import RigL, StaticSparsity
from er_lightning.cli import main
from er_lightning.masking import default_targets
from er_lightning.masking.masked import count_zeros
from er_lightning.sparsity.topk import exact_count

ROOT = Path(__file__).resolve().parents[1]
SHORT = [
    "--trainer.max_epochs=1",
    "--trainer.limit_train_batches=6",
    "--trainer.limit_val_batches=1",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
]


@pytest.fixture(autouse=True)
def _no_cli_argv(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", ["cli.py"])


def _matmul_and_embedding_weights(model: nn.Module) -> list[str]:
    """Every nn.Linear / attention projection / nn.Embedding weight, found independently of the target rule."""
    names = []
    for mod_name, module in model.named_modules():
        if isinstance(module, nn.Linear | nn.Embedding | nn.Conv2d):
            names.append(f"{mod_name}.weight")
        if isinstance(module, nn.MultiheadAttention):
            names.append(f"{mod_name}.in_proj_weight")
    return names


def _zeros_in_state_dict(state_dict: dict[str, torch.Tensor]) -> tuple[int, int]:
    """Zeros over the floating-point entries of a state_dict, tensors shared by several keys counted once."""
    unique = {t.data_ptr(): t for t in state_dict.values() if torch.is_floating_point(t)}
    return sum(int((t == 0).sum()) for t in unique.values()), sum(t.numel() for t in unique.values())


def _fit(config: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog, edit=None):  # noqa: ANN001, ANN202
    monkeypatch.chdir(tmp_path)
    text = (ROOT / config).read_text()
    if edit is not None:
        data = yaml.safe_load(text)
        edit(data)
        text = yaml.safe_dump(data)
    path = tmp_path / "config.yaml"
    path.write_text(text)
    with caplog.at_level(logging.INFO):
        cli = main(["fit", "--config", str(path), *SHORT])
    table = next(r.getMessage() for r in caplog.records if "whole model" in r.getMessage())
    return cli, table


def _whole_model_line(table: str) -> tuple[int, int]:
    line = re.search(r"whole model\s+(\d+) parameters\s+[\d.]+\s+(\d+)\s+\((\d+) zero\)", table)
    assert line is not None, table
    return int(line.group(3)), int(line.group(1))


def test_transformer_lm_with_rigl(tmp_path, monkeypatch, caplog):
    def update_often(data: dict) -> None:
        data["trainer"]["callbacks"][0]["init_args"]["update_every_steps"] = 2

    cli, table = _fit(
        "configs/examples/transformer_lm_rigl.yaml", tmp_path, monkeypatch, caplog, update_often
    )
    (cb,) = [c for c in cli.trainer.callbacks if isinstance(c, RigL)]
    module = cli.model
    lm = module.model
    assert lm.head.weight is lm.token.weight  # still tied after training
    # every matmul and embedding weight is masked, the tied one once
    expected = [f"model.{n}" for n in _matmul_and_embedding_weights(lm) if n != "head.weight"]
    assert sorted(cb.masked.names) == sorted(expected)
    assert cb.masked.names == default_targets(module, embeddings=True)
    update = cb.last_update
    assert update is not None and update.step >= 2
    moved = {n: (int(update.dropped[n].sum()), int(update.grown[n].sum())) for n in update.dropped}
    assert all(d == g for d, g in moved.values()) and sum(d for d, _ in moved.values()) > 0
    assert int(update.grown["model.token.weight"].sum()) > 0  # the tied tensor is updated as one
    params = dict(module.named_parameters())
    kept_all = numel_all = 0
    for name, mask in cb.masked.masks.items():
        kept = int(mask.sum())
        assert kept == exact_count(
            cb.target_densities[name], mask.numel()
        )  # exact count per tensor, after updates
        assert torch.count_nonzero(params[name]) <= kept
        assert (params[name][~mask] == 0).all()
        kept_all += kept
        numel_all += mask.numel()
    # the masked share of all matmul/embedding weights is the requested density, up to one count per tensor
    assert abs(kept_all - 0.1 * numel_all) <= len(cb.masked.names) / 2
    assert (kept_all, numel_all) == (1893, 18944)
    # the setup table's whole-model line is a count of zeros in the state_dict (tied tensor once)
    zeros, total = _whole_model_line(table)
    assert total == sum(p.numel() for p in module.parameters()) == 19712
    assert zeros == 17467  # 17051 masked zeros + 416 zero-initialised biases
    checkpoint = torch.load(
        tmp_path / "runs/transformer_lm_rigl/checkpoints/last.ckpt", map_location="cpu", weights_only=True
    )
    saved_zeros, saved_total = _zeros_in_state_dict(checkpoint["state_dict"])
    assert saved_total == total
    assert (saved_zeros, saved_total) == count_zeros(module)
    assert saved_zeros >= numel_all - kept_all


def test_vit_with_static_erk(tmp_path, monkeypatch, caplog):
    cli, table = _fit("configs/examples/vit_static_erk.yaml", tmp_path, monkeypatch, caplog)
    (cb,) = [c for c in cli.trainer.callbacks if isinstance(c, StaticSparsity)]
    module = cli.model
    expected = [f"model.{n}" for n in _matmul_and_embedding_weights(module.model)]
    assert sorted(cb.masked.names) == sorted(expected)  # patch conv, in_proj, out_proj, fc1, fc2, head
    assert "model.pos_embed" not in cb.masked.names and "model.cls_token" not in cb.masked.names
    params = dict(module.named_parameters())
    for name, mask in cb.masked.masks.items():
        assert int(mask.sum()) == exact_count(cb.target_densities[name], mask.numel())
        assert (params[name][~mask] == 0).all()
    zeros, total = _whole_model_line(table)
    assert total == sum(p.numel() for p in module.parameters())
    checkpoint = torch.load(
        tmp_path / "runs/vit_static_erk/checkpoints/last.ckpt", map_location="cpu", weights_only=True
    )
    saved_zeros, saved_total = _zeros_in_state_dict(checkpoint["state_dict"])
    assert saved_total == total
    assert saved_zeros >= sum(int((~m).sum()) for m in cb.masked.masks.values())
