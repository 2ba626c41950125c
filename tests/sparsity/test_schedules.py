from __future__ import annotations

import dataclasses
import math

import pytest

from er_lightning.sparsity.schedules import (
    DEFAULT_DROP_FLOOR,
    ConstantDrop,
    CosineDrop,
    LinearDrop,
    as_drop_schedule,
    cubic_density,
    drop_count,
    epoch_to_step,
    prune_window,
    steps_per_epoch,
)

# Spec §3.6 worked example: VGG-16, CIFAR-10, batch 100 (450 steps/epoch), 160 epochs, update every 1000 steps.
T = 72_000


@pytest.mark.parametrize(
    "step,expected", [(1000, 0.49976), (24_000, 0.37625), (48_000, 0.12875), (72_000, 0.005)]
)
def test_cosine_drop_matches_worked_example(step, expected):
    assert as_drop_schedule(0.5)(step, T) == pytest.approx(expected, abs=1e-5)
    assert CosineDrop(0.5, 0.005)(step, T) == pytest.approx(expected, abs=1e-5)


def test_cosine_drop_closed_form_and_ends():
    p = CosineDrop(0.5, 0.005)
    assert p(0, T) == 0.5
    assert p(T, T) == pytest.approx(0.005, abs=1e-15)
    assert p(2 * T, T) == pytest.approx(0.005, abs=1e-15)  # stays at the floor
    assert p(T // 2, T) == pytest.approx(0.005 + 0.495 / 2, abs=1e-12)
    t = 12_345
    assert p(t, T) == pytest.approx(0.005 + 0.495 * (1 + math.cos(math.pi * t / T)) / 2, abs=1e-15)


@pytest.mark.parametrize("c,expected", [(1, 0.0094601), (10, 0.0055378), (24, 0.0021953), (48, 0.00100008)])
def test_cubic_density_matches_worked_example(c, expected):
    assert cubic_density(c, 0.01, 0.001, 0, 49) == pytest.approx(expected, abs=1e-5)
    # and much tighter than the 1e-5, which is larger than d_f itself
    assert cubic_density(c, 0.01, 0.001, 0, 49) == pytest.approx(expected, rel=1e-4)


def test_cubic_density_reaches_final_at_window_end_and_stays():
    assert cubic_density(49, 0.01, 0.001, 0, 49) == 0.001
    assert cubic_density(60, 0.01, 0.001, 0, 49) == 0.001
    assert cubic_density(0, 0.01, 0.001, 0, 49) == 0.01
    assert cubic_density(3, 0.5, 0.1, 5, 9) == 0.5  # before the window
    assert cubic_density(7, 0.5, 0.1, 5, 9) == pytest.approx(0.1 + 0.4 * 0.5**3)
    assert cubic_density(5, 0.5, 0.1, 5, 5) == 0.1  # zero-length window: one-shot
    values = [cubic_density(c, 0.5, 0.1, 2, 12) for c in range(15)]
    assert all(a >= b for a, b in zip(values, values[1:]))  # monotone
    with pytest.raises(ValueError, match="end_update"):
        cubic_density(1, 0.5, 0.1, 5, 4)


def test_prune_window_matches_worked_example():
    assert prune_window(0.0, 110.0, steps_per_epoch=450, update_every_steps=1000, total_steps=T) == (0, 49)
    # None = the last update of training, step 71000 (step 72000 never hosts an update)
    assert prune_window(0.0, None, steps_per_epoch=None, update_every_steps=1000, total_steps=T) == (0, 71)
    # an end at exactly the last step is the last update too
    assert prune_window(0.0, 160.0, steps_per_epoch=450, update_every_steps=1000, total_steps=T) == (0, 71)
    assert prune_window(10.0, 110.0, steps_per_epoch=450, update_every_steps=1000, total_steps=T) == (4, 49)
    assert prune_window(0.5, 2.0, steps_per_epoch=4, update_every_steps=1, total_steps=12) == (2, 8)


def test_prune_window_errors():
    with pytest.raises(ValueError, match="beyond the end of training"):
        prune_window(0.0, 161.0, steps_per_epoch=450, update_every_steps=1000, total_steps=T)
    with pytest.raises(ValueError, match="must be >= prune_start_epoch"):
        prune_window(20.0, 10.0, steps_per_epoch=450, update_every_steps=1000, total_steps=T)
    with pytest.raises(ValueError, match="holds no mask update"):
        prune_window(0.0, 1.0, steps_per_epoch=450, update_every_steps=1000, total_steps=T)
    with pytest.raises(ValueError, match="finite number of training steps"):
        prune_window(0.0, None, steps_per_epoch=None, update_every_steps=10, total_steps=float("inf"))
    with pytest.raises(ValueError, match="steps per epoch"):
        prune_window(1.0, None, steps_per_epoch=None, update_every_steps=10, total_steps=100)


def test_other_drop_schedules():
    assert ConstantDrop(0.3)(0, 10) == 0.3 == ConstantDrop(0.3)(10, 10)
    lin = LinearDrop(0.5, 0.1)
    assert [lin(s, 4) for s in range(6)] == [0.5, 0.4, 0.3, 0.2, 0.1, 0.1]
    assert as_drop_schedule(ConstantDrop(0.2)) == ConstantDrop(0.2)
    assert as_drop_schedule(0.3) == CosineDrop(0.3, DEFAULT_DROP_FLOOR)
    assert as_drop_schedule(0.001) == CosineDrop(0.001, 0.001)  # the floor never lies above the start
    assert as_drop_schedule(0) == CosineDrop(0.0, 0.0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        ConstantDrop(0.2).value = 0.4  # type: ignore[misc]


@pytest.mark.parametrize("bad", [1.0, -0.1, 1.5, float("nan")])
def test_drop_fractions_outside_unit_interval_raise(bad):
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        as_drop_schedule(bad)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        CosineDrop(bad, 0.0)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        ConstantDrop(bad)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        LinearDrop(0.1, bad)


def test_decay_that_ends_at_the_stop_or_a_given_fraction():
    # the numbers: T = 1000, α = 0.3, updates stop at step 750
    rigl = CosineDrop(0.3, floor=0.0, until="stop")
    assert rigl(500, 1000, stop_step=750) == pytest.approx(0.075, abs=1e-12)
    assert CosineDrop(0.3)(500, 1000) == pytest.approx(0.1525, abs=1e-12)  # upstream: over the whole run
    assert rigl(749, 1000, stop_step=750) == pytest.approx(
        0.15 * (1 + math.cos(math.pi * 749 / 750)), abs=1e-15
    )
    assert rigl(749, 1000, stop_step=750) < 1e-5
    assert rigl(750, 1000, stop_step=750) == 0.0 == rigl(900, 1000, stop_step=750)
    half = CosineDrop(0.4, 0.1, until=0.5)
    assert half(250, 1000) == pytest.approx(0.1 + 0.3 * (1 + math.cos(math.pi / 2)) / 2)
    assert half(500, 1000) == pytest.approx(0.1) and half(800, 1000) == pytest.approx(0.1)
    lin = LinearDrop(0.5, 0.1, until="stop")
    assert [lin(s, 8, stop_step=4) for s in (0, 2, 4, 6)] == [0.5, 0.3, 0.1, 0.1]
    assert ConstantDrop(0.2)(3, 8, stop_step=4) == 0.2
    with pytest.raises(ValueError, match="until='stop' needs the step"):
        rigl(10, 100)
    for bad in ("start", 0.0, 1.5, True, float("nan")):
        with pytest.raises(ValueError, match="until"):
            CosineDrop(0.3, 0.0, until=bad)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="until"):
            LinearDrop(0.3, 0.0, until=bad)  # type: ignore[arg-type]


def test_rising_cosine_drop_is_rejected():
    with pytest.raises(ValueError, match=r"floor \(0.5\) must be <= CosineDrop.initial \(0.1\).*LinearDrop"):
        CosineDrop(0.1, floor=0.5)
    assert CosineDrop(0.2, 0.2)(5, 10) == pytest.approx(0.2)  # flat is allowed


def test_drop_fraction_of_wrong_type_raises():
    with pytest.raises(TypeError, match="CosineDrop, ConstantDrop or LinearDrop"):
        as_drop_schedule("cosine")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        as_drop_schedule(True)  # type: ignore[arg-type]


def test_drop_count_uses_ceiling_without_float_noise():
    assert drop_count(0.3, 100) == 30  # 0.3 * 100 = 30.000000000000004 in floating point
    assert drop_count(0.25, 3) == 1
    assert drop_count(0.5, 7) == 4
    assert drop_count(0.0, 50) == 0
    assert drop_count(0.999, 3) == 3
    assert drop_count(0.5, 0) == 0


def test_steps_per_epoch_and_epoch_to_step():
    assert steps_per_epoch(450) == 450
    assert steps_per_epoch(5, 2) == 3  # Lightning steps on the last, partial accumulation too
    assert epoch_to_step(110, 450) == 49_500
    assert epoch_to_step(0.5, 3) == 1
    with pytest.raises(ValueError, match="sized DataLoader"):
        steps_per_epoch(float("inf"))
    with pytest.raises(ValueError, match="epoch must be >= 0"):
        epoch_to_step(-1, 10)
