"""er-lightning: sparse training from random Erdős–Rényi masks, as PyTorch Lightning callbacks.

The public classes are re-exported here::

    from er_lightning import SparseLightningModule, StaticSparsity, RigL, create_model
"""

from er_lightning.callbacks import (
    GMP,
    SET,
    GraNet,
    IterativeMagnitudePruning,
    RigL,
    SoftThreshold,
    StaticSparsity,
    Supermask,
)
from er_lightning.models import create_model
from er_lightning.module import ParamGroup, SparseLightningModule
from er_lightning.sparsity import layer_densities
from er_lightning.sparsity.schedules import ConstantDrop, CosineDrop, LinearDrop

__version__ = "0.1.0"

__all__ = [
    "GMP",
    "SET",
    "ConstantDrop",
    "CosineDrop",
    "GraNet",
    "IterativeMagnitudePruning",
    "LinearDrop",
    "ParamGroup",
    "RigL",
    "SoftThreshold",
    "SparseLightningModule",
    "StaticSparsity",
    "Supermask",
    "create_model",
    "layer_densities",
]
