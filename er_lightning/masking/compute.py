"""Route masked ``Conv2d`` and ``Linear`` layers through the sparse kernels, without changing the model.

The module tree, the parameter objects, their names and the ``state_dict`` stay exactly as they are: each routed
layer gets an instance-level override of its op (``Conv2d._conv_forward``, ``Linear.forward``) that calls
:func:`er_lightning.compute.sparse_conv2d` / :func:`~er_lightning.compute.sparse_linear` over the active weights
of its mask, and falls back to the layer's own dense op whenever the kernels cannot compute the call (CUDA,
float16/bfloat16 or autocast, ``torch.compile`` tracing, no C compiler), saying so once per layer.

Modes per layer: ``"sparse"`` always uses the kernels where they apply; ``"auto"`` times the dense and the sparse
op (forward and backward, on the layer's first real training input, interleaved, best of three) and keeps the
faster one, logged; ``"dense"`` leaves the layer alone. The index of active weights is rebuilt lazily after a
mask change (DST updates, IMP levels): the router compares the mask tensor's version counter, which every
in-place edit bumps.

Example:
    >>> model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Flatten(), nn.Linear(8 * 16, 4))
    >>> masks = {n: torch.rand_like(p) < 0.2 for n, p in model.named_parameters() if n.endswith("weight")}
    >>> masked = MaskedParams({n: dict(model.named_parameters())[n] for n in masks}, masks)
    >>> masked.apply_()
    >>> dense_out = model(torch.ones(2, 3, 4, 4))
    >>> router = SparseComputeRouter(model, masked, mode="sparse")
    >>> bool(torch.allclose(model(torch.ones(2, 3, 4, 4)), dense_out, atol=1e-5))
    True
    >>> router.remove()
"""

from __future__ import annotations

import logging
import time
import types
from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor, nn

from er_lightning.compute import SparseIndex, build_error, sparse_conv2d, sparse_linear, supports
from er_lightning.masking.masked import MaskedParams

__all__ = ["COMPUTE_MODES", "LayerRoute", "SparseComputeRouter"]

log = logging.getLogger(__name__)

Compute = Literal["dense", "sparse", "auto"]
COMPUTE_MODES = ("dense", "sparse", "auto")
_ROUTE_ATTR = "_er_sparse_route"


def _unsupported_module(module: nn.Module, attr: str) -> str | None:
    if attr != "weight":
        return f"the parameter {attr!r} is not a layer weight the kernels compute with"
    if isinstance(module, nn.Conv2d):
        if module.groups != 1:
            return f"groups={module.groups} (the kernels compute groups=1 convolutions)"
        if module.padding_mode != "zeros":
            return f"padding_mode={module.padding_mode!r} (the kernels pad with zeros)"
        return None
    if isinstance(module, nn.Linear):
        return None
    return f"{type(module).__name__} has no sparse kernel (Conv2d and Linear have)"


class LayerRoute:
    """How one masked layer computes; attached to the layer by :class:`SparseComputeRouter`.

    Args:
        name: the weight's FQN (for log lines).
        get_mask: returns the layer's current bool mask.
        mode: ``"sparse"`` or ``"auto"``.
        kind: ``"conv"`` or ``"linear"``.
    """

    def __init__(self, name: str, get_mask: Callable[[], Tensor], mode: Compute, kind: str) -> None:
        self.name = name
        self.get_mask = get_mask
        self.mode = mode
        self.kind = kind
        self.decision: str | None = "sparse" if mode == "sparse" else None
        self.timings: tuple[float, float] | None = None  # (dense, sparse) seconds of the auto probe
        self.dense_step = False  # set by the router for steps that need the dense weight gradient
        self.fallback: str | None = None  # why the last call computed dense, if it did
        self._index: SparseIndex | None = None
        self._key: tuple[int, int] | None = None
        self.rebuilds = 0
        self.sparse_calls = 0

    def index(self, stride, dilation) -> SparseIndex:
        """The index of the current mask, rebuilt when the mask tensor changed."""
        mask = self.get_mask()
        key = (id(mask), mask._version)
        if self._index is None or key != self._key:
            self._index = SparseIndex(mask, stride=stride, dilation=dilation)
            self._key = key
            self.rebuilds += 1
        return self._index

    def _refuse(self, x: Tensor, weight: Tensor) -> str | None:
        if self.dense_step:
            return "dense-gradient step"
        if torch.compiler.is_compiling() or torch.jit.is_tracing() or torch.jit.is_scripting():
            return "inside torch.compile / TorchScript tracing"
        if x.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
            return "CPU autocast is on (the kernels compute float32)"
        reason = supports(x, weight)
        if reason is not None:
            return reason
        return None

    def _note_fallback(self, reason: str) -> None:
        if reason == "dense-gradient step":
            return
        if self.fallback != reason:
            log.info("er_lightning sparse compute: %s computes dense: %s", self.name, reason)
            self.fallback = reason

    def __call__(self, module: nn.Module, x: Tensor, weight: Tensor, bias: Tensor | None, dense) -> Tensor:
        reason = self._refuse(x, weight)
        if reason is not None:
            self._note_fallback(reason)
            return dense(x, weight, bias)
        if self.kind == "conv":
            stride, dilation, padding = module.stride, module.dilation, module.padding

            def sparse(a: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
                return sparse_conv2d(a, w, b, self.index(stride, dilation), padding)
        else:

            def sparse(a: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
                return sparse_linear(a, w, b, self.index(1, 1))

        if self.decision is None:
            self.decision = self._probe(x, weight, bias, dense, sparse)
        if self.decision == "dense":
            return dense(x, weight, bias)
        self.sparse_calls += 1
        return sparse(x, weight, bias)

    def _probe(self, x: Tensor, weight: Tensor, bias: Tensor | None, dense, sparse, reps: int = 3) -> str:
        """Time dense against sparse on this input (forward + backward when training), best of ``reps``."""
        train = torch.is_grad_enabled() and weight.requires_grad
        xs = x.detach().requires_grad_(train and x.requires_grad)
        ws = weight.detach().requires_grad_(train)
        bs = None if bias is None else bias.detach().requires_grad_(train)

        def once(fn) -> float:
            start = time.perf_counter()
            with torch.enable_grad() if train else torch.no_grad():
                y = fn(xs, ws, bs)
                if train:
                    y.backward(torch.ones_like(y))
            elapsed = time.perf_counter() - start
            for t in (xs, ws, bs):
                if t is not None:
                    t.grad = None
            return elapsed

        best = {"dense": float("inf"), "sparse": float("inf")}
        once(dense), once(sparse)
        for _ in range(reps):
            for k, fn in (("dense", dense), ("sparse", sparse)):
                best[k] = min(best[k], once(fn))
        self.timings = (best["dense"], best["sparse"])
        choice = "sparse" if best["sparse"] < best["dense"] else "dense"
        log.info(
            "er_lightning sparse compute (auto): %s computes %s (%s %.2f ms, %s %.2f ms; input %s)",
            self.name,
            choice,
            "forward+backward" if train else "forward",
            best["dense"] * 1e3,
            "sparse",
            best["sparse"] * 1e3,
            tuple(x.shape),
        )
        return choice


def _routed_conv_forward(self: nn.Conv2d, input: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    route: LayerRoute = self.__dict__[_ROUTE_ATTR]
    return route(self, input, weight, bias, lambda a, w, b: type(self)._conv_forward(self, a, w, b))


def _routed_linear_forward(self: nn.Linear, input: Tensor) -> Tensor:
    route: LayerRoute = self.__dict__[_ROUTE_ATTR]
    return route(self, input, self.weight, self.bias, torch.nn.functional.linear)


class SparseComputeRouter:
    """Routes every masked ``Conv2d``/``Linear`` of ``model`` through the sparse kernels (see the module doc).

    Args:
        model: the module whose layers hold the masked parameters (named as in ``masked``).
        masked: the callback's masks; the router always reads the current mask by name.
        mode: ``"sparse"`` or ``"auto"`` (``"dense"`` routes nothing).
    """

    def __init__(self, model: nn.Module, masked: MaskedParams, mode: Compute) -> None:
        if mode not in COMPUTE_MODES:
            raise ValueError(f"compute must be one of {list(COMPUTE_MODES)}, got {mode!r}")
        self.mode = mode
        self.routes: dict[str, LayerRoute] = {}
        self.dense_layers: dict[str, str] = {}
        self._modules: list[nn.Module] = []
        if mode == "dense":
            return
        error = build_error()
        if error is not None:
            log.warning("er_lightning: compute=%r falls back to dense for every layer: %s", mode, error)
            self.dense_layers = {n: error for n in masked.names}
            return
        modules = dict(model.named_modules())
        for name in masked.names:
            owner, _, attr = name.rpartition(".")
            module = modules.get(owner)
            if module is None:
                self.dense_layers[name] = "no module owns this parameter"
                continue
            reason = _unsupported_module(module, attr)
            if reason is not None:
                self.dense_layers[name] = reason
                continue
            kind = "conv" if isinstance(module, nn.Conv2d) else "linear"
            route = LayerRoute(name, lambda n=name: masked.masks[n], mode, kind)
            module.__dict__[_ROUTE_ATTR] = route
            if kind == "conv":
                module._conv_forward = types.MethodType(_routed_conv_forward, module)
            else:
                module.forward = types.MethodType(_routed_linear_forward, module)
            self.routes[name] = route
            self._modules.append(module)
        for name, reason in self.dense_layers.items():
            log.info("er_lightning sparse compute: %s computes dense: %s", name, reason)

    def set_dense_step(self, flag: bool) -> None:
        """Compute the coming forward/backward densely (a step whose growth rule needs the dense gradient)."""
        for route in self.routes.values():
            route.dense_step = flag

    def decisions(self) -> dict[str, str]:
        """FQN → ``"sparse"``, ``"dense"`` (with the reason) or ``"pending"`` (auto: the layer has not run yet, e.g.
        ``MultiheadAttention.out_proj``, whose weight attention reads directly)."""
        out = {n: (r.decision or "pending") for n, r in self.routes.items()}
        out.update({n: f"dense ({why})" for n, why in self.dense_layers.items()})
        return out

    def remove(self) -> None:
        """Detach every route; the layers compute with their own dense ops again."""
        for module in self._modules:
            module.__dict__.pop(_ROUTE_ATTR, None)
            module.__dict__.pop("_conv_forward", None)
            module.__dict__.pop("forward", None)
        self._modules.clear()
        self.routes.clear()
