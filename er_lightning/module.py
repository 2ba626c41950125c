"""``SparseLightningModule``: wraps any backbone with loss, metrics, optimiser and learning-rate schedule.

The module knows nothing about masks. Sparsity comes from callbacks (``er_lightning.callbacks``), which ask
:meth:`SparseLightningModule.sparsifiable_parameters` which weights they may mask and attach their state at
``setup``, before :meth:`SparseLightningModule.configure_optimizers` builds the optimiser from whatever trainable
parameters exist at that moment.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal, get_args

import pytorch_lightning as pl
import torch.nn.functional as F
from torch import Tensor, nn
from torch.optim import SGD, Adam, AdamW, Optimizer
from torch.optim.lr_scheduler import LambdaLR
from torchmetrics.classification import MulticlassAccuracy
from typing_extensions import override

from er_lightning.masking.io import SPARSE_CHECKPOINT_KEY
from er_lightning.masking.targets import default_targets
from er_lightning.sparsity.checks import check_choice

__all__ = ["OptimizerName", "ParamGroup", "ScheduleName", "SparseLightningModule", "lr_multiplier"]

OptimizerName = Literal["sgd", "adam", "adamw"]
ScheduleName = Literal["constant", "multistep", "cosine"]

_NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


@dataclass
class ParamGroup:
    """Optimiser settings for the parameters whose FQN matches ``pattern``.

    Groups are tried in order and the first match wins; parameters that match no group go into the default group,
    which uses the module's ``lr`` and ``weight_decay``. Names are the FQNs of ``SparseLightningModule``'s
    ``named_parameters()`` at ``configure_optimizers`` time, so they start with ``model.`` (the backbone) and a
    parametrized weight appears as ``model.conv1.parametrizations.weight.original``.

    Args:
        pattern: one ``fnmatch`` glob or a list of globs over parameter FQNs, e.g. ``"*.bn*.weight"``.
        weight_decay: weight decay of this group; ``None`` keeps the module's value.
        lr: base learning rate of this group; ``None`` keeps the module's value. The schedule scales it by the
            same factor as the default group's.

    Example:
        >>> ParamGroup(pattern=["*.bias", "*bn*"], weight_decay=0.0)
        ParamGroup(pattern=['*.bias', '*bn*'], weight_decay=0.0, lr=None)
    """

    pattern: str | list[str]
    weight_decay: float | None = None
    lr: float | None = None

    def __post_init__(self) -> None:
        """Check the pattern and the overrides."""
        patterns = [self.pattern] if isinstance(self.pattern, str) else self.pattern
        if not patterns or not all(isinstance(p, str) and p for p in patterns):
            raise ValueError(
                f"ParamGroup.pattern must be a non-empty glob or list of globs, got {self.pattern!r}"
            )
        if self.weight_decay is not None and self.weight_decay < 0:
            raise ValueError(f"ParamGroup.weight_decay must be >= 0 or None, got {self.weight_decay}")
        if self.lr is not None and self.lr <= 0:
            raise ValueError(f"ParamGroup.lr must be > 0 or None, got {self.lr}")

    @property
    def patterns(self) -> list[str]:
        """The pattern(s) as a list."""
        return [self.pattern] if isinstance(self.pattern, str) else list(self.pattern)


def lr_multiplier(
    step: int,
    *,
    schedule: ScheduleName,
    total_steps: float,
    steps_per_epoch: float,
    warmup_steps: int = 0,
    milestones: Sequence[float] = (),
    gamma: float = 0.1,
    floor: float = 0.0,
) -> float:
    """Factor applied to the base learning rate before optimiser step ``step`` (0-based, counted from the cycle start).

    Warm-up first: for ``step < warmup_steps`` the factor is ``(step + 1) / warmup_steps``. Then:

    * ``constant``: 1.
    * ``multistep``: ``gamma ** k``, where k counts the ``milestones`` (in epochs) with
      ``milestone <= step / steps_per_epoch``.
    * ``cosine``: from 1 down to ``floor`` over the remaining ``total_steps - warmup_steps`` steps,
      ``floor + (1 - floor) * (1 + cos(pi * t)) / 2`` with t the fraction done; it stays at ``floor`` afterwards.

    Args:
        step: optimiser steps since the schedule (re)started.
        schedule: one of ``constant``, ``multistep``, ``cosine``.
        total_steps: length of one cycle in optimiser steps (warm-up included).
        steps_per_epoch: optimiser steps per epoch, to read ``milestones``.
        warmup_steps: linear warm-up length in steps (0 disables it).
        milestones: epochs at which ``multistep`` multiplies by ``gamma``.
        gamma: multistep decay factor.
        floor: cosine end value as a fraction of the base learning rate (``min_lr / lr``).

    Returns:
        The multiplier.
    """
    step = max(int(step), 0)
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    if schedule == "multistep":
        epoch = step / steps_per_epoch
        return float(gamma ** sum(1 for m in milestones if m <= epoch))
    span = max(total_steps - warmup_steps, 1)
    progress = min((step - warmup_steps) / span, 1.0)
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


class SparseLightningModule(pl.LightningModule):
    """Classifier around any backbone: cross-entropy, top-1/top-5 accuracy, SGD/Adam/AdamW, LR schedule.

    The backbone returns logits (N, C) for targets (N,), or per-position logits (N, T, C) for targets (N, T) (a
    language model's next tokens, e.g. ``backbone="transformer_lm"``): loss and accuracies are then taken over all
    N·T positions.

    The learning rate is set per optimiser step by a ``LambdaLR`` (:func:`lr_multiplier`) whose length comes from
    ``trainer.estimated_stepping_batches`` and ``trainer.max_epochs``. Defaults follow upstream ER_DST
    (``ER_DST/main.py``): SGD with momentum 0.9, and for ``multistep`` decays ×``gamma`` at epochs E/2 and 3E/4.

    Logged: ``train/loss`` (epoch mean) and ``train/loss_step``, ``train/acc``, ``val/loss``, ``val/acc``,
    ``val/acc_top5``, ``test/loss``, ``test/acc``, ``test/acc_top5`` and ``lr`` (the first parameter group's
    learning rate, every step).

    Restarting the schedule (IMP or supermask levels): a callback calls :meth:`reset_lr_schedule`; the schedule then
    counts steps from that point (``lr_schedule_offset``) over ``schedule_steps`` steps. Both are saved in
    checkpoints.

    Args:
        backbone: an ``nn.Module`` returning logits, or a model name for ``er_lightning.models.create_model``
            (``small_cnn``, ``resnet18``, ``resnet20``, ``vgg16``, ...).
        num_classes: number of classes (passed to ``create_model`` and used by the metrics).
        model_kwargs: extra keyword arguments for ``create_model`` (e.g. ``{"input_size": 64}``); only with a name.
        label_smoothing: cross-entropy label smoothing in [0, 1).
        optimizer: ``sgd``, ``adam`` or ``adamw``.
        lr: base learning rate.
        momentum: SGD momentum.
        nesterov: SGD Nesterov momentum (needs ``momentum > 0``).
        weight_decay: L2 penalty (SGD, Adam) or decoupled weight decay (AdamW) of the default group.
        betas: Adam/AdamW betas.
        lr_schedule: ``constant``, ``multistep`` or ``cosine`` (see :func:`lr_multiplier`).
        milestones: multistep epochs; ``None`` means E/2 and 3E/4 of the cycle length E in epochs (upstream floors
            these, which agrees for E divisible by 4, e.g. 160 gives 80 and 120).
        gamma: multistep decay factor.
        warmup_epochs: linear warm-up length in epochs (may be fractional), for every schedule.
        min_lr: cosine floor (absolute, for the default group; other groups keep the same ratio ``min_lr / lr``).
        param_groups: per-pattern overrides of ``lr``/``weight_decay``, first match wins (see :class:`ParamGroup`).
        no_bn_weight_decay: put normalisation-layer parameters and every bias in a group without weight decay
            (after ``param_groups``, which take precedence).

    Raises:
        ValueError: an argument out of range or an unknown choice (message says what is allowed).
        TypeError: ``backbone`` is neither a module nor a name.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
        >>> module = SparseLightningModule(net, num_classes=10, lr_schedule="cosine", warmup_epochs=1)
        >>> module.sparsifiable_parameters()
        ['model.1.weight']
        >>> module(torch.zeros(2, 1, 8, 8)).shape
        torch.Size([2, 10])
    """

    def __init__(
        self,
        backbone: nn.Module | str = "small_cnn",
        num_classes: int = 10,
        model_kwargs: dict[str, Any] | None = None,
        label_smoothing: float = 0.0,
        optimizer: OptimizerName = "sgd",
        lr: float = 0.1,
        momentum: float = 0.9,
        nesterov: bool = False,
        weight_decay: float = 5e-4,
        betas: tuple[float, float] = (0.9, 0.999),
        lr_schedule: ScheduleName = "cosine",
        milestones: list[float] | None = None,
        gamma: float = 0.1,
        warmup_epochs: float = 0.0,
        min_lr: float = 0.0,
        param_groups: list[ParamGroup] | None = None,
        no_bn_weight_decay: bool = False,
    ) -> None:
        super().__init__()
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        check_choice(optimizer, "optimizer", get_args(OptimizerName))
        check_choice(lr_schedule, "lr_schedule", get_args(ScheduleName))
        if lr <= 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        if nesterov and (optimizer != "sgd" or momentum <= 0):
            raise ValueError(
                f"nesterov=True needs optimizer='sgd' and momentum > 0, got optimizer={optimizer!r}, "
                f"momentum={momentum}; set nesterov=False or use SGD with momentum"
            )
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {betas!r}")
        if milestones is not None and (
            any(m < 0 for m in milestones) or list(milestones) != sorted(milestones)
        ):
            raise ValueError(
                f"milestones must be non-negative epochs in increasing order, got {milestones!r}"
            )
        if not 0.0 < gamma <= 1.0:
            raise ValueError(f"gamma must be in (0, 1], got {gamma}")
        if warmup_epochs < 0:
            raise ValueError(f"warmup_epochs must be >= 0, got {warmup_epochs}")
        if not 0.0 <= min_lr <= lr:
            raise ValueError(f"min_lr must be in [0, lr={lr}], got {min_lr}")
        groups = [g if isinstance(g, ParamGroup) else ParamGroup(**g) for g in (param_groups or [])]
        if model_kwargs is not None and not isinstance(backbone, str):
            raise ValueError(
                "model_kwargs only applies when backbone is a model name; pass None with a module"
            )

        if isinstance(backbone, str):
            from er_lightning.models import create_model

            self.save_hyperparameters()
            self.model: nn.Module = create_model(backbone, num_classes, **(model_kwargs or {}))
        elif isinstance(backbone, nn.Module):
            self.save_hyperparameters(ignore=["backbone"])
            self.model = backbone
        else:
            raise TypeError(
                f"backbone must be an nn.Module or a model name such as 'resnet18', got {type(backbone).__name__}"
            )
        # Plain dicts in hparams so checkpoints hold no custom classes.
        self.hparams["param_groups"] = [asdict(g) for g in groups] if param_groups is not None else None
        self._param_groups = groups

        self.num_classes = num_classes
        top_k = min(5, num_classes)
        self.train_acc = MulticlassAccuracy(num_classes, top_k=1, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes, top_k=1, average="micro")
        self.val_acc_top5 = MulticlassAccuracy(num_classes, top_k=top_k, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, top_k=1, average="micro")
        self.test_acc_top5 = MulticlassAccuracy(num_classes, top_k=top_k, average="micro")

        #: Scheduler step at which the current LR cycle started (see :meth:`reset_lr_schedule`).
        self.lr_schedule_offset: int = 0
        #: Length of one LR cycle in optimiser steps; ``None`` means the whole run.
        self.schedule_steps: int | None = None
        self._total_steps: float = 0.0
        self._steps_per_epoch: float = 1.0
        self._scheduler: LambdaLR | None = None

    @override
    def forward(self, x: Tensor) -> Tensor:
        """Return the backbone's logits."""
        return self.model(x)

    def sparsifiable_parameters(self) -> list[str]:
        """FQNs of the parameters a sparsity callback may mask: every weight a matmul or convolution consumes.

        Names are as ``self.named_parameters()`` yields them, e.g. ``model.conv1.weight``. Callbacks ask this
        method; on other LightningModules they apply the same rule
        (:func:`er_lightning.masking.targets.default_targets`).
        """
        return default_targets(self)

    # ----------------------------------------------------------------------------------------------- steps
    def _shared_step(self, batch: Sequence[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        x, y = batch[0], batch[1]
        logits = self(x)
        if logits.dim() == 3 and y.dim() == 2:  # per-position classes (a language model's next tokens)
            logits, y = logits.reshape(-1, logits.shape[-1]), y.reshape(-1)
        loss = F.cross_entropy(logits, y, label_smoothing=self.hparams.label_smoothing)
        return loss, logits, y

    @override
    def training_step(self, batch: Sequence[Tensor], batch_idx: int) -> Tensor:
        """Cross-entropy on one batch; logs loss, accuracy and the learning rate."""
        loss, logits, y = self._shared_step(batch)
        self.train_acc.update(logits, y)
        self.log("train/loss_step", loss, on_step=True, on_epoch=False)
        self.log("train/loss", loss, on_step=False, on_epoch=True, sync_dist=True)
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True)
        if self._trainer is not None and self.trainer.optimizers:
            self.log(
                "lr", float(self.trainer.optimizers[0].param_groups[0]["lr"]), on_step=True, on_epoch=False
            )
        return loss

    @override
    def validation_step(self, batch: Sequence[Tensor], batch_idx: int) -> None:
        """Logs ``val/loss``, ``val/acc`` and ``val/acc_top5`` (epoch means over all ranks)."""
        loss, logits, y = self._shared_step(batch)
        self.val_acc.update(logits, y)
        self.val_acc_top5.update(logits, y)
        self.log("val/loss", loss, on_epoch=True, sync_dist=True, prog_bar=True)
        self.log("val/acc", self.val_acc, on_epoch=True, prog_bar=True)
        self.log("val/acc_top5", self.val_acc_top5, on_epoch=True)

    @override
    def test_step(self, batch: Sequence[Tensor], batch_idx: int) -> None:
        """Logs ``test/loss``, ``test/acc`` and ``test/acc_top5`` (epoch means over all ranks)."""
        loss, logits, y = self._shared_step(batch)
        self.test_acc.update(logits, y)
        self.test_acc_top5.update(logits, y)
        self.log("test/loss", loss, on_epoch=True, sync_dist=True)
        self.log("test/acc", self.test_acc, on_epoch=True)
        self.log("test/acc_top5", self.test_acc_top5, on_epoch=True)

    @override
    def predict_step(self, batch: Any, batch_idx: int) -> Tensor:
        """Return logits for the inputs (the first element of a tuple batch)."""
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        return self(x)

    # ----------------------------------------------------------------------------------------------- optimiser
    def parameter_groups(self) -> list[dict[str, Any]]:
        """Optimiser parameter groups built from the trainable parameters that exist now.

        The default group (module ``lr``/``weight_decay``) comes first when non-empty, then one group per
        :class:`ParamGroup` and, with ``no_bn_weight_decay``, one for normalisation parameters and biases.
        Parameters with ``requires_grad=False`` are left out. Each group carries a ``name`` key.

        Raises:
            ValueError: a ``ParamGroup`` pattern matches no parameter (the message lists the names that exist).
        """
        named = list(self.named_parameters())
        all_names = [n for n, _ in named]
        specs: list[tuple[str, list[str], dict[str, float]]] = []
        for i, group in enumerate(self._param_groups):
            for pattern in group.patterns:
                if not any(fnmatch.fnmatchcase(n, pattern) for n in all_names):
                    raise ValueError(
                        f"param_groups[{i}] pattern {pattern!r} matches no parameter; "
                        f"the module's parameters are: {all_names}"
                    )
            overrides = {
                k: v for k, v in (("lr", group.lr), ("weight_decay", group.weight_decay)) if v is not None
            }
            specs.append((f"group{i}", group.patterns, overrides))
        no_decay: set[str] = set()
        if self.hparams.no_bn_weight_decay:
            for mod_name, module in self.named_modules():
                if isinstance(module, _NORM_TYPES):
                    no_decay.update(
                        f"{mod_name}.{p}" if mod_name else p for p, _ in module.named_parameters()
                    )
            no_decay.update(n for n in all_names if n.endswith(".bias") or n == "bias")

        buckets: dict[str, list[Tensor]] = {"default": [], "no_decay": []}
        buckets.update({name: [] for name, _, _ in specs})
        for name, param in named:
            if not param.requires_grad:
                continue
            target = next(
                (g for g, pats, _ in specs if any(fnmatch.fnmatchcase(name, p) for p in pats)), None
            )
            if target is None:
                target = "no_decay" if name in no_decay else "default"
            buckets[target].append(param)

        groups: list[dict[str, Any]] = []
        if buckets["default"]:
            groups.append({"name": "default", "params": buckets["default"]})
        for name, _, overrides in specs:
            if buckets[name]:
                groups.append({"name": name, "params": buckets[name], **overrides})
        if buckets["no_decay"]:
            groups.append({"name": "no_decay", "params": buckets["no_decay"], "weight_decay": 0.0})
        return groups

    def _make_optimizer(self, groups: list[dict[str, Any]]) -> Optimizer:
        hp = self.hparams
        if hp.optimizer == "sgd":
            return SGD(
                groups, lr=hp.lr, momentum=hp.momentum, nesterov=hp.nesterov, weight_decay=hp.weight_decay
            )
        cls = Adam if hp.optimizer == "adam" else AdamW
        return cls(groups, lr=hp.lr, betas=tuple(hp.betas), weight_decay=hp.weight_decay)

    def _schedule_lengths(self) -> tuple[float, float]:
        """``(total optimiser steps, steps per epoch)`` from the trainer."""
        trainer = self.trainer
        total = float(trainer.estimated_stepping_batches)
        batches = getattr(trainer, "num_training_batches", float("inf"))
        accumulate = getattr(trainer, "accumulate_grad_batches", 1)
        if math.isfinite(batches) and batches > 0:
            per_epoch = float(math.ceil(batches / accumulate))
        elif trainer.max_epochs is not None and trainer.max_epochs > 0 and math.isfinite(total):
            per_epoch = total / trainer.max_epochs
        else:
            per_epoch = total
        return total, max(per_epoch, 1.0)

    @override
    def configure_optimizers(self) -> dict[str, Any]:
        """Build the optimiser over every trainable parameter present now, and the per-step LR schedule.

        Raises:
            ValueError: the run length is unknown (``max_epochs=-1`` without ``max_steps``) for a non-constant
                schedule, or a ``ParamGroup`` pattern matches nothing.
        """
        optimizer = self._make_optimizer(self.parameter_groups())
        self._total_steps, self._steps_per_epoch = self._schedule_lengths()
        if (
            not math.isfinite(self._total_steps)
            and self.schedule_steps is None
            and (self.hparams.lr_schedule != "constant" or self.hparams.warmup_epochs > 0)
        ):
            raise ValueError(
                f"lr_schedule={self.hparams.lr_schedule!r} needs a finite run length, but the trainer's "
                "estimated_stepping_batches is infinite; set trainer.max_epochs or trainer.max_steps, "
                "or use lr_schedule='constant'"
            )

        def factor(step: int) -> float:
            return self.lr_factor(step)

        self._scheduler = LambdaLR(optimizer, lr_lambda=factor)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": self._scheduler, "interval": "step", "frequency": 1},
        }

    def lr_factor(self, scheduler_step: int) -> float:
        """LR multiplier for scheduler step ``scheduler_step`` (counted from the run start, before the offset)."""
        hp = self.hparams
        per_epoch = self._steps_per_epoch
        cycle = float(self.schedule_steps) if self.schedule_steps is not None else self._total_steps
        milestones = hp.milestones
        if milestones is None and hp.lr_schedule == "multistep":
            cycle_epochs = cycle / per_epoch
            milestones = [cycle_epochs / 2, 3 * cycle_epochs / 4]
        # A constant schedule without warm-up needs no run length (max_epochs=-1 and max_steps=-1 run forever).
        warmup_steps = round(hp.warmup_epochs * per_epoch) if hp.warmup_epochs > 0 else 0
        return lr_multiplier(
            scheduler_step - self.lr_schedule_offset,
            schedule=hp.lr_schedule,
            total_steps=cycle,
            steps_per_epoch=per_epoch,
            warmup_steps=warmup_steps,
            milestones=milestones or (),
            gamma=hp.gamma,
            floor=hp.min_lr / hp.lr,
        )

    def reset_lr_schedule(self, schedule_steps: int | None = None) -> None:
        """Restart the LR schedule (warm-up included) from the current step, e.g. at a new IMP level.

        Call it from a callback hook such as ``on_train_epoch_start``. The learning rates of the optimiser are set
        at once to the first value of the new cycle.

        Args:
            schedule_steps: length of the new cycle in optimiser steps (multistep milestones default to its half
                and three quarters); ``None`` keeps the whole run's length.

        Raises:
            ValueError: ``schedule_steps`` is not positive.
        """
        if schedule_steps is not None and schedule_steps < 1:
            raise ValueError(
                f"schedule_steps must be a positive number of optimiser steps, got {schedule_steps}"
            )
        self.schedule_steps = schedule_steps
        scheduler = self._scheduler
        if scheduler is None:
            self.lr_schedule_offset = self.trainer.global_step if self._trainer is not None else 0
            return
        self.lr_schedule_offset = scheduler.last_epoch
        value = self.lr_factor(scheduler.last_epoch)
        for group, base in zip(scheduler.optimizer.param_groups, scheduler.base_lrs):
            group["lr"] = base * value
        scheduler._last_lr = [group["lr"] for group in scheduler.optimizer.param_groups]

    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Store the LR cycle (offset and length) so a resumed run continues the same schedule."""
        checkpoint["er_lightning_lr_schedule"] = {
            "offset": self.lr_schedule_offset,
            "schedule_steps": self.schedule_steps,
        }

    @override
    def on_load_checkpoint(self, checkpoint: Mapping[str, Any]) -> None:
        """Restore the LR cycle saved by :meth:`on_save_checkpoint` (absent in older checkpoints: defaults).

        Raises:
            RuntimeError: ``fit`` resumes a checkpoint trained sparse without the sparsity callback that trained
                it (the run would continue dense); the message names the callback to add.
        """
        self._refuse_dense_resume(checkpoint)
        state = checkpoint.get("er_lightning_lr_schedule", {})
        self.lr_schedule_offset = int(state.get("offset", 0))
        self.schedule_steps = state.get("schedule_steps")

    def _refuse_dense_resume(self, checkpoint: Mapping[str, Any]) -> None:
        """Raise when ``fit`` resumes a sparse checkpoint without its sparsity callback (evaluation is fine)."""
        trained_by = checkpoint.get(SPARSE_CHECKPOINT_KEY) or {}
        trainer = self._trainer
        if not trained_by or trainer is None or trainer.state.fn != "fit":
            return
        attached = {getattr(cb, "state_key", None) for cb in trainer.callbacks}
        missing = {key: path for key, path in trained_by.items() if key not in attached}
        if not missing:
            return
        wanted = []
        for key, class_path in missing.items():
            config = checkpoint.get("callbacks", {}).get(key, {}).get("config", {})
            wanted.append(f"{class_path} (its mask settings in the checkpoint: {config})")
        raise RuntimeError(
            f"this checkpoint was trained sparse by {', '.join(wanted)}, but no such callback is attached to this "
            "fit, so resuming would train the model dense. Add the callback with the arguments of the original "
            "run (its config.yaml has them), e.g. trainer.callbacks: [{class_path: "
            f"{next(iter(missing.values()))}, init_args: {{...}}}}]. To continue dense on purpose, start a new "
            "fit from the weights only (SparseLightningModule.load_from_checkpoint(path), no ckpt_path)."
        )
