"""A StaticSparsity that flips one mask entry on rank 1 after setup, to prove `verify_masks` catches it."""

from __future__ import annotations

import torch.distributed as dist

from er_lightning.callbacks import StaticSparsity


class CorruptingStaticSparsity(StaticSparsity):
    def on_fit_start(self, trainer, pl_module):  # noqa: ANN001, ANN201
        if dist.is_initialized() and dist.get_rank() == 1:
            mask = next(iter(self.masked.masks.values()))
            mask.view(-1)[0] = ~mask.view(-1)[0]
        super().on_fit_start(trainer, pl_module)
