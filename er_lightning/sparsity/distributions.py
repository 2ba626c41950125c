"""Layer-wise density rules: how an overall density is split over the masked layers.

Every rule is a pure function of ``{fqn: shape}`` and the overall ``density`` d (fraction of weights kept, in
(0, 1]). Layer l has shape (s_1, ..., s_k), n_l = Π s_i weights, N = Σ n_l in total. The result maps each name to a
per-layer density d_l in [0, 1]; the overall *expected* density is Σ d_l·n_l / N (:func:`expected_density`).

Rules (``method``):

* ``uniform``: d_l = d.
* ``er`` (Erdős–Rényi, Mocanu et al. 2018): d_l ∝ (n_in + n_out) / (n_in·n_out), with n_out = s_1 and n_in = s_2
  (kernel dimensions ignored; a 1-D shape counts as n_in = 1).
* ``erk`` (Erdős–Rényi-Kernel, Evci et al. 2020, arXiv:1911.11134): d_l ∝ (Σ_i s_i / Π_i s_i)^p with
  p = ``power_scale`` (1 by default; 0 gives uniform). Kernel dimensions count.
* ``balanced``: the same number of kept weights X = d·N / L in every layer, d_l = X / n_l.
* ``pyramidal``: d_l = r^l (l = 1..L in mapping order), with r in (0, 1] solving Σ n_l·r^l = d·N; the first layer
  is densest and density falls geometrically with depth.
* ``custom``: the densities given in ``custom``, one per layer (``density`` is validated but not used).

**redistribute=True (the default)** keeps the promise "overall density = d": a layer whose proportional density
would exceed 1 is made dense and its surplus is spread over the other layers, repeatedly, so Σ d_l·n_l = d·N up to
float rounding for every method. For ``erk`` this is exactly ER_DST's ERK (RigL's ``get_sparsities_erdos_renyi``):
all layers sharing the largest raw score are made dense together and the scale is recomputed. ``er`` uses the same
loop with its own score. For ``balanced`` the layers smaller than the per-layer budget become dense and the remaining
budget is split equally, in *count*, over the rest, until no layer overflows. ``uniform`` and ``pyramidal`` never
overflow, so the flag does not change them.

**redistribute=False** reproduces the upstream code (RelationalML/sparse_to_sparse), whose overall density falls
short of d when a layer is capped: ``erk`` follows STR's clamped rule, C = d·N / Σ r_l·n_l and d_l = min(C·r_l, 1),
computed in float32 exactly as upstream does (so the figures match to the last digit); ``balanced`` caps
d_l = min(X / n_l, 1) without redistribution (ER_DST ``ER_same_params_per_layer`` and STR ``balanced``); ``er``
clamps the same way in float64.

Unlike upstream, which silently trains a dense network when it does not recognise a mode name, an unknown
``method`` raises ``ValueError``.

Example:
    >>> d = layer_densities({"fc1.weight": (300, 784), "fc2.weight": (10, 300)}, 0.1, "erk")
    >>> d["fc2.weight"]
    1.0
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence

import torch

from er_lightning.sparsity.checks import check_density

__all__ = ["DENSITY_METHODS", "Densities", "expected_density", "layer_densities"]

Densities = dict[str, float]
"""Per-layer densities keyed by parameter FQN, in the order of the shapes they were computed for."""

DENSITY_METHODS: tuple[str, ...] = ("uniform", "er", "erk", "balanced", "pyramidal", "custom")
"""Names accepted by :func:`layer_densities`."""


def _finite_real(value: object) -> float | None:
    """``value`` as a float if it is a finite real number (bools excluded), else ``None``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    out = float(value)
    return out if math.isfinite(out) else None


def _check_shapes(shapes: Mapping[str, Sequence[int]]) -> dict[str, tuple[int, ...]]:
    if not isinstance(shapes, Mapping):
        raise TypeError(f"shapes must be a mapping of parameter name to shape, got {type(shapes).__name__}")
    if len(shapes) == 0:
        raise ValueError("shapes is empty: give at least one layer {name: shape}")
    out: dict[str, tuple[int, ...]] = {}
    for name, shape in shapes.items():
        if not isinstance(name, str):
            raise TypeError(f"layer names must be strings, got {name!r}")
        try:
            dims = tuple(shape)
        except TypeError:
            raise ValueError(
                f"shape of {name!r} must be a sequence of positive ints, got {shape!r}"
            ) from None
        if len(dims) < 1:
            raise ValueError(f"shape of {name!r} must have at least 1 dimension, got {shape!r}")
        bad = [s for s in dims if not isinstance(s, int) or isinstance(s, bool) or s <= 0]
        if bad:
            raise ValueError(f"shape of {name!r} must contain only positive ints, got {shape!r}")
        out[name] = tuple(int(s) for s in dims)
    return out


def _numel(shape: tuple[int, ...]) -> int:
    return math.prod(shape)


def _er_score(shape: tuple[int, ...]) -> float:
    n_out = shape[0]
    n_in = shape[1] if len(shape) > 1 else 1
    return (n_in + n_out) / (n_in * n_out)


def _erk_score(shape: tuple[int, ...], power_scale: float) -> float:
    try:
        return float((sum(shape) / _numel(shape)) ** power_scale)
    except OverflowError:
        raise ValueError(
            f"infeasible density scores: ERK score of shape {shape} overflows with power_scale={power_scale}; "
            "use a smaller power_scale"
        ) from None


def _scale_with_redistribution(scores: list[float], numels: list[int], density: float) -> list[float]:
    """Densities eps·r_l with overflowing layers made dense and eps recomputed (ER_DST / RigL ERK loop).

    Per round, with D the dense set: eps = (d·N − Σ_{l∈D} n_l) / Σ_{l∉D} r_l·n_l. If eps·max_{l∉D} r_l > 1, every
    layer with that maximal score joins D and the round repeats.
    """
    total = sum(numels)
    dense = [False] * len(scores)
    eps = 0.0
    while True:
        rest = [i for i, is_dense in enumerate(dense) if not is_dense]
        if not rest:  # only reachable at density 1 (or by rounding just below it): everything is dense
            break
        budget = density * total - sum(n for n, is_dense in zip(numels, dense) if is_dense)
        divisor = math.fsum(scores[i] * numels[i] for i in rest)
        if not divisor > 0.0 or not math.isfinite(divisor):
            raise ValueError(
                f"infeasible density scores (sum of score·numel = {divisor}); "
                "power_scale may be too large for these shapes, try a smaller one"
            )
        eps = budget / divisor
        top = max(scores[i] for i in rest)
        if eps * top > 1.0:
            for i in rest:
                if scores[i] == top:
                    dense[i] = True
        else:
            break
    return [1.0 if is_dense else min(max(eps * r, 0.0), 1.0) for r, is_dense in zip(scores, dense)]


def _clamped_float64(scores: list[float], numels: list[int], density: float) -> list[float]:
    """C = d·N / Σ r_l·n_l, d_l = clamp(C·r_l, 0, 1), no redistribution."""
    divisor = math.fsum(r * n for r, n in zip(scores, numels))
    if not divisor > 0.0 or not math.isfinite(divisor):
        raise ValueError(f"infeasible density scores (sum of score·numel = {divisor})")
    c = density * sum(numels) / divisor
    return [min(max(c * r, 0.0), 1.0) for r in scores]


def _erk_str_clamped(shapes: list[tuple[int, ...]], density: float, power_scale: float) -> list[float]:
    """STR's clamped ERK, in float32 with the same operations as upstream so the figures match bit for bit."""
    dim_sums = torch.tensor([sum(s) for s in shapes], dtype=torch.int64)
    numels = torch.tensor([_numel(s) for s in shapes], dtype=torch.int64)
    raw = dim_sums / numels  # int64 / int64 -> float32 true division, as upstream's per-layer tensor division
    if power_scale != 1.0:
        raw = raw**power_scale
    kept = (raw * numels).sum()  # float32
    if not float(kept) > 0.0 or not math.isfinite(float(kept)):
        raise ValueError(f"infeasible density scores (sum of score·numel = {float(kept)})")
    c = (int(numels.sum()) * density) / kept
    return [float(x) for x in torch.clamp(c * raw, 0, 1)]


def _balanced(numels: list[int], density: float, redistribute: bool) -> list[float]:
    total = sum(numels)
    if not redistribute:
        per_layer = density * total / len(numels)
        return [per_layer / n if per_layer / n < 1.0 else 1.0 for n in numels]
    dense = [False] * len(numels)
    while True:
        rest = [i for i, is_dense in enumerate(dense) if not is_dense]
        if not rest:
            return [1.0] * len(numels)
        budget = density * total - sum(n for n, is_dense in zip(numels, dense) if is_dense)
        per_layer = budget / len(rest)
        overflow = [i for i in rest if per_layer >= numels[i]]
        if not overflow:
            return [1.0 if is_dense else min(per_layer / n, 1.0) for n, is_dense in zip(numels, dense)]
        for i in overflow:
            dense[i] = True


def _pyramid_ratio(numels: list[int], density: float) -> float:
    """The r in (0, 1] with Σ_l n_l·r^l = d·N (l 1-based), by bisection then Newton polishing, in float64.

    f(r) = Σ n_l r^l − d·N is strictly increasing on (0, 1] with f(0) = −d·N < 0 and f(1) = (1 − d)·N ≥ 0, so the
    root is unique (Descartes' rule of signs) and bisection always converges.
    """
    total = sum(numels)
    target = density * total
    if density >= 1.0:
        return 1.0

    def f(r: float) -> float:
        return math.fsum(n * r ** (i + 1) for i, n in enumerate(numels)) - target

    lo, hi = 0.0, 1.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if mid in (lo, hi):
            break
        if f(mid) < 0.0:
            lo = mid
        else:
            hi = mid
    r = 0.5 * (lo + hi)
    # One or two Newton steps, kept only if they stay in the bracket: bisection already gives ~1 ulp.
    for _ in range(2):
        deriv = math.fsum((i + 1) * n * r**i for i, n in enumerate(numels))
        if deriv <= 0.0:
            break
        step = r - f(r) / deriv
        if lo <= step <= hi:
            r = step
    return r


def _check_custom(names: list[str], custom: Mapping[str, float] | None) -> list[float]:
    if custom is None:
        raise ValueError("method 'custom' needs the custom mapping {name: density} for every layer")
    if not isinstance(custom, Mapping):
        raise TypeError(f"custom must be a mapping of layer name to density, got {type(custom).__name__}")
    missing = [n for n in names if n not in custom]
    extra = [n for n in custom if n not in names]
    if missing or extra:
        raise ValueError(
            f"custom densities must name exactly the layers in shapes; missing: {missing}, extra (unknown): {extra}"
        )
    out = []
    for n in names:
        value = _finite_real(custom[n])
        if value is None or not 0.0 <= value <= 1.0:
            raise ValueError(f"custom density of {n!r} must be a finite number in [0, 1], got {custom[n]!r}")
        out.append(value)
    return out


def layer_densities(
    shapes: Mapping[str, Sequence[int]],
    density: float,
    method: str,
    *,
    redistribute: bool = True,
    power_scale: float = 1.0,
    custom: Mapping[str, float] | None = None,
) -> Densities:
    """Split an overall density over layers with one of the rules in :data:`DENSITY_METHODS`.

    Formulas (n_l weights in layer l, N = Σ n_l, L layers, mapping order = depth order):

    * ``uniform``: d_l = d.
    * ``er``: r_l = (n_in + n_out) / (n_in·n_out) with n_out = shape[0], n_in = shape[1]; d_l = ε·r_l.
    * ``erk``: r_l = (Σ_i s_i / Π_i s_i)^power_scale; d_l = ε·r_l.
    * ``balanced``: d_l = X / n_l with X = d·N / L kept weights per layer.
    * ``pyramidal``: d_l = r^l with Σ_l n_l·r^l = d·N, r in (0, 1].
    * ``custom``: d_l = ``custom[name]``.

    For ``er``/``erk``, ε is set so that Σ d_l·n_l = d·N. Layers that would exceed 1 are handled as the module
    docstring describes: made dense with the surplus redistributed (``redistribute=True``) or clamped as upstream
    did (``redistribute=False``; overall density then falls below d).

    Args:
        shapes: ``{fqn: shape}`` of the masked weights, in module order (the order matters for ``pyramidal``).
        density: overall fraction of weights kept, in (0, 1]. Validated but not used for ``custom``.
        method: one of :data:`DENSITY_METHODS`.
        redistribute: make overflowing layers dense and give their surplus to the others, so the overall density
            is exactly ``density``. ``False`` reproduces upstream's capped rules (``erk``: STR's float32 clamp).
        power_scale: exponent p of the ERK score (``erk`` only); 1 is standard ERK, 0 is uniform. Must be ≥ 0.
        custom: ``{fqn: density in [0, 1]}`` naming every layer exactly once; only with ``method="custom"``.

    Returns:
        ``{fqn: density_l}`` with the same keys and order as ``shapes``, every value in [0, 1].

    Raises:
        ValueError: density not in (0, 1] or not finite; empty shapes; a shape with no dimension or a non-positive
            one; unknown method; bad ``power_scale``; ``custom`` missing, misnamed or out of range, or given with
            another method; scores that cannot be normalised.
        TypeError: ``shapes`` or ``custom`` is not a mapping.
    """
    if method not in DENSITY_METHODS:
        raise ValueError(f"unknown density method {method!r}; valid: {', '.join(DENSITY_METHODS)}")
    d = check_density(density)
    checked = _check_shapes(shapes)
    power = _finite_real(power_scale)
    if power is None or power < 0.0:
        raise ValueError(f"power_scale must be a finite number >= 0, got {power_scale!r}")
    if custom is not None and method != "custom":
        raise ValueError(f"custom densities are only used with method='custom', got method={method!r}")
    names = list(checked)
    dims = list(checked.values())
    numels = [_numel(s) for s in dims]

    if method == "uniform":
        values = [d] * len(names)
    elif method == "custom":
        values = _check_custom(names, custom)
    elif method == "pyramidal":
        r = _pyramid_ratio(numels, d)
        values = [min(r ** (i + 1), 1.0) for i in range(len(names))]
    elif method == "balanced":
        values = _balanced(numels, d, redistribute)
    elif method == "erk":
        if redistribute:
            values = _scale_with_redistribution([_erk_score(s, power) for s in dims], numels, d)
        else:
            values = _erk_str_clamped(dims, d, power)
    else:  # "er"
        scores = [_er_score(s) for s in dims]
        values = (
            _scale_with_redistribution(scores, numels, d)
            if redistribute
            else _clamped_float64(scores, numels, d)
        )
    return dict(zip(names, values))


def expected_density(shapes: Mapping[str, Sequence[int]], densities: Mapping[str, float]) -> float:
    """Overall expected density Σ d_l·n_l / Σ n_l of per-layer ``densities`` over ``shapes``.

    Raises:
        ValueError: the two mappings do not name the same layers, or a shape is invalid.
    """
    checked = _check_shapes(shapes)
    missing = [n for n in checked if n not in densities]
    extra = [n for n in densities if n not in checked]
    if missing or extra:
        raise ValueError(
            f"densities must name exactly the layers in shapes; missing: {missing}, extra: {extra}"
        )
    numels = {n: _numel(s) for n, s in checked.items()}
    return math.fsum(float(densities[n]) * numels[n] for n in checked) / sum(numels.values())
