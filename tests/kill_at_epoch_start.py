"""A callback that SIGKILLs its own process when an epoch starts: a run killed mid-study, for resume tests."""

from __future__ import annotations

import os
import signal

import pytorch_lightning as pl


class KillAtEpochStart(pl.Callback):
    """Kill the process (no clean-up, as a scheduler's SIGKILL) when epoch ``epoch`` (0-based) starts.

    The previous epoch's checkpoint is on disk by then (``ModelCheckpoint`` saves at the end of each epoch).
    """

    def __init__(self, epoch: int = 1) -> None:
        self.epoch = epoch

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch == self.epoch:
            os.kill(os.getpid(), signal.SIGKILL)
