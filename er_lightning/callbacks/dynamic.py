"""Dynamic sparse training (DST) from a random ER start: SET, RigL, GraNet and gradual magnitude pruning (GMP).

Every method here is a :class:`~er_lightning.callbacks.base.SparsityCallback`: the initial mask is drawn exactly as
:class:`~er_lightning.callbacks.static.StaticSparsity` draws it (same ``distribution``, ``sampling``, ``seed``,
``include``/``exclude``, init and flow options), and masks are applied in place. :class:`DynamicSparsity` holds the
shared update loop; a method is mostly the score that makes it different:

=========  ======================================  ==================================================
method     prune-and-regrow (every update)          gradual pruning (cubic schedule, inside a window)
=========  ======================================  ==================================================
``SET``    drop smallest ``|W|``, grow at random    no
``RigL``   drop smallest ``|W|``, grow largest      no
           ``|dense grad|`` (or momentum)
``GraNet`` as RigL                                  yes (global or layer-wise)
``GMP``    no                                       yes
=========  ======================================  ==================================================

**When.** An update happens before optimizer step ``g + 1`` when ``g = trainer.global_step`` (steps done so far)
is a positive multiple of ``update_every_steps``; the update index is ``c = g // update_every_steps``. Prune-and-
regrow runs while ``g < stop_updates_at · T`` (``T = trainer.estimated_stepping_batches``); gradual pruning runs
for ``c_start <= c <= c_end`` (:func:`~er_lightning.sparsity.schedules.prune_window`) and the update at
``c = c_end`` applies ``final_density`` exactly. On every other step :meth:`DynamicSparsity.update_masks` returns
after an integer test: no copies, no device syncs.

**How.** The update runs in ``on_before_optimizer_step``, after backward, the DDP all-reduce and AMP unscaling (with
gradient accumulation, on the accumulated gradient), while gradients are still dense. Per layer, ``n = ⌈p · n_active⌉``
active weights with the smallest drop score are removed and the ``n`` inactive positions with the largest grow
score are switched on, so each layer keeps its number of nonzeros exactly. Positions removed in the same update
(by the drop or by gradual pruning) are never regrown unless ``allow_regrow_dropped=True`` (upstream allows it);
``n`` is capped at the number of positions that may grow, so a layer denser than 1/2 never drops more than it can
replace. Regrown weights are set to exactly 0 and every optimizer state tensor at their positions (momentum, Adam
moments) is zeroed; the optimizer step that follows gives them their first update from this batch's gradient.
Parameters with ``requires_grad=False`` are left out of prune-and-regrow, with a warning naming them (a frozen
weight regrown at 0 would never train again); gradual pruning still prunes them.
Gradual pruning keeps exactly ``exact_count(d(c), N)`` weights (global top-``k`` with ties broken by position),
where upstream keeps ``k − 1`` (quirk Q9).

**Ranks.** Random growth draws from ``layer_generator(seed, layer_index, step)``; top-k ties are broken by flat
index; after each update the masks are broadcast from rank 0 (and checked with ``verify_masks=True``).

**Logged** at each update ``g``, at step ``g`` (through ``pl_module.log``, so ``trainer.callback_metrics`` holds
them for ``ModelCheckpoint``/``EarlyStopping``, and written to every logger at that step whatever
``log_every_n_steps`` is): ``sparsity/density_global``, per-layer densities with ``log_layer_densities=True``,
``dst/dropped`` and ``dst/grown`` (weights removed, by the drop and gradual pruning, and switched on),
``dst/drop_fraction`` (the *realised* share of the active weights replaced: below the scheduled
``dst/drop_fraction_scheduled`` where a layer has too few free positions, e.g. a dense layer replaces none),
``dst/itop_rate`` (share of the masked weights ever active, the in-time over-parameterisation rate of Liu et al.,
arXiv:2102.02887), ``dst/initial_overlap`` (share of the active weights that were active in the initial mask: how far
the topology has moved from its start) and, for gradual pruning, ``dst/target_density``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any, Literal, NamedTuple

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_warn
from torch import Tensor
from typing_extensions import override

from er_lightning.callbacks.base import Density, Distribution, SparsityCallback
from er_lightning.callbacks.progress import StepUnitGuard
from er_lightning.masking.dist import broadcast_masks_
from er_lightning.masking.flops import FlopsCount
from er_lightning.sparsity.checks import check_bool, check_choice, check_density, check_int
from er_lightning.sparsity.sampling import layer_generator
from er_lightning.sparsity.schedules import (
    CallableDrop,
    ConstantDrop,
    CosineDrop,
    DropSchedule,
    LinearDrop,
    as_drop_schedule,
    cubic_density,
    drop_count,
    prune_window,
    steps_per_epoch,
)
from er_lightning.sparsity.scores import synflow_scores
from er_lightning.sparsity.topk import exact_count, global_topk_masks, topk_mask

__all__ = [
    "GMP",
    "SET",
    "DynamicSparsity",
    "GraNet",
    "LayerUpdate",
    "RigL",
    "UpdateRecord",
    "drop_and_grow",
]

PruneScore = Literal["magnitude", "synflow"]
Growth = Literal["gradient", "momentum"]
Scope = Literal["global", "layerwise"]

_PRUNE_SCORES = ("magnitude", "synflow")
_GROWTH = ("gradient", "momentum")
_SCOPES = ("global", "layerwise")


# ----------------------------------------------------------------------------------------------------------------
# Pure per-layer pieces
# ----------------------------------------------------------------------------------------------------------------


class LayerUpdate(NamedTuple):
    """Result of :func:`drop_and_grow` for one layer (bool tensors shaped like the mask)."""

    mask: Tensor
    dropped: Tensor
    grown: Tensor


def drop_and_grow(
    mask: Tensor,
    drop_scores: Tensor,
    grow_scores: Tensor,
    n_drop: int,
    *,
    exclude: Tensor | None = None,
    allow_regrow_dropped: bool = False,
) -> LayerUpdate:
    """Remove the ``n`` active entries with the smallest drop score, switch on the ``n`` best inactive ones.

    ``n = min(n_drop, number of positions that may grow)``, so the number of active entries is kept exactly. Ties
    are broken by flat index (lowest first for growth, highest index dropped first among equal drop scores), so the
    result depends only on the values.

    Args:
        mask: bool mask of the layer (True = active).
        drop_scores: larger = keep (e.g. ``|W|``); only active positions are compared.
        grow_scores: larger = grow first (e.g. ``|grad|``); only eligible inactive positions are compared.
        n_drop: how many active entries to replace (see :func:`~er_lightning.sparsity.schedules.drop_count`).
        exclude: positions that may not grow either (e.g. weights gradual pruning removed in this update).
        allow_regrow_dropped: let the entries dropped here be chosen again by growth (upstream's behaviour).

    Returns:
        :class:`LayerUpdate` with the new mask, the dropped and the grown positions (with
        ``allow_regrow_dropped`` an entry can be in both).

    Example:
        >>> m = torch.tensor([True, True, False, False])
        >>> up = drop_and_grow(m, torch.tensor([0.1, 0.9, 0, 0]), torch.tensor([0.0, 0.0, 0.2, 0.7]), 1)
        >>> up.mask.tolist(), up.dropped.tolist(), up.grown.tolist()
        ([False, True, False, True], [True, False, False, False], [False, False, False, True])
    """
    mask = mask.to(torch.bool)
    n_active = int(torch.count_nonzero(mask))
    candidates = ~mask
    if exclude is not None:
        candidates = candidates & ~exclude.to(device=mask.device, dtype=torch.bool)
    n_free = int(torch.count_nonzero(candidates))
    n = max(min(int(n_drop), n_active if allow_regrow_dropped else min(n_active, n_free)), 0)
    keep = topk_mask(drop_scores, n_active - n, mask)
    dropped = mask & ~keep
    if allow_regrow_dropped:
        candidates = candidates | dropped
    grown = topk_mask(grow_scores, n, candidates)
    return LayerUpdate(keep | grown, dropped, grown)


# ----------------------------------------------------------------------------------------------------------------
# Argument checks
# ----------------------------------------------------------------------------------------------------------------


def _check_stop(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"stop_updates_at must be a number in (0, 1], got {value!r}")
    if not 0 < value <= 1:
        raise ValueError(
            f"stop_updates_at is a fraction of training and must be in (0, 1], got {value} (1 = update to the end)"
        )
    return float(value)


def _check_epoch(value: object, what: str) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value < 0
    ):
        raise ValueError(f"{what} must be a number of epochs >= 0, got {value!r}")
    return float(value)


def _start_density(density: float | None, init_density: float | None, default: float) -> float:
    """``density`` and its upstream spelling ``init_density`` name the same value; give one (or neither)."""
    if density is not None and init_density is not None and density != init_density:
        raise ValueError(
            f"density ({density}) and init_density ({init_density}) are the same argument (the density of the "
            "initial ER mask, upstream's init_density); give only one"
        )
    if density is not None:
        return check_density(density)
    return check_density(init_density, "init_density") if init_density is not None else default


def _schedule_config(schedule: DropSchedule | None) -> dict[str, Any] | None:
    if schedule is None:
        return None
    if isinstance(schedule, CallableDrop):  # compared on resume by the function's name
        return {"type": "CallableDrop", "fn": schedule.name}
    return {"type": type(schedule).__name__, **asdict(schedule)}


# ----------------------------------------------------------------------------------------------------------------
# The shared loop
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class UpdateRecord:
    """What the last mask update did; kept until the next update (``DynamicSparsity.last_update``).

    Attributes:
        step: ``trainer.global_step`` of the update (it ran before optimizer step ``step + 1``).
        dropped: FQN → positions removed (by the drop and by gradual pruning).
        grown: FQN → positions switched on (weights set to 0, optimizer state zeroed).
        drop_fraction: fraction used by prune-and-regrow, ``None`` if it did not run.
        target_density: gradual-pruning target ``d(c)``, ``None`` if it did not run.
    """

    step: int
    dropped: dict[str, Tensor]
    grown: dict[str, Tensor]
    drop_fraction: float | None
    target_density: float | None


class DynamicSparsity(SparsityCallback):
    """Base class of dynamic sparse training: the shared update loop; subclasses provide the scores.

    A subclass overrides :meth:`grow_scores` (and optionally :meth:`drop_scores`). Gradual pruning is switched on by
    :class:`GraNet` and :class:`GMP` through ``_configure_gradual``; ``REGROWS = False`` turns prune-and-regrow off.
    The initial ER mask and engine options (``distribution``, ``sampling``, ``seed``, ``include``, ...) are exactly
    those of :class:`~er_lightning.callbacks.base.SparsityCallback`.

    Args:
        density: starting overall density (fraction kept) of the ER mask, in (0, 1].
        update_every_steps: optimizer steps between mask updates (upstream ``--update-frequency``), >= 1.
        drop_fraction: share of each layer's active weights replaced per update. A number ``p0`` in [0, 1) means
            cosine decay from ``p0`` to 0.005 over the whole run (upstream); or pass a schedule object
            (:class:`~er_lightning.sparsity.schedules.CosineDrop`, ``ConstantDrop``, ``LinearDrop``; in YAML a
            mapping with their fields, e.g. ``{value: 0.3}`` for a constant). The RigL paper's cosine, which
            reaches 0 when updates stop, is ``CosineDrop(0.3, floor=0.0, until="stop")``
            (``{initial: 0.3, floor: 0.0, until: stop}``). Any function ``step -> fraction`` works too
            (wrapped in :class:`~er_lightning.sparsity.schedules.CallableDrop`; in YAML its import path).
        stop_updates_at: fraction of training (of ``trainer.estimated_stepping_batches``) after which
            prune-and-regrow stops, in (0, 1]; RigL's 0.75 by default, 1 updates to the end.
        prune: score that decides which active weights go: ``"magnitude"`` (``|W|``) or ``"synflow"`` (data-free
            SynFlow, Tanaka et al. arXiv:2006.05467, computed on a copy of the module only at update steps; needs
            the input shape, see ``input_shape``). Upstream's "SynFlow" is really ``|g·W|`` (quirk Q10).
        allow_regrow_dropped: let growth pick weights removed in the same update, by the drop or by gradual
            pruning (upstream does); off by default, so an update really changes the topology.
        input_shape: shape of one input sample without the batch dimension, for ``prune="synflow"``; by default
            taken from ``pl_module.example_input_array`` or from the first training batch.

    Raises:
        ValueError: ``update_every_steps < 1``, ``drop_fraction`` outside [0, 1), ``stop_updates_at`` outside
            (0, 1], unknown ``prune``; at ``on_train_start``, a run without a finite number of steps.

    Example:
        A new method is one hook (here: grow where ``|grad|`` is large relative to the layer's mean):

        >>> class NormalisedRigL(DynamicSparsity):
        ...     def grow_scores(self, name, weight, grad, step):
        ...         g = grad.abs()
        ...         return g / (g.mean() + 1e-12)
        >>> cb = NormalisedRigL(density=0.1, update_every_steps=100, drop_fraction=0.3)
    """

    #: Whether prune-and-regrow runs at updates (GMP turns it off).
    REGROWS: bool = True
    TOPOLOGY_FIGURES = True

    def __init__(
        self,
        density: Density = 0.1,
        update_every_steps: int = 100,
        drop_fraction: float | CosineDrop | ConstantDrop | LinearDrop | Callable[[int], float] = 0.3,
        stop_updates_at: float = 0.75,
        prune: PruneScore = "magnitude",
        allow_regrow_dropped: bool = False,
        input_shape: list[int] | None = None,
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
        if self.REGROWS and type(self).grow_scores is DynamicSparsity.grow_scores:
            raise TypeError(
                f"{type(self).__name__} defines no grow_scores: DynamicSparsity is the base class of SET, RigL, GraNet "
                "and GMP. Use one of them, or subclass DynamicSparsity and override grow_scores(name, weight, grad, "
                "step) (larger = grow first)"
            )
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
        self.update_every_steps = check_int(update_every_steps, "update_every_steps", 1)
        self.drop_schedule: DropSchedule | None = as_drop_schedule(drop_fraction) if self.REGROWS else None
        self.stop_updates_at = _check_stop(stop_updates_at)
        self.prune = check_choice(prune, "prune", _PRUNE_SCORES)
        self.allow_regrow_dropped = check_bool(allow_regrow_dropped, "allow_regrow_dropped")
        if input_shape is not None and (
            not input_shape
            or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in input_shape)
        ):
            raise ValueError(
                f"input_shape must be a list of positive ints such as [3, 32, 32], got {input_shape!r}"
            )
        self.input_shape = list(input_shape) if input_shape is not None else None

        # gradual pruning (GraNet, GMP); None = off
        self.final_density: float | None = None
        self.prune_start_epoch = 0.0
        self.prune_end_epoch: float | None = None
        self.scope: str = "global"

        # resolved at on_train_start from the trainer
        self._total_steps: int | None = None
        self._stop_step = 0
        self._window: tuple[int, int] | None = None
        # run-time state
        self._ever_active: dict[str, Tensor] | None = None
        self._initial_masks: dict[str, Tensor] | None = None
        self._layer_index: dict[str, int] = {}
        self._last_update_step = -1
        self._pending_stats: _PendingStats | None = None
        self._seen_input_shape: list[int] | None = None
        self._warned_no_grad = False
        self._warned_frozen: set[str] = set()
        self._synflow: dict[str, Tensor] | None = None
        self.step_unit = StepUnitGuard(type(self).__name__, "its update schedule")
        self.last_update: UpdateRecord | None = None

    def _configure_gradual(
        self,
        final_density: float,
        prune_start_epoch: float,
        prune_end_epoch: float | None,
        scope: str,
    ) -> None:
        """Switch gradual pruning on (called by GraNet and GMP constructors)."""
        final = check_density(final_density, "final_density")
        if final > self.density:
            raise ValueError(
                f"final_density ({final}) must be <= init_density ({self.density}): gradual pruning only removes "
                "weights"
            )
        start = _check_epoch(prune_start_epoch, "prune_start_epoch")
        end = None if prune_end_epoch is None else _check_epoch(prune_end_epoch, "prune_end_epoch")
        if end is not None and end < start:
            raise ValueError(f"prune_end_epoch ({end}) must be >= prune_start_epoch ({start})")
        self.final_density = final
        self.prune_start_epoch = start
        self.prune_end_epoch = end
        self.scope = check_choice(scope, "scope", _SCOPES)

    # ------------------------------------------------------------------ hooks for methods
    def drop_scores(self, name: str, weight: Tensor, grad: Tensor | None, step: int) -> Tensor:
        """Hook: larger = keep. Default: ``|W|``, or the SynFlow score with ``prune="synflow"``."""
        if self._synflow is not None:
            return self._synflow[name]
        return weight.detach().abs()

    def grow_scores(self, name: str, weight: Tensor, grad: Tensor | None, step: int) -> Tensor:
        """Hook: larger = grow first; only inactive positions are compared. Subclasses must override it."""
        raise NotImplementedError(f"{type(self).__name__} must implement grow_scores")

    # ------------------------------------------------------------------ config and state
    @override
    def mask_config(self) -> dict[str, Any]:
        cfg = super().mask_config()
        cfg.update(
            {
                "method": type(self).__name__,
                "update_every_steps": self.update_every_steps,
                "drop_fraction": _schedule_config(self.drop_schedule),
                "stop_updates_at": self.stop_updates_at if self.REGROWS else None,
                "prune": self.prune,
                "allow_regrow_dropped": self.allow_regrow_dropped,
                "final_density": self.final_density,
                "prune_start_epoch": self.prune_start_epoch if self.final_density is not None else None,
                "prune_end_epoch": self.prune_end_epoch,
                "scope": self.scope if self.final_density is not None else None,
            }
        )
        return cfg

    def _history(self) -> dict[str, dict[str, Tensor]]:
        """The bool masks kept beside the current ones, by checkpoint key (ITOP and overlap statistics)."""
        out = {}
        if self._ever_active is not None:
            out["ever_active"] = self._ever_active
        if self._initial_masks is not None:
            out["initial_masks"] = self._initial_masks
        return out

    @override
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        if state:
            for key, masks in self._history().items():
                state[key] = {n: m.detach().to("cpu", copy=True) for n, m in masks.items()}
        return state

    @override
    def topology_history(self) -> tuple[dict[str, Tensor], dict[str, Tensor]] | None:
        if self._ever_active is None or self._initial_masks is None:
            return None
        return self._ever_active, self._initial_masks

    @override
    def load_extra_state(self, state_dict: Mapping[str, Any]) -> None:
        for key, targets in self._history().items():
            saved = state_dict.get(key)
            if saved is None:
                if key == "initial_masks":  # written before the overlap statistic existed
                    rank_zero_warn(
                        f"{type(self).__name__}: the checkpoint has no initial masks; dst/initial_overlap is measured "
                        "against the masks restored now"
                    )
                    for name, target in targets.items():
                        target.copy_(self.masked.masks[name] if self.masked is not None else target)
                continue
            if list(saved) != list(targets):
                raise ValueError(f"checkpoint {key} masks are for {list(saved)}, not {list(targets)}")
            for name, mask in saved.items():
                target = targets[name]
                if tuple(mask.shape) != tuple(target.shape):
                    raise ValueError(f"checkpoint {key} mask {name!r} has shape {tuple(mask.shape)}")
                target.copy_(mask.to(device=target.device, dtype=torch.bool))

    # ------------------------------------------------------------------ lifecycle
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        previous = self.masked
        super().setup(trainer, pl_module, stage)
        assert self.masked is not None
        if self.masked is not previous or self._ever_active is None:
            self._ever_active = {n: m.clone() for n, m in self.masked.masks.items()}
            self._initial_masks = {n: m.clone() for n, m in self.masked.masks.items()}
            self._layer_index = {n: i for i, n in enumerate(self.masked.names)}

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        assert self.masked is not None
        for masks in self._history().values():
            for name, mask in self.masked.masks.items():
                masks[name] = masks[name].to(mask.device)
        self._last_update_step = -1
        self._total_steps = None
        assert self.step_unit is not None
        self.step_unit.fit_start(trainer, pl_module)
        self._warn_frozen(self._frozen())

    def _frozen(self) -> list[str]:
        """Masked parameters with ``requires_grad=False``: prune-and-regrow leaves their masks as they are."""
        assert self.masked is not None
        if not self.REGROWS:
            return []
        return [n for n, p in zip(self.masked.names, self.masked.params) if not p.requires_grad]

    def _warn_frozen(self, frozen: list[str]) -> None:
        new = [n for n in frozen if n not in self._warned_frozen]
        if new:
            self._warned_frozen.update(new)
            rank_zero_warn(
                f"{type(self).__name__}: {new} have requires_grad=False, so prune-and-regrow skips them (their "
                "masks stay as they are): a frozen weight that was dropped and regrown at 0 would never train "
                "again. Unfreeze them to update their masks, or exclude them (exclude=[...]) to leave them dense"
            )

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self._resolve_schedule(trainer)

    def _resolve_schedule(self, trainer: pl.Trainer) -> None:
        """Turn fractions and epochs into optimizer steps (needs the train loader, hence ``on_train_start``)."""
        total = trainer.estimated_stepping_batches
        if not math.isfinite(total) or total < 1:
            raise ValueError(
                f"{type(self).__name__} needs a finite number of training steps (got {total}): its schedules run "
                "over trainer.estimated_stepping_batches; set max_epochs or max_steps"
            )
        self._total_steps = int(total)
        self._stop_step = math.floor(self.stop_updates_at * self._total_steps + 1e-9)
        if self.final_density is not None:
            try:
                spe: int | None = steps_per_epoch(
                    trainer.num_training_batches, trainer.accumulate_grad_batches
                )
            except ValueError:
                spe = None
            self._window = prune_window(
                self.prune_start_epoch,
                self.prune_end_epoch,
                steps_per_epoch=spe,
                update_every_steps=self.update_every_steps,
                total_steps=self._total_steps,
            )
        if self.update_every_steps >= self._total_steps:
            rank_zero_warn(
                f"{type(self).__name__}: update_every_steps={self.update_every_steps} >= the {self._total_steps} "
                "training steps, so the masks never change"
            )

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)
        if self.prune == "synflow" and self._seen_input_shape is None:
            x = batch[0] if isinstance(batch, (list, tuple)) and batch else batch
            if isinstance(x, Tensor) and x.dim() >= 2:
                self._seen_input_shape = list(x.shape[1:])

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if self._pending_stats is not None:
            pending, self._pending_stats = self._pending_stats, None
            self._log_update(trainer, pl_module, pending)

    @override
    def needs_dense_gradients(self, trainer: pl.Trainer) -> bool:
        """Prune-and-regrow update steps compute dense under ``compute="sparse"``/``"auto"``: RigL and GraNet rank
        growth by the dense gradient, and with every method the weights grown in an update take that step's
        gradient, exactly as with ``compute="dense"`` (the RigL paper's accounting: an update step costs a dense
        backward). Gradual pruning alone (GMP) needs nothing dense."""
        if not self.REGROWS:
            return False
        if getattr(self, "growth", None) == "momentum":
            return True  # sparse momentum follows the momentum of the dense gradient at every step
        step = trainer.global_step
        if step % self.update_every_steps or step == 0 or self._total_steps is None:
            return False
        return self._phases(step)[1]

    # ------------------------------------------------------------------ the update
    def _phases(self, step: int) -> tuple[bool, bool]:
        """(gradual pruning, prune-and-regrow) at an update step; integer tests only."""
        c = step // self.update_every_steps
        pruning = self._window is not None and self._window[0] <= c <= self._window[1]
        regrow = self.REGROWS and step < self._stop_step
        return pruning, regrow

    @override
    def update_masks(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        step = trainer.global_step
        if step % self.update_every_steps or step == 0 or step == self._last_update_step:
            return
        if self._total_steps is None:
            self._resolve_schedule(trainer)
        pruning, regrow = self._phases(step)
        if not (pruning or regrow):
            return
        self._last_update_step = step
        try:
            self._update(trainer, pl_module, step, pruning, regrow)
        finally:
            self._synflow = None
        self.refresh_flops_()

    def _compute_synflow(self, pl_module: pl.LightningModule) -> None:
        assert self.masked is not None
        shape = self.input_shape
        if shape is None:
            example = getattr(pl_module, "example_input_array", None)
            if isinstance(example, Tensor) and example.dim() >= 2:
                shape = list(example.shape[1:])
        shape = shape or self._seen_input_shape
        if shape is None:
            raise RuntimeError(
                f"{type(self).__name__}(prune='synflow') needs the input shape: pass input_shape=[C, H, W] or set "
                "example_input_array on the LightningModule"
            )
        self._synflow = synflow_scores(
            pl_module, self.masked.names, input_shape=shape, masks=self.masked.masks, double=True
        )

    @torch.no_grad()
    def _update(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int, pruning: bool, regrow: bool
    ) -> None:
        masked = self.masked
        assert masked is not None and self._ever_active is not None and self._total_steps is not None
        before = {n: m.clone() for n, m in masked.masks.items()}
        target: float | None = None
        fraction: float | None = None

        if pruning:
            assert self._window is not None and self.final_density is not None
            c = step // self.update_every_steps
            target = cubic_density(c, self.density, self.final_density, *self._window)
            if self.prune == "synflow":
                with torch.enable_grad():
                    self._compute_synflow(pl_module)
            for name, mask in self._gradual_masks(target, step).items():
                masked.set_mask_(name, mask)
            self._synflow = None
            if regrow:  # regrowth starts from rank 0's pruned masks (SynFlow sees per-rank BN statistics)
                self.sync_masks_(trainer)

        local_grown: dict[str, Tensor] = {}
        if regrow:
            assert self.drop_schedule is not None
            fraction = float(self.drop_schedule(step, self._total_steps, stop_step=self._stop_step))
            if self.prune == "synflow":
                with torch.enable_grad():
                    self._compute_synflow(pl_module)
            frozen = self._frozen()
            self._warn_frozen(frozen)
            for name, p in zip(masked.names, masked.params):
                if name in frozen:
                    continue
                mask = masked.masks[name]
                n_drop = drop_count(fraction, int(torch.count_nonzero(mask)))
                if n_drop == 0:
                    continue
                grad = p.grad
                if grad is None and not self._warned_no_grad:
                    self._warned_no_grad = True
                    rank_zero_warn(
                        f"{type(self).__name__}: {name} has no gradient at step {step}; scores use 0"
                    )
                result = drop_and_grow(
                    mask,
                    self.drop_scores(name, p.data, grad, step),
                    self.grow_scores(name, p.data, grad, step),
                    n_drop,
                    # weights gradual pruning removed in this update may come back only on request (upstream)
                    exclude=None if self.allow_regrow_dropped else before[name] & ~mask,
                    allow_regrow_dropped=self.allow_regrow_dropped,
                )
                masked.set_mask_(name, result.mask)
                local_grown[name] = result.grown

        self.sync_masks_(trainer)
        if self.allow_regrow_dropped and local_grown:
            # which removed weights came back is not visible in the masks: take rank 0's choice as well
            broadcast_masks_(local_grown, trainer.strategy.root_device)
        grown: dict[str, Tensor] = {}
        dropped: dict[str, Tensor] = {}
        for name, p in zip(masked.names, masked.params):
            new = masked.masks[name]
            g = new & ~before[name]
            if self.allow_regrow_dropped and name in local_grown:
                # removed and grown again in this update: restarted from 0 like any new weight
                g = g | (local_grown[name].to(new.device) & new)
            # a grown position that was active before was removed first (by gradual pruning or by the drop)
            grown[name] = g
            dropped[name] = before[name] & (~new | g)
            p.data.masked_fill_(g, 0)
            self._ever_active[name] |= new
        masked.apply_()
        masked.zero_optimizer_state_(trainer.optimizers, extra=grown)

        assert self._initial_masks is not None
        # per layer: dropped, grown, active, ever active, active and in the initial mask (summed when logged)
        stats = torch.stack(
            [
                torch.stack(
                    [
                        torch.count_nonzero(dropped[n]),
                        torch.count_nonzero(grown[n]),
                        torch.count_nonzero(masked.masks[n]),
                        torch.count_nonzero(self._ever_active[n]),
                        torch.count_nonzero(
                            masked.masks[n] & self._initial_masks[n].to(masked.masks[n].device)
                        ),
                    ]
                )
                for n in masked.names
            ]
        ).cpu()
        self._pending_stats = _PendingStats(step, stats, fraction, target)
        self.last_update = UpdateRecord(step, dropped, grown, fraction, target)

    def _gradual_masks(self, target: float, step: int) -> dict[str, Tensor]:
        """Masks keeping exactly ``exact_count(target, N)`` (global) or each layer's share (layer-wise)."""
        masked = self.masked
        assert masked is not None
        scores = {n: self.drop_scores(n, p.data, p.grad, step) for n, p in zip(masked.names, masked.params)}
        if self.scope == "global":
            total = sum(m.numel() for m in masked.masks.values())
            active = sum(int(torch.count_nonzero(m)) for m in masked.masks.values())
            k = min(exact_count(target, total), active)
            return global_topk_masks(scores, k, masked.masks)
        out: dict[str, Tensor] = {}
        for name, mask in masked.masks.items():
            layer_target = min(self.target_densities.get(name, self.density) * target / self.density, 1.0)
            k = min(exact_count(layer_target, mask.numel()), int(torch.count_nonzero(mask)))
            out[name] = topk_mask(scores[name], k, mask)
        return out

    # ------------------------------------------------------------------ logging
    def update_metrics(self, pending: _PendingStats) -> dict[str, float]:
        """The scalars of one update (see the module docstring), from its per-layer counts."""
        assert self.masked is not None
        dropped, grown, active, ever, initial = (int(v) for v in pending.counts.sum(0).tolist())
        total = sum(m.numel() for m in self.masked.masks.values())
        metrics = {
            "sparsity/density_global": active / total,
            "dst/dropped": float(dropped),
            "dst/grown": float(grown),
            "dst/itop_rate": ever / total,
            "dst/initial_overlap": initial / active if active else 0.0,
        }
        if pending.drop_fraction is not None:
            # every grown weight replaces one the drop removed, and the drop leaves the count as it was
            metrics["dst/drop_fraction"] = grown / active if active else 0.0
            metrics["dst/drop_fraction_scheduled"] = pending.drop_fraction
        if pending.target_density is not None:
            metrics["dst/target_density"] = pending.target_density
        return metrics

    def _log_update(self, trainer: pl.Trainer, pl_module: pl.LightningModule, pending: _PendingStats) -> None:
        """Log one update's scalars at its step ``g``, on every rank (the masks agree, so the values do).

        ``pl_module.log`` puts them in ``trainer.callback_metrics``, so ``ModelCheckpoint``/``EarlyStopping`` can
        monitor them; the loggers get them from :meth:`log_densities` at step ``g`` for every update (Lightning
        would write a value logged here only on its ``log_every_n_steps`` batches, which need not hold updates).
        """
        metrics = self.update_metrics(pending)
        for name, value in metrics.items():
            pl_module.log(name, value, on_step=True, on_epoch=False, logger=False, batch_size=1)
        self.log_densities(trainer, extra=metrics, step=pending.step)


class _PendingStats(NamedTuple):
    """Counts of an update, kept from ``on_before_optimizer_step`` to ``on_train_batch_end`` (when logging is allowed)."""

    step: int
    counts: Tensor  # (layers, 5) int64 on the CPU: dropped, grown, active, ever active, active ∩ initial
    drop_fraction: float | None
    target_density: float | None


# ----------------------------------------------------------------------------------------------------------------
# Methods
# ----------------------------------------------------------------------------------------------------------------


class SET(DynamicSparsity):
    """Sparse Evolutionary Training (Mocanu et al., arXiv:1707.04780): drop smallest ``|W|``, grow at random.

    Growth scores are uniform random numbers from ``layer_generator(seed, layer_index, step)``: the same on every
    rank and after a resume, independent of the global RNG. Each layer keeps its number of nonzeros. The paper's
    constant ζ = 0.3 is ``drop_fraction=ConstantDrop(0.3)``; a plain number decays by cosine to 0.005.
    See :class:`DynamicSparsity` for every argument.

    Example:
        >>> import pytorch_lightning as pl
        >>> cb = SET(density=0.05, distribution="erk", update_every_steps=1000, drop_fraction=0.3)
        >>> trainer = pl.Trainer(max_epochs=160, callbacks=[cb])
        >>> # trainer.fit(your_lightning_module, datamodule=...)
    """

    @override
    def grow_scores(self, name: str, weight: Tensor, grad: Tensor | None, step: int) -> Tensor:
        gen = layer_generator(self.seed, self._layer_index[name], step)
        return torch.rand(weight.shape, generator=gen).to(weight.device)


class RigL(DynamicSparsity):
    """Rigged Lottery (Evci et al., arXiv:1911.11134): drop smallest ``|W|``, grow largest ``|dense gradient|``.

    This is upstream ER_DST's ``--method DST``. The gradient is the one the optimizer is about to use (after the
    DDP all-reduce, AMP unscaling and gradient accumulation), before masking and before weight decay. A plain
    ``drop_fraction`` decays as upstream does (cosine to 0.005 over the whole run); the paper's schedule,
    ``α/2·(1 + cos(π t/T_end))`` with ``T_end = stop_updates_at · T``, is
    ``drop_fraction=CosineDrop(0.3, floor=0.0, until="stop")``.

    **Momentum growth** (``growth="momentum"``, the growth rule of sparse momentum, Dettmers and Zettlemoyer,
    arXiv:1907.04840): inactive weights are grown where ``|m|`` is largest, ``m ← β·m + (1 − β)·g`` the exponential
    average of the *dense* gradient of every masked weight, updated at every optimizer step (one fused
    ``torch._foreach_lerp_`` before the gradients are masked) and including the current step's gradient. The
    optimizer's own momentum cannot serve: gradients are masked before every step, so it is exactly 0 at every
    inactive position. ``m`` costs one float per masked weight (kept in the checkpoint) and the lerp per step;
    both exist only in this mode. Sparse momentum's redistribution of weights across layers is not done: each
    layer keeps its count, as in RigL.

    The other options are those of :class:`DynamicSparsity`.

    Args:
        growth: ``"gradient"`` (RigL: ``|g|`` of this step) or ``"momentum"`` (``|m|``, see above).
        growth_momentum: ``β`` of the dense-gradient average for ``growth="momentum"``, in [0, 1) (sparse
            momentum's 0.9); ``β = 0`` ranks by ``|g|`` like ``"gradient"``. Ignored for ``growth="gradient"``.

    Example:
        >>> import pytorch_lightning as pl
        >>> cb = RigL(density=0.1, distribution="balanced", update_every_steps=100, drop_fraction=0.3)
        >>> trainer = pl.Trainer(max_epochs=160, callbacks=[cb])
        >>> # trainer.fit(your_lightning_module, datamodule=...)
    """

    def __init__(
        self,
        density: Density = 0.1,
        update_every_steps: int = 100,
        drop_fraction: float | CosineDrop | ConstantDrop | LinearDrop | Callable[[int], float] = 0.3,
        stop_updates_at: float = 0.75,
        growth: Growth = "gradient",
        growth_momentum: float = 0.9,
        prune: PruneScore = "magnitude",
        allow_regrow_dropped: bool = False,
        input_shape: list[int] | None = None,
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
            update_every_steps=update_every_steps,
            drop_fraction=drop_fraction,
            stop_updates_at=stop_updates_at,
            prune=prune,
            allow_regrow_dropped=allow_regrow_dropped,
            input_shape=input_shape,
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
        self.growth = check_choice(growth, "growth", _GROWTH)
        if (
            isinstance(growth_momentum, bool)
            or not isinstance(growth_momentum, (int, float))
            or not 0.0 <= growth_momentum < 1.0
        ):
            raise ValueError(
                f"growth_momentum is the β of the dense-gradient average and must be in [0, 1), got {growth_momentum!r}"
            )
        self.growth_momentum = float(growth_momentum)
        #: FQN → exponential average of the dense gradient (``growth="momentum"`` only; created at fit start).
        self.grad_momentum: dict[str, Tensor] | None = None

    @override
    def mask_config(self) -> dict[str, Any]:
        cfg = super().mask_config()
        cfg["growth"] = self.growth
        if self.growth == "momentum":
            cfg["growth_momentum"] = self.growth_momentum
        return cfg

    @override
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        if state and self.grad_momentum is not None:
            state["grad_momentum"] = {
                n: m.detach().to("cpu", copy=True) for n, m in self.grad_momentum.items()
            }
        return state

    @override
    def load_extra_state(self, state_dict: Mapping[str, Any]) -> None:
        super().load_extra_state(state_dict)
        if self.growth != "momentum":
            return
        saved = state_dict.get("grad_momentum")
        if saved is None:
            raise RuntimeError(
                f"{type(self).__name__}(growth='momentum'): the checkpoint holds no gradient momentum; resume from a "
                "checkpoint written with growth='momentum'"
            )
        assert self.masked is not None
        if list(saved) != self.masked.names:
            raise ValueError(f"checkpoint gradient momentum is for {list(saved)}, not {self.masked.names}")
        for name, p in zip(self.masked.names, self.masked.params):
            if tuple(saved[name].shape) != tuple(p.shape):
                raise ValueError(
                    f"checkpoint gradient momentum {name!r} has shape {tuple(saved[name].shape)}, the parameter "
                    f"{tuple(p.shape)}"
                )
        self.grad_momentum = {n: m.detach().clone() for n, m in saved.items()}

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        if self.growth != "momentum":
            return
        assert self.masked is not None
        if self.grad_momentum is None:
            self.grad_momentum = {
                n: torch.zeros_like(p) for n, p in zip(self.masked.names, self.masked.params)
            }
        else:  # restored from a checkpoint, on the CPU
            self.grad_momentum = {
                n: self.grad_momentum[n].to(device=p.device, dtype=p.dtype)
                for n, p in zip(self.masked.names, self.masked.params)
            }

    @override
    def update_masks(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if self.grad_momentum is not None:
            self._accumulate_momentum_()
        super().update_masks(trainer, pl_module, optimizer)

    @torch.no_grad()
    def _accumulate_momentum_(self) -> None:
        """``m ← β·m + (1 − β)·g`` with the dense gradients, one fused op over every masked weight with a gradient."""
        assert self.masked is not None and self.grad_momentum is not None
        bufs, grads = [], []
        for name, p in zip(self.masked.names, self.masked.params):
            if p.grad is not None:
                bufs.append(self.grad_momentum[name])
                grads.append(p.grad)
        if bufs:
            torch._foreach_lerp_(bufs, grads, 1.0 - self.growth_momentum)

    @override
    def weight_gradient_flops(self, flops: FlopsCount, step: int) -> float | None:
        """Growth by the dense gradient (or its momentum) reads the dense weight gradient on those steps."""
        return float(flops.dense) if self._dense_gradient_step else None

    @override
    def grow_scores(self, name: str, weight: Tensor, grad: Tensor | None, step: int) -> Tensor:
        if self.grad_momentum is not None:
            return self.grad_momentum[name].abs()
        if grad is None:
            return torch.zeros_like(weight, dtype=torch.float32)
        return grad.detach().abs()


class GraNet(RigL):
    """GraNet (Liu et al., arXiv:2106.10404) from an ER start: gradual pruning plus RigL prune-and-regrow.

    At every update inside the pruning window the masks are first pruned to the cubic target
    ``d(c) = d_f + (d_i − d_f)(1 − (c − c_start)/(c_end − c_start))³`` (``c`` = update index, see
    :func:`~er_lightning.sparsity.schedules.cubic_density`), keeping exactly ``exact_count(d(c), N)`` weights by
    global magnitude (``scope="global"``) or each layer's share (``scope="layerwise"``: layer ``l`` goes from its
    initial density ``d_l`` to ``d_l · d_f/d_i``, which from a uniform start is upstream's ``GraNet_uniform``
    without its classifier special case, quirk Q11). Then prune-and-regrow runs as in :class:`RigL` (weights
    pruned in the same update are regrown only with ``allow_regrow_dropped=True``, as upstream does) at every
    update until ``stop_updates_at`` (default 1.0: to the end, as upstream; upstream also waits for
    ``prune_start_epoch`` before its first regrow, we do not).

    **The window, in epochs** (floats; converted with the optimizer steps per epoch,
    ``⌈trainer.num_training_batches / accumulate_grad_batches⌉``): ``c_start = ⌊prune_start_epoch·S/f⌋`` and
    ``c_end = ⌊prune_end_epoch·S/f⌋``; ``prune_end_epoch=None`` is the last update of training. The update at
    ``c_end`` applies ``final_density`` exactly; later updates keep it. Worked example (VGG-16, CIFAR-10, 450
    steps/epoch, 160 epochs, ``update_every_steps=1000``, window 0 → 110): pruning at updates 1…49 (steps
    1000…49000), ``d(1) = 0.0094601``, …, ``d(48) = 0.00100008``, ``d(49) = 0.001``.

    The other options (``growth``, ``update_every_steps``, ``prune``, the initial-mask options) are those of
    :class:`RigL` and :class:`DynamicSparsity`.

    Args:
        init_density: starting density ``d_i`` of the ER mask (upstream's name; the same as ``density``, give one
            of them; default 0.5).
        final_density: density reached at the end of the window, ``d_f <= d_i``.
        prune_start_epoch: epoch at which gradual pruning starts (upstream ``--init-prune-epoch``, 0).
        prune_end_epoch: epoch at which ``final_density`` is reached (upstream ``--final-prune-epoch``, 110), or
            ``None`` for the end of training. A value beyond training raises at ``on_train_start``.
        scope: ``"global"`` (upstream ``GraNet``) or ``"layerwise"`` (upstream ``GraNet_uniform``).
        drop_fraction: as in :class:`DynamicSparsity`; upstream's ``--prune-rate`` 0.5 by default.
        stop_updates_at: when prune-and-regrow stops, fraction of training; default 1.0.
        density: starting density of the ER mask, as ``density`` means for every callback (the same as
            ``init_density``).

    Example:
        >>> import pytorch_lightning as pl
        >>> cb = GraNet(init_density=0.01, final_density=0.001, distribution="ER_same_params_per_layer",
        ...             update_every_steps=1000, drop_fraction=0.5, prune_end_epoch=110, flow_preservation=True)
        >>> trainer = pl.Trainer(max_epochs=160, callbacks=[cb])
        >>> # trainer.fit(your_lightning_module, datamodule=...)
    """

    def __init__(
        self,
        init_density: Density | None = None,
        final_density: Density = 0.05,
        prune_start_epoch: float = 0.0,
        prune_end_epoch: float | None = None,
        scope: Scope = "global",
        update_every_steps: int = 100,
        drop_fraction: float | CosineDrop | ConstantDrop | LinearDrop | Callable[[int], float] = 0.5,
        stop_updates_at: float = 1.0,
        growth: Growth = "gradient",
        growth_momentum: float = 0.9,
        prune: PruneScore = "magnitude",
        allow_regrow_dropped: bool = False,
        input_shape: list[int] | None = None,
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
        density: Density | None = None,
    ) -> None:
        super().__init__(
            density=_start_density(density, init_density, 0.5),
            update_every_steps=update_every_steps,
            drop_fraction=drop_fraction,
            stop_updates_at=stop_updates_at,
            growth=growth,
            growth_momentum=growth_momentum,
            prune=prune,
            allow_regrow_dropped=allow_regrow_dropped,
            input_shape=input_shape,
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
        self._configure_gradual(final_density, prune_start_epoch, prune_end_epoch, scope)

    @property
    def init_density(self) -> float:
        """Starting density ``d_i`` (the ``density`` of the initial ER mask)."""
        return self.density


class GMP(DynamicSparsity):
    """Gradual magnitude pruning (Zhu and Gupta, arXiv:1710.01878) without regrowth, from dense or an ER start.

    ``init_density=1`` (the default) starts dense, as upstream's ``--method GMP`` always does; ``init_density < 1``
    starts from an ER mask drawn like :class:`~er_lightning.callbacks.static.StaticSparsity`'s. At each update in
    the window the masks keep exactly ``exact_count(d(c), N)`` weights by global magnitude (``scope="global"``,
    upstream ``GMP``) or each layer's share (``"layerwise"``, upstream ``GMP_uniform``); the window, the cubic
    schedule and the exact end are as in :class:`GraNet`. Weights never come back.

    The initial-mask and engine options are those of :class:`~er_lightning.callbacks.base.SparsityCallback`
    (irrelevant for the mask when starting dense).

    Args:
        init_density: starting density ``d_i`` (upstream's name; the same as ``density``, give one of them;
            default 1 = dense).
        final_density: density reached at the end of the window, ``d_f <= d_i``.
        prune_start_epoch: epoch at which gradual pruning starts, as in :class:`GraNet`.
        prune_end_epoch: epoch at which ``final_density`` is reached, or ``None`` for the end of training.
        scope: ``"global"`` (upstream ``GMP``) or ``"layerwise"`` (upstream ``GMP_uniform``).
        update_every_steps: optimizer steps between pruning events.
        prune: ``"magnitude"`` or ``"synflow"`` (see :class:`DynamicSparsity`).
        input_shape: shape of one input sample, for ``prune="synflow"`` (see :class:`DynamicSparsity`).
        density: starting density, as ``density`` means for every callback (the same as ``init_density``).

    Example:
        >>> import pytorch_lightning as pl
        >>> cb = GMP(init_density=1.0, final_density=0.05, update_every_steps=1000, prune_end_epoch=110)
        >>> trainer = pl.Trainer(max_epochs=160, callbacks=[cb])
        >>> # trainer.fit(your_lightning_module, datamodule=...)
    """

    REGROWS = False

    def __init__(
        self,
        init_density: Density | None = None,
        final_density: Density = 0.05,
        prune_start_epoch: float = 0.0,
        prune_end_epoch: float | None = None,
        scope: Scope = "global",
        update_every_steps: int = 100,
        prune: PruneScore = "magnitude",
        input_shape: list[int] | None = None,
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
        density: Density | None = None,
    ) -> None:
        super().__init__(
            density=_start_density(density, init_density, 1.0),
            update_every_steps=update_every_steps,
            stop_updates_at=1.0,
            prune=prune,
            input_shape=input_shape,
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
        self._configure_gradual(final_density, prune_start_epoch, prune_end_epoch, scope)

    @property
    def init_density(self) -> float:
        """Starting density ``d_i`` (1 = dense)."""
        return self.density

    @override
    def grow_scores(self, name: str, weight: Tensor, grad: Tensor | None, step: int) -> Tensor:
        raise RuntimeError("GMP never regrows weights")
