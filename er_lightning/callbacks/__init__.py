"""Sparse-training behaviours as Lightning callbacks; attach them to any LightningModule."""

from er_lightning.callbacks.base import DISTRIBUTION_ALIASES, SparsityCallback
from er_lightning.callbacks.static import StaticSparsity

__all__ = ["DISTRIBUTION_ALIASES", "SparsityCallback", "StaticSparsity"]
