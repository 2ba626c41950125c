"""When and how much masks change in dynamic sparse training: pure functions of the optimizer step.

Nothing here reads a trainer, a model or a clock; the callbacks in :mod:`er_lightning.callbacks.dynamic` pass in
``trainer.global_step`` and ``trainer.estimated_stepping_batches``, so a resumed run computes the same values.

Two families:

* **Drop fraction** (the share of active weights replaced at a prune-and-regrow update), as frozen dataclasses
  called with ``(step, total_steps, stop_step)``: :class:`CosineDrop` (upstream ER_DST / GraNet over the whole run;
  the RigL paper's decay to 0 at the stop with ``floor=0, until="stop"``), :class:`ConstantDrop` and
  :class:`LinearDrop`. :func:`as_drop_schedule` turns a plain float ``p0`` into ``CosineDrop(p0, 0.005)``,
  upstream's floor, over the whole run.
* **Gradual pruning** (Zhu and Gupta, arXiv:1710.01878; GraNet, arXiv:2106.10404): the cubic density schedule
  :func:`cubic_density`, counted in update periods, and :func:`prune_window`, which turns a window given in epochs
  into the first and last update index.

Worked example (spec §3.6, the seed README command: VGG-16, CIFAR-10, batch 100 so 450 steps per epoch, 160 epochs,
an update every 1000 steps, density 0.01 → 0.001 between epochs 0 and 110)::

    >>> p = CosineDrop(0.5, 0.005)
    >>> round(p(1000, 72000), 5), round(p(24000, 72000), 5), round(p(48000, 72000), 5), p(72000, 72000)
    (0.49976, 0.37625, 0.12875, 0.005)
    >>> prune_window(0.0, 110.0, steps_per_epoch=450, update_every_steps=1000, total_steps=72000)
    (0, 49)
    >>> [round(cubic_density(c, 0.01, 0.001, 0, 49), 7) for c in (1, 10, 24, 48, 49)]
    [0.0094601, 0.0055378, 0.0021953, 0.0010001, 0.001]
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

__all__ = [
    "DEFAULT_DROP_FLOOR",
    "CallableDrop",
    "ConstantDrop",
    "CosineDrop",
    "DecayEnd",
    "DropSchedule",
    "LinearDrop",
    "as_drop_schedule",
    "cubic_density",
    "drop_count",
    "epoch_to_step",
    "prune_window",
    "steps_per_epoch",
]

#: Upstream's lowest drop fraction (the cosine floor of ER_DST's prune-rate decay).
DEFAULT_DROP_FLOOR = 0.005


def _check_fraction(value: object, what: str) -> float:
    """A drop fraction must be a finite number in [0, 1)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{what} must be a number in [0, 1), got {value!r}")
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{what} must be in [0, 1) (a share of the active weights replaced), got {value}")
    return float(value)


#: Where a decaying drop fraction reaches its last value: ``"end"`` of training (upstream), the ``"stop"`` of
#: prune-and-regrow (``stop_updates_at``, the RigL paper's ``T_end``), or a fraction of training in (0, 1].
DecayEnd = Literal["end", "stop"] | float


def _check_until(value: object, what: str) -> str | float:
    if value in ("end", "stop"):
        return str(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(
            f"{what} must be 'end' (end of training), 'stop' (when prune-and-regrow stops) or a fraction of training "
            f"in (0, 1], got {value!r}"
        )
    if not 0.0 < value <= 1.0:
        raise ValueError(f"{what} as a fraction of training must be in (0, 1], got {value}")
    return float(value)


def _horizon(until: str | float, total_steps: float, stop_step: float | None) -> float:
    """The step at which a decay ends (``T_end``), for ``until`` of :data:`DecayEnd`."""
    if not total_steps > 0:
        raise ValueError(f"total_steps must be > 0, got {total_steps}")
    if until == "end":
        return float(total_steps)
    if until == "stop":
        if stop_step is None:
            raise ValueError(
                "a drop schedule with until='stop' needs the step at which prune-and-regrow stops (stop_step)"
            )
        return float(stop_step)
    return float(until) * float(total_steps)


def _progress(step: int, horizon: float) -> float:
    """Fraction of the decay done at ``step``, clipped to [0, 1]; a horizon of 0 steps is done at once."""
    if horizon <= 0:
        return 1.0
    return min(max(step / horizon, 0.0), 1.0)


@dataclass(frozen=True)
class CosineDrop:
    """Cosine decay of the drop fraction: ``floor + (initial − floor)·(1 + cos(π·t/T_end))/2``.

    ``t`` is the optimizer step (``trainer.global_step``, steps done so far). ``T_end`` is set by ``until``: the
    total number of training steps ``T`` (``trainer.estimated_stepping_batches``; upstream ER_DST's prune-rate
    decay, spec §3.5, with ``floor=0.005``), the step at which prune-and-regrow stops (``until="stop"``,
    ``stop_updates_at · T``: the RigL paper's ``α/2·(1 + cos(π t/T_end))`` with ``floor=0``, Evci et al.,
    arXiv:1911.11134), or a fraction of ``T``. After ``T_end`` the value stays at ``floor``.

    Args:
        initial: drop fraction at step 0, in [0, 1).
        floor: drop fraction at ``T_end`` and after, in [0, ``initial``]; upstream uses 0.005, RigL 0.
        until: ``"end"`` (of training, default), ``"stop"`` or a fraction of training in (0, 1].

    Raises:
        ValueError: a value outside its range, e.g. ``floor > initial`` (a rising "decay").

    Example:
        >>> round(CosineDrop(0.5, 0.005)(1000, 72000), 5)
        0.49976
        >>> rigl = CosineDrop(0.3, floor=0.0, until="stop")  # T = 1000, updates stop at step 750
        >>> round(rigl(500, 1000, stop_step=750), 4), CosineDrop(0.3)(500, 1000)
        (0.075, 0.1525)
    """

    initial: float = 0.3
    floor: float = DEFAULT_DROP_FLOOR
    until: DecayEnd = "end"

    def __post_init__(self) -> None:
        _check_fraction(self.initial, "CosineDrop.initial")
        _check_fraction(self.floor, "CosineDrop.floor")
        if self.floor > self.initial:
            raise ValueError(
                f"CosineDrop.floor ({self.floor}) must be <= CosineDrop.initial ({self.initial}): the cosine decays "
                "from initial to floor; use LinearDrop(initial, final) for a rising drop fraction"
            )
        _check_until(self.until, "CosineDrop.until")

    def __call__(self, step: int, total_steps: float, stop_step: float | None = None) -> float:
        """The drop fraction at optimizer step ``step`` of ``total_steps`` (``stop_step`` for ``until="stop"``)."""
        t = _progress(step, _horizon(self.until, total_steps, stop_step))
        return self.floor + (self.initial - self.floor) * (1.0 + math.cos(math.pi * t)) / 2.0


@dataclass(frozen=True)
class ConstantDrop:
    """The same drop fraction at every update (SET's ζ, Mocanu et al., arXiv:1707.04780).

    Args:
        value: the drop fraction, in [0, 1).

    Example:
        >>> ConstantDrop(0.3)(5000, 10000)
        0.3
    """

    value: float = 0.3

    def __post_init__(self) -> None:
        _check_fraction(self.value, "ConstantDrop.value")

    def __call__(self, step: int, total_steps: float, stop_step: float | None = None) -> float:
        """The drop fraction (independent of the step)."""
        _horizon("end", total_steps, stop_step)
        return float(self.value)


@dataclass(frozen=True)
class LinearDrop:
    """Linear change of the drop fraction from ``initial`` at step 0 to ``final`` at ``T_end`` (and after).

    Args:
        initial: drop fraction at step 0, in [0, 1).
        final: drop fraction at ``T_end`` and after, in [0, 1).
        until: where ``T_end`` lies, as in :class:`CosineDrop`: ``"end"`` (default), ``"stop"`` or a fraction.

    Example:
        >>> LinearDrop(0.5, 0.1)(5000, 10000)
        0.3
    """

    initial: float = 0.3
    final: float = 0.0
    until: DecayEnd = "end"

    def __post_init__(self) -> None:
        _check_fraction(self.initial, "LinearDrop.initial")
        _check_fraction(self.final, "LinearDrop.final")
        _check_until(self.until, "LinearDrop.until")

    def __call__(self, step: int, total_steps: float, stop_step: float | None = None) -> float:
        """The drop fraction at optimizer step ``step`` of ``total_steps`` (``stop_step`` for ``until="stop"``)."""
        t = _progress(step, _horizon(self.until, total_steps, stop_step))
        return round(self.initial + (self.final - self.initial) * t, 15)


@dataclass(frozen=True)
class CallableDrop:
    """Any function ``step -> fraction`` as a drop schedule; the fraction is checked to lie in [0, 1).

    Args:
        fn: called with the optimizer step (``trainer.global_step``) of each update.

    Example:
        >>> halving = CallableDrop(lambda step: 0.4 * 0.5 ** (step // 1000))
        >>> halving(2500, 10000)
        0.1
    """

    fn: Callable[[int], float]

    def __post_init__(self) -> None:
        if not callable(self.fn):
            raise TypeError(f"CallableDrop needs a function step -> fraction, got {self.fn!r}")

    @property
    def name(self) -> str:
        """``module.qualname`` of the function (what checkpoints compare on resume)."""
        return f"{getattr(self.fn, '__module__', '?')}.{getattr(self.fn, '__qualname__', type(self.fn).__name__)}"

    def __call__(self, step: int, total_steps: float, stop_step: float | None = None) -> float:
        """``fn(step)``, checked."""
        return _check_fraction(self.fn(step), f"drop_fraction({step}) from {self.name}")


#: Any drop-fraction schedule: called as ``schedule(step, total_steps, stop_step=...)``, returns a fraction in
#: [0, 1).
DropSchedule = CosineDrop | ConstantDrop | LinearDrop | CallableDrop


def as_drop_schedule(value: float | DropSchedule | Callable[[int], float]) -> DropSchedule:
    """Turn a callback's ``drop_fraction`` argument into a schedule object.

    A plain number ``p0`` means upstream's cosine decay from ``p0`` to ``min(p0, 0.005)``
    (:data:`DEFAULT_DROP_FLOOR`; the floor is lowered to ``p0`` when ``p0`` is smaller, so the fraction never
    rises). Schedule objects pass through unchanged; any other callable ``step -> fraction`` is wrapped in
    :class:`CallableDrop`.

    Raises:
        ValueError: a number outside [0, 1).
        TypeError: anything else (the message lists what is accepted).
    """
    if isinstance(value, (CosineDrop, ConstantDrop, LinearDrop, CallableDrop)):
        return value
    if callable(value):
        return CallableDrop(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(
            "drop_fraction must be a number in [0, 1) (cosine decay to 0.005), a CosineDrop, ConstantDrop or "
            f"LinearDrop, or a function step -> fraction, got {type(value).__name__} {value!r}"
        )
    p0 = _check_fraction(value, "drop_fraction")
    return CosineDrop(p0, min(p0, DEFAULT_DROP_FLOOR))


def drop_count(fraction: float, n_active: int) -> int:
    """Active weights dropped at an update: ``⌈fraction · n_active⌉`` (upstream's rounding), in [0, n_active].

    The product is rounded to 9 decimals before the ceiling, so that ``0.3 · 100`` gives 30, not 31.
    """
    if n_active < 0:
        raise ValueError(f"n_active must be >= 0, got {n_active}")
    return int(min(max(math.ceil(round(fraction * n_active, 9)), 0), n_active))


def cubic_density(
    update: int, init_density: float, final_density: float, start_update: int, end_update: int
) -> float:
    """Target density of gradual pruning at update index ``update`` (update periods since step 0).

    ``d(c) = d_f + (d_i − d_f)·(1 − (c − c_start)/(c_end − c_start))³``, the cubic schedule of Zhu and Gupta as
    upstream GraNet writes it (spec §3.6, with ``T_p = c_end − c_start``). Before the window it returns ``d_i``,
    after it ``d_f``; the update at ``c = c_end`` applies ``d_f`` exactly (upstream's last event is at
    ``c_end − 1`` and so never reaches ``d_f``, quirk Q9). A window of length 0 (``c_end == c_start``) prunes to
    ``d_f`` at once.

    Args:
        update: update index ``c = global_step // update_every_steps``.
        init_density: density at the start of the window, ``d_i``.
        final_density: density at the end of the window, ``d_f <= d_i``.
        start_update: first update index of the window, ``c_start``.
        end_update: last update index of the window, ``c_end >= c_start``.

    Raises:
        ValueError: ``end_update < start_update``.
    """
    if end_update < start_update:
        raise ValueError(f"end_update must be >= start_update, got {start_update} and {end_update}")
    if update >= end_update:
        return float(final_density)
    if update <= start_update:
        return float(init_density)
    remaining = 1.0 - (update - start_update) / (end_update - start_update)
    return final_density + (init_density - final_density) * remaining**3


def steps_per_epoch(num_training_batches: float, accumulate_grad_batches: int = 1) -> int:
    """Optimizer steps per epoch: ``⌈batches / accumulate⌉`` (Lightning steps on an epoch's last batch too).

    Raises:
        ValueError: an infinite or non-positive number of batches (an iterable dataset without a length).
    """
    if not math.isfinite(num_training_batches) or num_training_batches < 1:
        raise ValueError(
            f"cannot convert epochs to steps: the training loader has {num_training_batches} batches per epoch; "
            "give the window as epoch 0 to the end of training or use a sized DataLoader"
        )
    if accumulate_grad_batches < 1:
        raise ValueError(f"accumulate_grad_batches must be >= 1, got {accumulate_grad_batches}")
    return math.ceil(num_training_batches / accumulate_grad_batches)


def epoch_to_step(epoch: float, steps_per_epoch: int) -> int:
    """Optimizer step at which ``epoch`` (a float, e.g. 110 or 0.5) begins: ``⌊epoch · steps_per_epoch⌋``."""
    if epoch < 0:
        raise ValueError(f"epoch must be >= 0, got {epoch}")
    return math.floor(epoch * steps_per_epoch + 1e-9)


def prune_window(
    start_epoch: float,
    end_epoch: float | None,
    *,
    steps_per_epoch: int | None,
    update_every_steps: int,
    total_steps: float,
) -> tuple[int, int]:
    """First and last update index ``(c_start, c_end)`` of a gradual-pruning window given in epochs.

    As upstream: ``c_start = ⌊start_epoch · S / f⌋`` and ``c_end = ⌊end_epoch · S / f⌋`` with ``S`` the optimizer
    steps per epoch and ``f`` the update period. ``end_epoch=None`` means the end of training: the last update that
    happens, ``⌊(T − 1)/f⌋`` (an update at step ``g`` runs before optimizer step ``g + 1``, so step ``T`` never
    hosts one). An explicit end that falls on step ``T`` exactly (``end_epoch == max_epochs``) is moved to that same
    last update.

    Args:
        start_epoch: epoch at which pruning starts (>= 0).
        end_epoch: epoch at which the final density is reached, or ``None`` for the end of training.
        steps_per_epoch: ``S``; may be ``None`` only when both ends need no conversion (start 0, end ``None``).
        update_every_steps: ``f``.
        total_steps: ``T``, the optimizer steps of the whole run.

    Raises:
        ValueError: the end is before the start, beyond training, or the window holds no update.
    """
    if update_every_steps < 1:
        raise ValueError(f"update_every_steps must be >= 1, got {update_every_steps}")
    if not math.isfinite(total_steps) or total_steps < 1:
        raise ValueError(
            f"gradual pruning needs a finite number of training steps, got {total_steps}; set trainer max_epochs or "
            "max_steps"
        )
    total = int(total_steps)
    last_update = (total - 1) // update_every_steps
    if end_epoch is not None and end_epoch < start_epoch:
        raise ValueError(f"prune_end_epoch ({end_epoch}) must be >= prune_start_epoch ({start_epoch})")
    needs_epochs = start_epoch != 0 or end_epoch is not None
    if needs_epochs and steps_per_epoch is None:
        raise ValueError(
            "converting the pruning window from epochs to steps needs the number of steps per epoch"
        )
    start_step = 0 if start_epoch == 0 else epoch_to_step(start_epoch, steps_per_epoch)  # type: ignore[arg-type]
    if end_epoch is None:
        end = last_update
    else:
        end_step = epoch_to_step(end_epoch, steps_per_epoch)  # type: ignore[arg-type]
        if end_step > total:
            raise ValueError(
                f"prune_end_epoch={end_epoch} is step {end_step}, beyond the end of training ({total} steps = "
                f"{total / steps_per_epoch:g} epochs); lower it or train longer"  # type: ignore[operator]
            )
        end = min(end_step // update_every_steps, last_update)
    start = start_step // update_every_steps
    if start > end or end < 1:
        raise ValueError(
            f"the pruning window (epochs {start_epoch} to {end_epoch}) holds no mask update: updates happen every "
            f"{update_every_steps} steps and training has {total} steps; widen the window or update more often"
        )
    return start, end
