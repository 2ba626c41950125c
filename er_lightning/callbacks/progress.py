"""One unit for training progress: the step schedules of the callbacks count optimizer steps.

DST updates, ``stop_updates_at``, GraNet's pruning window, Supermask's levels and SoftThreshold's density target all
compare ``trainer.global_step`` (optimizer steps done) with ``trainer.estimated_stepping_batches`` (the run's length
in batches, divided by gradient accumulation). The two are the same unit under automatic optimization, where
Lightning takes one step per (accumulated) batch with the module's single optimizer. Under manual optimization
(``automatic_optimization = False``) a module may step two optimizers per batch, or one every few batches, and the
schedules would run at the wrong speed (measured with two optimizers per batch: RigL's ``stop_updates_at=0.75`` stopped at
step 15 of 40 batches and GraNet reached its final density at half time). :class:`StepUnitGuard` makes such runs fail
with an explanation instead: one optimizer, and under manual optimization exactly one step per training batch.
"""

from __future__ import annotations

import pytorch_lightning as pl

__all__ = ["StepUnitGuard"]


class StepUnitGuard:
    """Checks that optimizer steps and batches count alike for a callback's step schedule.

    Call :meth:`fit_start` from ``on_fit_start``, :meth:`batch_start`/:meth:`batch_end` from
    ``on_train_batch_start``/``on_train_batch_end``; they cost an integer comparison per batch.

    Args:
        owner: the callback's name, for the messages.
        schedule: what counts steps, e.g. ``"its update schedule (update_every_steps, stop_updates_at)"``.

    Example:
        >>> guard = StepUnitGuard("RigL", "its update schedule")
        >>> # in the callback: guard.fit_start(trainer, pl_module); guard.batch_start(trainer, pl_module); ...
    """

    def __init__(self, owner: str, schedule: str) -> None:
        self.owner = owner
        self.schedule = schedule
        self._start: int | None = None

    def _explain(self) -> str:
        return (
            f"{self.owner}: {self.schedule} counts optimizer steps (trainer.global_step) against the run's length in "
            "batches (trainer.estimated_stepping_batches), so it needs one optimizer step per training batch"
        )

    def fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Raise unless the run has exactly one optimizer."""
        n = len(trainer.optimizers)
        if n != 1:
            raise RuntimeError(
                f"{self._explain()}, and this run has {n} optimizers (each of their steps advances global_step). Use "
                "one optimizer (param groups can give parts of the model other settings), or a sparsity callback "
                "without a step schedule (StaticSparsity, IterativeMagnitudePruning)"
            )

    def batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Remember the step count before a batch (manual optimization only)."""
        self._start = None if pl_module.automatic_optimization else trainer.global_step

    def batch_end(self, trainer: pl.Trainer) -> None:
        """Raise if a manually optimised batch took another number of optimizer steps than one."""
        if self._start is None:
            return
        taken = trainer.global_step - self._start
        self._start = None
        if taken != 1:
            raise RuntimeError(
                f"{self._explain()}; under manual optimization this batch took {taken} optimizer steps. Step the "
                "optimizer exactly once per training_step (accumulate with Trainer(accumulate_grad_batches=...) under "
                "automatic optimization instead), or use a sparsity callback without a step schedule"
            )
