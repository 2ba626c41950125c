"""``ResumableCheckpoint``: a ``ModelCheckpoint`` whose ``last.ckpt`` is refreshed at the end of every epoch."""

from __future__ import annotations

import pytorch_lightning as pl
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.trainer.states import TrainerFn
from typing_extensions import override

__all__ = ["ResumableCheckpoint"]


class ResumableCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` that also writes ``last.ckpt`` at the end of every training epoch.

    Lightning's ``save_last=True`` writes ``last.ckpt`` only when a top-k checkpoint is written: with
    ``save_top_k=0`` nothing reaches the disk before training ends, and with ``monitor="val/acc"`` the "last"
    checkpoint is the last *improving* epoch, so a run killed in epoch 9 resumes from epoch 6. This subclass keeps
    every ``ModelCheckpoint`` argument and behaviour (``monitor``, ``mode``, ``save_top_k`` choose the best
    checkpoints as before) and, when ``save_last`` is on, refreshes ``last.ckpt`` at every ``on_train_epoch_end``
    where no checkpoint was written at this step yet (when the monitored metric improved, Lightning has just
    written both at validation end, which resumes as well). Lightning runs checkpoint callbacks after every other
    callback, so an epoch-end ``last.ckpt`` holds the state after the sparsity callbacks' epoch-end work (e.g. an
    IMP prune). A resumed run loses at most the epoch in progress.

    The :class:`~er_lightning.cli.SparseCLI` ``checkpoint`` group is this class with ``save_last=True``.

    Example:
        >>> import pytorch_lightning as pl
        >>> best_and_last = ResumableCheckpoint(dirpath="runs/x/checkpoints", monitor="val/acc", mode="max",
        ...                                     save_top_k=1, save_last=True)
        >>> trainer = pl.Trainer(max_epochs=160, callbacks=[best_and_last])
        >>> # killed at any point: trainer.fit(module, ckpt_path="last") resumes from the last finished epoch
    """

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Save top-k as ``ModelCheckpoint`` does, then ``last.ckpt`` if this step has no checkpoint yet."""
        super().on_train_epoch_end(trainer, pl_module)
        if (
            not self.save_last
            or trainer.fast_dev_run
            or trainer.sanity_checking
            or trainer.state.fn != TrainerFn.FITTING
            or self._last_global_step_saved == trainer.global_step
        ):
            return
        self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
