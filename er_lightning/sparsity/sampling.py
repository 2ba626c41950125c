"""Seeded random masks: the same (seed, step, layer) gives the same mask on every rank and after a resume.

Randomness never comes from the global RNG, whose state depends on data loading, dropout and call order. Each
layer draws from its own CPU ``torch.Generator`` seeded by :func:`layer_generator` from the integers
(seed, step, layer_index), with a fixed 64-bit mixing function (SplitMix64), so nothing needs to be saved to
reproduce a mask and nothing depends on Python's per-process ``hash()`` randomisation.

Two ways to draw a layer's mask (``sampling``):

* ``"exact"``: exactly ``round(density · numel)`` entries kept (:func:`~er_lightning.sparsity.topk.exact_count`),
  at the first positions of a random permutation. Upstream's ``ER_flow`` mode keeps ⌊density · numel⌋ instead.
* ``"bernoulli"``: every entry kept independently with probability ``density`` (``rand < density``), as upstream
  does in all its other modes; the kept count is Binomial.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Literal

import torch
from torch import Tensor

from er_lightning.sparsity.checks import check_int
from er_lightning.sparsity.topk import exact_count

__all__ = ["SAMPLING_MODES", "Sampling", "layer_generator", "resample_like", "sample_mask", "sample_masks"]

Sampling = Literal["exact", "bernoulli"]
SAMPLING_MODES: tuple[str, ...] = ("exact", "bernoulli")

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    """One SplitMix64 output for state ``x`` (Steele, Lea and Flood 2014): a bijective 64-bit mixer."""
    z = (x + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def layer_generator(seed: int, layer_index: int, step: int = 0) -> torch.Generator:
    """A CPU generator seeded deterministically from (seed, step, layer_index).

    The generator seed is ``h3`` where ``h1 = splitmix64(seed mod 2**64)``, ``h2 = splitmix64(h1 XOR step)`` and
    ``h3 = splitmix64(h2 XOR layer_index)``. It depends on nothing else (not the global RNG, not ``hash()``), so every
    process computes the same value.

    Args:
        seed: experiment seed; any int in [-2**63, 2**64) (negative values are taken modulo 2**64).
        layer_index: position of the layer in the ordered list of masked parameters, >= 0.
        step: optimizer step of the draw (0 at initialisation), >= 0; different steps give independent streams.

    Returns:
        A fresh ``torch.Generator`` on the CPU.

    Raises:
        TypeError: an argument is not an int.
        ValueError: ``seed`` is out of range, ``layer_index`` or ``step`` is negative.
    """
    check_int(seed, "seed", minimum=None)
    if not -(1 << 63) <= seed < (1 << 64):
        raise ValueError(f"seed must be in [-2**63, 2**64), got {seed}")
    check_int(layer_index, "layer_index", minimum=0)
    check_int(step, "step", minimum=0)
    h = _splitmix64(seed & _MASK64)
    h = _splitmix64(h ^ (step & _MASK64))
    h = _splitmix64(h ^ (layer_index & _MASK64))
    generator = torch.Generator(device="cpu")
    generator.manual_seed(h)
    return generator


def _check_generator(generator: object) -> torch.Generator:
    if not isinstance(generator, torch.Generator):
        raise TypeError(
            f"generator must be a torch.Generator (see layer_generator), got {type(generator).__name__}"
        )
    if generator.device.type != "cpu":
        raise ValueError(f"generator must be a CPU generator, got one on {generator.device}")
    return generator


def _check_sampling(sampling: object) -> Sampling:
    if sampling == "exact":
        return "exact"
    if sampling == "bernoulli":
        return "bernoulli"
    raise ValueError(f"unknown sampling {sampling!r}; valid: {', '.join(SAMPLING_MODES)}")


def _check_layer_density(name: str, density: object) -> float:
    value = (
        float(density) if isinstance(density, numbers.Real) and not isinstance(density, bool) else math.nan
    )
    if not math.isfinite(value) or not 0.0 <= value <= 1.0:
        raise ValueError(f"density of {name} must be a finite number in [0, 1], got {density!r}")
    return value


def _check_shape(name: str, shape: object) -> tuple[int, ...]:
    dims = tuple(shape) if isinstance(shape, Sequence) and not isinstance(shape, str) else None
    if dims is None or any(not isinstance(s, int) or isinstance(s, bool) or s < 0 for s in dims):
        raise ValueError(f"shape of {name} must be a sequence of ints >= 0, got {shape!r}")
    return dims


def sample_mask(
    shape: Sequence[int],
    density: float,
    *,
    generator: torch.Generator,
    sampling: Sampling = "exact",
) -> Tensor:
    """Draw one random bool mask on the CPU.

    Args:
        shape: the mask (weight) shape.
        density: fraction kept, in [0, 1].
        generator: CPU generator, usually from :func:`layer_generator`; its state advances.
        sampling: ``"exact"`` keeps exactly ``round(density * numel)`` entries at random positions (a prefix of
            ``torch.randperm``); ``"bernoulli"`` keeps each entry independently with probability ``density``.

    Returns:
        A ``torch.bool`` tensor of ``shape`` on the CPU.

    Raises:
        ValueError: bad shape, density outside [0, 1], unknown ``sampling``, non-CPU generator.
        TypeError: ``generator`` is not a ``torch.Generator``.
    """
    dims = _check_shape("the mask", shape)
    d = _check_layer_density("the mask", density)
    mode = _check_sampling(sampling)
    g = _check_generator(generator)
    if mode == "bernoulli":
        return torch.rand(dims, generator=g) < d
    numel = math.prod(dims)
    k = exact_count(d, numel)
    flat = torch.zeros(numel, dtype=torch.bool)
    flat[torch.randperm(numel, generator=g)[:k]] = True
    return flat.view(dims)


def sample_masks(
    shapes: Mapping[str, Sequence[int]],
    densities: Mapping[str, float],
    *,
    seed: int,
    sampling: Sampling = "exact",
    step: int = 0,
) -> dict[str, Tensor]:
    """Draw a mask per layer, each from its own generator ``layer_generator(seed, index, step)``.

    The layer index is the position of the name in ``shapes``, so a layer's mask does not depend on the masks
    drawn before it, nor on any other randomness in the process.

    Args:
        shapes: ``{fqn: shape}`` in a fixed order (e.g. ``named_parameters()`` order).
        densities: ``{fqn: density in [0, 1]}`` naming the same layers, e.g. from
            :func:`~er_lightning.sparsity.distributions.layer_densities`.
        seed: experiment seed.
        sampling: ``"exact"`` or ``"bernoulli"``, see :func:`sample_mask`.
        step: optimizer step of the draw (0 at initialisation).

    Returns:
        ``{fqn: bool mask}`` on the CPU, in ``shapes`` order.

    Raises:
        ValueError: the two mappings name different layers (both differences are listed), a density is outside
            [0, 1], a shape is invalid or ``sampling`` is unknown.
    """
    mode = _check_sampling(sampling)
    missing = [n for n in shapes if n not in densities]
    extra = [n for n in densities if n not in shapes]
    if missing or extra:
        raise ValueError(
            f"densities must name exactly the layers in shapes; missing: {missing}, extra (unknown): {extra}"
        )
    checked = {
        name: (_check_shape(repr(name), s), _check_layer_density(repr(name), densities[name]))
        for name, s in shapes.items()
    }
    check_int(seed, "seed", minimum=None)
    check_int(step, "step", minimum=0)
    return {
        name: sample_mask(dims, d, generator=layer_generator(seed, index, step), sampling=mode)
        for index, (name, (dims, d)) in enumerate(checked.items())
    }


def resample_like(mask: Tensor, *, generator: torch.Generator) -> Tensor:
    """A mask with the same shape and number of kept entries as ``mask``, at freshly drawn random positions.

    This is the "shuffled" control: it keeps each layer's count (hence its density) and destroys the structure.

    Args:
        mask: bool or 0/1 tensor; nonzero entries count as kept.
        generator: CPU generator; its state advances.

    Returns:
        A ``torch.bool`` tensor shaped like ``mask`` on ``mask``'s device.

    Raises:
        TypeError: ``mask`` is not a tensor or ``generator`` not a ``torch.Generator``.
        ValueError: non-CPU generator.
    """
    if not isinstance(mask, Tensor):
        raise TypeError(f"mask must be a torch.Tensor, got {type(mask).__name__}")
    g = _check_generator(generator)
    numel = mask.numel()
    k = int(torch.count_nonzero(mask))
    flat = torch.zeros(numel, dtype=torch.bool)
    flat[torch.randperm(numel, generator=g)[:k]] = True
    return flat.view(mask.shape).to(mask.device)
