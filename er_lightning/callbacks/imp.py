"""Iterative magnitude pruning (IMP) with weight rewinding, from a dense or a random ER start, within one ``fit``."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_info, rank_zero_only, rank_zero_warn
from torch import Tensor
from typing_extensions import override

from er_lightning.callbacks.base import Density, Distribution, SparsityCallback
from er_lightning.masking.io import save_masks
from er_lightning.sparsity.checks import check_bool
from er_lightning.sparsity.topk import exact_count, global_topk_masks, topk_mask

__all__ = ["IterativeMagnitudePruning"]


class IterativeMagnitudePruning(SparsityCallback):
    """Train, prune the smallest weights, rewind, repeat: IMP / lottery tickets with rewinding.

    Frankle and Carbin, "The Lottery Ticket Hypothesis", ICLR 2019, arXiv:1803.03635; late rewinding: Frankle et
    al., "Linear Mode Connectivity and the Lottery Ticket Hypothesis", ICML 2020, arXiv:1912.05671. Starting from
    a random ER mask instead of a dense network is the sparse-to-sparse IMP of Gadhikar et al. (ICML 2023,
    arXiv:2210.02412; upstream ``STR/run_imp.py``: balanced 0.3, then IMP ×0.8 per level with reset weights).

    The starting mask is the base class's (``density`` + ``distribution``; the default ``density=1.0`` is a dense
    start). Training then runs in segments of ``epochs_per_level`` epochs. At the end of each segment (in
    ``on_train_epoch_end``, after that epoch's validation and before its epoch-end checkpoint, since Lightning runs
    ``ModelCheckpoint`` last) the callback

    1. prunes by magnitude ``|W|`` among the weights still active (pruning never regrows) to the level's density:
       ``scope="global"`` keeps exactly ``round(d_level · N)`` weights over all ``N`` masked weights;
       ``scope="layerwise"`` keeps ``round(d_level / density · k0_l)`` in each layer, ``k0_l`` its count in the
       starting mask (every layer shrinks by the same factor; for a dense start that is ``round(d_level · n_l)``);
    2. rewinds (unless ``rewind_step=None``): every parameter, and every buffer (BN running statistics) when
       ``rewind_buffers``, is restored bit for bit from the snapshot taken after ``rewind_step`` optimizer steps
       (0 = right after ``setup``, i.e. the masked initial weights), then the new mask zeroes the pruned weights;
    3. clears the optimizer state (``reset_optimizer``: ``optimizer.state.clear()``, so momentum and Adam moments
       restart), or restores the state it had at the rewind point (``rewind_optimizer``: momentum and moments of
       step ``rewind_step``, as upstream STR reloads the initial optimizer state with its weights), or else keeps
       it; in every case it is then zeroed at the pruned positions;
    4. restarts the learning-rate schedule for the next segment (``reset_lr_schedule``) by calling
       ``pl_module.reset_lr_schedule(schedule_steps)`` when the module has it (``SparseLightningModule`` does):
       ``epochs_per_level`` epochs for a level, the remaining epochs up to ``max_epochs`` after the last prune.
       Other LightningModules keep their schedule running across levels (a warning says so); reset it yourself
       in the module's ``on_train_epoch_start`` if needed;
    5. writes the new mask to ``save_dir/level_{i}.pt`` (``level_0.pt`` is the starting mask), loadable with
       ``StaticSparsity(distribution="from_mask", mask_file=...)`` (ER_imp: ``placement="random"``). The folder
       is part of the checkpoint state: a resumed run writes its levels next to the earlier ones (not into its
       own ``version_N``), so one folder holds every level.

    Level densities: ``densities`` if given, else ``density · prune_factor**i`` for ``i = 1..levels``. After the
    last prune, training simply continues with the final mask until ``max_epochs``, so a run needs
    ``max_epochs = levels · epochs_per_level + final epochs`` (a warning tells when fewer epochs cannot reach
    every level, and another when no epoch follows the last prune: the run would end on the rewound, untrained
    network). Level, start counts and the rewind snapshot (CPU copies: a checkpoint then holds the model
    twice) are part of the callback's checkpoint state, so a run resumed mid-level continues exactly. Checkpoints
    written at epoch ends (``ModelCheckpoint``'s default when validation runs once per epoch) hold the pruned and
    rewound state; a checkpoint written at validation end of a level's last epoch (``save_on_train_epoch_end=False``)
    holds the state just before the prune, and Lightning runs that epoch's ``on_train_epoch_end`` again when it
    resumes, so the prune happens then, with the same result (both cases are tested). Checkpoints written
    mid-epoch resume as Lightning allows (it may replay batches).

    Args:
        epochs_per_level: training epochs before each prune, >= 1.
        levels: number of prunes, >= 1 (omit when ``densities`` is given, or give ``len(densities)``).
        prune_factor: density multiplier per level, in (0, 1) (upstream ``run_imp.py``: 0.8).
        densities: explicit density after each prune, non-increasing, each in (0, ``density``].
        scope: ``"global"`` (one magnitude threshold over all masked layers) or ``"layerwise"``.
        rewind_step: optimizer steps of training before the rewind snapshot (0 = initial weights; late rewinding
            uses a few hundred), reached before the first prune; ``None`` = no rewinding (keep training the
            pruned weights, as upstream's tabular IMP does).
        rewind_buffers: also rewind buffers (BN running statistics). Upstream ``--reset-weights`` restores only
            ``.weight``/``.bias`` entries (``rewind_buffers=False``); restoring them too gives the exact state of
            the rewind point.
        reset_optimizer: clear the optimizer state at each prune (``False`` keeps it, zeroed where pruned).
        rewind_optimizer: restore the optimizer state (not its hyper-parameters such as the LR) of the rewind point
            at each prune, instead of clearing it; needs ``rewind_step`` (at ``rewind_step=0`` the state there is
            empty, so this equals clearing) and ``reset_optimizer=True``. The snapshot (CPU copies, as large as
            the optimizer state) is kept in the checkpoint.
        reset_lr_schedule: restart the LR schedule for each segment (see above).
        save_dir: folder for ``level_{i}.pt``; default ``<trainer.log_dir>/imp_masks`` of the run that started
            (``default_root_dir`` without a logger), kept on resume.
        density: density of the starting mask, in (0, 1]; 1.0 starts dense.
        distribution: layer-wise rule of the starting mask (see ``SparsityCallback``).
        **kwargs: the other arguments of :class:`~er_lightning.callbacks.base.SparsityCallback`.

    Raises:
        ValueError: ``epochs_per_level``/``levels`` < 1, ``prune_factor`` outside (0, 1), ``densities`` not
            non-increasing in (0, ``density``], neither ``levels`` nor ``densities`` given, ``levels`` different
            from ``len(densities)``, ``rewind_step`` < 0 or not reached before the first prune.

    Example:
        >>> from er_lightning.callbacks.imp import IterativeMagnitudePruning
        >>> imp = IterativeMagnitudePruning(  # upstream run_imp.py: balanced 0.3, 15 levels x0.8
        ...     density=0.3, distribution="balanced", epochs_per_level=150, levels=15, prune_factor=0.8
        ... )
        >>> round(imp.level_densities[0], 4), round(imp.level_densities[-1], 6)
        (0.24, 0.010555)
        >>> # pl.Trainer(max_epochs=15 * 150 + 160, callbacks=[imp]).fit(module, datamodule=...)
    """

    def __init__(
        self,
        epochs_per_level: int,
        levels: int | None = None,
        prune_factor: float = 0.8,
        densities: list[float] | None = None,
        scope: Literal["global", "layerwise"] = "global",
        rewind_step: int | None = 0,
        rewind_buffers: bool = True,
        reset_optimizer: bool = True,
        rewind_optimizer: bool = False,
        reset_lr_schedule: bool = True,
        save_dir: str | None = None,
        density: Density = 1.0,
        distribution: Distribution = "erk",
        sampling: Literal["exact", "bernoulli"] = "exact",
        seed: int = 0,
        include: list[str] | None = None,
        exclude: list[str] | None = None,
        embeddings: bool = False,
        dense_first_layer: bool = False,
        dense_last_layer: bool = False,
        redistribute: bool = True,
        power_scale: float = 1.0,
        custom_densities: dict[str, float] | None = None,
        init: Literal["default", "he_sparse", "looks_linear"] = "default",
        flow_preservation: bool = False,
        ortho_repair: bool = False,
        ortho_steps: int = 1000,
        ortho_lr: float = 1e-2,
        rezero_every_step: bool = False,
        verify_masks: bool = False,
        log_layer_densities: bool = False,
        compute: Literal["dense", "sparse", "auto"] = "dense",
    ) -> None:
        super().__init__(
            density=density,
            distribution=distribution,
            sampling=sampling,
            seed=seed,
            include=include,
            exclude=exclude,
            embeddings=embeddings,
            dense_first_layer=dense_first_layer,
            dense_last_layer=dense_last_layer,
            redistribute=redistribute,
            power_scale=power_scale,
            custom_densities=custom_densities,
            init=init,
            flow_preservation=flow_preservation,
            ortho_repair=ortho_repair,
            ortho_steps=ortho_steps,
            ortho_lr=ortho_lr,
            rezero_every_step=rezero_every_step,
            verify_masks=verify_masks,
            log_layer_densities=log_layer_densities,
            compute=compute,
        )
        self.epochs_per_level = _positive_int(epochs_per_level, "epochs_per_level")
        if (
            isinstance(prune_factor, bool)
            or not isinstance(prune_factor, (int, float))
            or not 0.0 < float(prune_factor) < 1.0
        ):
            raise ValueError(f"prune_factor must be in (0, 1) (density kept per level), got {prune_factor!r}")
        self.prune_factor = float(prune_factor)
        if densities is not None:
            self.level_densities = _check_level_densities(densities, self.density)
            if levels is not None and _positive_int(levels, "levels") != len(self.level_densities):
                raise ValueError(
                    f"levels={levels} but densities has {len(self.level_densities)} entries; give one of them, "
                    "or make them agree"
                )
        else:
            if levels is None:
                raise ValueError(
                    "IterativeMagnitudePruning needs the pruning schedule: levels (with prune_factor, e.g. "
                    "levels=15, prune_factor=0.8) or an explicit list of densities"
                )
            n = _positive_int(levels, "levels")
            self.level_densities = [self.density * self.prune_factor**i for i in range(1, n + 1)]
        self.levels = len(self.level_densities)
        if scope not in ("global", "layerwise"):
            raise ValueError(f"scope must be 'global' or 'layerwise', got {scope!r}")
        self.scope = scope
        if rewind_step is not None and (
            isinstance(rewind_step, bool) or not isinstance(rewind_step, int) or rewind_step < 0
        ):
            raise ValueError(
                f"rewind_step must be an int >= 0 (optimizer steps; 0 = initial weights) or None, got {rewind_step!r}"
            )
        self.rewind_step = rewind_step
        self.rewind_buffers = check_bool(rewind_buffers, "rewind_buffers")
        self.reset_optimizer = check_bool(reset_optimizer, "reset_optimizer")
        self.rewind_optimizer = check_bool(rewind_optimizer, "rewind_optimizer")
        self.reset_lr_schedule = check_bool(reset_lr_schedule, "reset_lr_schedule")
        if self.rewind_optimizer and (rewind_step is None or not self.reset_optimizer):
            raise ValueError(
                "rewind_optimizer=True restores the optimizer state of the rewind point, so it needs rewind_step (an "
                f"int, got {rewind_step!r}) and reset_optimizer=True (got {reset_optimizer!r}; False keeps the state "
                "instead)"
            )
        self.save_dir = os.fspath(save_dir) if save_dir is not None else None

        #: Number of prunes done so far (0 while training the starting mask).
        self.level = 0
        self.start_counts: dict[str, int] = {}
        self._rewind: dict[str, dict[str, Tensor]] | None = None
        #: ``optimizer.state_dict()["state"]`` of every optimizer at the rewind point (``rewind_optimizer``).
        self._rewind_optimizer_state: list[dict[int, dict[str, Any]]] | None = None
        self._mask_dir: str | None = None

    @override
    def mask_config(self) -> dict[str, Any]:
        config = super().mask_config()
        config.update(
            {
                "epochs_per_level": self.epochs_per_level,
                "level_densities": list(self.level_densities),
                "scope": self.scope,
                "rewind_step": self.rewind_step,
                "rewind_buffers": self.rewind_buffers,
                "reset_optimizer": self.reset_optimizer,
                "rewind_optimizer": self.rewind_optimizer,
                "reset_lr_schedule": self.reset_lr_schedule,
            }
        )
        return config

    # ------------------------------------------------------------------ lifecycle
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if not self.start_counts and self.masked is not None:
            self.start_counts = {n: k for n, (k, _) in self.masked.counts().items()}

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        # A resumed run keeps writing where the interrupted one did (its log_dir is a new version_N); every rank
        # holds the same restored state. trainer.log_dir broadcasts from rank 0: call it on every rank.
        self._mask_dir = (
            self.save_dir
            or self._mask_dir
            or os.path.join(trainer.log_dir or trainer.default_root_dir, "imp_masks")
        )
        needed = self.levels * self.epochs_per_level
        max_epochs = trainer.max_epochs
        if max_epochs is not None and max_epochs >= 0 and max_epochs < needed:
            rank_zero_warn(
                f"{type(self).__name__}: max_epochs={max_epochs} reaches only {max_epochs // self.epochs_per_level} "
                f"of {self.levels} levels ({needed} epochs needed, plus the final training)"
            )
        elif max_epochs == needed and self.rewind_step is not None:
            rank_zero_warn(self._untrained_end_message(max_epochs))
        resettable = callable(getattr(pl_module, "reset_lr_schedule", None))
        if self.reset_lr_schedule and not resettable and trainer.lr_scheduler_configs:
            rank_zero_warn(
                f"{type(self).__name__}: {type(pl_module).__name__} has no reset_lr_schedule(), so its LR "
                "schedule runs on across IMP levels; restart it yourself or use SparseLightningModule"
            )
        if self.rewind_step == 0 and self._rewind is None:
            self._take_snapshot(trainer, pl_module)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        steps = _steps_per_epoch(trainer)
        if self.rewind_step and self._rewind is None and steps is not None:
            first_prune = self.epochs_per_level * steps
            if self.rewind_step > first_prune:
                raise ValueError(
                    f"rewind_step={self.rewind_step} is after the first prune (step {first_prune}: "
                    f"{self.epochs_per_level} epochs of {steps} steps); lower rewind_step or raise epochs_per_level"
                )
        if trainer.global_step == 0 and self.level == 0:  # a fresh run, not a resume
            self._restart_lr(trainer, pl_module)
            self._save_level()

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        # the level in the progress bar (the log line at each prune says what changed)
        pl_module.log("imp/level", float(self.level), prog_bar=True, logger=False, rank_zero_only=True)
        if self.rewind_step and self._rewind is None and trainer.global_step >= self.rewind_step:
            self._take_snapshot(trainer, pl_module)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        while self.level < self.levels and trainer.current_epoch + 1 >= self._boundary():
            self.prune_(trainer, pl_module)
        super().on_train_epoch_end(trainer, pl_module)

    def _boundary(self) -> int:
        """Number of completed epochs at which the next prune is due."""
        return (self.level + 1) * self.epochs_per_level

    # ------------------------------------------------------------------ one level
    def prune_(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Prune to the next level's density, rewind, reset optimizer state and LR schedule, save the mask."""
        assert self.masked is not None
        if self.rewind_step is not None and self._rewind is None:
            raise RuntimeError(
                f"{type(self).__name__}: rewind_step={self.rewind_step} was not reached before the prune at step "
                f"{trainer.global_step}; lower rewind_step"
            )
        target = self.level_densities[self.level]
        epochs_done = self._boundary()
        new = self.magnitude_masks(target)
        for name, mask in new.items():
            self.masked.set_mask_(name, mask)
        self.sync_masks_(trainer)
        if self.rewind_step is not None:
            assert self._rewind is not None
            self._restore(pl_module, self._rewind)
        self.masked.apply_()
        if self.rewind_optimizer:
            self._restore_optimizers(trainer)
        elif self.reset_optimizer:
            for optimizer in trainer.optimizers:
                optimizer.state.clear()
        self.masked.zero_optimizer_state_(trainer.optimizers)
        self.level += 1
        self.target_densities = self.masked.densities()
        self._restart_lr(trainer, pl_module, epochs_done)
        self._save_level()
        self.refresh_flops_()
        self.log_densities(trainer, extra={"imp/level": float(self.level)})
        max_epochs = trainer.max_epochs
        last = self.level == self.levels and self.rewind_step is not None
        if last and max_epochs is not None and 0 <= max_epochs <= epochs_done:
            rank_zero_warn(self._untrained_end_message(max_epochs))
        rank_zero_info(
            f"{type(self).__name__}: level {self.level}/{self.levels} after {epochs_done} epochs: density "
            f"{self.masked.global_density():.6f} (target {target:.6f})"
        )

    @torch.no_grad()
    def magnitude_masks(self, target: float) -> dict[str, Tensor]:
        """Masks keeping the largest ``|W|`` among the active weights, at overall density ``target``."""
        assert self.masked is not None
        scores = {n: p.detach().abs() for n, p in zip(self.masked.names, self.masked.params)}
        current = self.masked.masks
        kept_now = {n: int(current[n].sum()) for n in self.masked.names}
        if self.scope == "global":
            total = sum(m.numel() for m in current.values())
            k = min(exact_count(target, total), sum(kept_now.values()))
            return global_topk_masks(scores, k, current)
        ratio = target / self.density
        return {
            n: topk_mask(scores[n], min(round(ratio * self.start_counts[n]), kept_now[n]), current[n])
            for n in self.masked.names
        }

    def _untrained_end_message(self, max_epochs: int) -> str:
        return (
            f"{type(self).__name__}: training ends with the last prune (max_epochs={max_epochs} = levels "
            f"{self.levels} x epochs_per_level {self.epochs_per_level}), so the model it leaves is the network "
            f"rewound to step {self.rewind_step} under the final mask, never trained at that density. Add final "
            "epochs (max_epochs > levels x epochs_per_level) to train it, or use rewind_step=None; the level masks "
            "in the mask folder are complete either way"
        )

    def _take_snapshot(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """The rewind point: parameters and buffers, and with ``rewind_optimizer`` the optimizer state (CPU)."""
        self._rewind = self._snapshot(pl_module)
        if self.rewind_optimizer:
            self._rewind_optimizer_state = [
                _to_cpu(optimizer.state_dict()["state"]) for optimizer in trainer.optimizers
            ]

    def _restore_optimizers(self, trainer: pl.Trainer) -> None:
        """Load the optimizer state of the rewind point, keeping the current hyper-parameters (LR, ...)."""
        saved = self._rewind_optimizer_state
        if saved is None or len(saved) != len(trainer.optimizers):
            raise RuntimeError(
                f"{type(self).__name__}: rewind_optimizer=True but the rewind point holds the state of "
                f"{0 if saved is None else len(saved)} optimizers, this run has {len(trainer.optimizers)}"
            )
        for optimizer, state in zip(trainer.optimizers, saved):
            current = optimizer.state_dict()
            # copies: load_state_dict keeps CPU tensors of CPU parameters as they are, and the steps would edit them
            current["state"] = _to_cpu(state)
            optimizer.load_state_dict(current)

    def _snapshot(self, pl_module: pl.LightningModule) -> dict[str, dict[str, Tensor]]:
        params = {n: p.detach().to("cpu", copy=True) for n, p in pl_module.named_parameters()}
        buffers = (
            {n: b.detach().to("cpu", copy=True) for n, b in pl_module.named_buffers()}
            if self.rewind_buffers
            else {}
        )
        return {"params": params, "buffers": buffers}

    @torch.no_grad()
    def _restore(self, pl_module: pl.LightningModule, snapshot: Mapping[str, Mapping[str, Tensor]]) -> None:
        params = dict(pl_module.named_parameters())
        missing = [n for n in snapshot["params"] if n not in params]
        if missing:
            raise RuntimeError(f"{type(self).__name__}: cannot rewind, parameters {missing} no longer exist")
        for name, value in snapshot["params"].items():
            params[name].copy_(value)
        if self.rewind_buffers:
            buffers = dict(pl_module.named_buffers())
            for name, value in snapshot["buffers"].items():
                if name in buffers:
                    buffers[name].copy_(value)

    def _restart_lr(self, trainer: pl.Trainer, pl_module: pl.LightningModule, epochs_done: int = 0) -> None:
        """Restart the module's LR schedule for the segment that starts after ``epochs_done`` epochs."""
        reset = getattr(pl_module, "reset_lr_schedule", None)
        if not self.reset_lr_schedule or not callable(reset):
            return
        steps = _steps_per_epoch(trainer)
        if steps is None:
            reset(None)
        elif self.level < self.levels:
            reset(self.epochs_per_level * steps)
        else:
            max_epochs = trainer.max_epochs if trainer.max_epochs is not None else -1
            remaining = max_epochs - epochs_done
            reset(remaining * steps if remaining > 0 else None)

    @rank_zero_only
    def _save_level(self) -> None:
        if self.masked is None or self._mask_dir is None:
            return
        os.makedirs(self._mask_dir, exist_ok=True)
        save_masks(self.masked.masks, os.path.join(self._mask_dir, f"level_{self.level}.pt"))

    @property
    def mask_dir(self) -> str | None:
        """Folder the level masks are written to (known from ``on_fit_start``)."""
        return self._mask_dir

    # ------------------------------------------------------------------ checkpoint state
    @override
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        if state:
            state["imp"] = {
                "level": self.level,
                "start_counts": dict(self.start_counts),
                "rewind": self._rewind,
                "mask_dir": self._mask_dir,
                "rewind_optimizer": self._rewind_optimizer_state,
            }
        return state

    @override
    def load_extra_state(self, state_dict: Mapping[str, Any]) -> None:
        imp = state_dict.get("imp")
        if imp is None:
            raise RuntimeError(f"{type(self).__name__} checkpoint state has no IMP progress ('imp' entry)")
        self.level = int(imp["level"])
        self.start_counts = {n: int(k) for n, k in imp["start_counts"].items()}
        mask_dir = imp.get("mask_dir")  # absent in older checkpoints: on_fit_start picks the default folder
        self._mask_dir = os.fspath(mask_dir) if isinstance(mask_dir, str) and mask_dir else self._mask_dir
        rewind = imp.get("rewind")
        self._rewind = (
            None
            if rewind is None
            else {"params": dict(rewind["params"]), "buffers": dict(rewind.get("buffers", {}))}
        )
        self._rewind_optimizer_state = imp.get("rewind_optimizer")
        if self.rewind_optimizer and self._rewind is not None and self._rewind_optimizer_state is None:
            raise RuntimeError(
                f"{type(self).__name__}(rewind_optimizer=True): the checkpoint has the rewind point's weights but not "
                "its optimizer state"
            )


def _to_cpu(value: Any) -> Any:
    """A copy of a (nested) optimizer state with every tensor cloned to the CPU."""
    if isinstance(value, Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_cpu(v) for v in value)
    return value


def _positive_int(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{what} must be an int >= 1, got {value!r}")
    if value < 1:
        raise ValueError(f"{what} must be >= 1, got {value}")
    return value


def _check_level_densities(densities: Sequence[float], start: float) -> list[float]:
    values = list(densities)
    if not values:
        raise ValueError("densities is empty: give the density after each prune, e.g. [0.8, 0.64, 0.512]")
    for d in values:
        if isinstance(d, bool) or not isinstance(d, (int, float)) or not math.isfinite(d) or not 0 < d <= 1:
            raise ValueError(f"every level density must be a number in (0, 1], got {d!r} in {values}")
    if values[0] > start or any(b > a for a, b in zip(values, values[1:])):
        raise ValueError(
            f"densities must be non-increasing and at most the starting density {start} (pruning never regrows), "
            f"got {values}"
        )
    return [float(d) for d in values]


def _steps_per_epoch(trainer: pl.Trainer) -> int | None:
    batches = getattr(trainer, "num_training_batches", float("inf"))
    if not math.isfinite(batches) or batches <= 0:
        return None
    return int(math.ceil(batches / max(trainer.accumulate_grad_batches, 1)))
