"""er-lightning: sparse training from random Erdős–Rényi masks, as PyTorch Lightning callbacks.

The public classes are re-exported here::

    from er_lightning import SparseLightningModule, StaticSparsity, create_model
"""

from er_lightning.callbacks import StaticSparsity
from er_lightning.models import create_model
from er_lightning.module import ParamGroup, SparseLightningModule
from er_lightning.sparsity import layer_densities

__version__ = "0.1.0"

__all__ = ["ParamGroup", "SparseLightningModule", "StaticSparsity", "create_model", "layer_densities"]
