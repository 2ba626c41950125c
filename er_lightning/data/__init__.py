"""LightningDataModules for the experiments: CIFAR-10/100, Tiny-ImageNet, the bundled digits demo and synthetic data.

These modules import nothing from the rest of ``er_lightning``: any data module trains any model, sparse or dense.
"""

from __future__ import annotations

from er_lightning.data.cifar import CIFAR10_STATS, CIFAR100_STATS, CIFAR10DataModule, CIFAR100DataModule
from er_lightning.data.digits import DIGITS_MEAN, DIGITS_STD, DigitsDataModule
from er_lightning.data.synthetic import SyntheticImagesDataModule, SyntheticTokensDataModule
from er_lightning.data.tiny_imagenet import TINY_IMAGENET_STATS, TinyImageNetDataModule

__all__ = [
    "CIFAR10_STATS",
    "CIFAR100_STATS",
    "DIGITS_MEAN",
    "DIGITS_STD",
    "TINY_IMAGENET_STATS",
    "CIFAR10DataModule",
    "CIFAR100DataModule",
    "DigitsDataModule",
    "SyntheticImagesDataModule",
    "SyntheticTokensDataModule",
    "TinyImageNetDataModule",
]
