"""Shared fixtures: a tiny conv net, a plain LightningModule (not ours: callbacks must work on any) and data."""

from __future__ import annotations

import os

import pytest
import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

os.environ.setdefault("PL_DISABLE_FORK", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))


class TinyNet(nn.Module):
    """conv(3→8) BN ReLU, conv(8→16) BN ReLU, pool, linear(16→10): three masked weights."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean(dim=(2, 3)))


class PlainModule(pl.LightningModule):
    """A user's own LightningModule: knows nothing about masks."""

    def __init__(self, optimizer: str = "sgd", lr: float = 0.05, weight_decay: float = 5e-4) -> None:
        super().__init__()
        self.net = TinyNet()
        self.optimizer_name = optimizer
        self.lr = lr
        self.weight_decay = weight_decay

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):  # noqa: ANN001
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):  # noqa: ANN001
        x, y = batch
        self.log("val_loss", nn.functional.cross_entropy(self(x), y))

    def configure_optimizers(self):  # noqa: ANN201
        params = self.parameters()
        if self.optimizer_name == "sgd":
            return torch.optim.SGD(
                params, lr=self.lr, momentum=0.9, nesterov=True, weight_decay=self.weight_decay
            )
        if self.optimizer_name == "adam":
            return torch.optim.Adam(params, lr=self.lr, weight_decay=self.weight_decay)
        if self.optimizer_name == "adamw":
            return torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)
        if self.optimizer_name == "rmsprop":
            return torch.optim.RMSprop(params, lr=self.lr, momentum=0.9, weight_decay=self.weight_decay)
        raise ValueError(self.optimizer_name)


def random_loader(n: int = 64, batch_size: int = 16, seed: int = 0, image: int = 8) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, image, image, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=False)


def make_trainer(tmp_path, callbacks, max_steps: int = 4, **kwargs) -> pl.Trainer:  # noqa: ANN001
    defaults = dict(
        default_root_dir=str(tmp_path),
        max_steps=max_steps,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    defaults.update(kwargs)
    return pl.Trainer(callbacks=callbacks, **defaults)


@pytest.fixture
def tiny_module() -> PlainModule:
    torch.manual_seed(0)
    return PlainModule()
