"""Fixed-mask sparse training from a random ER mask (weak lottery tickets; upstream ``--sparse --fix``)."""

from __future__ import annotations

from er_lightning.callbacks.base import SparsityCallback

__all__ = ["StaticSparsity"]


class StaticSparsity(SparsityCallback):
    """Train with a fixed random Erdős–Rényi mask (Gadhikar et al., "Why Random Pruning Is All We Need to Start
    Sparse", ICML 2023, arXiv:2210.02412).

    At ``setup`` the masked parameters (every conv and linear weight by default) get per-layer densities from the
    chosen rule and a seeded random mask with exactly ``round(d_l · n_l)`` kept entries; masked weights are zeroed
    in place and their gradients are zeroed before every optimizer step, so weights and optimizer moments stay
    exactly zero there. See :class:`~er_lightning.callbacks.base.SparsityCallback` for every argument.

    Upstream ``--sparse-init`` names are accepted as aliases: ``ERK`` → ``erk``; ``ER_same_params`` and
    ``ER_same_params_per_layer`` → ``balanced``; ``pyramid``, ``pyramid_sparsity`` → ``pyramidal``;
    ``ER_init`` → ``uniform``. Unknown names raise.

    Example:
        >>> import pytorch_lightning as pl
        >>> from er_lightning import SparseLightningModule, StaticSparsity
        >>> trainer = pl.Trainer(max_epochs=1, callbacks=[StaticSparsity(density=0.1, distribution="erk")])
        >>> # trainer.fit(SparseLightningModule("resnet18", num_classes=10), datamodule=...)
    """
