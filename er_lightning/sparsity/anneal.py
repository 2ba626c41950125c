"""Annealed kept fraction of a supermask run: one value per level, and the level of an optimizer step.

Upstream ER_SLT (``ER_SLT/cifar_main.py``) trains ``levels`` equal rounds and, with annealing on, changes the kept
fraction ``s`` before each round: ``s ← s·b`` with ``b = (k_final / k_start)^(1/levels)``, starting from
``s = k_start``; then ``s`` is clamped to the ER density when ``s ≥ er_density`` and lifted to ``k_final`` when it
falls below, and the clamped value feeds the next level. The clamp bends the geometric path, e.g. for
``k_final = 0.1``, ER density 0.3 and 5 levels the values are 0.3, 0.20965, 0.14651, 0.10238, 0.1.

These are pure functions of numbers: the callback (:class:`er_lightning.callbacks.supermask.Supermask`) decides
when to call them.
"""

from __future__ import annotations

import math
import numbers

__all__ = ["annealed_densities", "level_at_step"]


def _fraction(name: str, value: object) -> float:
    if not isinstance(value, numbers.Real) or isinstance(value, bool) or not math.isfinite(float(value)):
        raise ValueError(f"{name} must be a number in (0, 1], got {value!r}")
    if not 0.0 < float(value) <= 1.0:
        raise ValueError(f"{name} must be in (0, 1], got {value!r}")
    return float(value)


def _positive_int(name: str, value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return value


def annealed_densities(
    density: float,
    er_density: float,
    levels: int,
    start: float = 0.6,
    anneal: bool = True,
) -> list[float]:
    """Kept fraction used during each level (upstream ER_SLT's annealing rule, clamp included).

    Args:
        density: final kept fraction ``k_final`` of every masked layer, in (0, ``er_density``].
        er_density: density of the random ER mask; the kept fraction never exceeds it.
        levels: number of levels (equal chunks of training), >= 1.
        start: ``k_start`` (upstream ``--sparsity_start``, 0.6), in [``density``, 1]. It is not used itself:
            the first level already uses ``start · b`` (then clamped).
        anneal: ``False`` keeps ``density`` for every level (upstream without ``--anneal``).

    Returns:
        ``levels`` values; the last one is ``density`` whenever annealing reaches it (always, up to float error,
        since ``start · b^levels = density``; values below ``density`` are lifted to it).

    Raises:
        ValueError: a fraction outside (0, 1], ``density > er_density``, ``start < density`` or ``levels < 1``.
        TypeError: ``levels`` is not an int.

    Example:
        >>> [round(k, 5) for k in annealed_densities(0.2, 0.5, levels=5)]
        [0.48164, 0.38664, 0.31037, 0.24915, 0.2]
    """
    k_final = _fraction("density", density)
    er = _fraction("er_density", er_density)
    k_start = _fraction("start", start)
    n = _positive_int("levels", levels)
    if k_final > er:
        raise ValueError(
            f"density (the final kept fraction, {k_final}) must not exceed er_density ({er}): the kept weights are "
            "chosen inside the ER mask; lower density or raise er_density"
        )
    if k_start < k_final:
        raise ValueError(
            f"start ({k_start}) must be >= density ({k_final}): annealing only lowers the kept fraction"
        )
    if not anneal:
        return [k_final] * n
    factor = (k_final / k_start) ** (1.0 / n)
    values = []
    s = k_start
    for _ in range(n):
        s = s * factor
        if er <= s:
            s = er
        if s < k_final or math.isclose(s, k_final, rel_tol=1e-12):
            s = k_final  # also absorbs float error: start·b^levels is density up to rounding
        values.append(s)
    return values


def level_at_step(step: int, total_steps: int, levels: int) -> int:
    """The 0-based level of optimizer step ``step`` when ``total_steps`` are split into ``levels`` equal chunks.

    Level ``l`` covers steps ``[ceil(l·T/L), ceil((l+1)·T/L))``, i.e. ``level = floor(step·L/T)`` (exact integer
    arithmetic, so 500 epochs of 391 steps in 5 levels switch exactly every 100 epochs). Steps at or past the end
    stay in the last level.

    Args:
        step: optimizer step (``trainer.global_step``), >= 0.
        total_steps: planned optimizer steps of the whole run, >= 1.
        levels: number of levels, >= 1.

    Raises:
        ValueError: negative ``step`` or non-positive ``total_steps``/``levels``.
        TypeError: a non-int argument.
    """
    if not isinstance(step, int) or isinstance(step, bool):
        raise TypeError(f"step must be an int, got {type(step).__name__} {step!r}")
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    total = _positive_int("total_steps", total_steps)
    n = _positive_int("levels", levels)
    return min(step * n // total, n - 1)
