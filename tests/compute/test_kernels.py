"""Every sparse kernel against its dense reference: same inputs, same outputs and gradients to float32 round-off."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from er_lightning.compute import (
    SparseIndex,
    build_error,
    conv_padding,
    kernels_available,
    sparse_conv2d,
    sparse_linear,
    supports,
)
from er_lightning.compute.functional import (
    _MIN_SPAN,
    conv2d_values,
    is_batch_last,
    max_pool2d_batch_last,
    to_batch_last,
    to_contiguous,
)

pytestmark = pytest.mark.skipif(
    not kernels_available(), reason=f"sparse kernels unavailable: {build_error()}"
)

# (batch, in, out, H, W, kernel, stride, padding, dilation): batch 1 and 7, odd sizes, stride 2 and 3,
# padding 0 / 2 / "same", dilation 2, non-square kernels, a 1x1 shortcut, batches past the 16-wide blocks,
# input pixels no output reads.
CONV_CASES = [
    (1, 3, 5, 7, 7, (3, 3), 1, 1, 1),
    (7, 4, 6, 9, 8, (3, 3), 2, 1, 1),
    (32, 8, 8, 8, 8, (3, 3), 1, 1, 1),
    (2, 3, 4, 10, 11, (2, 5), (2, 1), (0, 2), (2, 1)),
    (3, 5, 2, 6, 6, (1, 1), 2, 0, 1),
    (4, 3, 3, 12, 12, (3, 3), 1, "same", 1),
    (5, 2, 3, 9, 9, (4, 4), 1, "same", 2),
    (1, 16, 16, 4, 4, (3, 3), 1, 1, 1),
    (32, 4, 4, 32, 32, (3, 3), 2, 1, 1),
    (16, 3, 5, 20, 19, (3, 3), 1, 1, 1),
    (33, 2, 2, 17, 17, (3, 3), 2, 1, 1),
    (48, 3, 3, 16, 33, (1, 3), (1, 2), (0, 1), 1),
    (2, 3, 4, 9, 9, (3, 3), 3, 2, 1),
    (1, 2, 3, 5, 5, (5, 5), 1, 0, 1),
    (3, 2, 3, 10, 10, (3, 3), 3, 0, 1),  # the last input row and column reach no output
]


def _masked_conv(cin, cout, kernel, stride, padding, dilation, density, bias=True, seed=0):
    torch.manual_seed(seed)
    conv = torch.nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, dilation=dilation, bias=bias)
    mask = torch.rand_like(conv.weight) < density
    with torch.no_grad():
        conv.weight.mul_(mask)
    return conv, mask


@pytest.mark.parametrize("case", CONV_CASES, ids=[str(c) for c in CONV_CASES])
def test_conv_forward_and_gradients_match_dense(case):
    b, cin, cout, h, w, kernel, stride, padding, dilation = case
    conv, mask = _masked_conv(cin, cout, kernel, stride, padding, dilation, 0.3)
    index = SparseIndex(mask, stride=conv.stride, dilation=conv.dilation)
    x = torch.randn(b, cin, h, w, requires_grad=True)
    y = sparse_conv2d(x, conv.weight, conv.bias, index, padding=conv.padding)
    ref = F.conv2d(x, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation)
    assert y.shape == ref.shape
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(ref)
    gx, gw, gb = torch.autograd.grad(y, [x, conv.weight, conv.bias], g)
    rx, rw, rb = torch.autograd.grad(ref, [x, conv.weight, conv.bias], g)
    torch.testing.assert_close(gx, rx, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gw, rw * mask, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(gb, rb, rtol=1e-5, atol=1e-4)
    assert int((gw[~mask] != 0).sum()) == 0  # weight gradient only at active positions


@pytest.mark.parametrize("case", CONV_CASES, ids=[str(c) for c in CONV_CASES])
def test_batch_last_training_layout_in_out_and_gradients(case):
    # the router's layout plan: a batch-last input and batch_last=True give a batch-last result, and the input
    # gradient comes back batch-last too (er_unpack_grad_bl), all equal to the dense convolution's
    b, cin, cout, h, w, kernel, stride, padding, dilation = case
    conv, mask = _masked_conv(cin, cout, kernel, stride, padding, dilation, 0.3)
    index = SparseIndex(mask, stride=conv.stride, dilation=conv.dilation)
    take = index.buffers.take

    def garbage(slot, shape, slack=0, zero=False):  # every cell a kernel leaves unwritten reads NaN
        out = take(slot, shape, slack, zero)
        return out if zero else out.fill_(float("nan"))

    index.buffers.take = garbage
    x = to_batch_last(torch.randn(b, cin, h, w)).requires_grad_(True)
    y = sparse_conv2d(x, conv.weight, conv.bias, index, padding=conv.padding, batch_last=True)
    ref = F.conv2d(x, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation)
    assert is_batch_last(y) and y.shape == ref.shape
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    g = to_batch_last(torch.randn_like(ref))
    gx, gw, gb = torch.autograd.grad(y, [x, conv.weight, conv.bias], g)
    rx, rw, rb = torch.autograd.grad(ref, [x, conv.weight, conv.bias], g)
    assert is_batch_last(gx) and (b == 1 or not gx.is_contiguous())
    torch.testing.assert_close(gx, rx, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gw, rw * mask, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(gb, rb, rtol=1e-5, atol=1e-4)
    # an NCHW input keeps an NCHW input gradient, whatever the result's layout
    xn = torch.randn(b, cin, h, w, requires_grad=True)
    (gxn,) = torch.autograd.grad(
        sparse_conv2d(xn, conv.weight, None, index, conv.padding, batch_last=True), xn, g
    )
    assert gxn.is_contiguous()
    torch.testing.assert_close(
        gxn,
        torch.autograd.grad(F.conv2d(xn, conv.weight, None, conv.stride, conv.padding, conv.dilation), xn, g)[
            0
        ],
        rtol=1e-5,
        atol=1e-5,
    )


@pytest.mark.parametrize("case", CONV_CASES, ids=[str(c) for c in CONV_CASES])
def test_fused_residual_and_relu_epilogue(case):
    # relu(conv(x) + r) as the kernel stores each result, for residuals in the batch-last layout, in the strided
    # interior of padded planes, and in NCHW (not fusable: added afterwards); NaN passes the ReLU as in torch
    b, cin, cout, h, w, kernel, stride, padding, dilation = case
    conv, mask = _masked_conv(cin, cout, kernel, stride, padding, dilation, 0.3)
    conv.weight.data[:, :, 0, 0] = 0.0  # (some output rows may have no weight at all)
    mask = conv.weight != 0
    index = SparseIndex(mask, stride=conv.stride, dilation=conv.dilation)
    pad = conv_padding(conv.padding, conv.kernel_size, conv.dilation)
    values = conv.weight.detach().reshape(-1)[index.flat_index]
    x = torch.randn(b, cin, h, w)
    with torch.no_grad():
        y = F.conv2d(x, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation)
    r = torch.randn_like(y)
    r[0, 0, 0, 0] = float("nan")
    padded = torch.zeros(y.shape[1], y.shape[2] + 2, y.shape[3] + 2, b)
    padded[:, 1:-1, 1:-1] = r.permute(1, 2, 3, 0)
    interior = padded[:, 1:-1, 1:-1].permute(3, 0, 1, 2)
    for res in (to_batch_last(r), interior, r):
        for relu in (False, True):
            for batch_last in (True, False):
                got = conv2d_values(x, values, conv.bias, index, pad, batch_last, residual=res, relu=relu)
                want = torch.relu(y + r) if relu else y + r
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, equal_nan=True)
    got = conv2d_values(x, values, conv.bias, index, pad, True, relu=True)
    torch.testing.assert_close(got, torch.relu(y), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(r[1:], to_batch_last(r)[1:])  # residuals are read, not written


def test_conv_density_extremes_and_empty_rows():
    # a mask with whole output channels and input planes empty, and a fully dense one
    for density in (0.02, 1.0):
        conv, mask = _masked_conv(6, 5, (3, 3), 1, 1, 1, density, seed=3)
        mask[0] = False
        with torch.no_grad():
            conv.weight.mul_(mask)
        index = SparseIndex(mask)
        x = torch.randn(3, 6, 8, 8, requires_grad=True)
        y = sparse_conv2d(x, conv.weight, conv.bias, index, padding=1)
        torch.testing.assert_close(y, conv(x), rtol=1e-5, atol=1e-5)
        (gx,) = torch.autograd.grad(y.sum(), [x])
        (rx,) = torch.autograd.grad(conv(x).sum(), [x])
        torch.testing.assert_close(gx, rx, rtol=1e-5, atol=1e-5)


# leading dims; widths below, at and past the 16x16 transpose tiles of the linear layout; an input gradient too
# large for the forward-order accumulation (the transposed path)
LINEAR_CASES = [
    ((1,), 13, 7),
    ((7,), 13, 7),
    ((2, 5), 13, 7),
    ((3, 1, 4), 13, 7),
    ((35,), 40, 24),
    ((64,), 48, 33),
    ((16,), 16, 16),
    ((100,), 2048, 8),
]


@pytest.mark.parametrize("lead,fan_in,fan_out", LINEAR_CASES)
def test_linear_matches_dense_with_any_leading_dims(lead, fan_in, fan_out):
    torch.manual_seed(1)
    lin = torch.nn.Linear(fan_in, fan_out)
    mask = torch.rand_like(lin.weight) < 0.4
    with torch.no_grad():
        lin.weight.mul_(mask)
    index = SparseIndex(mask)
    x = torch.randn(*lead, fan_in, requires_grad=True)
    y = sparse_linear(x, lin.weight, lin.bias, index)
    torch.testing.assert_close(y, lin(x), rtol=1e-5, atol=1e-5)
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, [x, lin.weight, lin.bias], g)
    ref = torch.autograd.grad(lin(x), [x, lin.weight, lin.bias], g)
    torch.testing.assert_close(got[0], ref[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[1], ref[1] * mask, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[2], ref[2], rtol=1e-5, atol=1e-5)


def test_reused_buffers_never_overwrite_memory_still_in_use():
    """Outputs, packed inputs and input gradients come from per-layer buffers reused across steps: only once
    nothing refers to them any more. A held output, a layer applied twice in one graph and a retained graph all
    keep their values; a dropped output's memory is handed out again (the reuse is real)."""
    conv, mask = _masked_conv(5, 5, (3, 3), 1, 1, 1, 0.4, seed=4)
    index = SparseIndex(mask)
    x1, x2 = torch.randn(3, 5, 8, 8), torch.randn(3, 5, 8, 8)
    y1 = sparse_conv2d(x1, conv.weight, conv.bias, index, padding=1)
    ref1 = y1.clone()
    y2 = sparse_conv2d(x2, conv.weight, conv.bias, index, padding=1)
    assert y1.data_ptr() != y2.data_ptr()
    torch.testing.assert_close(y1, ref1, rtol=0, atol=0)
    torch.testing.assert_close(y2, conv(x2), rtol=1e-5, atol=1e-5)
    del y1, y2
    y3 = sparse_conv2d(x1, conv.weight, conv.bias, index, padding=1)
    kept = {st.data_ptr() for st in index.buffers._slots["out"]}
    assert y3.data_ptr() in kept
    torch.testing.assert_close(y3, ref1, rtol=0, atol=0)

    # the same layer twice in one graph, and a retained graph run backward twice
    x = torch.randn(2, 5, 7, 7, requires_grad=True)
    z = sparse_conv2d(
        torch.relu(sparse_conv2d(x, conv.weight, conv.bias, index, padding=1)),
        conv.weight,
        conv.bias,
        index,
        padding=1,
    )
    ref = conv(torch.relu(conv(x)))
    torch.testing.assert_close(z, ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(z)
    got = torch.autograd.grad(z, [x, conv.weight], g, retain_graph=True)
    again = torch.autograd.grad(z, [x, conv.weight], g)
    want = torch.autograd.grad(ref, [x, conv.weight], g)
    for a, b, r in zip(got, again, (want[0], want[1] * mask)):
        torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(b, r, rtol=1e-4, atol=1e-5)


def test_gradient_buffer_reuse_accumulates_correctly():
    """Two backward passes without zeroing accumulate (p.grad lives in the reused storage the second time)."""
    conv, mask = _masked_conv(4, 4, (3, 3), 1, 1, 1, 0.5, seed=2)
    index = SparseIndex(mask)
    x = torch.randn(2, 4, 6, 6)
    ref = torch.autograd.grad(conv(x).sum(), [conv.weight])[0] * mask
    for _ in range(2):
        sparse_conv2d(x, conv.weight, conv.bias, index, padding=1).sum().backward()
    torch.testing.assert_close(conv.weight.grad, 2 * ref, rtol=1e-5, atol=1e-5)
    grad_before = conv.weight.grad.clone()
    conv.weight.grad = None  # zero_grad(set_to_none=True): the next step reuses the storage
    sparse_conv2d(x, conv.weight, conv.bias, index, padding=1).sum().backward()
    torch.testing.assert_close(conv.weight.grad, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad_before, 2 * conv.weight.grad)


def test_index_rejects_wrong_shapes_and_supports_reports_why():
    with pytest.raises(ValueError, match="2-D .* or 4-D"):
        SparseIndex(torch.ones(3, dtype=torch.bool))
    conv, mask = _masked_conv(2, 2, (3, 3), 1, 1, 1, 0.5)
    with pytest.raises(ValueError, match="index was built for"):
        sparse_conv2d(torch.randn(1, 2, 5, 5), torch.zeros(2, 2, 1, 1), None, SparseIndex(mask))
    assert "float32" in supports(torch.randn(2, 2, dtype=torch.float64), torch.randn(2, 2))
    assert supports(torch.randn(2, 2), torch.randn(2, 2)) is None
    # sizes past the 32-bit offsets, from the input or from a widening layer's output (expanded: no memory)
    big = torch.zeros(()).expand(64, 64, 256, 256)  # 2**28 elements
    assert "32-bit" in supports(big, torch.zeros(8, 64, 3, 3))
    wide_in = torch.zeros(()).expand(64, 8, 256, 256)  # 2**25 elements, 32x wider output
    assert supports(wide_in, torch.zeros(8, 8, 3, 3)) is None
    assert "32-bit" in supports(wide_in, torch.zeros(256, 8, 3, 3))
    assert "32-bit" in supports(wide_in, torch.zeros(10), out_channels=256)


@pytest.mark.parametrize("case", CONV_CASES, ids=[str(c) for c in CONV_CASES])
def test_batch_last_inference_layout_in_and_out(case):
    """The inference path in the kernels' own layout: batch-last results, batch-last inputs packed by row copies,
    and the conversions back, all equal to F.conv2d."""
    b, cin, cout, h, w, kernel, stride, padding, dilation = case
    conv, mask = _masked_conv(cin, cout, kernel, stride, padding, dilation, 0.3)
    index = SparseIndex(mask, stride=conv.stride, dilation=conv.dilation)
    values = conv.weight.detach().reshape(-1)[index.flat_index]
    pad = conv_padding(conv.padding, conv.kernel_size, conv.dilation)
    x = torch.randn(b, cin, h, w)
    with torch.no_grad():
        ref = conv(x)
        y = conv2d_values(x, values, conv.bias, index, pad, batch_last=True)
        assert is_batch_last(y) and y.shape == ref.shape
        torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
        xb = to_batch_last(x)
        assert is_batch_last(xb) and (b == 1 or not xb.is_contiguous())
        torch.testing.assert_close(xb, x, rtol=0, atol=0)
        torch.testing.assert_close(
            conv2d_values(xb, values, conv.bias, index, pad), ref, rtol=1e-5, atol=1e-5
        )
        back = to_contiguous(y)
        assert back.is_contiguous()
        torch.testing.assert_close(back, y, rtol=0, atol=0)
        # the batch-last result stays valid while the next call computes (it lives in the layer's own buffers)
        keep = y.clone()
        conv2d_values(torch.randn_like(x), values, conv.bias, index, pad, batch_last=True)
        torch.testing.assert_close(y, keep, rtol=0, atol=0)


def test_batch_last_max_pool_equals_max_pool2d_with_nan():
    x = torch.randn(5, 3, 9, 8)
    x[1, 2, 4, 4] = float("nan")
    for window in ((2, 2), (3, 2), (1, 4)):
        got = max_pool2d_batch_last(to_batch_last(x), window)
        want = torch.nn.functional.max_pool2d(x, window)
        assert is_batch_last(got) and got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)
    assert bool(torch.isnan(max_pool2d_batch_last(to_batch_last(x), (2, 2))[1, 2, 2, 2]))


@pytest.mark.parametrize("batch", [5, 20, 32])  # the scalar tail, a vector and a tail, two vectors
def test_batch_last_max_pool_gradient_goes_where_max_pool2d_sends_it(batch):
    # ties (small integers), NaN and -inf: the gradient goes to the first maximum of each window, the last NaN
    g = torch.Generator().manual_seed(batch)
    x = torch.randint(0, 3, (batch, 3, 9, 11), generator=g).float()
    x[1, 2, 4, 4] = x[1, 2, 5, 5] = float("nan")
    x[2, 0, :2, :2] = float("-inf")
    for window in ((2, 2), (3, 2), (1, 4), (3, 3)):
        xa = x.clone().requires_grad_(True)
        xb = to_batch_last(x).requires_grad_(True)
        want = torch.nn.functional.max_pool2d(xa, window)
        got = max_pool2d_batch_last(xb, window)
        grad = torch.randn(want.shape, generator=g)
        (ga,) = torch.autograd.grad(want, xa, grad)
        (gb,) = torch.autograd.grad(got, xb, to_batch_last(grad))
        assert is_batch_last(gb)
        torch.testing.assert_close(gb, ga, rtol=0, atol=0)  # rows and columns no window covers: 0


@pytest.mark.parametrize(
    "case",
    [
        (32, 128, 128, 8, 1, 0.2),
        (7, 128, 96, 40, 1, 0.2),
        (32, 64, 64, 9, 1, 0.25),
        (16, 128, 128, 36, 2, 0.2),
    ],
)
def test_blocked_kernel_on_layers_with_many_weights_per_row(case):
    """Layers wide and dense enough for the plane-blocked kernel (forward of stride-1 layers, input gradient of
    all) over spans of at least _MIN_SPAN floats, whole tiles and spans that end in a partial tile."""
    b, cin, cout, hw, stride, density = case
    conv, mask = _masked_conv(cin, cout, (3, 3), stride, 1, 1, density, seed=b)
    index = SparseIndex(mask, stride=conv.stride, dilation=conv.dilation)
    assert index.block_size(True) > 0
    assert (index.block_size(False) > 0) == (stride == 1)
    x = torch.randn(b, cin, hw, hw, requires_grad=True)
    y = sparse_conv2d(x, conv.weight, conv.bias, index, padding=1)
    ref = F.conv2d(x, conv.weight, conv.bias, conv.stride, 1)
    assert min(ref.shape[3], (hw + 1) // stride) * b >= _MIN_SPAN  # the spans take the blocked kernel
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4)
    g = torch.randn_like(ref)
    gx, gw = torch.autograd.grad(y, [x, conv.weight], g)
    rx, rw = torch.autograd.grad(ref, [x, conv.weight], g)
    torch.testing.assert_close(gx, rx, rtol=1e-4, atol=1e-4)
    # weight gradients are sums over batch x map (up to 11k products): round-off relative to their scale
    torch.testing.assert_close(gw, rw * mask, rtol=1e-4, atol=1e-5 * float(rw.abs().max()))
    if stride == 1:  # the fused epilogue goes with the last block's pass
        values = conv.weight.detach().reshape(-1)[index.flat_index]
        r = torch.randn_like(ref)
        got = conv2d_values(
            x, values, conv.bias, index, (1, 1, 1, 1), True, residual=to_batch_last(r), relu=True
        )
        torch.testing.assert_close(got, torch.relu(ref + r), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("batch", [32, 7])
def test_results_written_into_the_next_layers_padded_planes_are_read_in_place(batch):
    """A layer with out_border writes its batch-last result into zero-bordered planes; the next stride-1 layer
    with that padding reads them without packing, and packs as usual once the border is no longer zero."""
    from er_lightning.compute.functional import _lib, _packed_in_place

    a, mask_a = _masked_conv(6, 8, (3, 3), 1, 1, 1, 0.4, seed=5)
    b, mask_b = _masked_conv(8, 5, (3, 3), 1, 1, 1, 0.4, seed=6)
    ia, ib = SparseIndex(mask_a), SparseIndex(mask_b)
    va, vb = (c.weight.detach().reshape(-1)[i.flat_index] for c, i in ((a, ia), (b, ib)))
    x = torch.randn(batch, 6, 9, 9)
    with torch.no_grad():
        ya = conv2d_values(x, va, a.bias, ia, (1, 1, 1, 1), batch_last=True, out_border=(1, 1, 1, 1))
        torch.testing.assert_close(ya, a(x), rtol=1e-5, atol=1e-5)
        assert _packed_in_place(_lib(), ya, (1, 1, 1, 1), 11, 11) is not None
        assert _packed_in_place(_lib(), ya, (2, 0, 1, 1), 11, 11) is None  # another padding: packed as usual
        ref = b(ya)
        torch.testing.assert_close(conv2d_values(ya, vb, b.bias, ib, (1, 1, 1, 1)), ref, rtol=1e-5, atol=1e-5)
        # a nonzero border cell (written through the storage) is caught: the layer packs and stays correct
        planes = torch.empty(0).set_(ya.untyped_storage(), 0, (8, 11, 11, batch))
        planes[3, 0, 5, 0] = 1.0
        assert _packed_in_place(_lib(), ya, (1, 1, 1, 1), 11, 11) is None
        torch.testing.assert_close(conv2d_values(ya, vb, b.bias, ib, (1, 1, 1, 1)), ref, rtol=1e-5, atol=1e-5)


DENSE_ROW_CASES = [
    *CONV_CASES,
    (
        32,
        5,
        13,
        9,
        9,
        (3, 3),
        1,
        1,
        1,
    ),  # two blocks of 6 rows and one row past them; 4 tiles of 64 and a tail
    (32, 16, 12, 16, 16, (1, 1), 2, 0, 1),  # a ResNet shortcut: stride 2, 1x1, 256-float spans
    (7, 3, 6, 32, 32, (3, 3), 1, 1, 1),  # a stem: spans of 224 floats
]


@pytest.mark.parametrize("case", DENSE_ROW_CASES, ids=[str(c) for c in DENSE_ROW_CASES])
def test_layers_with_every_weight_active_take_the_row_blocked_kernel(case, monkeypatch):
    """A full mask (every row the same offsets) computes with er_dense_rows: forward in both layouts, with the
    fused residual and ReLU, and as a training layer (whose gradients take the sparse kernels)."""
    from er_lightning.compute import functional

    b, cin, cout, h, w, kernel, stride, padding, dilation = case
    conv, _ = _masked_conv(cin, cout, kernel, stride, padding, dilation, 2.0)  # density 2: nothing masked
    mask = torch.ones_like(conv.weight, dtype=torch.bool)
    index = SparseIndex(mask, stride=conv.stride, dilation=conv.dilation)
    assert index.dense_rows and not SparseIndex(conv.weight.abs() > 0.1, stride=conv.stride).dense_rows
    lib, calls = functional._lib(), []
    real = lib.er_dense_rows
    monkeypatch.setattr(lib, "er_dense_rows", lambda *a: calls.append(a[:2]) or real(*a))
    pad = conv_padding(conv.padding, conv.kernel_size, conv.dilation)
    values = conv.weight.detach().reshape(-1)
    x = torch.randn(b, cin, h, w, requires_grad=True)
    with torch.no_grad():
        y = F.conv2d(x, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation)
        r = torch.randn_like(y)
        for xin in (x.detach(), to_batch_last(x.detach())):
            for batch_last in (True, False):
                got = conv2d_values(xin, values, conv.bias, index, pad, batch_last)
                torch.testing.assert_close(got, y, rtol=1e-5, atol=1e-5)
            got = conv2d_values(
                xin, values, conv.bias, index, pad, True, residual=to_batch_last(r), relu=True
            )
            torch.testing.assert_close(got, torch.relu(y + r), rtol=1e-5, atol=1e-5)
    assert calls and all(c == (cout, cin * kernel[0] * kernel[1]) for c in calls)
    out = sparse_conv2d(x, conv.weight, conv.bias, index, padding=conv.padding)
    torch.testing.assert_close(out, y, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(y)
    gx, gw = torch.autograd.grad(out, [x, conv.weight], g)
    ref = F.conv2d(x, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation)
    rx, rw = torch.autograd.grad(ref, [x, conv.weight], g)
    torch.testing.assert_close(gx, rx, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(gw, rw, rtol=1e-4, atol=1e-5 * float(rw.abs().max()))
