"""Forward FLOPs of a model, dense and under masks, per masked tensor and in total.

FLOPs are counted by :class:`torch.utils.flop_counter.FlopCounterMode` on a real forward pass (one batch), not by
hand-written shape formulas, so every op torch knows how to count (convolutions, matrix products, attention) is
included. Each counted op is attributed to the masked weight it reads: an argument that shares storage with the
weight (``linear`` reads a transposed view of it, ``conv`` the weight itself), or, for weights computed by a
parametrization (supermask, soft threshold), the op running directly inside the module that owns the weight. Under
a mask the FLOPs of those ops scale with the layer's density (an inactive weight takes part in no multiply-add);
every other op is counted dense.

Training cost follows Evci et al. (RigL, arXiv:1911.11134, App. H): a step costs a forward ``f`` and a backward of
``2f`` (gradients of the activations and of the weights), so ``3 f_S`` for a sparse step against ``3 f_D`` dense;
a step that needs the dense weight gradient (RigL's growth) computes the weight gradient densely: ``2 f_S + f_D``.

Example:
    >>> import torch
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Linear(4, 3, bias=False))
    >>> mask = torch.tensor([[True, False, False, False]] * 3)  # density 0.25
    >>> count = count_flops(net, torch.randn(1, 4), {"0.weight": mask})
    >>> count.layers["0.weight"].dense, count.layers["0.weight"].sparse, count.inference_ratio
    (24, 6.0, 0.25)
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode, flop_registry

from er_lightning.masking.targets import original_named_parameters

__all__ = ["FLOPS_COLUMNS", "FlopsCount", "LayerFlops", "count_flops", "flops_rows", "flops_table"]


@dataclass(frozen=True)
class LayerFlops:
    """Forward FLOPs of the ops that read one masked weight.

    Attributes:
        name: the weight's FQN (as ``named_parameters()`` yields it, parametrizations removed).
        shape: the weight's shape.
        kept: active entries under the mask.
        numel: entries of the weight.
        dense: FLOPs of these ops without a mask, for the example input (2 per multiply-add, as torch counts).
    """

    name: str
    shape: tuple[int, ...]
    kept: int
    numel: int
    dense: int

    @property
    def density(self) -> float:
        """``kept / numel``."""
        return self.kept / self.numel if self.numel else 1.0

    @property
    def sparse(self) -> float:
        """FLOPs under the mask: ``dense · density``."""
        return self.dense * self.density


@dataclass(frozen=True)
class FlopsCount:
    """Forward FLOPs of a model for one example input, per masked weight and in total.

    Attributes:
        layers: masked weight FQN → :class:`LayerFlops`, in the order the masks were given.
        other: FLOPs of every op that reads no masked weight (counted dense).
        examples: batch size of the example input (``x.shape[0]``); divide by it for FLOPs per example.
        params: number of entries of every parameter of the model (masked or not).
    """

    layers: dict[str, LayerFlops]
    other: int
    examples: int = 1
    params: int = 0

    @property
    def dense(self) -> int:
        """FLOPs of the dense model."""
        return sum(layer.dense for layer in self.layers.values()) + self.other

    @property
    def sparse(self) -> float:
        """FLOPs of the masked model (masked layers scaled by their densities, the rest dense)."""
        return sum(layer.sparse for layer in self.layers.values()) + self.other

    @property
    def inference_ratio(self) -> float:
        """Sparse / dense forward FLOPs."""
        return self.sparse / self.dense if self.dense else 1.0

    @property
    def kept_params(self) -> int:
        """Parameters of the whole model that are not masked out (unmasked tensors count in full)."""
        return self.params - sum(layer.numel - layer.kept for layer in self.layers.values())

    def train_step(self, weight_gradient: float | None = None) -> float:
        """FLOPs of one training step on the example input (RigL App. H): ``2 f_S + f_W``.

        Args:
            weight_gradient: FLOPs of the weight gradient ``f_W``; ``None`` = sparse, ``f_S`` (a step costs
                ``3 f_S``); a RigL growth step computes it densely, ``f_D``.
        """
        return 2 * self.sparse + (self.sparse if weight_gradient is None else weight_gradient)

    def train_step_ratio(self, weight_gradient: float | None = None) -> float:
        """:meth:`train_step` against a dense step, ``3 f_D``."""
        return self.train_step(weight_gradient) / (3 * self.dense) if self.dense else 1.0

    def with_kept(self, kept: Mapping[str, int]) -> FlopsCount:
        """The same dense counts with new active-entry counts (after a mask change); no forward pass."""
        unknown = sorted(set(kept) - set(self.layers))
        if unknown:
            raise ValueError(f"no FLOPs were counted for {unknown}; counted: {list(self.layers)}")
        layers = {
            n: replace(layer, kept=int(kept[n])) if n in kept else layer for n, layer in self.layers.items()
        }
        return replace(self, layers=layers)

    def with_masks(self, masks: Mapping[str, Tensor]) -> FlopsCount:
        """:meth:`with_kept` from bool masks (one device sync for all of them)."""
        names = list(masks)
        counts = torch.stack([torch.count_nonzero(masks[n]).cpu() for n in names]).tolist() if names else []
        return self.with_kept(dict(zip(names, counts)))


def _storage_key(t: Tensor) -> int | None:
    try:
        return t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # tensors without storage (meta, functional wrappers)
        return None


def _run(model: nn.Module, example_input: Any) -> Any:
    if isinstance(example_input, Mapping):
        return model(**example_input)
    if isinstance(example_input, tuple):
        return model(*example_input)
    return model(example_input)


def _batch_size(example_input: Any) -> int:
    first = example_input
    if isinstance(first, Mapping):
        first = next(iter(first.values()), None)
    elif isinstance(first, (tuple, list)):
        first = first[0] if first else None
    return int(first.shape[0]) if isinstance(first, Tensor) and first.dim() > 0 else 1


@torch.no_grad()
def count_flops(
    model: nn.Module, example_input: Any, masks: Mapping[str, Tensor] | None = None
) -> FlopsCount:
    """Count the forward FLOPs of ``model`` on ``example_input``, dense and under ``masks``, per masked weight.

    The model runs once in eval mode without gradients (BatchNorm statistics and the RNG are untouched; each
    module's train/eval flag is restored).

    Args:
        model: any module; masked weights are named by FQN as ``model.named_parameters()`` yields them
            (parametrized weights by their plain name, e.g. ``conv1.weight``).
        example_input: what ``model`` is called with: a tensor, a tuple of positional arguments or a mapping of
            keyword arguments (a real batch, already on the model's device).
        masks: FQN → bool mask of the weight's shape; ``None`` counts everything as ``other``.

    Returns:
        :class:`FlopsCount` for that input (``examples`` = its batch size).

    Raises:
        ValueError: a mask names no parameter of ``model`` or has the wrong shape.
    """
    masks = dict(masks or {})
    params = original_named_parameters(model)
    missing = [n for n in masks if n not in params]
    if missing:
        raise ValueError(f"masks name parameters the model does not have: {missing}; e.g. {list(params)[:5]}")
    for n, m in masks.items():
        if tuple(m.shape) != tuple(params[n].shape):
            raise ValueError(f"mask {n!r} has shape {tuple(m.shape)}, parameter has {tuple(params[n].shape)}")
    by_storage = {_storage_key(params[n]): n for n in masks}
    by_storage.pop(None, None)
    by_module = {n.rpartition(".")[0]: n for n in masks}
    attributed: dict[str, int] = dict.fromkeys(masks, 0)
    counter: FlopCounterMode | None = None

    def _owner(args: Sequence[Any]) -> str | None:
        for a in args:
            if isinstance(a, Tensor):
                name = by_storage.get(_storage_key(a))
                if name is not None:
                    return name
        if counter is None or not counter.mod_tracker.parents:
            return None
        # a computed (parametrized) weight: the op runs directly inside the module that owns it
        innermost = max(counter.mod_tracker.parents, key=lambda p: p.count("."))
        module_fqn = innermost.partition(".")[2] if "." in innermost else ""
        return by_module.get(module_fqn)

    def _attributing(formula: Any) -> Any:
        def counted(*args: Any, out_val: Any = None, **kwargs: Any) -> int:
            flops = int(formula(*args, out_val=out_val, **kwargs))
            owner = _owner(args)
            if owner is not None:
                attributed[owner] += flops
            return flops

        counted._get_raw = True  # type: ignore[attr-defined]  # receive tensors, not shapes
        return counted

    mapping = {op: _attributing(formula) for op, formula in flop_registry.items()}
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with FlopCounterMode(display=False, custom_mapping=mapping) as counter:
            _run(model, example_input)
    finally:
        for m, training in modes.items():
            m.training = training
    total = counter.get_total_flops()
    kept = torch.stack([torch.count_nonzero(m).cpu() for m in masks.values()]).tolist() if masks else []
    layers = {
        n: LayerFlops(n, tuple(masks[n].shape), int(k), masks[n].numel(), attributed[n])
        for n, k in zip(masks, kept)
    }
    return FlopsCount(
        layers=layers,
        other=total - sum(attributed.values()),
        examples=_batch_size(example_input),
        params=sum(p.numel() for p in params.values()),
    )


def _mflops(flops: float, examples: int) -> str:
    return f"{flops / examples / 1e6:.4f}"


#: Column names of :func:`flops_rows`.
FLOPS_COLUMNS = ("parameter", "shape", "target", "kept", "of", "dense MFLOPs", "sparse MFLOPs")


def flops_rows(count: FlopsCount, targets: Mapping[str, float] | None = None) -> list[tuple[str, ...]]:
    """The rows of :func:`flops_table` (:data:`FLOPS_COLUMNS`), formatted as strings: one per masked weight,
    then ``masked tensors``, ``other (dense)`` (every parameter and op left dense) and ``whole model``."""
    targets = targets or {}
    rows = [
        (
            n,
            "x".join(map(str, layer.shape)),
            f"{targets.get(n, math.nan):.4f}",
            f"{layer.kept:,}",
            f"{layer.numel:,}",
            _mflops(layer.dense, count.examples),
            _mflops(layer.sparse, count.examples),
        )
        for n, layer in count.layers.items()
    ]
    masked_kept = sum(layer.kept for layer in count.layers.values())
    masked_numel = sum(layer.numel for layer in count.layers.values())
    masked_dense = sum(layer.dense for layer in count.layers.values())
    masked_sparse = sum(layer.sparse for layer in count.layers.values())
    dense_params = count.params - masked_numel
    other = _mflops(count.other, count.examples)
    rows.append(
        (
            "masked tensors",
            "",
            "",
            f"{masked_kept:,}",
            f"{masked_numel:,}",
            _mflops(masked_dense, count.examples),
            _mflops(masked_sparse, count.examples),
        )
    )
    rows.append(("other (dense)", "", "", f"{dense_params:,}", f"{dense_params:,}", other, other))
    rows.append(
        (
            "whole model",
            "",
            "",
            f"{count.kept_params:,}",
            f"{count.params:,}",
            _mflops(count.dense, count.examples),
            _mflops(count.sparse, count.examples),
        )
    )
    return rows


def flops_table(count: FlopsCount, targets: Mapping[str, float] | None = None, title: str = "") -> str:
    """A plain-text table: per masked weight its shape, target density, kept weights, dense and sparse MFLOPs
    per example; then the masked tensors together, everything else (dense), and the whole model; then the ratios.

    Args:
        count: from :func:`count_flops`.
        targets: FQN → target density (shown as ``nan`` where missing).
        title: a first line.
    """
    rows = flops_rows(count, targets)
    header = FLOPS_COLUMNS
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    fmt = "  ".join(f"{{:<{w}}}" if i < 2 else f"{{:>{w}}}" for i, w in enumerate(widths))
    lines = [title] if title else []
    lines.append(fmt.format(*header))
    lines.extend(fmt.format(*r) for r in rows)
    lines.append(
        f"forward FLOPs sparse/dense = {count.inference_ratio:.4f}; training step (3 f_S vs 3 f_D) = "
        f"{count.train_step_ratio():.4f}, with dense weight gradient (2 f_S + f_D) = "
        f"{count.train_step_ratio(count.dense):.4f}; per example"
    )
    return "\n".join(lines)
