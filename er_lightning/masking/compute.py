"""Route masked ``Conv2d``, ``Linear`` and attention projections through the sparse kernels, model unchanged.

The module tree, the parameter objects, their names and the ``state_dict`` stay exactly as they are: each routed
layer gets an instance-level override of its op (``Conv2d._conv_forward``, ``Linear.forward``) that calls
:func:`er_lightning.compute.sparse_conv2d` / :func:`~er_lightning.compute.sparse_linear` over the active weights
of its mask, and falls back to the layer's own dense op whenever the kernels cannot compute the call (CUDA,
float16/bfloat16 or autocast, ``torch.compile`` tracing, no C compiler), saying so once per layer.
``nn.MultiheadAttention`` reads its projection weights itself, so a masked ``in_proj_weight`` or
``out_proj.weight`` is routed through an override of the attention's forward
(:func:`er_lightning.compute.attention.multihead_attention`) that computes both projections sparse (cross-attention
projects each distinct input with the packed layer); ``kdim``/``vdim`` and ``add_bias_kv`` compute dense, said once.

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
import os
import time
import types
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from er_lightning.compute import SparseIndex, build_error, sparse_conv2d, sparse_linear, supports
from er_lightning.compute.attention import attention_unsupported, call_unsupported, multihead_attention
from er_lightning.compute.functional import batch_norm_batch_last, is_batch_last, max_pool2d_batch_last
from er_lightning.compute.layout import layout_free, pool_window
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


def _unsupported_attention(module: nn.Module, attr: str) -> str | None:
    """Why the masked ``attr`` of a ``MultiheadAttention`` cannot compute sparse (None: it can)."""
    if attr != "in_proj_weight":
        return f"the parameter {attr!r} is not a projection the kernels compute with (only in_proj_weight is)"
    return attention_unsupported(module)


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
        # the layout plan (see SparseComputeRouter): return results batch-last while ``scope`` runs, in the
        # training modes listed in ``batch_last_modes``
        self.scope: _Scope | None = None
        self.batch_last_modes: frozenset[bool] = frozenset()

    def index(self, stride, dilation) -> SparseIndex:
        """The index of the current mask, rebuilt when the mask tensor changed."""
        mask = self.get_mask()
        key = (id(mask), mask._version)
        if self._index is None or key != self._key:
            self._index = SparseIndex(mask, stride=stride, dilation=dilation)
            self._key = key
            self.rebuilds += 1
        return self._index

    def batch_last(self) -> bool:
        """Whether this call returns its result batch-last (the plan holds for the running forward)."""
        scope = self.scope
        return scope is not None and scope.depth > 0 and scope.training in self.batch_last_modes

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
                return sparse_conv2d(a, w, b, self.index(stride, dilation), padding, self.batch_last())
        else:

            def sparse(a: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
                return sparse_linear(a, w, b, self.index(1, 1), self.batch_last())

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


class _Scope:
    """Whether the forward of a traced module is running, and in which mode (kept by its forward hooks)."""

    def __init__(self, module: nn.Module) -> None:
        self.depth = 0
        self.training = module.training
        self.handles = [
            module.register_forward_pre_hook(self._enter),
            module.register_forward_hook(self._exit, always_call=True),
        ]

    def _enter(self, module: nn.Module, args: object) -> None:
        if self.depth == 0:
            self.training = module.training
        self.depth += 1

    def _exit(self, module: nn.Module, args: object, output: object) -> None:
        self.depth = max(self.depth - 1, 0)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _batch_last_batch(input: Tensor) -> bool:
    """A (B, C, H, W) batch of more than one sample in the batch-last layout (a batch of one is also NCHW)."""
    return input.dim() == 4 and input.shape[0] > 1 and is_batch_last(input)


def _batch_last_batchnorm(self: nn.BatchNorm2d, input: Tensor) -> Tensor:
    """``BatchNorm2d.forward``, over a batch-last input's per-channel blocks (a batch-last result)."""
    if not _batch_last_batch(input):
        return type(self).forward(self, input)
    if self.training and self.track_running_stats and self.num_batches_tracked is not None:
        # BatchNorm2d.forward's bookkeeping (the count; the cumulative average when momentum is None), the kernel
        factor = 1.0 / float(self.num_batches_tracked + 1) if self.momentum is None else self.momentum
        out = batch_norm_batch_last(
            input, self.weight, self.bias, self.running_mean, self.running_var, factor, self.eps
        )
        if out is not None:
            self.num_batches_tracked.add_(1)
            return out
    # evaluation, no running statistics, other dtypes: (C, H, W, B) in memory is a contiguous (1, C, H*W*B, 1)
    # batch with the same statistics per channel, which BatchNorm2d's own forward normalises
    B, C, H, W = input.shape
    out = type(self).forward(self, input.permute(1, 2, 3, 0).reshape(1, C, H * W * B, 1))
    return out.view(C, H, W, B).permute(3, 0, 1, 2)


def _batch_last_max_pool(self: nn.MaxPool2d, input: Tensor) -> Tensor:
    """``MaxPool2d.forward``, with the kernels for a batch-last input (a batch-last result)."""
    window = pool_window(self)
    if window is not None and _batch_last_batch(input) and supports(input, input) is None:
        return max_pool2d_batch_last(input, window)
    return type(self).forward(self, input)


def _planned_module(module: nn.Module | None) -> bool:
    """Modules the plan computes on batch-last inputs itself (their forward is routed)."""
    if type(module) is nn.BatchNorm2d:
        return True
    return type(module) is nn.MaxPool2d and pool_window(module) is not None


def _traced(module: nn.Module, training: bool):  # noqa: ANN202
    """``torch.fx`` graph of ``module`` in the given mode (its modes restored), or None when it does not trace.

    Like any ``torch.fx`` trace this runs the Python of ``forward`` (and of non-leaf submodules) once, on proxy
    values; leaf modules (``torch.nn`` layers) are not run."""
    import torch.fx as fx

    modes = {m: m.training for m in module.modules()}
    try:
        module.train(training)
        return fx.symbolic_trace(module).graph
    except Exception as e:  # noqa: BLE001 - any failure to trace only means no plan for this module
        log.info(
            "er_lightning sparse compute: %s does not trace with torch.fx, its layers hand on NCHW results "
            "(or its submodules' plans apply) (%s: %s)",
            type(module).__name__,
            type(e).__name__,
            e,
        )
        return None
    finally:
        for m, mode in modes.items():
            m.training = mode


def _plan_graph(graph, modules: dict[str, nn.Module], convs: dict[nn.Module, LayerRoute]):  # noqa: ANN001, ANN202
    """(routed layers whose every result may be batch-last, BatchNorm2d/MaxPool2d modules such results reach).

    A convolution qualifies when everything reachable from its result through layout-free operations (the
    tables of :mod:`er_lightning.compute.layout`, plus ``BatchNorm2d`` and window = stride ``MaxPool2d``, which
    the router computes with the kernels on batch-last input) is consumed only by layout-free operations and as
    the input of routed convolutions, which read any layout: no view, no flatten, no other module, not the
    traced module's output. A linear layer qualifies likewise, its result reaching layout-free operations and
    routed linear layers only (a transformer MLP's ``fc2(gelu(fc1(x)))``: fc1)."""

    def routed_conv(n) -> nn.Module | None:  # noqa: ANN001
        m = modules.get(n.target) if n.op == "call_module" else None
        return m if m in convs else None

    ok: dict[nn.Module, bool] = {}
    reached: dict[nn.Module, set[nn.Module]] = {}
    for node in graph.nodes:
        conv = routed_conv(node)
        if conv is None:
            continue
        # a linear layer's result may reach routed linear layers, not BatchNorm / pooling
        linear = isinstance(conv, nn.Linear)
        good, seen, stack, planned = True, {node}, [node], set()
        while stack and good:
            value = stack.pop()
            for user in value.users:
                if user in seen:
                    continue
                reader = routed_conv(user)
                same_kind = reader is not None and isinstance(reader, nn.Linear) == linear
                if same_kind and user.args == (value,) and not user.kwargs:
                    continue  # read as a routed layer's input (of the same kind)
                routed = not linear and user.op == "call_module" and _planned_module(modules.get(user.target))
                if not routed and not layout_free(user, modules):
                    good = False
                    break
                seen.add(user)
                stack.append(user)
                if routed:
                    planned.add(modules[user.target])
        ok[conv] = ok.get(conv, True) and good
        reached.setdefault(conv, set()).update(planned)
    switched = {c for c, good in ok.items() if good}
    return switched, set().union(*(reached[c] for c in switched)) if switched else set()


def _routed_conv_forward(self: nn.Conv2d, input: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    route: LayerRoute = self.__dict__[_ROUTE_ATTR]
    return route(self, input, weight, bias, lambda a, w, b: type(self)._conv_forward(self, a, w, b))


def _routed_linear_forward(self: nn.Linear, input: Tensor) -> Tensor:
    route: LayerRoute = self.__dict__[_ROUTE_ATTR]
    return route(self, input, self.weight, self.bias, torch.nn.functional.linear)


def _projection(module: nn.Module, weight: Tensor, bias: Tensor | None, route: LayerRoute | None):  # noqa: ANN202
    if route is None:
        return lambda x: F.linear(x, weight, bias)
    return lambda x: route(module, x, weight, bias, F.linear)


def _routed_attention_forward(
    self: nn.MultiheadAttention, query: Tensor, key: Tensor, value: Tensor, *args: Any, **kwargs: Any
) -> tuple[Tensor, Tensor | None]:
    """``MultiheadAttention.forward`` (same arguments) with its masked projections routed."""
    in_route: LayerRoute | None = self.__dict__[_ROUTE_ATTR]
    out_route: LayerRoute | None = self.out_proj.__dict__.get(_ROUTE_ATTR)
    reason = call_unsupported(query, key, value)
    if reason is not None:
        for route in (in_route, out_route):
            if route is not None:
                route._note_fallback(reason)
        return type(self).forward(self, query, key, value, *args, **kwargs)
    return multihead_attention(
        self,
        query,
        key,
        value,
        *args,
        **kwargs,
        in_proj=_projection(self, self.in_proj_weight, self.in_proj_bias, in_route),
        out_proj=_projection(self.out_proj, self.out_proj.weight, self.out_proj.bias, out_route),
    )


class SparseComputeRouter:
    """Routes every masked ``Conv2d``/``Linear`` of ``model`` through the sparse kernels (see the module doc).

    Args:
        model: the module whose layers hold the masked parameters (named as in ``masked``).
        masked: the callback's masks; the router always reads the current mask by name.
        mode: ``"sparse"`` or ``"auto"`` (``"dense"`` routes nothing).
        layout_scopes: the modules whose forward is traced for the layout plan (default ``[model]``; a callback
            passes the LightningModule's children, which its ``training_step`` may call without its ``forward``);
            a module that does not trace is replaced by its children. ``[]`` (or the environment variable
            ``ER_LIGHTNING_NO_LAYOUT_PLAN=1``) switches the plan off.

    **Layout plan.** The kernels compute in a batch-innermost layout, (C, H, W, B) in memory. A routed convolution
    whose result reaches only activations, additions, ``BatchNorm2d``, ``MaxPool2d`` (window = stride) and other
    routed convolutions (checked on the ``torch.fx`` graph of its scope, in training and in evaluation mode)
    returns that result batch-last while its scope's forward runs: the next routed convolution packs it with row
    copies instead of transposes, those ``BatchNorm2d`` layers normalise its contiguous per-channel blocks with a
    kernel, those poolings pool it in its layout, and the input gradient comes back in the same layout. The
    values are the same; only the strides differ, and nothing outside the plan sees them. A routed ``Linear``
    whose result reaches only layout-free operations and routed ``Linear`` layers returns it likewise as (OUT, N)
    in memory for its N rows (a transformer MLP's ``fc1``).
    """

    def __init__(
        self,
        model: nn.Module,
        masked: MaskedParams,
        mode: Compute,
        layout_scopes: Sequence[nn.Module] | None = None,
    ) -> None:
        if mode not in COMPUTE_MODES:
            raise ValueError(f"compute must be one of {list(COMPUTE_MODES)}, got {mode!r}")
        self.mode = mode
        self.routes: dict[str, LayerRoute] = {}
        self.dense_layers: dict[str, str] = {}
        self._modules: list[nn.Module] = []
        self._scopes: list[_Scope] = []
        self.batch_last_layers: list[str] = []  # FQNs of the weights of the layers the layout plan switched
        if mode == "dense":
            return
        error = build_error()
        if error is not None:
            log.warning("er_lightning: compute=%r falls back to dense for every layer: %s", mode, error)
            self.dense_layers = {n: error for n in masked.names}
            return
        modules = dict(model.named_modules())
        # attention reads its out_proj's weight itself: that Linear is routed through its attention's forward
        attention_of = {m.out_proj: m for m in modules.values() if isinstance(m, nn.MultiheadAttention)}
        attention: dict[nn.MultiheadAttention, LayerRoute | None] = {}
        for name in masked.names:
            owner, _, attr = name.rpartition(".")
            module = modules.get(owner)
            if module is None:
                self.dense_layers[name] = "no module owns this parameter"
                continue
            if isinstance(module, nn.MultiheadAttention):
                reason = _unsupported_attention(module, attr)
            elif module in attention_of and attention_unsupported(attention_of[module]) is not None:
                reason = f"its MultiheadAttention has no sparse path: {attention_unsupported(attention_of[module])}"
            else:
                reason = _unsupported_module(module, attr)
            if reason is not None:
                self.dense_layers[name] = reason
                continue
            kind = "conv" if isinstance(module, nn.Conv2d) else "linear"
            route = LayerRoute(name, lambda n=name: masked.masks[n], mode, kind)
            if isinstance(module, nn.MultiheadAttention):
                attention[module] = route  # the in-projection's route; the forward is set below
            else:
                module.__dict__[_ROUTE_ATTR] = route
                if kind == "conv":
                    module._conv_forward = types.MethodType(_routed_conv_forward, module)
                else:
                    module.forward = types.MethodType(_routed_linear_forward, module)
                self._modules.append(module)
                if module in attention_of:
                    attention.setdefault(attention_of[module], None)
            self.routes[name] = route
        for module, in_route in attention.items():
            module.__dict__[_ROUTE_ATTR] = in_route
            module.forward = types.MethodType(_routed_attention_forward, module)
            self._modules.append(module)
        for name, reason in self.dense_layers.items():
            log.info("er_lightning sparse compute: %s computes dense: %s", name, reason)
        if os.environ.get("ER_LIGHTNING_NO_LAYOUT_PLAN"):
            log.info(
                "er_lightning sparse compute: layout plan off (ER_LIGHTNING_NO_LAYOUT_PLAN): NCHW results"
            )
        else:
            self._plan_layouts([model] if layout_scopes is None else list(layout_scopes))

    def _plan_layouts(self, scopes: list[nn.Module]) -> None:
        """Trace ``scopes`` and switch the convolutions the plan allows (see the class doc)."""
        convs = {
            m: m.__dict__[_ROUTE_ATTR]
            for m in self._modules
            if isinstance(m, (nn.Conv2d, nn.Linear)) and m.__dict__.get(_ROUTE_ATTR) is not None
        }
        while scopes:
            scope = scopes.pop(0)
            inner = [m for m in scope.modules() if m in convs]
            if not inner or scope in convs:
                continue
            graphs = [_traced(scope, True)]
            if graphs[0] is not None:
                graphs.append(_traced(scope, False))
            if any(g is None for g in graphs):
                scopes[:0] = list(scope.children())
                continue
            modules = dict(scope.named_modules())
            plans = [_plan_graph(g, modules, convs) for g in graphs]
            state = None
            for conv in inner:
                modes = frozenset(
                    mode for mode, (switched, _) in zip((True, False), plans) if conv in switched
                )
                if not modes:
                    continue
                state = state or _Scope(scope)
                convs[conv].scope, convs[conv].batch_last_modes = state, modes
                self.batch_last_layers.append(convs[conv].name)
            if state is None:
                continue
            self._scopes.append(state)
            for m in plans[0][1] | plans[1][1]:
                if "forward" not in m.__dict__:
                    forward = _batch_last_batchnorm if type(m) is nn.BatchNorm2d else _batch_last_max_pool
                    m.forward = types.MethodType(forward, m)
                    self._modules.append(m)
        if self.batch_last_layers:
            log.info(
                "er_lightning sparse compute: %d of %d routed convolution/linear layers hand their results on "
                "batch-last",
                len(self.batch_last_layers),
                len(convs),
            )

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
        for scope in self._scopes:
            scope.remove()
        for route in self.routes.values():
            route.scope, route.batch_last_modes = None, frozenset()
        self._modules.clear()
        self._scopes.clear()
        self.batch_last_layers.clear()
        self.routes.clear()
