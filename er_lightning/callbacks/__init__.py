"""Sparse-training behaviours as Lightning callbacks; attach them to any LightningModule.

| callback | method |
|---|---|
| :class:`StaticSparsity` | fixed random ER mask, or the layer ratios / positions of a pruning-at-init criterion |
| :class:`IterativeMagnitudePruning` | IMP with weight rewinding, optionally from an ER start |
| :class:`SET`, :class:`RigL`, :class:`GraNet`, :class:`GMP` | dynamic sparse training from an ER start |
| :class:`Supermask` | strong lottery tickets: edge-popup scores inside a random ER mask |
| :class:`SoftThreshold` | STR soft thresholds on a random ER support |

:class:`ResumableCheckpoint` is a ``ModelCheckpoint`` that refreshes ``last.ckpt`` every epoch (the CLI's default).
"""

from er_lightning.callbacks.base import DISTRIBUTION_ALIASES, SparsityCallback
from er_lightning.callbacks.checkpoint import ResumableCheckpoint
from er_lightning.callbacks.dynamic import GMP, SET, DynamicSparsity, GraNet, RigL
from er_lightning.callbacks.imp import IterativeMagnitudePruning
from er_lightning.callbacks.soft_threshold import SoftThreshold
from er_lightning.callbacks.static import StaticSparsity
from er_lightning.callbacks.supermask import Supermask

__all__ = [
    "DISTRIBUTION_ALIASES",
    "GMP",
    "SET",
    "DynamicSparsity",
    "GraNet",
    "IterativeMagnitudePruning",
    "ResumableCheckpoint",
    "RigL",
    "SoftThreshold",
    "SparsityCallback",
    "StaticSparsity",
    "Supermask",
]
