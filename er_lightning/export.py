"""Inference copies of sparse models that compute with the sparse kernels: :func:`to_sparse`, save and load.

:func:`to_sparse` takes any trained module whose masked weights are exact zeros (a checkpoint of any hard-mask
callback, ``Supermask.bake()``, ``SoftThreshold.finalize()``) and returns an evaluation-mode copy in which

* every ``BatchNorm`` that directly follows a convolution or linear layer is folded into it (exact in eval mode;
  done with ``torch.fx.experimental.optimization.fuse``, skipped with a log line for models ``torch.fx`` cannot
  trace),
* every ``MultiheadAttention`` with a packed in-projection is replaced by a :class:`SparseAttention` holding the
  same parameters, whose two projections are ``Linear`` layers (attention reads its weights itself otherwise), and
* every ``Conv2d`` (``groups=1``, zero padding) and ``Linear`` whose density is at most ``max_density`` is
  replaced by :class:`SparseConv2d` / :class:`SparseLinear`, which keep only the active values and their flat
  positions and compute with the CPU kernels (other devices and dtypes compute densely from them); with an
  ``example_input``, dense convolutions next to sparse ones may become a :class:`SparseConv2d` holding every
  weight, where timing shows that computing them in the kernels' layout beats transposing to and from it.

:func:`save_sparse` writes tensors, lists and strings only, so :func:`load_sparse` reads the file with
``torch.load(..., weights_only=True)``; it rebuilds the same structure from a freshly built (untrained) model of
the same architecture.

Example:
    >>> net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
    ...                     nn.Linear(8 * 4 * 4, 10)).eval()
    >>> with torch.no_grad():
    ...     for p in (net[0].weight, net[4].weight):
    ...         _ = p.mul_(torch.rand_like(p) < 0.1)
    >>> fast = to_sparse(net)
    >>> x = torch.randn(2, 3, 4, 4)
    >>> bool(torch.allclose(fast(x), net(x), atol=1e-4))
    True
"""

from __future__ import annotations

import copy
import logging
import operator
import os
import time
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from er_lightning.compute import SparseIndex, conv_padding, supports
from er_lightning.compute.attention import attention_unsupported, call_unsupported, multihead_attention
from er_lightning.compute.functional import (
    conv2d_values,
    is_batch_last,
    max_pool2d_batch_last,
    to_batch_last,
    to_contiguous,
)
from er_lightning.compute.layout import layout_free as _layout_free
from er_lightning.compute.layout import pool_window

__all__ = ["SparseAttention", "SparseConv2d", "SparseLinear", "load_sparse", "save_sparse", "to_sparse"]

log = logging.getLogger(__name__)

FORMAT_VERSION = 1


class _SparseLayer(nn.Module):
    """Shared storage: ``values`` (active weights) and ``indices`` (their flat positions), both buffers."""

    def __init__(
        self, weight_shape: tuple[int, ...], values: Tensor, indices: Tensor, bias: Tensor | None
    ) -> None:
        super().__init__()
        self.weight_shape = tuple(int(s) for s in weight_shape)
        self.register_buffer("values", values.detach().clone().contiguous())
        self.register_buffer("indices", indices.detach().clone().to(torch.int64).contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self._index: SparseIndex | None = None
        self._index_key: tuple[int, int] | None = None

    @property
    def density(self) -> float:
        numel = 1
        for s in self.weight_shape:
            numel *= s
        return self.indices.numel() / max(numel, 1)

    def dense_weight(self) -> Tensor:
        """The weight as a dense tensor (zeros at inactive positions)."""
        w = torch.zeros(self.weight_shape, dtype=self.values.dtype, device=self.values.device)
        w.view(-1)[self.indices] = self.values
        return w

    def _sparse_index(self, stride: Any = 1, dilation: Any = 1) -> SparseIndex:
        key = (self.indices.data_ptr(), self.indices._version)
        if self._index is None or key != self._index_key:
            mask = torch.zeros(self.weight_shape, dtype=torch.bool)
            mask.view(-1)[self.indices.cpu()] = True
            index = SparseIndex(mask, stride=stride, dilation=dilation)
            if not torch.equal(index.flat_index, self.indices.cpu()):
                raise ValueError(f"{type(self).__name__}: indices must be sorted, unique flat positions")
            self._index, self._index_key = index, key
        return self._index

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):  # noqa: ANN001
        # the number of active weights is part of the data, not of the architecture: take the saved sizes
        for key in ("values", "indices"):
            t = state_dict.get(prefix + key)
            if isinstance(t, Tensor):
                setattr(self, key, torch.empty_like(t))
        numel = 1
        for s in self.weight_shape:
            numel *= s
        idx, vals = state_dict.get(prefix + "indices"), state_dict.get(prefix + "values")
        if isinstance(idx, Tensor) and isinstance(vals, Tensor):
            if idx.dim() != 1 or vals.shape != idx.shape:
                errors.append(
                    f"{prefix}values/indices must be 1-D of equal length, got {tuple(vals.shape)}, {tuple(idx.shape)}"
                )
            elif idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= numel):
                errors.append(
                    f"{prefix}indices must lie in [0, {numel}) for weight shape {self.weight_shape}"
                )
            elif idx.numel() > 1 and not bool((idx[1:] > idx[:-1]).all()):
                errors.append(f"{prefix}indices must be strictly increasing")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing, unexpected, errors)
        self._index = None


class SparseConv2d(_SparseLayer):
    """Inference ``Conv2d`` over its active weights (see :func:`to_sparse`, which builds and plans these).

    Example:
        >>> conv = nn.Conv2d(4, 6, 3, padding=1)
        >>> mask = torch.rand_like(conv.weight) < 0.2
        >>> with torch.no_grad():
        ...     _ = conv.weight.mul_(mask)
        >>> sparse = SparseConv2d(conv, mask)
        >>> x, r = torch.randn(2, 4, 5, 5), torch.randn(2, 6, 5, 5)
        >>> with torch.no_grad():
        ...     bool(torch.allclose(sparse(x), conv(x), atol=1e-5))
        True
        >>> sparse.epilogue_relu = True  # relu(conv(x) + r), fused into the kernel's stores where it can be
        >>> with torch.no_grad():
        ...     bool(torch.allclose(sparse(x, r), torch.relu(conv(x) + r), atol=1e-5))
        True
    """

    def __init__(self, conv: nn.Conv2d, mask: Tensor) -> None:
        flat = mask.reshape(-1).nonzero().reshape(-1)
        super().__init__(tuple(conv.weight.shape), conv.weight.detach().reshape(-1)[flat], flat, conv.bias)
        self.stride = tuple(conv.stride)
        self.dilation = tuple(conv.dilation)
        self.padding = conv_padding(conv.padding, conv.kernel_size, conv.dilation)
        #: return results in the kernels' batch-last memory layout (set by :func:`to_sparse` where every
        #: consumer of the result is known to accept any layout; the values are the same either way)
        self.batch_last_out = False
        #: with batch_last_out: write results into zero-bordered planes (top, bottom, left, right) that the next
        #: sparse layer, stride 1 with this padding, reads in place (set by :func:`to_sparse`)
        self.out_border: tuple[int, int, int, int] | None = None
        #: apply ReLU to the result (after adding ``residual`` when the call passes one) as the kernel stores it:
        #: ``relu(conv(x) + residual)`` in one pass (set by :func:`to_sparse` for a ReLU only this result feeds)
        self.epilogue_relu = False

    def forward(self, x: Tensor, residual: Tensor | None = None) -> Tensor:
        """``conv(x)``, or ``conv(x) + residual`` when given; then ReLU when :attr:`epilogue_relu`."""
        if supports(x, self.values, self.weight_shape[0]) is None and not (
            torch.is_grad_enabled() and (x.requires_grad or (residual is not None and residual.requires_grad))
        ):
            unbatched = x.dim() == 3
            xb = x.unsqueeze(0) if unbatched else x
            res = residual.unsqueeze(0) if unbatched and residual is not None else residual
            y = conv2d_values(
                xb,
                self.values,
                self.bias,
                self._sparse_index(self.stride, self.dilation),
                self.padding,
                batch_last=self.batch_last_out and not unbatched,
                out_border=self.out_border,
                residual=res,
                relu=self.epilogue_relu,
            )
            return y.squeeze(0) if unbatched else y
        pt, pb, pl, pr = self.padding
        y = nn.functional.conv2d(
            nn.functional.pad(x, (pl, pr, pt, pb)),
            self.dense_weight(),
            self.bias,
            self.stride,
            0,
            self.dilation,
        )
        if residual is not None:
            y = y + residual
        return torch.relu(y) if self.epilogue_relu else y

    def extra_repr(self) -> str:
        return f"weight={self.weight_shape}, stride={self.stride}, padding={self.padding}, density={self.density:.4f}"


class SparseLinear(_SparseLayer):
    """Inference ``Linear`` over its active weights (see :func:`to_sparse`); any leading dimensions.

    Example:
        >>> linear = nn.Linear(16, 8)
        >>> mask = torch.rand_like(linear.weight) < 0.1
        >>> with torch.no_grad():
        ...     _ = linear.weight.mul_(mask)
        >>> sparse = SparseLinear(linear, mask)
        >>> x = torch.randn(3, 5, 16)
        >>> with torch.no_grad():
        ...     bool(torch.allclose(sparse(x), linear(x), atol=1e-5))
        True
    """

    def __init__(self, linear: nn.Linear, mask: Tensor) -> None:
        flat = mask.reshape(-1).nonzero().reshape(-1)
        super().__init__(
            tuple(linear.weight.shape), linear.weight.detach().reshape(-1)[flat], flat, linear.bias
        )

    def forward(self, x: Tensor) -> Tensor:
        if supports(x, self.values, self.weight_shape[0]) is None and not (
            torch.is_grad_enabled() and x.requires_grad
        ):
            lead = x.shape[:-1]
            y = conv2d_values(
                x.reshape(-1, x.shape[-1], 1, 1), self.values, self.bias, self._sparse_index(), (0, 0, 0, 0)
            )
            return y.reshape(*lead, self.weight_shape[0])
        return nn.functional.linear(x, self.dense_weight(), self.bias)

    def extra_repr(self) -> str:
        return f"weight={self.weight_shape}, density={self.density:.4f}"


class SparseAttention(nn.Module):
    """Inference ``nn.MultiheadAttention`` whose projections are ``Linear`` children (see :func:`to_sparse`).

    ``MultiheadAttention`` hands its projection weights to ``F.multi_head_attention_forward`` itself; here the
    packed in-projection is ``in_proj`` (E -> 3E) and the output projection ``out_proj``, called as layers, so
    that :func:`to_sparse` converts them like any other ``Linear``. The forward takes ``MultiheadAttention``'s
    arguments and computes what it computes (:func:`er_lightning.compute.attention.multihead_attention`).

    Example:
        >>> mha = nn.MultiheadAttention(8, 2, batch_first=True).eval()
        >>> attn = SparseAttention(mha)
        >>> x = torch.randn(3, 5, 8)
        >>> with torch.no_grad():
        ...     bool(torch.allclose(attn(x, x, x)[0], mha(x, x, x)[0], atol=1e-6))
        True
    """

    def __init__(self, mha: nn.MultiheadAttention) -> None:
        super().__init__()
        reason = attention_unsupported(mha)
        if reason is not None:
            raise ValueError(f"SparseAttention takes attention with a packed in-projection, not {reason}")
        self.embed_dim, self.num_heads = mha.embed_dim, mha.num_heads
        self.batch_first, self.dropout = mha.batch_first, mha.dropout
        e = mha.embed_dim
        self.in_proj = nn.Linear(e, 3 * e, bias=mha.in_proj_bias is not None)
        self.in_proj.weight = mha.in_proj_weight
        if mha.in_proj_bias is not None:
            self.in_proj.bias = mha.in_proj_bias
        out = nn.Linear(e, e, bias=mha.out_proj.bias is not None)
        out.weight = mha.out_proj.weight
        if mha.out_proj.bias is not None:
            out.bias = mha.out_proj.bias
        self.out_proj = out
        # torch's fused transformer paths (TransformerEncoderLayer / TransformerEncoder in eval) read the dense
        # projection weights themselves; they check this flag first and keep off, calling this module instead
        self._qkv_same_embed_dim = False
        self.train(mha.training)

    @property
    def in_proj_bias(self) -> Tensor | None:
        """The in-projection's bias (read by torch's transformer layers before they choose a path)."""
        return self.in_proj.bias

    def forward(self, query: Tensor, key: Tensor, value: Tensor, *args: Any, **kwargs: Any):  # noqa: ANN201
        if call_unsupported(query, key, value) is not None:
            raise ValueError(f"SparseAttention: {call_unsupported(query, key, value)}")
        return multihead_attention(
            self, query, key, value, *args, **kwargs, in_proj=self.in_proj, out_proj=self.out_proj
        )

    def extra_repr(self) -> str:
        return f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, batch_first={self.batch_first}"


class BatchLastMaxPool2d(nn.MaxPool2d):
    """``nn.MaxPool2d`` that pools batch-last inputs (see :func:`to_sparse`) in their layout, with the kernels.

    Windows equal to the stride, no padding, dilation 1, no ``ceil_mode``/``return_indices``, float32 CPU
    inputs in the batch-last layout take the kernel (NaN propagates as in ``F.max_pool2d``); everything else is
    ``nn.MaxPool2d.forward``.

    Example:
        >>> from er_lightning.compute.functional import to_batch_last
        >>> pool = BatchLastMaxPool2d.from_pool(nn.MaxPool2d(2))
        >>> x = torch.randn(4, 3, 8, 8)
        >>> bool(torch.equal(pool(to_batch_last(x)), nn.functional.max_pool2d(x, 2)))
        True
    """

    @classmethod
    def from_pool(cls, pool: nn.MaxPool2d) -> BatchLastMaxPool2d:
        new = cls(
            pool.kernel_size, pool.stride, pool.padding, pool.dilation, pool.return_indices, pool.ceil_mode
        )
        new.train(pool.training)
        return new

    def forward(self, x: Tensor) -> Tensor:  # type: ignore[override]
        window = pool_window(self)
        if window is not None and is_batch_last(x) and not x.is_contiguous() and supports(x, x) is None:
            return max_pool2d_batch_last(x, window)
        return super().forward(x)


def _plan_batch_last(model: nn.Module) -> int:
    """Let sparse convolutions hand their results to the next sparse convolution in the kernels' own layout.

    Only for a ``torch.fx.GraphModule`` (what BatchNorm folding returns). A :class:`SparseConv2d` returns a
    batch-last result when some chain of layout-free operations (activations, additions, max pooling) leads
    from it to another :class:`SparseConv2d`; wherever a batch-last value reaches anything else (a view, a
    flatten, a dense layer, the model's output), a :func:`~er_lightning.compute.functional.to_contiguous` node
    is inserted before it, so every other operation sees exactly the NCHW tensor it saw before. Returns the
    number of convolutions switched.
    """
    import torch.fx as fx

    if not isinstance(model, fx.GraphModule):
        return 0
    modules = dict(model.named_modules())
    for node in model.graph.nodes:  # max pooling that keeps the layout
        if node.op == "call_module" and type(modules[node.target]) is nn.MaxPool2d:
            _replace(model, node.target, BatchLastMaxPool2d.from_pool(modules[node.target]))
    modules = dict(model.named_modules())

    def is_sparse_conv(n: fx.Node) -> bool:
        return n.op == "call_module" and isinstance(modules[n.target], SparseConv2d)

    def layout_free(n: fx.Node) -> bool:
        return _layout_free(n, modules, (BatchLastMaxPool2d,))

    switched = [
        n for n in model.graph.nodes if is_sparse_conv(n) and _reaches(n, is_sparse_conv, layout_free)
    ]
    if not switched:
        return 0
    # values that may be batch-last: the switched convolutions and what layout-free operations make of them
    maybe = set(switched)
    for n in list(model.graph.nodes):
        if n not in maybe and layout_free(n) and any(a in maybe for a in n.all_input_nodes):
            maybe.add(n)
            # an addition of a batch-last and an NCHW tensor runs several times slower than either alone:
            # bring the other operands into the batch-last layout first
            for a in n.all_input_nodes:
                if a not in maybe:
                    with model.graph.inserting_before(n):
                        c = model.graph.call_function(to_batch_last, (a,))
                    n.replace_input_with(a, c)
    for n in list(model.graph.nodes):
        if layout_free(n) or is_sparse_conv(n):  # these take any layout
            continue
        for a in n.all_input_nodes:
            if a not in maybe:
                continue
            with model.graph.inserting_before(n):
                c = model.graph.call_function(to_contiguous, (a,))
            n.replace_input_with(a, c)
    for n in switched:
        modules[n.target].batch_last_out = True
    model.recompile()
    return len(switched)


def _reaches(n, is_layer, free, seen: set | None = None) -> bool:  # noqa: ANN001
    """Whether a chain of ``free`` (layout-free) users leads from the ``torch.fx`` node ``n`` to a node
    ``is_layer`` accepts that reads the chain's value as its first argument."""
    seen = set() if seen is None else seen
    for user in n.users:
        if user in seen:
            continue
        seen.add(user)
        if is_layer(user) and user.args and user.args[0] is n:
            return True
        if free(user) and _reaches(user, is_layer, free, seen):
            return True
    return False


def add_into(a: Tensor, b: Tensor) -> Tensor:
    """``a + b``, written into ``a`` when that has the result's shape and dtype (``a`` must be dead otherwise)."""
    if a.shape == torch.broadcast_shapes(a.shape, b.shape) and a.dtype == torch.result_type(a, b):
        return a.add_(b)
    return a + b


_ADDS = {operator.add, torch.add}
_RELUS = {torch.relu, nn.functional.relu}


def _reuse_results(model: nn.Module) -> int:
    """Compute additions and ReLUs into the tensors they consume where nothing else reads those.

    In a ``torch.fx.GraphModule``: an addition whose operand is the result of a conv or linear layer used by
    nothing else adds into it (:func:`add_into`), and a ReLU of such a result, or of an addition, with no other
    user runs in place. The values are the same; the fresh multi-megabyte result each op allocated (and
    page-faulted in) is gone. Returns the number of operations rewritten.
    """
    import torch.fx as fx

    if not isinstance(model, fx.GraphModule):
        return 0
    modules = dict(model.named_modules())

    def layer_result(n: object) -> bool:
        return (
            isinstance(n, fx.Node)
            and n.op == "call_module"
            and isinstance(modules[n.target], (SparseConv2d, SparseLinear, nn.Conv2d, nn.Linear))
            and len(n.users) == 1
        )

    rewritten = 0
    for n in list(model.graph.nodes):
        if n.op == "call_function" and n.target in _ADDS and len(n.args) == 2 and not n.kwargs:
            a, b = n.args
            for x, y in ((a, b), (b, a)):  # float addition commutes
                if layer_result(x) and isinstance(y, fx.Node):
                    n.target, n.args = add_into, (x, y)
                    rewritten += 1
                    break
            continue
        relu = (
            (n.op == "call_function" and n.target in _RELUS and not n.kwargs.get("inplace", False))
            or (n.op == "call_method" and n.target == "relu")
            or (n.op == "call_module" and type(modules[n.target]) is nn.ReLU)
        )
        if not relu or len(n.args) != 1:
            continue
        src = n.args[0]
        fresh = layer_result(src) or (
            isinstance(src, fx.Node)
            and src.op == "call_function"
            and src.target in (*_ADDS, add_into)
            and len(src.users) == 1
        )
        if fresh:
            with model.graph.inserting_before(n):
                new = model.graph.call_function(torch.relu_, (src,))
            n.replace_all_uses_with(new)
            model.graph.erase_node(n)
            rewritten += 1
    if rewritten:
        model.recompile()
    return rewritten


def _module_calls(graph) -> dict[str, int]:  # noqa: ANN001
    """How often the ``torch.fx`` graph calls each submodule."""
    calls: dict[str, int] = {}
    for n in graph.nodes:
        if n.op == "call_module":
            calls[n.target] = calls.get(n.target, 0) + 1
    return calls


def _fuse_epilogues(model: nn.Module) -> int:
    """Fold the addition and ReLU after a batch-last sparse conv into the conv's stores.

    After :func:`_reuse_results`: ``relu_(conv(x))``, ``add_into(conv(x), r)`` and ``relu_(add_into(conv(x),
    r))``, where nothing else reads the conv's (or the addition's) result and the conv module is called once,
    become ``conv(x)`` / ``conv(x, r)`` with :attr:`SparseConv2d.epilogue_relu` set: the kernel adds ``r`` and
    clamps as it stores each result, instead of two more passes over the activation. ``r`` is moved before the
    conv when it is computed after it from values computed before. Returns the number of convs fused.
    """
    import torch.fx as fx

    if not isinstance(model, fx.GraphModule):
        return 0
    modules, calls = dict(model.named_modules()), _module_calls(model.graph)
    order = {n: i for i, n in enumerate(model.graph.nodes)}

    def only_user(n: fx.Node) -> fx.Node | None:
        return next(iter(n.users)) if len(n.users) == 1 else None

    def relu_of(n: fx.Node | None, src: fx.Node) -> bool:
        return n is not None and n.op == "call_function" and n.target is torch.relu_ and n.args == (src,)

    fused = 0
    for n in list(model.graph.nodes):
        conv = modules.get(n.target) if n.op == "call_module" else None
        if not isinstance(conv, SparseConv2d) or not conv.batch_last_out or calls[n.target] != 1:
            continue
        if len(n.args) != 1 or n.kwargs:
            continue
        user = only_user(n)
        residual, last = None, n
        if user is not None and user.op == "call_function" and user.target is add_into and user.args[0] is n:
            other = user.args[1]
            if not isinstance(other, fx.Node) or other is n:
                continue
            later, todo, cyclic = set(), [other], False  # what of the residual's computation follows the conv
            while todo and not cyclic:
                a = todo.pop()
                cyclic = a is n  # the residual depends on the conv's own result
                if order[a] > order[n] and a not in later:
                    later.add(a)
                    todo.extend(a.all_input_nodes)
            if cyclic:
                continue
            for a in sorted(later, key=order.__getitem__):  # in their order, before the conv
                n.prepend(a)
            residual, last = other, user
        relu = relu_of(only_user(last), last)
        if residual is None and not relu:
            continue
        end = only_user(last) if relu else last
        if residual is not None:
            n.args = (n.args[0], residual)
        conv.epilogue_relu = relu
        end.replace_all_uses_with(n)
        for dead in (end, last) if last not in (n, end) else (end,):  # the ReLU, then the addition it read
            model.graph.erase_node(dead)
        fused += 1
    if fused:
        model.graph.lint()
        model.recompile()
    return fused


def _plan_borders(model: nn.Module) -> int:
    """Let a batch-last sparse conv write into the zero-bordered planes the next sparse conv reads in place.

    After :func:`_reuse_results`: the result of a :class:`SparseConv2d` and what in-place operations make of it
    (``relu_``, :func:`add_into` into it) is one buffer; when every other consumer of that buffer is a stride-1
    :class:`SparseConv2d` with the same padding, the producer gets ``out_border`` = that padding and the
    consumers skip their packing copy (after checking the border is still zero). Any other consumer, or a
    producer module called twice, leaves it alone. Returns the number of producers planned.
    """
    import torch.fx as fx

    if not isinstance(model, fx.GraphModule):
        return 0
    modules, calls = dict(model.named_modules()), _module_calls(model.graph)
    planned = 0
    for n in model.graph.nodes:
        if n.op != "call_module" or not isinstance(modules[n.target], SparseConv2d):
            continue
        producer = modules[n.target]
        if not producer.batch_last_out or calls[n.target] != 1:
            continue
        alias, todo = {n}, [n]
        while todo:  # the producer's buffer, through in-place operations on it
            a = todo.pop()
            for u in a.users:
                inplace = u.op == "call_function" and u.target in (torch.relu_, add_into) and u.args[0] is a
                if inplace and u not in alias:
                    alias.add(u)
                    todo.append(u)
        borders = set()
        for a in alias:
            for u in a.users:
                if u in alias:
                    continue
                sub = modules.get(u.target) if u.op == "call_module" else None
                if isinstance(sub, SparseConv2d) and u.args[0] is not a and u.args[1:] == (a,):
                    continue  # read as a fused residual, through its strides: the border does not matter
                reads = isinstance(sub, SparseConv2d) and u.args[0] is a and tuple(sub.stride) == (1, 1)
                borders.add(tuple(sub.padding) if reads else None)
        if len(borders) == 1 and None not in borders:
            producer.out_border = borders.pop()
            planned += 1
    return planned


def _fold_batchnorm(model: nn.Module) -> nn.Module:
    from torch.fx.experimental.optimization import fuse

    try:
        return fuse(model, inplace=True)
    except Exception as exc:  # noqa: BLE001 - any tracing failure means: keep the BatchNorms
        log.info(
            "to_sparse: BatchNorm left unfolded (torch.fx could not trace %s: %s)", type(model).__name__, exc
        )
        return model


def _strip_routes(model: nn.Module) -> None:
    for m in model.modules():
        if "_er_sparse_route" in m.__dict__:
            for key in ("_er_sparse_route", "_conv_forward", "forward"):
                m.__dict__.pop(key, None)


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _weights_read_directly(model: nn.Module) -> dict[nn.Module, str]:
    """Linear layers whose ``weight`` their parent reads itself instead of calling them (they must keep it): the
    ``out_proj`` of attention :func:`_attention_layers` did not replace."""
    return {
        m.out_proj: f"MultiheadAttention reads out_proj.weight itself ({attention_unsupported(m)})"
        for m in model.modules()
        if isinstance(m, nn.MultiheadAttention)
    }


def _attention_layers(model: nn.Module, names: list[str] | None = None) -> list[str]:
    """Replace each ``MultiheadAttention`` with a packed in-projection (or those in ``names``) by a
    :class:`SparseAttention` holding the same parameters; returns the names replaced."""
    done = []
    for name, sub in list(model.named_modules()):
        if not isinstance(sub, nn.MultiheadAttention) or (names is not None and name not in names):
            continue
        if attention_unsupported(sub) is None:
            _replace(model, name, SparseAttention(sub))
            done.append(name)
    return done


def _convertible(module: nn.Module) -> bool:
    if isinstance(module, nn.Conv2d):
        return module.groups == 1 and module.padding_mode == "zeros"
    return isinstance(module, nn.Linear)


def _layer_inputs(model: nn.Module, names: list[str], example_input: Any) -> dict[str, Tensor]:
    """The input each named layer sees on one forward pass of ``example_input``."""
    seen: dict[str, Tensor] = {}
    handles = []
    for name in names:
        sub = model.get_submodule(name)
        handles.append(
            sub.register_forward_pre_hook(lambda m, args, n=name: seen.setdefault(n, args[0].detach()))
        )
    try:
        with torch.no_grad():
            model(*example_input) if isinstance(example_input, tuple) else model(example_input)
    finally:
        for h in handles:
            h.remove()
    return seen


def _faster_sparse(
    dense: nn.Module, sparse: nn.Module, x: Tensor, reps: int = 5, budget: float = 0.02
) -> tuple[bool, float, float]:
    """Whether ``sparse`` beats ``dense`` on ``x`` (forward, interleaved, best of at least ``reps`` rounds).

    Layers that take a fraction of a millisecond get more rounds, up to ``budget`` seconds each (50 at most):
    best-of-5 of a 0.2 ms layer flipped decisions from run to run.
    """
    best = {"d": float("inf"), "s": float("inf")}
    spent = {"d": 0.0, "s": 0.0}
    with torch.no_grad():
        dense(x), sparse(x)
        rounds = 0
        while rounds < reps or (rounds < 50 and min(spent.values()) < budget):
            for key, m in (("d", dense), ("s", sparse)):
                start = time.perf_counter()
                m(x)
                took = time.perf_counter() - start
                best[key] = min(best[key], took)
                spent[key] += took
            rounds += 1
    return best["s"] < best["d"], best["d"], best["s"]


def _dense_neighbours(model: nn.Module, inputs: dict[str, Tensor]) -> list[tuple[str, float]]:
    """Dense convolutions next to sparse ones that the kernels compute faster, in their layout, with all weights.

    A dense ``Conv2d`` whose result reaches a :class:`SparseConv2d` through layout-free operations (a ResNet's
    stem, its shortcuts) hands it on through a transpose into the batch-last layout, and one whose input comes
    from a sparse conv reads it through a transpose back. A :class:`SparseConv2d` holding every weight computes
    it in that layout (its rows share one index, so the kernel keeps blocks of rows in registers). Each such
    layer with an input in ``inputs`` is timed both ways, the transposes with the dense one, and replaced where
    the kernel is faster (logged). Returns (name, density) of the layers replaced.
    """
    import torch.fx as fx

    if not isinstance(model, fx.GraphModule):
        return []
    modules, calls = dict(model.named_modules()), _module_calls(model.graph)

    def is_sparse(n: fx.Node) -> bool:
        return n.op == "call_module" and isinstance(modules.get(n.target), SparseConv2d)

    def free(n: fx.Node) -> bool:
        return _layout_free(n, modules, (nn.MaxPool2d,))

    def from_sparse(n: object, seen: set[fx.Node]) -> bool:
        if not isinstance(n, fx.Node) or n in seen:
            return False
        seen.add(n)
        return is_sparse(n) or (free(n) and any(from_sparse(a, seen) for a in n.all_input_nodes))

    pairs = []
    for n in list(model.graph.nodes):
        sub = modules.get(n.target) if n.op == "call_module" else None
        if (
            type(sub) is not nn.Conv2d
            or not _convertible(sub)
            or n.target not in inputs
            or calls[n.target] != 1
        ):
            continue
        bl_in, bl_out = bool(n.args) and from_sparse(n.args[0], set()), _reaches(n, is_sparse, free)
        if not (bl_in or bl_out):
            continue
        x = to_batch_last(inputs[n.target]) if bl_in else inputs[n.target]
        full = SparseConv2d(sub, torch.ones_like(sub.weight, dtype=torch.bool))
        full.batch_last_out = bl_out

        def dense(t: Tensor, sub: nn.Module = sub, bl_out: bool = bl_out) -> Tensor:
            y = sub(to_contiguous(t))
            return to_batch_last(y) if bl_out else y

        pairs.append((n.target, dense, full, x))
    replaced = []
    for (name, _, full, _), (faster, t_dense, t_full) in zip(pairs, _probe([p[1:] for p in pairs])):
        full.batch_last_out = False  # the layout plan decides
        log.info(
            "to_sparse: %s (dense, next to sparse layers) with transposes %.2f ms, in the kernels' layout %.2f ms: %s",
            name,
            t_dense * 1e3,
            t_full * 1e3,
            "kernels" if faster else "stays dense",
        )
        if faster:
            _replace(model, name, full)
            replaced.append((name, 1.0))
    return replaced


def _probe(pairs: list[tuple[Any, nn.Module, Tensor]]) -> list[tuple[bool, float, float]]:
    """:func:`_faster_sparse` for each (dense, sparse, input), in two sweeps over all pairs (the second in reverse
    order), each side's best time kept. A burst of load from elsewhere on the machine outlasts one layer's probe
    (at batch 1 it turned runs of consecutive layers dense, the slower choice in the model, in some exports);
    it rarely covers the same layer in both sweeps."""
    best = [[float("inf"), float("inf")] for _ in pairs]
    for order in (range(len(pairs)), reversed(range(len(pairs)))):
        for i in order:
            _, t_dense, t_sparse = _faster_sparse(*pairs[i])
            best[i] = [min(best[i][0], t_dense), min(best[i][1], t_sparse)]
    return [(t_sparse < t_dense, t_dense, t_sparse) for t_dense, t_sparse in best]


def to_sparse(
    module: nn.Module,
    masks: Mapping[str, Tensor] | None = None,
    *,
    fold_batchnorm: bool = True,
    max_density: float = 0.5,
    example_input: Any = None,
) -> nn.Module:
    """An inference copy of ``module`` whose sparse ``Conv2d``/``Linear`` layers compute with the sparse kernels.

    Args:
        module: a trained module (any ``nn.Module``; pass the backbone, e.g. ``SparseLightningModule.model``).
            Its masked weights must be exact zeros, as every hard-mask callback leaves them.
        masks: optional FQN (``"layer1.0.conv1.weight"``) → bool mask; by default a layer's mask is its
            nonzero pattern.
        fold_batchnorm: fold each BatchNorm that follows a conv/linear layer into it (exact in eval mode).
        max_density: layers denser than this stay dense (dense kernels win there), except the dense convs next
            to sparse ones that the timing with ``example_input`` (below) puts on the kernels.
        example_input: a batch (or tuple of forward arguments) of the size you will run; when given, each
            candidate layer is timed dense against sparse on the input it sees and converted only where sparse
            is faster (logged), and so is each dense ``Conv2d`` next to a sparse one (a ResNet's stem and
            shortcuts): computed by the kernels with all its weights, in their layout, against dense plus the
            transposes between layouts it needs (see :func:`_dense_neighbours`). Without it, every layer at or
            below ``max_density`` is converted and no other.

    Returns:
        A new module in eval mode; ``module`` itself is not changed.
    """
    if not 0.0 < max_density <= 1.0:
        raise ValueError(f"max_density must be in (0, 1], got {max_density}")
    model = copy.deepcopy(module).eval()
    _strip_routes(model)
    if masks is not None:
        params = dict(model.named_parameters())
        unknown = sorted(set(masks) - set(params))
        if unknown:
            raise ValueError(f"masks name parameters the module does not have: {unknown}")
        with torch.no_grad():
            for name, mask in masks.items():
                if tuple(mask.shape) != tuple(params[name].shape):
                    raise ValueError(
                        f"mask {name!r} has shape {tuple(mask.shape)}, parameter {tuple(params[name].shape)}"
                    )
                params[name].mul_(mask.to(params[name].device, params[name].dtype))
    if fold_batchnorm:
        model = _fold_batchnorm(model)
    attention = _attention_layers(model)
    if attention:
        log.info("to_sparse: %d MultiheadAttention layers with their projections as layers", len(attention))
    candidates = []
    read_directly = _weights_read_directly(model)
    for name, sub in list(model.named_modules()):
        if not name or not _convertible(sub):
            continue
        if sub in read_directly:
            log.info("to_sparse: %s stays dense: %s", name, read_directly[sub])
            continue
        mask = sub.weight.detach() != 0
        density = float(mask.float().mean())
        if density <= max_density:
            candidates.append((name, sub, mask, density))
    chosen = {c[0] for c in candidates}
    dense_convs = [
        n
        for n, m in model.named_modules()
        if type(m) is nn.Conv2d and _convertible(m) and n not in chosen and m not in read_directly
    ]
    inputs = (
        _layer_inputs(model, [c[0] for c in candidates] + dense_convs, example_input)
        if example_input is not None
        else {}
    )
    converted = []
    made = [
        SparseConv2d(s, m) if isinstance(s, nn.Conv2d) else SparseLinear(s, m) for _, s, m, _ in candidates
    ]
    pairs = [(sub, new, inputs[name]) for (name, sub, _, _), new in zip(candidates, made) if name in inputs]
    timed = iter(_probe(pairs))
    for (name, _, _, density), new in zip(candidates, made):
        if name in inputs:
            faster, t_dense, t_sparse = next(timed)
            log.info(
                "to_sparse: %s (density %.3f) dense %.2f ms, sparse %.2f ms: %s",
                name,
                density,
                t_dense * 1e3,
                t_sparse * 1e3,
                "sparse" if faster else "stays dense",
            )
            if not faster:
                continue
        _replace(model, name, new)
        converted.append((name, density))
    converted += _dense_neighbours(model, {n: inputs[n] for n in dense_convs + list(chosen) if n in inputs})
    log.info(
        "to_sparse: %d layers compute sparse (%s)",
        len(converted),
        ", ".join(f"{n} {d:.3f}" for n, d in converted) or "none",
    )
    switched = _plan_batch_last(model)
    if switched:
        log.info("to_sparse: %d sparse convolutions pass batch-last results on", switched)
    _reuse_results(model)
    _fuse_epilogues(model)
    _plan_borders(model)
    return model.eval()


def save_sparse(model: nn.Module, path: str | os.PathLike) -> None:
    """Save a :func:`to_sparse` model as plain tensors (loadable with ``torch.load(..., weights_only=True)``)."""
    sparse = [n for n, m in model.named_modules() if isinstance(m, _SparseLayer)]
    folded = not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    torch.save(
        {
            "format_version": FORMAT_VERSION,
            "fold_batchnorm": folded,
            "sparse_layers": sparse,
            "attention_layers": [n for n, m in model.named_modules() if isinstance(m, SparseAttention)],
            "state_dict": model.state_dict(),
        },
        path,
    )


def load_sparse(template: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load :func:`save_sparse` output into the structure of ``template`` (same architecture, any weights).

    Raises:
        ValueError: the file is not an export of this library, or does not fit the template (names what differs).
    """
    data = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(data, dict) or data.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{os.fspath(path)} is not an er_lightning sparse export (format_version {FORMAT_VERSION})"
        )
    model = copy.deepcopy(template).eval()
    _strip_routes(model)
    if data["fold_batchnorm"]:
        model = _fold_batchnorm(model)
    attention = list(data.get("attention_layers", []))  # exports before attention support have none
    missing = sorted(set(attention) - set(_attention_layers(model, attention)))
    if missing:
        raise ValueError(
            f"{os.fspath(path)}: attention layers {missing} have no MultiheadAttention with a packed "
            "in-projection in the template"
        )
    modules = dict(model.named_modules())
    read_directly = _weights_read_directly(model)
    for name in data["sparse_layers"]:
        sub = modules.get(name)
        if sub is None or not _convertible(sub) or sub in read_directly:
            raise ValueError(
                f"{os.fspath(path)}: sparse layer {name!r} has no Conv2d/Linear counterpart in the template"
            )
        empty = torch.zeros_like(sub.weight, dtype=torch.bool)
        _replace(
            model, name, SparseConv2d(sub, empty) if isinstance(sub, nn.Conv2d) else SparseLinear(sub, empty)
        )
    model.load_state_dict(data["state_dict"], strict=True)
    _plan_batch_last(model)
    _reuse_results(model)
    _fuse_epilogues(model)
    _plan_borders(model)
    return model.eval()
