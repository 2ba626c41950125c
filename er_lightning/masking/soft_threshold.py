"""Soft threshold reparameterisation (STR) as a ``torch.nn.utils.parametrize`` parametrization.

STR (Kusupati et al., "Soft Threshold Weight Reparameterization for Learnable Sparsity", ICML 2020,
arXiv:2002.03231) replaces a weight W by

    Ŵ = sign(W) · ReLU(|W| − g(s)),

with a learnable threshold parameter s (one per layer, or one per output channel) and g a monotone map to a
non-negative threshold: ``sigmoid`` (STR's choice) or ``identity`` (s itself, floored at 0). Autograd of this
expression gives exactly STR's gradients: ∂Ŵ/∂W = 1 where |W| > g(s) and 0 elsewhere, and s receives
−g′(s)·Σ sign(W)·∂L/∂Ŵ over the active entries.

Here W is the parametrization's ``original`` tensor and s is the ``threshold`` parameter of
:class:`SoftThresholdParametrization`, so both are ordinary parameters of the model: optimisers, DDP and
checkpoints see them with no extra machinery, and no buffer is added (DDP would re-send buffers every step). A
random Erdős–Rényi support is *not* part of the parametrization: the callback
(:class:`~er_lightning.callbacks.soft_threshold.SoftThreshold`) keeps W exactly zero outside the support in place,
and sign(0) = 0 makes Ŵ zero there too.

This module also holds the per-layer density files that connect two STR runs (``str_induced`` ER masks):
:func:`save_densities`, :func:`load_densities` and :func:`rescale_densities`, and the arithmetic of the density
controller (:func:`critical_shifts`, :func:`shift_for_count`).
"""

from __future__ import annotations

import json
import math
import numbers
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from er_lightning.masking.targets import PARAMETRIZED_NAME, original_fqn

__all__ = [
    "DENSITY_FILE_FORMAT",
    "SPARSE_FUNCTIONS",
    "SoftThresholdParametrization",
    "SparseFunction",
    "attach_soft_threshold_",
    "bake_state_dict",
    "check_sparse_function",
    "critical_shifts",
    "find_soft_thresholds",
    "load_densities",
    "original_fqn",
    "remove_soft_thresholds_",
    "rescale_densities",
    "save_densities",
    "shift_for_count",
    "soft_threshold",
    "threshold_shape",
    "threshold_value",
]

SparseFunction = Literal["sigmoid", "identity"]
SPARSE_FUNCTIONS: tuple[str, ...] = ("sigmoid", "identity")
"""Maps from the raw threshold parameter s to the threshold g(s) ≥ 0."""

DENSITY_FILE_FORMAT = "er_lightning.str_densities"
_DENSITY_FILE_VERSION = 1


# --------------------------------------------------------------------------------------------- the function
def check_sparse_function(name: object) -> SparseFunction:
    """Return ``name`` if it is a known sparse function, else raise ``ValueError`` listing the valid ones."""
    if name == "sigmoid":
        return "sigmoid"
    if name == "identity":
        return "identity"
    raise ValueError(
        f"unknown sparse_function {name!r}; valid: {list(SPARSE_FUNCTIONS)} "
        "('sigmoid': g(s) = sigmoid(s) as in STR; 'identity': g(s) = max(s, 0))"
    )


def threshold_value(s: Tensor, sparse_function: SparseFunction = "sigmoid") -> Tensor:
    """The threshold g(s): ``sigmoid(s)``, or ``max(s, 0)`` for ``identity`` (a negative s thresholds nothing)."""
    if sparse_function == "sigmoid":
        return torch.sigmoid(s)
    if sparse_function == "identity":
        return torch.relu(s)
    raise ValueError(f"unknown sparse_function {sparse_function!r}; valid: {list(SPARSE_FUNCTIONS)}")


def soft_threshold(weight: Tensor, s: Tensor, sparse_function: SparseFunction = "sigmoid") -> Tensor:
    """Ŵ = sign(W)·ReLU(|W| − g(s)); differentiable in ``weight`` and ``s``.

    Args:
        weight: W, any shape.
        s: raw threshold, broadcastable to ``weight`` (shape ``(1, …, 1)`` per layer or ``(C_out, 1, …, 1)``).
        sparse_function: g, see :func:`threshold_value`.

    Returns:
        Ŵ, the shape of ``weight``; exactly zero wherever |W| ≤ g(s) (and wherever W = 0).
    """
    return torch.sign(weight) * torch.relu(weight.abs() - threshold_value(s, sparse_function))


def threshold_shape(weight_shape: Sequence[int], per_channel: bool) -> tuple[int, ...]:
    """Shape of s for a weight: all ones (one threshold per layer) or ``(C_out, 1, …, 1)`` (one per channel)."""
    dims = tuple(int(d) for d in weight_shape)
    if not dims:
        return ()
    if per_channel:
        return (dims[0],) + (1,) * (len(dims) - 1)
    return (1,) * len(dims)


class SoftThresholdParametrization(nn.Module):
    """The parametrization W ↦ sign(W)·ReLU(|W| − g(s)) with a learnable threshold ``s`` (:attr:`threshold`).

    Registered with ``torch.nn.utils.parametrize`` on a module's ``weight``, the trained tensors become
    ``<module>.parametrizations.weight.original`` (W) and ``<module>.parametrizations.weight.0.threshold`` (s);
    an optimiser parameter-group pattern ``"*.threshold"`` selects every threshold.

    Args:
        shape: shape of s, see :func:`threshold_shape`.
        s_init: initial value of every entry of s (STR's ``sInit``; its configs use −200, i.e. g ≈ 0).
        sparse_function: g, ``"sigmoid"`` or ``"identity"``.
        dtype: dtype of s (that of the weight).
        device: device of s (that of the weight).

    Example:
        >>> conv = nn.Conv2d(3, 4, 3)
        >>> p = attach_soft_threshold_(conv, "weight", s_init=-2.0)
        >>> [n for n, _ in conv.named_parameters()][-1]
        'parametrizations.weight.0.threshold'
        >>> bool((conv.weight.abs() <= conv.parametrizations.weight.original.abs()).all())
        True
    """

    def __init__(
        self,
        shape: Sequence[int],
        s_init: float,
        sparse_function: SparseFunction = "sigmoid",
        dtype: torch.dtype | None = None,
        device: torch.device | None = None,
    ) -> None:
        super().__init__()
        if not _is_finite_real(s_init):
            raise ValueError(f"s_init must be a finite number, got {s_init!r}")
        self.sparse_function: SparseFunction = check_sparse_function(sparse_function)
        self.threshold = nn.Parameter(torch.full(tuple(shape), float(s_init), dtype=dtype, device=device))

    def forward(self, weight: Tensor) -> Tensor:
        """Ŵ from W (see :func:`soft_threshold`)."""
        return soft_threshold(weight, self.threshold, self.sparse_function)

    def g(self) -> Tensor:
        """The current threshold g(s) (a tensor of :attr:`threshold`'s shape, attached to the graph)."""
        return threshold_value(self.threshold, self.sparse_function)

    def extra_repr(self) -> str:
        """Shape of s and the sparse function."""
        return f"threshold_shape={tuple(self.threshold.shape)}, sparse_function={self.sparse_function!r}"


def _is_finite_real(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(float(value))


def attach_soft_threshold_(
    module: nn.Module,
    tensor_name: str = "weight",
    *,
    s_init: float,
    per_channel: bool = False,
    sparse_function: SparseFunction = "sigmoid",
) -> SoftThresholdParametrization:
    """Register a :class:`SoftThresholdParametrization` on ``module.<tensor_name>`` (in place) and return it.

    The parameter object is kept as the parametrization's ``original`` (so references held elsewhere, such as a
    :class:`~er_lightning.masking.masked.MaskedParams`, stay valid); only its FQN changes.

    Raises:
        ValueError: ``tensor_name`` is not a parameter of ``module``, or bad ``s_init``/``sparse_function``.
    """
    weight = getattr(module, tensor_name, None)
    if not isinstance(weight, nn.Parameter):
        raise ValueError(
            f"{type(module).__name__}.{tensor_name} is not a parameter; parameters: "
            f"{[n for n, _ in module.named_parameters(recurse=False)]}"
        )
    p = SoftThresholdParametrization(
        threshold_shape(weight.shape, per_channel),
        s_init,
        sparse_function,
        dtype=weight.dtype,
        device=weight.device,
    )
    parametrize.register_parametrization(module, tensor_name, p)
    return p


def find_soft_thresholds(
    model: nn.Module,
) -> Iterator[tuple[str, nn.Module, str, SoftThresholdParametrization]]:
    """Yield ``(original FQN, module, tensor name, parametrization)`` for every soft threshold in ``model``.

    The original FQN is the name the tensor had before it was parametrized (``net.conv1.weight``).
    """
    for mod_name, module in model.named_modules():
        if not parametrize.is_parametrized(module):
            continue
        for tensor_name, plist in module.parametrizations.items():
            for p in plist:
                if isinstance(p, SoftThresholdParametrization):
                    fqn = f"{mod_name}.{tensor_name}" if mod_name else tensor_name
                    yield fqn, module, tensor_name, p


@torch.no_grad()
def remove_soft_thresholds_(model: nn.Module) -> list[str]:
    """Bake Ŵ into every soft-thresholded tensor of ``model`` and remove the parametrizations (in place).

    Uses ``parametrize.remove_parametrizations(..., leave_parametrized=True)``: afterwards the module holds a plain
    ``weight`` parameter equal to Ŵ, under its original FQN. Other parametrizations stacked on the same tensor are
    baked in as well.

    Returns:
        The original FQNs of the tensors that were baked.
    """
    found = [(fqn, module, tensor_name) for fqn, module, tensor_name, _ in find_soft_thresholds(model)]
    detached: set[int] = set()
    for _, module, tensor_name in found:
        if id(module) not in detached:
            _own_class_(module)
            detached.add(id(module))
        parametrize.remove_parametrizations(module, tensor_name, leave_parametrized=True)
    return [fqn for fqn, _, _ in found]


def _own_class_(module: nn.Module) -> None:
    """Give a parametrized module a private copy of its generated class.

    ``remove_parametrizations`` deletes the tensor's property from ``type(module)``. A ``copy.deepcopy`` of a
    parametrized module shares that generated class with the original, so removing the parametrization from the
    copy would break the original (``AttributeError: ... has no attribute 'weight'``). A private class with the same
    bases and attributes makes the removal local.
    """
    cls = type(module)
    namespace = {k: v for k, v in cls.__dict__.items() if k not in ("__dict__", "__weakref__")}
    module.__class__ = type(cls.__name__, cls.__bases__, namespace)


@torch.no_grad()
def bake_state_dict(
    state_dict: Mapping[str, Tensor], sparse_function: SparseFunction = "sigmoid"
) -> dict[str, Tensor]:
    """Turn a soft-thresholded model's ``state_dict`` into the plain model's: Ŵ under the original keys.

    Every pair ``<mod>.parametrizations.<t>.original`` / ``<mod>.parametrizations.<t>.0.threshold`` becomes
    ``<mod>.<t>`` = Ŵ; other entries are copied. Use it to load a training checkpoint's ``state_dict`` into the
    unparametrized model (an evaluation script, a FLOP counter) without the callback.

    Raises:
        ValueError: an ``original`` without its threshold (another parametrization, not STR's).
    """
    out: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        if key.endswith(".0.threshold") and ".parametrizations." in f".{key}":
            continue
        match = PARAMETRIZED_NAME.search(key)
        if match is None:
            out[key] = value
            continue
        prefix = key[: match.start()]
        head = f"{prefix}{match.group(1)}parametrizations.{match.group(2)}"
        threshold = state_dict.get(f"{head}.0.threshold")
        if threshold is None:
            raise ValueError(
                f"{key!r} has no soft threshold ({head}.0.threshold); it is not a SoftThreshold tensor"
            )
        out[original_fqn(key)] = soft_threshold(value, threshold, sparse_function)
    return out


# --------------------------------------------------------------------------------------------- the controller
@torch.no_grad()
def critical_shifts(weight: Tensor, s: Tensor, sparse_function: SparseFunction = "sigmoid") -> Tensor:
    """Per entry, the largest additive shift δ of s that keeps the entry active (float64, flattened).

    An entry is active (Ŵ ≠ 0) under s + δ exactly when δ < δ*, with

    * ``sigmoid``: δ* = logit(|W|) − s for 0 < |W| < 1; +∞ for |W| ≥ 1;
    * ``identity``: δ* = |W| − s for |W| > 0;

    and δ* = −∞ where W = 0 (never active). A shift of s in logit space moves every layer's threshold while
    keeping the order of the thresholds STR has learned.
    """
    w = weight.detach().to(torch.float64).abs()
    base = s.detach().to(torch.float64).expand_as(w)
    if sparse_function == "sigmoid":
        inside = w.clamp(max=1.0)
        crit = (
            torch.log(inside) - torch.log1p(-inside) - base
        )  # logit(|W|) - s; log(0) = -inf, log1p(-1) = -inf
        crit = torch.where(w >= 1.0, torch.full_like(crit, math.inf), crit)
    elif sparse_function == "identity":
        crit = w - base
    else:
        raise ValueError(f"unknown sparse_function {sparse_function!r}; valid: {list(SPARSE_FUNCTIONS)}")
    crit = torch.where(w == 0, torch.full_like(crit, -math.inf), crit)
    return crit.reshape(-1)


@torch.no_grad()
def shift_for_count(crit: Tensor, k: int) -> float:
    """A shift δ that leaves exactly ``k`` entries active, given every entry's δ* (:func:`critical_shifts`).

    With v_1 ≥ v_2 ≥ … the finite-or-infinite δ* values of the entries that can be active, any δ in
    [v_{k+1}, v_k) keeps exactly k. δ = 0 is returned when it already does; otherwise the midpoint of the
    interval, or a point 1 beyond its finite end when the other end is infinite. ``k`` is clipped to what is
    reachable (entries with δ* = +∞ are always active, those with −∞ never).
    """
    values = crit[crit > -math.inf]
    m = values.numel()
    always = int((values == math.inf).sum())
    k = min(max(int(k), always), m)
    # v_j = j-th largest = (m - j + 1)-th smallest
    hi = math.inf if k == 0 else float(torch.kthvalue(values, m - k + 1).values)
    lo = -math.inf if k == m else float(torch.kthvalue(values, m - k).values)
    if lo <= 0.0 < hi:
        return 0.0
    if lo == -math.inf:
        return hi - 1.0
    if hi == math.inf:
        return lo + 1.0
    return 0.5 * (lo + hi)


# --------------------------------------------------------------------------------------------- density files
def save_densities(
    path: str | os.PathLike[str],
    densities: Mapping[str, float],
    shapes: Mapping[str, Sequence[int]],
) -> dict[str, Any]:
    """Write per-layer densities as JSON: ``{"format", "version", "densities", "global", "shapes"}``.

    ``global`` is Σ d_l·n_l / Σ n_l. Names are the original parameter FQNs (``net.conv1.weight``), so a later
    ``SoftThreshold(distribution="str_induced", densities_file=path)`` on the same model reads it back.

    Returns:
        The written object.
    """
    missing = [n for n in densities if n not in shapes]
    if missing:
        raise ValueError(f"no shape given for {missing}")
    numels = {n: math.prod(int(d) for d in shapes[n]) for n in densities}
    total = sum(numels.values())
    glob = sum(float(densities[n]) * numels[n] for n in densities) / max(total, 1)
    obj = {
        "format": DENSITY_FILE_FORMAT,
        "version": _DENSITY_FILE_VERSION,
        "densities": {n: float(d) for n, d in densities.items()},
        "global": glob,
        "shapes": {n: [int(d) for d in shapes[n]] for n in densities},
    }
    with open(os.fspath(path), "w", encoding="utf-8") as handle:
        json.dump(obj, handle, indent=2)
    return obj


def load_densities(
    path: str | os.PathLike[str], shapes: Mapping[str, Sequence[int]] | None = None
) -> dict[str, float]:
    """Read and validate a densities file written by :func:`save_densities`.

    Args:
        path: the JSON file.
        shapes: when given, the file must name exactly these layers (FQN → shape); shapes stored in the file must
            agree with them.

    Returns:
        ``{fqn: density}`` in the order of ``shapes`` (or of the file).

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: not JSON, not our format, a density outside [0, 1] (percentages such as upstream STR's sparsity
            files are recognised and explained), or names/shapes that do not match the model (every missing and
            extra name is listed).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"densities file not found: {path!r}")
    try:
        with open(path, encoding="utf-8") as handle:
            obj = json.load(handle)
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot read densities file {path!r} as JSON: {err}") from err
    if not isinstance(obj, dict) or not isinstance(obj.get("densities"), dict):
        hint = ""
        if isinstance(obj, dict) and "total" in obj:
            hint = (
                " It looks like an upstream STR sparsity file (layer -> sparsity %, plus 'total'); convert it to "
                "densities (d = 1 - pct / 100) keyed by this model's parameter names, or export one with "
                "SoftThreshold.export_densities."
            )
        raise ValueError(
            f"densities file {path!r} must be a JSON object with a 'densities' mapping "
            f"(written by SoftThreshold.export_densities).{hint}"
        )
    if obj.get("format", DENSITY_FILE_FORMAT) != DENSITY_FILE_FORMAT:
        raise ValueError(
            f"densities file {path!r} has format {obj.get('format')!r}, expected {DENSITY_FILE_FORMAT!r}"
        )
    raw = obj["densities"]
    out: dict[str, float] = {}
    for name, value in raw.items():
        if not _is_finite_real(value) or not 0.0 <= float(value) <= 1.0:
            hint = ""
            if _is_finite_real(value) and 1.0 < float(value) <= 100.0:
                hint = " (this looks like a percentage; densities are fractions kept, in [0, 1])"
            raise ValueError(
                f"density of {name!r} in {path!r} must be a number in [0, 1], got {value!r}{hint}"
            )
        out[str(name)] = float(value)
    if shapes is not None:
        missing = [n for n in shapes if n not in out]
        extra = [n for n in out if n not in shapes]
        stored = obj.get("shapes") if isinstance(obj.get("shapes"), dict) else {}
        wrong = [
            f"{n}: file {tuple(stored[n])} vs model {tuple(shapes[n])}"
            for n in shapes
            if n in stored
            and isinstance(stored[n], list)
            and tuple(stored[n]) != tuple(int(d) for d in shapes[n])
        ]
        if missing or extra or wrong:
            parts = []
            if missing:
                parts.append(f"missing from the file: {missing}")
            if extra:
                parts.append(f"in the file but not masked in this model: {extra}")
            if wrong:
                parts.append(f"shape mismatches: {wrong}")
            raise ValueError(
                f"densities file {path!r} does not match the model's masked parameters; " + "; ".join(parts)
            )
        out = {n: out[n] for n in shapes}
    return out


def rescale_densities(
    shapes: Mapping[str, Sequence[int]], densities: Mapping[str, float], density: float
) -> dict[str, float]:
    """Scale per-layer densities by one factor so that Σ d_l·n_l = density·N, capping at 1 and redistributing.

    Layers that would exceed 1 become dense and the factor is recomputed over the others, repeatedly (the same loop
    as ERK with redistribution, with the given densities as scores). Layers at 0 stay at 0.

    Raises:
        ValueError: ``density`` is unreachable: larger than the share of weights in layers with a non-zero
            density (the message gives that largest feasible value).
    """
    names = list(shapes)
    numels = [math.prod(int(d) for d in shapes[n]) for n in names]
    scores = [float(densities[n]) for n in names]
    total = sum(numels)
    feasible = sum(n for n, r in zip(numels, scores) if r > 0) / max(total, 1)
    if density > feasible + 1e-12:
        raise ValueError(
            f"cannot rescale the densities to an overall {density}: only layers with a non-zero density can "
            f"grow, which allows at most {feasible:.6f}; request density <= {feasible:.6f} or density=None "
            "(use the file's densities as they are)"
        )
    # Making an overflowing layer dense only raises the factor for the others (their share of the remaining
    # budget grows), so every layer that overflows in a round can be made dense at once.
    dense = [False] * len(names)
    eps = 0.0
    while True:
        rest = [i for i in range(len(names)) if not dense[i] and scores[i] > 0]
        divisor = math.fsum(scores[i] * numels[i] for i in rest)
        if not rest or divisor <= 0.0:
            break
        budget = density * total - sum(n for n, is_dense in zip(numels, dense) if is_dense)
        eps = budget / divisor
        over = [i for i in rest if eps * scores[i] > 1.0]
        if not over:
            break
        for i in over:
            dense[i] = True
    values = [1.0 if dense[i] else min(max(eps * scores[i], 0.0), 1.0) for i in range(len(names))]
    return dict(zip(names, values))
