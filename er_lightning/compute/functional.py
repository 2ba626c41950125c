"""Sparse ``conv2d`` and ``linear`` over the active weights of a bool mask, as autograd functions.

:class:`SparseIndex` is the per-layer index structure, built from a bool mask once per mask change (cost measured
in ``benchmarks/bench_sparse.py --table train``): the active positions in output-channel order (forward, weight gradient) and in
input-plane order (input gradient). :func:`sparse_conv2d` and :func:`sparse_linear` compute

* the forward pass and the input gradient with the kernels of ``_kernels.c`` over active weights only, and
* the weight gradient at active positions only, written into a dense tensor of the weight's shape (zeros
  elsewhere), so ``p.grad`` looks exactly like the dense, masked gradient to every optimizer, clipper, DDP
  all-reduce and gradient accumulation.

Both accept any batch size, stride, padding, dilation and kernel shape of a ``groups=1`` convolution, and any
leading dimensions for ``linear``; float32 on CPU only (:func:`supports` says why a call is refused).

Example:
    >>> conv = torch.nn.Conv2d(4, 6, 3, padding=1)
    >>> mask = torch.rand_like(conv.weight) < 0.2
    >>> with torch.no_grad():
    ...     _ = conv.weight.mul_(mask)
    >>> index = SparseIndex(mask, stride=conv.stride, dilation=conv.dilation)
    >>> x = torch.randn(3, 4, 9, 9)
    >>> y = sparse_conv2d(x, conv.weight, conv.bias, index, padding=conv.padding)
    >>> bool(torch.allclose(y, conv(x), atol=1e-5))
    True
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import torch
from torch import Tensor

from er_lightning.compute.build import build_error, load_kernels

__all__ = [
    "SparseIndex",
    "batch_last_view",
    "batch_norm_batch_last",
    "conv2d_values",
    "conv_padding",
    "is_batch_last",
    "max_pool2d_batch_last",
    "sparse_conv2d",
    "sparse_linear",
    "supports",
    "to_batch_last",
    "to_contiguous",
]

_INT32 = 2**31

#: Weight gradients larger than this (bytes) are computed in one band (one pass over the gradient).
_GRAD_PASS_BYTES = 4 << 20

#: The plane-blocked kernel is used from this many active weights per row and block on, over spans of at least
#: _MIN_SPAN floats (A/B in one process, random order, 2 threads: ResNet-18 ERK 0.05 inference at batch 32 takes
#: 0.85x the time, VGG-16 uniform 0.05 0.94x, batch 1 unchanged; without the span limit batch 1 takes 1.1-1.7x).
_PER_BLOCK = 20
_MIN_SPAN = 256
#: ... and over at least _MIN_TILES whole 128-float tiles (its parallel tasks; the one-span planes of batch 1
#: have two or three, which left a thread idle)
_MIN_TILES = 4

#: Largest scratch tensor (bytes) kept per thread and slot between calls.
_TEMP_KEEP_BYTES = 256 << 20

#: Floats past the end of every kernel input: the spans' tails are read as whole 16-float vectors.
_SLACK = 16

#: Largest input gradient (floats) a linear layer accumulates in forward order, one copy per thread in L2.
_SCATTER_FLOATS = 196_608

#: Floats of input rows a band of output rows may touch (keeps them in a 2 MB L2 with room for the outputs).
_BAND_FLOATS = 196_608


def _ptr(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _pair(v: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(v, int):
        return (v, v)
    a, b = tuple(v)
    return (int(a), int(b))


def conv_padding(
    padding: str | int | Sequence[int], kernel: Sequence[int], dilation: Sequence[int]
) -> tuple[int, int, int, int]:
    """``nn.Conv2d``'s padding as (top, bottom, left, right); ``"same"`` pads the extra row/column at the end."""
    if isinstance(padding, str):
        if padding == "valid":
            return (0, 0, 0, 0)
        if padding != "same":
            raise ValueError(f"padding must be an int, a pair, 'same' or 'valid', got {padding!r}")
        out = []
        for k, d in zip(kernel, dilation):
            total = d * (k - 1)
            out += [total // 2, total - total // 2]
        return (out[0], out[1], out[2], out[3])
    ph, pw = _pair(padding)
    return (ph, ph, pw, pw)


class SparseIndex:
    """The active weights of one layer, for the sparse kernels; rebuilt whenever the mask changes.

    Args:
        mask: bool mask of a conv weight (OC, IC, KH, KW) or a linear weight (OUT, IN).
        stride: the convolution's stride (1 for linear).
        dilation: the convolution's dilation (1 for linear).
    """

    def __init__(
        self, mask: Tensor, stride: int | Sequence[int] = 1, dilation: int | Sequence[int] = 1
    ) -> None:
        if mask.dim() == 2:
            mask4 = mask.reshape(mask.shape[0], mask.shape[1], 1, 1)
        elif mask.dim() == 4:
            mask4 = mask
        else:
            raise ValueError(
                f"SparseIndex takes a 2-D (linear) or 4-D (conv2d) mask, got shape {tuple(mask.shape)}"
            )
        self.shape = tuple(mask.shape)
        oc, ic, kh, kw = mask4.shape
        self.stride = _pair(stride)
        self.dilation = _pair(dilation)
        sh, sw = self.stride
        dlh, dlw = self.dilation
        self.kernel = (kh, kw)
        self.in_channels = ic
        self.out_channels = oc
        self.phases = sh * sw
        # max shift of a tap inside the phase planes
        self.mh = (dlh * (kh - 1)) // sh
        self.mw = (dlw * (kw - 1)) // sw

        flat = mask4.detach().to("cpu").reshape(-1).nonzero().reshape(-1)
        self.flat_index = flat
        self.nnz = int(flat.numel())
        #: every weight active: all rows read the same offsets (the kernels block rows in registers then)
        self.dense_rows = self.nnz == mask4.numel() and self.nnz > 0
        o = flat // (ic * kh * kw)
        rest = flat % (ic * kh * kw)
        c = rest // (kh * kw)
        r = rest % (kh * kw)
        th, tw = (r // kw) * dlh, (r % kw) * dlw
        ph, pw = th % sh, tw % sw
        dh, dw = th // sh, tw // sw
        cp = (ph * sw + pw) * ic + c
        self.row_ptr = _row_ptr(o, oc)
        self.cp = cp.to(torch.int32)
        self.dh = dh.to(torch.int32)
        self.dw = dw.to(torch.int32)
        # input-gradient order: grouped by input plane (phase, channel)
        perm = torch.argsort(cp, stable=True)
        self.perm = perm
        # the kernels read 32-bit indices (half the index traffic of a linear layer, where each active weight
        # does only a batch's worth of work); weights of 2**31 entries or more are refused by supports()
        self._flat32 = flat.to(torch.int32)
        self._perm32 = perm.to(torch.int32)
        self.row_ptr_t = _row_ptr(cp[perm], self.phases * ic)
        self.cp_t = o[perm].to(torch.int32)
        self.dh_t = (self.mh - dh[perm]).to(torch.int32)
        self.dw_t = (self.mw - dw[perm]).to(torch.int32)
        self._offsets: dict[tuple[bool, int, int, int], Tensor] = {}
        self._plans: dict[tuple, tuple] = {}
        self._blocks: dict[tuple[bool, int], tuple[int, Tensor]] = {}
        self._block_sizes: dict[bool, int] = {}
        self._grad_storage: torch.UntypedStorage | None = None
        #: packed inputs, outputs and input gradients of this layer, reused from step to step (see _Buffers)
        self.buffers = _Buffers()

    def offsets(self, transposed: bool, plane: int, row: int, col: int) -> Tensor:
        """Per-weight flat offsets into the packed planes of one input geometry (cached)."""
        key = (transposed, plane, row, col)
        out = self._offsets.get(key)
        if out is None:
            if len(self._offsets) > 16:
                self._offsets.clear()
            cp, dh, dw = (self.cp_t, self.dh_t, self.dw_t) if transposed else (self.cp, self.dh, self.dw)
            if plane * max(self.phases * self.in_channels, self.out_channels) >= _INT32:
                raise RuntimeError(
                    f"packed planes of {plane} floats are too large for the kernels' 32-bit offsets"
                )
            out = torch.empty(self.nnz, dtype=torch.int32)
            _lib().er_offsets(
                self.nnz, _ptr(cp), _ptr(dh), _ptr(dw), plane, row, col, _ptr(out), torch.get_num_threads()
            )
            self._offsets[key] = out
        return out

    def block_size(self, transposed: bool) -> int:
        """Planes per block for :func:`er_spmm_blocked` (0: the unblocked kernel), from the measured break-even.

        Blocking pays from about ``_PER_BLOCK`` active weights per row and block, on layers with at least 128
        planes or 100 weights per row (single-threaded: 0.73-0.87x of the unblocked time on ResNet-18's ERK
        layers, 1.04-1.3x on 64-channel layers at density 0.05-0.1). The forward of a strided convolution is
        never blocked (its weights are not ordered by plane within a row).
        """
        got = self._block_sizes.get(transposed)
        if got is None:
            got = self._block_sizes[transposed] = self._block_size(transposed)
        return got

    def _block_size(self, transposed: bool) -> int:
        if not transposed and self.phases != 1:
            return 0
        nplanes = self.out_channels if transposed else self.in_channels
        nrows = self.phases * self.in_channels if transposed else self.out_channels
        per_row = self.nnz / max(nrows, 1)
        if nplanes < 128 and per_row < 100:
            return 0
        for size in (16, 32, 64):
            if size < nplanes and per_row * size / nplanes >= _PER_BLOCK:
                return size
        return 0

    def blocks(self, transposed: bool, size: int) -> tuple[int, Tensor]:
        """(number of blocks, pointers) splitting each row's weights by blocks of ``size`` consecutive planes.

        Forward rows are output channels over input planes (stride 1 only: one phase); transposed rows are input
        planes over output channels. The weights of row r in block b are ``ptr[r*n + b] : ptr[r*n + b + 1]``.
        """
        key = (transposed, size)
        got = self._blocks.get(key)
        if got is None:
            if transposed:
                rows, ch = self.cp[self.perm].long(), self.cp_t.long()
                nrows, nch = self.phases * self.in_channels, self.out_channels
            else:
                nrows, nch = self.out_channels, self.phases * self.in_channels
                rows = torch.repeat_interleave(torch.arange(nrows), self.row_ptr[1:] - self.row_ptr[:-1])
                ch = self.cp.long()
            n = (nch + size - 1) // size
            got = self._blocks[key] = (n, _row_ptr(rows * n + ch // size, nrows * n))
        return got

    def plan(self, B: int, C: int, H: int, W: int, pad: tuple[int, ...]) -> tuple:
        """The forward geometry of one input shape (cached): output and plane sizes, offsets, spans, band."""
        key = (B, C, H, W, pad)
        got = self._plans.get(key)
        if got is not None:
            return got
        kh, kw = self.kernel
        sh, sw = self.stride
        dlh, dlw = self.dilation
        pt, pb, pl, pr = pad
        OH = (H + pt + pb - dlh * (kh - 1) - 1) // sh + 1
        OW = (W + pl + pr - dlw * (kw - 1) - 1) // sw + 1
        if OH <= 0 or OW <= 0:
            raise RuntimeError(f"input of size {H}x{W} is too small for this convolution")
        if self.in_channels != C:
            raise RuntimeError(f"input has {C} channels, the layer takes {self.in_channels}")
        Hq, Wq = OH + self.mh, OW + self.mw
        offs = self.offsets(False, Hq * Wq * B, Wq * B, B)
        if OW * B >= 32:  # one output row per span
            y_row, n_i, L = OW * B, OH, OW * B
        else:  # small rows (batch 1, tiny maps): the whole plane as one span, columns past OW ignored
            y_row, n_i, L = Wq * B, 1, (OH - 1) * Wq * B + OW * B
        band = _band(self.phases * C, Wq * B, self.mh)
        if len(self._plans) > 16:
            self._plans.clear()
        got = self._plans[key] = (OH, OW, Hq, Wq, offs, y_row, n_i, L, band)
        return got

    def grad_buffer(self, weight: Tensor) -> Tensor:
        """A zero-filled tensor of the weight's shape for its gradient, reused from step to step.

        A fresh dense gradient per step costs more than the whole sparse backward for large layers (page faults of
        a new allocation). The index keeps the storage of the gradient it returned last; autograd takes the
        returned tensor as ``p.grad``, and the optimizer's ``zero_grad(set_to_none=True)`` drops it again.
        Inactive entries are never written by the kernels (and the callbacks' ``mask_grads_`` keeps them zero),
        so the next step only overwrites the active ones. The storage is handed out again only when nothing else
        refers to it: while ``p.grad`` still lives there (``set_to_none=False``, gradient accumulation) or a
        gradient of the same layer from earlier in this backward pass is still pending (a layer applied twice),
        a fresh zero tensor is returned instead and autograd adds it in.
        """
        with self.buffers._lock:  # check and claim at once (see _Buffers)
            st = self._grad_storage
            if (
                st is not None
                and _storage_use_count is not None
                and st.nbytes() == 4 * weight.numel()
                and _storage_use_count(st._cdata) == 1
            ):
                return torch.empty(0, dtype=torch.float32).set_(st, 0, weight.shape)
            grad = torch.zeros(weight.shape, dtype=torch.float32)
            if _storage_use_count is not None and (
                st is None or st.nbytes() != grad.untyped_storage().nbytes()
            ):
                self._grad_storage = grad.untyped_storage()
            return grad

    def values(self, weight: Tensor) -> Tensor:
        """The active weights in forward order (one sequential pass over the weight)."""
        w = weight.detach()
        if not w.is_contiguous():
            w = w.contiguous()
        return self._gather(w, self._flat32, self.buffers.take("vals", (self.nnz,)))

    def transposed_values(self, values: Tensor) -> Tensor:
        """The active weights in input-gradient order, from :meth:`values` (a gather within the small array).

        The result is scratch memory of the calling thread, valid until its next call.
        """
        return self._gather(values, self._perm32, _temp("vals_t", (self.nnz,)))

    def _gather(self, src: Tensor, idx: Tensor, out: Tensor) -> Tensor:
        _lib().er_gather(_ptr(src), _ptr(idx), self.nnz, _ptr(out), torch.get_num_threads())
        return out


_storage_use_count = getattr(torch._C, "_storage_Use_Count", None)


class _Buffers:
    """Float32 tensors whose memory is handed out again once nothing else refers to it.

    A fresh multi-megabyte tensor costs a page fault per 4 KB on first touch (the kernel zero-fills each page);
    for the packed planes and outputs of one layer that is a third of the sparse step. A buffer is reused only
    when its storage has no other user (no tensor, view or saved-for-backward reference), so holding an output,
    saving it for backward, retaining the graph or running a layer twice per step all get fresh memory instead.
    ``keep`` buffers per slot stay allocated between calls.
    """

    def __init__(self, keep: int = 2) -> None:
        self.keep = keep
        self._slots: dict[str, list[torch.UntypedStorage]] = {}
        # check-and-claim must be atomic: torch ops release the GIL, so two threads running one model could
        # otherwise both see a storage free and claim it
        self._lock = threading.Lock()

    def take(self, slot: str, shape: tuple[int, ...], slack: int = 0, zero: bool = False) -> Tensor:
        """A tensor of ``shape`` (uninitialised, or zeros when newly allocated with ``zero``), whose storage runs
        ``slack`` zeroed floats past its end."""
        numel = 1
        for n in shape:
            numel *= n
        nbytes = 4 * (numel + slack)
        with self._lock:
            kept = self._slots.setdefault(slot, [])
            if _storage_use_count is not None:
                for st in kept:
                    if st.nbytes() == nbytes and _storage_use_count(st._cdata) == 1:
                        return torch.empty(0, dtype=torch.float32).set_(st, 0, shape)
            flat = (torch.zeros if zero else torch.empty)(numel + slack, dtype=torch.float32)
            flat[numel:].zero_()
            out = torch.empty(0, dtype=torch.float32).set_(flat.untyped_storage(), 0, shape)
            kept.append(flat.untyped_storage())
            if len(kept) > self.keep:
                kept.pop(0)
        return out

    def clear(self) -> None:
        self._slots.clear()


_scratch = threading.local()


def _temp(slot: str, shape: tuple[int, ...]) -> Tensor:
    """A per-thread scratch tensor for a value that dies inside one kernel call (never returned or saved); its
    storage runs at least ``_SLACK`` floats past its end."""
    bufs = getattr(_scratch, "bufs", None)
    if bufs is None:
        bufs = _scratch.bufs = {}
    numel = 1
    for n in shape:
        numel *= n
    if 4 * numel > _TEMP_KEEP_BYTES:  # a one-off huge call keeps nothing behind
        return torch.zeros(numel + _SLACK, dtype=torch.float32)[:numel].view(shape)
    buf = bufs.get(slot)
    if buf is None or buf.numel() < numel + _SLACK:
        buf = bufs[slot] = torch.zeros(numel + _SLACK, dtype=torch.float32)
    return buf[:numel].view(shape)


def _row_ptr(rows: Tensor, n: int) -> Tensor:
    counts = torch.bincount(rows, minlength=n) if rows.numel() else torch.zeros(n, dtype=torch.int64)
    ptr = torch.zeros(n + 1, dtype=torch.int64)
    torch.cumsum(counts, 0, out=ptr[1:])
    return ptr


def _lib():
    lib = load_kernels()
    if lib is None:
        raise RuntimeError("the sparse kernels are not available (see er_lightning.compute.build_error())")
    return lib


def supports(x: Tensor, weight: Tensor, out_channels: int | None = None) -> str | None:
    """``None`` when the kernels can compute this call, else the reason they cannot.

    ``out_channels`` (default ``weight.shape[0]`` for a 2-D or 4-D weight) sizes the output planes, which must
    fit the kernels' 32-bit offsets too (a layer that widens its input 32 times would otherwise fail mid-call).
    """
    if load_kernels() is None:
        return "the sparse kernels are not built on this machine"
    if x.device.type != "cpu" or weight.device.type != "cpu":
        return f"the kernels run on CPU only, tensors are on {x.device}"
    if x.dtype != torch.float32 or weight.dtype != torch.float32:
        return f"the kernels compute float32 only, got {x.dtype} input and {weight.dtype} weight"
    if out_channels is None:
        out_channels = int(weight.shape[0]) if weight.dim() in (2, 4) else 1
    channels = int(x.shape[1]) if x.dim() == 4 else int(x.shape[-1]) if x.dim() else 1
    widened = x.numel() * max(1.0, out_channels / max(channels, 1))  # output elements, at most about this
    if weight.numel() >= _INT32 or max(x.numel(), widened) >= _INT32 // 8:
        return "tensors this large exceed the kernels' 32-bit offsets"
    return None


def _pixel_range(phase: int, pad: int, stride: int, size: int, planes: int) -> tuple[int, int]:
    """Plane rows i (of one phase) whose pixel i*stride + phase - pad lies in [0, size), clipped to the planes."""
    lo = max(0, -((phase - pad) // stride))
    hi = min(planes, (size - 1 + pad - phase) // stride + 1)
    return lo, hi


def _band(rows_all_planes: int, row_floats: int, halo: int) -> int:
    per_row = max(1, rows_all_planes * row_floats)
    return max(1, _BAND_FLOATS // per_row - halo)


def is_batch_last(t: Tensor) -> bool:
    """Whether the (B, C, H, W) tensor ``t`` lies in memory as (C, H, W, B): batch stride 1, the layout the
    kernels compute in. A contiguous batch of one is both this and NCHW."""
    if t.dim() != 4:
        return False
    B, C, H, W = t.shape
    sb, sc, sh, sw = t.stride()
    expect = 1  # strides from the innermost dimension out: B, W, H, C (any stride where the size is 1)
    for size, stride in ((B, sb), (W, sw), (H, sh), (C, sc)):
        if size != 1 and stride != expect:
            return False
        expect *= size
    return True


def _flat_batch_last(t: Tensor) -> bool:
    """Whether the (B, C) tensor ``t`` (a linear layer's input or result) lies in memory as (C, B), B > 1."""
    return (
        t.dim() == 2
        and t.shape[0] > 1
        and t.stride(0) == 1
        and (t.shape[1] == 1 or t.stride(1) == t.shape[0])
    )


def _as_batch_last(t: Tensor, shape: tuple[int, ...]) -> Tensor:
    """The contiguous ``t`` holding a (C, H, W, B) or, for a 2-D ``shape`` (B, C), a (C, B) block, seen as the
    batch-last tensor of ``shape``: not an autograd view (``set_`` on the same storage; see batch_last_view)."""
    if len(shape) == 4:
        B, C, H, W = shape
        strides: tuple[int, ...] = (1, H * W * B, W * B, B)
    else:
        B, C = shape
        strides = (1, B)
    with torch.no_grad():
        return torch.empty(0, dtype=t.dtype).set_(t.untyped_storage(), t.storage_offset(), shape, strides)


def batch_last_view(t: Tensor) -> Tensor:
    """The contiguous (C, H, W, B) tensor ``t`` seen as the (B, C, H, W) batch-last tensor it holds.

    Not an autograd view (``set_`` on the same storage): a custom Function's output that is a view of one of
    its intermediates may not be modified in place, and an in-place ReLU on a layer's result is common."""
    C, H, W, B = t.shape
    return _as_batch_last(t, (B, C, H, W))


def _pack(lib, t: Tensor, out: Tensor, geometry: tuple[int, ...], nt: int) -> None:  # noqa: ANN001
    """Phase planes of ``t`` (B, C, H, W) into ``out``: row copies from a batch-last ``t``, transposes otherwise."""
    if is_batch_last(t) or _flat_batch_last(t):
        lib.er_pack_bl(_ptr(t), _ptr(out), *geometry, nt)
    else:
        src = t.contiguous()  # held until the call returns
        lib.er_pack(_ptr(src), _ptr(out), *geometry, nt)


def to_contiguous(x: Tensor) -> Tensor:
    """``x.contiguous()``, with the kernels' transposes when ``x`` is batch-last (see :func:`is_batch_last`)."""
    if x.is_contiguous() or not is_batch_last(x) or supports(x, x) is not None:
        return x.contiguous()
    B, C, H, W = x.shape
    out = torch.empty((B, C, H, W), dtype=x.dtype)
    _lib().er_unpack_out(_ptr(x), None, _ptr(out), B, C, H, W, W * B, torch.get_num_threads())
    return out


def to_batch_last(x: Tensor) -> Tensor:
    """``x`` with the same values laid out batch-last (see :func:`is_batch_last`); other tensors unchanged."""
    if x.dim() != 4 or is_batch_last(x) or supports(x, x) is not None:
        return x
    B, C, H, W = x.shape
    src = x.contiguous()
    out = torch.empty((C, H, W, B), dtype=torch.float32)
    _lib().er_pack(_ptr(src), _ptr(out), B, C, H, W, 1, 1, 0, 0, H, W, torch.get_num_threads())
    return batch_last_view(out)


class _MaxPoolBatchLast(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, kh: int, kw: int):
        ctx.save_for_backward(x)
        ctx.window = (kh, kw)
        return _max_pool_bl(x, kh, kw)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (x,) = ctx.saved_tensors
        B, C, H, W = x.shape
        kh, kw = ctx.window
        g = grad.permute(1, 2, 3, 0).contiguous()  # a copy only when grad is not batch-last
        dx = torch.empty((C, H, W, B), dtype=torch.float32)
        _lib().er_maxpool_bl_grad(_ptr(x), _ptr(g), _ptr(dx), B, C, H, W, kh, kw, torch.get_num_threads())
        return batch_last_view(dx), None, None


def _max_pool_bl(x: Tensor, kh: int, kw: int) -> Tensor:
    B, C, H, W = x.shape
    out = torch.empty((C, H // kh, W // kw, B), dtype=torch.float32)
    _lib().er_maxpool_bl(_ptr(x), _ptr(out), B, C, H, W, kh, kw, torch.get_num_threads())
    return batch_last_view(out)


def max_pool2d_batch_last(x: Tensor, kernel: tuple[int, int]) -> Tensor:
    """``F.max_pool2d(x, kernel)`` (stride = kernel, no padding) of a batch-last float32 CPU ``x``, batch-last
    result; differentiable (the gradient goes to the element torch's max_pool2d takes: the first maximum of the
    window in row-major order, the last NaN)."""
    if torch.is_grad_enabled() and x.requires_grad:
        return _MaxPoolBatchLast.apply(x, int(kernel[0]), int(kernel[1]))
    return _max_pool_bl(x, int(kernel[0]), int(kernel[1]))  # inference: no autograd node to build


def _spmm(
    lib,  # noqa: ANN001
    index: SparseIndex,
    transposed: bool,
    phase: int,
    nrows: int,
    *args: int,
    epilogue: tuple[int | None, int, int, bool] = (None, 0, 0, False),
) -> None:
    """``er_spmm`` over rows ``phase*nrows ...`` of the forward (or transposed) index, blocked where that pays.

    ``args``: offs, vals, in, in_row, out, out_plane, out_row, n_i, L, band, bias, nthreads (pointers as ints).
    ``epilogue``: (residual pointer or None, its plane and row strides, relu): each result adds the residual at
    its position, then ReLU, as it is stored.
    """
    offs, vals, inp, in_row, out, out_plane, out_row, n_i, L, band, bias, nt = args
    res, res_plane, res_row, relu = epilogue
    if index.dense_rows and not transposed:  # every row reads the same offsets: rows in register blocks
        K = index.nnz // index.out_channels
        common = (offs, vals + 4 * phase * nrows * K, inp, in_row, out, out_plane, out_row, n_i, L)
        lib.er_dense_rows(nrows, K, *common, bias, res, res_plane, res_row, int(relu), nt)
        return
    size = index.block_size(transposed) if L >= _MIN_SPAN and n_i * (L // 128) >= _MIN_TILES else 0
    common = (offs, vals, inp, in_row, out, out_plane, out_row, n_i, L)
    if size:
        n, ptr = index.blocks(transposed, size)
        ptr_at = _ptr(ptr) + 8 * phase * nrows * n
        lib.er_spmm_blocked(nrows, n, ptr_at, *common, bias, res, res_plane, res_row, int(relu), nt)
    else:
        row_ptr = index.row_ptr_t if transposed else index.row_ptr
        ptr_at = _ptr(row_ptr) + 8 * phase * nrows
        lib.er_spmm(nrows, ptr_at, *common, band, bias, res, res_plane, res_row, int(relu), nt)


def _packed_in_place(lib, x: Tensor, pad: tuple[int, ...], Hq: int, Wq: int) -> Tensor | None:  # noqa: ANN001
    """``x``'s own storage as packed planes (1, C, Hq, Wq, B), when ``x`` is the interior of zero-bordered planes
    of exactly this padding (what a sparse layer with ``out_border`` returns), else None."""
    B, C, H, W = x.shape
    pt, pb, pl, pr = pad
    if Hq != H + pt + pb or Wq != W + pl + pr or x.dtype != torch.float32 or x.device.type != "cpu":
        return None
    want = (1, Hq * Wq * B, Wq * B, B)
    if any(size != 1 and got != exp for size, got, exp in zip(x.shape, x.stride(), want)):
        return None
    base = x.storage_offset() - (pt * Wq + pl) * B
    st = x.untyped_storage()
    if base < 0 or st.nbytes() < 4 * (base + C * Hq * Wq * B + _SLACK):
        return None
    planes = torch.empty(0, dtype=torch.float32).set_(st, base, (1, C, Hq, Wq, B))
    if not lib.er_border_zero(_ptr(planes), C, Hq, Wq, B, pt, pb, pl, pr):
        return None
    return planes


def _forward(
    x: Tensor,
    vals: Tensor,
    bias: Tensor | None,
    index: SparseIndex,
    pad: tuple[int, ...],
    batch_last: bool = False,
    out_border: tuple[int, int, int, int] | None = None,
    read_in_place: bool = False,
    residual: Tensor | None = None,
    relu: bool = False,
):
    """The forward pass over packed planes: (output, packed input, geometry).

    ``residual`` (same shape as the result) is added and ``relu`` applied to the result, in the kernel's stores
    where the result is batch-last in row spans and the residual has batch-last rows, else afterwards.

    With ``batch_last`` the output is returned in the kernels' own layout (see :func:`is_batch_last`), which
    the next sparse layer packs with row copies instead of transposes. With ``out_border`` (top, bottom, left,
    right) as well it is written into the interior of zero-bordered planes, and the (strided) interior is
    returned: a stride-1 layer with that padding, called with ``read_in_place``, reads those planes as its packed
    input after checking that the border is still zero (:func:`_packed_in_place`). Inference only: the packed
    input is not copied, so it must not change before a backward pass."""
    lib = _lib()
    nt = torch.get_num_threads()
    B, C, H, W = x.shape if x.dim() == 4 else (*x.shape, 1, 1)  # 2-D: a linear layer's (N, IN)
    OC, P = index.out_channels, index.phases
    OH, OW, Hq, Wq, offs, y_row, n_i, L, band = index.plan(B, C, H, W, pad)
    pt, pl = pad[0], pad[2]
    xq = _packed_in_place(lib, x, pad, Hq, Wq) if read_in_place and P == 1 else None
    if xq is None:
        xq = index.buffers.take("xq", (P, C, Hq, Wq, B), slack=_SLACK)
        _pack(lib, x, xq, (B, C, H, W, *index.stride, pt, pl, Hq, Wq), nt)
    row = Wq * B
    b = bias.detach().contiguous() if bias is not None else None
    vals = vals.contiguous()
    # the kernel writes n_i spans of L floats, rows y_row apart: into strided destinations (padded planes, a
    # residual's rows) only when each span is one output row (a span over several rows runs into the border)
    row_spans = y_row == OW * B and n_i == OH
    padded = batch_last and out_border is not None and row_spans
    y = planes = None
    if padded:  # into the interior of zero-bordered planes
        bt, bb, bl, br = out_border
        Hb, Wb = OH + bt + bb, OW + bl + br
        planes = index.buffers.take("out_planes", (OC, Hb, Wb, B), slack=_SLACK, zero=True)
        start = (bt * Wb + bl) * B
        dst, dst_plane, dst_row = _ptr(planes) + 4 * start, Hb * Wb * B, Wb * B
    else:  # batch-last results are computed in place when their rows have no columns past OW
        y = (
            index.buffers.take("out_bl", (OC, OH, OW * B))
            if batch_last and y_row == OW * B
            else _temp("y", (OC, OH, y_row))
        )
        dst, dst_plane, dst_row = _ptr(y), OH * y_row, y_row
    args = (_ptr(offs), _ptr(vals), _ptr(xq), row, dst, dst_plane, dst_row, n_i, L, band)
    rows = _row_strides(residual, (B, OC, OH, OW)) if residual is not None else (0, 0)
    fused = (
        (residual is not None or relu)
        and batch_last
        and y_row == OW * B
        and rows is not None
        and (row_spans or residual is None or rows[1] == y_row)
    )
    epilogue = (_ptr(residual), *rows, relu) if fused else (None, 0, 0, False)
    _spmm(lib, index, False, 0, OC, *args, _ptr(b) if batch_last else None, nt, epilogue=epilogue)
    geom = (B, C, H, W, OH, OW, Hq, Wq, pt, pl)
    out = _result(index, y, planes, out_border, b, batch_last, geom, y_row, x.dim() == 2)
    if not fused and residual is not None:  # in place where the sum keeps the result's shape and dtype
        keeps = out.shape == torch.broadcast_shapes(out.shape, residual.shape)
        out = (
            out.add_(residual) if keeps and out.dtype == torch.result_type(out, residual) else out + residual
        )
    if not fused and relu:
        out = out.relu_()
    return out, xq, geom


def _row_strides(t: Tensor, shape: tuple[int, int, int, int]) -> tuple[int, int] | None:
    """(channel, row) strides of ``t`` when it has ``shape`` and rows of (W, B) contiguous as batch-last
    results have them (the kernels' epilogue reads it so), else None."""
    B, C, H, W = shape
    if tuple(t.shape) != shape or t.dtype != torch.float32 or t.device.type != "cpu":
        return None
    sb, sc, sh, sw = t.stride()
    if (B > 1 and sb != 1) or (W > 1 and sw != B):
        return None
    return sc, sh


def _result(index, y, planes, out_border, b, batch_last, geom, y_row, flat=False):  # noqa: ANN001, ANN202
    """The layer's result from what the kernel wrote: the interior of zero-bordered planes, a batch-last
    buffer, or (transposed into) an NCHW one (``flat``: (B, OC), a linear layer's result)."""
    lib = _lib()
    B, C, H, W, OH, OW, Hq, Wq, pt, pl = geom
    OC = index.out_channels
    if planes is not None:
        bt, bb, bl, br = out_border
        Hb, Wb = OH + bt + bb, OW + bl + br
        start = (bt * Wb + bl) * B
        shape, strides = (B, OC, OH, OW), (1, Hb * Wb * B, Wb * B, B)
        return torch.empty(0, dtype=torch.float32).set_(planes.untyped_storage(), start, shape, strides)
    if batch_last:
        if y_row != OW * B:  # drop the columns past OW
            out = index.buffers.take("out_bl", (OC, OH, OW * B))
            out.view(OC, OH, OW, B).copy_(y.view(OC, OH, Wq, B)[:, :, :OW])
            y = out
        return _as_batch_last(y, (B, OC) if flat else (B, OC, OH, OW))
    out = index.buffers.take("out", (B, OC) if flat else (B, OC, OH, OW))
    lib.er_unpack_out(_ptr(y), _ptr(b), _ptr(out), B, OC, OH, OW, y_row, torch.get_num_threads())
    return out


def conv2d_values(
    x: Tensor,
    values: Tensor,
    bias: Tensor | None,
    index: SparseIndex,
    pad: tuple[int, ...],
    batch_last: bool = False,
    out_border: tuple[int, int, int, int] | None = None,
    residual: Tensor | None = None,
    relu: bool = False,
) -> Tensor:
    """Inference: the convolution of (B, C, H, W) ``x`` with the active ``values`` (forward order of ``index``).

    No autograd graph is recorded (export modules use it under ``torch.inference_mode`` or ``no_grad``). With
    ``batch_last`` the result lies in memory as (C, H, W, B) (see :func:`is_batch_last`); its values are the same.
    ``relu(result + residual)`` (either part optional) is computed as the kernel stores each result where it can
    (batch-last results), else after it; ``residual`` is read, never written.
    """
    args = (bias, index, pad, batch_last, out_border, True, residual, relu)
    return _forward(x.detach(), values.detach(), *args)[0]


class _SparseConv(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        x: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        index: SparseIndex,
        pad: tuple[int, ...],
        batch_last: bool = False,
    ):
        vals = index.values(weight)
        out, xq, geom = _forward(x, vals, bias, index, pad, batch_last)
        ctx.save_for_backward(xq, weight, vals)
        ctx.index = index
        ctx.geom = geom
        ctx.flat = x.dim() == 2
        ctx.has_bias = bias is not None
        # the input gradient is returned in the input's layout: a batch-last input came from a layer (or an
        # activation of one) that computes batch-last, and its backward then reads rows instead of transposes
        ctx.grad_batch_last = x.shape[0] > 1 and (is_batch_last(x) or _flat_batch_last(x))
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        lib = _lib()
        nt = torch.get_num_threads()
        xq, weight, vals = ctx.saved_tensors
        index: SparseIndex = ctx.index
        B, C, H, W, OH, OW, Hq, Wq, pt, pl = ctx.geom
        sh, sw = index.stride
        OC, P, mh, mw = index.out_channels, index.phases, index.mh, index.mw
        g = grad_out if grad_out.dtype == torch.float32 else grad_out.float()
        gh, gw = OH + 2 * mh, OW + 2 * mw
        gq = _temp("gq", (OC, gh, gw, B))
        _pack(lib, g, gq, (B, OC, OH, OW, 1, 1, mh, mw, gh, gw), nt)
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0] and H * W == 1 and Hq * Wq == 1 and P == 1 and C * B <= _SCATTER_FLOATS:
            # a linear layer whose input gradient fits in L2: accumulate it in the forward order (no gather of
            # the values into input order, no second index), with the weight gradient in the same pass
            gxq = _temp("gxq", (C, B))
            part = _temp("gx_part", (max(nt - 1, 1), C * B))
            weight_grad = (None, None, None)
            if ctx.needs_input_grad[1]:
                grad_w = index.grad_buffer(weight)
                weight_grad = (_ptr(xq), _ptr(grad_w), _ptr(index._flat32))
            lib.er_spmm_scatter(
                OC,
                _ptr(index.row_ptr),
                _ptr(index.offsets(False, B, B, B)),
                _ptr(vals),
                _ptr(gq),
                B,
                B,
                _ptr(gxq),
                _ptr(part),
                C * B,
                *weight_grad,
                nt,
            )
            grad_x = _unpack_grad(lib, ctx, gxq)
        elif ctx.needs_input_grad[0]:
            vals_t = index.transposed_values(vals)
            offs_t = index.offsets(True, gh * gw * B, gw * B, B)
            gxq = _temp("gxq", (P, C, Hq, Wq, B))
            band = _band(OC, gw * B, mh)
            # per phase plane, only the cells that hold an input pixel (the rest are padding, never read back)
            for p in range(P):
                ph, pw = divmod(p, sw)
                i0, i1 = _pixel_range(ph, pt, sh, H, Hq)
                j0, j1 = _pixel_range(pw, pl, sw, W, Wq)
                if i1 <= i0 or j1 <= j0:
                    continue
                start = i0 * gw * B + j0 * B
                _spmm(
                    lib,
                    index,
                    True,
                    p,
                    C,
                    _ptr(offs_t),
                    _ptr(vals_t),
                    _ptr(gq) + 4 * start,
                    gw * B,
                    _ptr(gxq) + 4 * (p * C * Hq * Wq * B + i0 * Wq * B + j0 * B),
                    Hq * Wq * B,
                    Wq * B,
                    i1 - i0,
                    (j1 - j0) * B,
                    band,
                    None,
                    nt,
                )
            grad_x = _unpack_grad(lib, ctx, gxq)
        if ctx.needs_input_grad[1] and grad_w is None:
            offs = index.offsets(False, Hq * Wq * B, Wq * B, B)
            grad_w = index.grad_buffer(weight)
            band = _band(P * C, Wq * B, mh)
            if 4 * weight.numel() > _GRAD_PASS_BYTES:
                # every band is one pass of read-modify-writes over the dense gradient; past L2 those cost more
                # than the band's input locality saves (conv 512x512x3x3 @4x4: 4.4 -> 3.1 ms)
                band = OH
            dy = gq[:, mh:, mw:]  # a view: the kernel reads rows of stride gw*B from its first element
            lib.er_sddmm(
                OC,
                _ptr(index.row_ptr),
                _ptr(offs),
                _ptr(dy),
                gh * gw * B,
                gw * B,
                _ptr(xq),
                Wq * B,
                OH,
                OW * B,
                band,
                _ptr(grad_w),
                _ptr(index._flat32),
                nt,
            )
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = g.sum(dim=0) if ctx.flat else g.sum(dim=(0, 2, 3))
        return grad_x, grad_w, grad_b, None, None, None


def _unpack_grad(lib, ctx, gxq: Tensor) -> Tensor:  # noqa: ANN001
    """The input gradient from its phase planes ``gxq``, in the layout the input had (NCHW or batch-last)."""
    index: SparseIndex = ctx.index
    B, C, H, W, _, _, Hq, Wq, pt, pl = ctx.geom
    sh, sw = index.stride
    args = (B, C, H, W, sh, sw, pt, pl, Hq, Wq, torch.get_num_threads())
    if ctx.grad_batch_last:
        grad_x = index.buffers.take("grad_x_bl", (C, H, W, B))
        lib.er_unpack_grad_bl(_ptr(gxq), _ptr(grad_x), *args)
        return grad_x.view(C, B).t() if ctx.flat else grad_x.permute(3, 0, 1, 2)
    grad_x = index.buffers.take("grad_x", (B, C) if ctx.flat else (B, C, H, W))
    lib.er_unpack_grad(_ptr(gxq), _ptr(grad_x), *args)
    return grad_x


class _BatchNormBatchLast(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, factor, eps):  # noqa: ANN001
        B, C, H, W = x.shape
        xc = x.permute(1, 2, 3, 0)  # contiguous: batch-last
        y = torch.empty((C, H, W, B), dtype=torch.float32)
        mean, invstd = torch.empty(C), torch.empty(C)
        _lib().er_bn_train(
            _ptr(xc),
            _ptr(y),
            C,
            B * H * W,
            _ptr(weight),
            _ptr(bias),
            eps,
            factor,
            _ptr(running_mean),
            _ptr(running_var),
            _ptr(mean),
            _ptr(invstd),
            torch.get_num_threads(),
        )
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.eps = eps
        return batch_last_view(y)

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, weight, mean, invstd = ctx.saved_tensors
        B, C, H, W = x.shape
        need = ctx.needs_input_grad
        g = grad.permute(1, 2, 3, 0).reshape(1, C, B * H * W, 1)  # a copy only when grad is not batch-last
        gx, gw, gb = torch.ops.aten.native_batch_norm_backward(
            g,
            x.permute(1, 2, 3, 0).reshape(1, C, B * H * W, 1),
            weight,
            None,
            None,
            mean,
            invstd,
            True,
            ctx.eps,
            [need[0], weight is not None and need[1], need[2]],
        )
        if gx is not None:
            gx = gx.view(C, H, W, B).permute(3, 0, 1, 2)
        return gx, gw, gb, None, None, None, None


def batch_norm_batch_last(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    factor: float,
    eps: float,
) -> Tensor | None:
    """``F.batch_norm(x, running_mean, running_var, weight, bias, training=True, factor, eps)`` of a batch-last
    float32 CPU ``x`` with more than one sample (a batch-last result), or None where the kernel does not apply.

    Each channel's values lie contiguously in a batch-last tensor: the statistics, the normalisation and the
    running-statistics update are one pass of the kernel per channel (torch's batch_norm on this layout, or on
    the same memory seen as a (1, C, H*W*B, 1) batch, is 1.5-2x slower); the backward pass is torch's own
    ``native_batch_norm_backward`` on that (1, C, H*W*B, 1) view."""
    tensors = [t for t in (weight, bias, running_mean, running_var) if t is not None]
    if (
        x.dim() != 4
        or x.shape[0] < 2
        or not is_batch_last(x)
        or (running_mean is None) != (running_var is None)
        or any(
            t.dtype != torch.float32 or t.device.type != "cpu" or not t.is_contiguous()
            for t in [x.permute(1, 2, 3, 0), *tensors]
        )
        or build_error() is not None
    ):
        return None
    return _BatchNormBatchLast.apply(x, weight, bias, running_mean, running_var, float(factor), float(eps))


def sparse_conv2d(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    index: SparseIndex,
    padding: str | int | Sequence[int] = 0,
    batch_last: bool = False,
) -> Tensor:
    """``F.conv2d(x, weight, bias, index.stride, padding, index.dilation)`` over the active weights of ``index``.

    ``weight`` must be zero where the mask is off for the result to equal the dense convolution (the masking
    callbacks keep it so); only its active entries are read, and its gradient is nonzero only there.

    Args:
        x: (B, C, H, W) or unbatched (C, H, W) float32 CPU input.
        weight: (OC, C, KH, KW) weight of the mask's shape.
        bias: optional (OC,) bias.
        index: the layer's :class:`SparseIndex` (built with this convolution's stride and dilation).
        padding: as ``nn.Conv2d`` takes it (int, pair, ``"same"``, ``"valid"``); zero padding only.
        batch_last: return the result in the kernels' own (C, H, W, B) memory layout (see :func:`is_batch_last`;
            same values and shape), which the next sparse layer reads without a transpose. Only for results that
            reach nothing but layout-agnostic operations (``SparseComputeRouter`` plans where that holds).
    """
    if tuple(weight.shape) != index.shape:
        raise ValueError(f"weight has shape {tuple(weight.shape)}, the index was built for {index.shape}")
    pad = conv_padding(padding, index.kernel, index.dilation)
    if x.dim() == 3:
        return _SparseConv.apply(x.unsqueeze(0), weight, bias, index, pad).squeeze(0)
    return _SparseConv.apply(x, weight, bias, index, pad, batch_last)


def sparse_linear(
    x: Tensor, weight: Tensor, bias: Tensor | None, index: SparseIndex, batch_last: bool = False
) -> Tensor:
    """``F.linear(x, weight, bias)`` over the active weights of ``index``; ``x`` may have any leading dims.

    With ``batch_last`` the result lies in memory as (OUT, N) for its N rows (the kernels' layout; same values), which
    the next sparse linear layer reads with row copies instead of a transpose; any input layout is read."""
    if tuple(weight.shape) != index.shape:
        raise ValueError(f"weight has shape {tuple(weight.shape)}, the index was built for {index.shape}")
    # a linear layer is a 1x1 convolution of 1x1 maps: (N, IN) is computed as (N, IN, 1, 1) without a view (and
    # without the view's backward node)
    if x.dim() == 2:
        return _SparseConv.apply(x, weight, bias, index, (0, 0, 0, 0), batch_last)
    y = _SparseConv.apply(x.reshape(-1, x.shape[-1]), weight, bias, index, (0, 0, 0, 0), batch_last)
    return y.reshape(*x.shape[:-1], weight.shape[0])
