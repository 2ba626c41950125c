"""A callback that SIGKILLs its own process at a chosen batch: a crash with no chance to save anything."""

from __future__ import annotations

import os
import signal

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Callback


class SigkillAt(Callback):
    """Kill the process (SIGKILL, no cleanup, no on_exception) before batch ``batch`` of epoch ``epoch``."""

    def __init__(self, epoch: int, batch: int = 0) -> None:
        self.epoch = epoch
        self.batch = batch

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx: int
    ) -> None:  # noqa: ANN001
        if trainer.current_epoch == self.epoch and batch_idx == self.batch:
            os.kill(os.getpid(), signal.SIGKILL)
