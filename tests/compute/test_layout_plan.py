"""The router's layout plan: which convolutions hand results on batch-last, and that training is unchanged by it."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from er_lightning import StaticSparsity
from er_lightning.compute import kernels_available
from er_lightning.compute.functional import is_batch_last, to_batch_last
from er_lightning.masking import MaskedParams
from er_lightning.masking.compute import SparseComputeRouter, _batch_last_batchnorm
from tests.conftest import make_trainer

pytestmark = pytest.mark.skipif(not kernels_available(), reason="sparse kernels unavailable")


class ResNetBit(nn.Module):
    """A stem, one residual block with an identity shortcut, a stride-2 conv, pooling and a head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv0 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(8)
        self.conv1 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(8, momentum=None)
        self.down = nn.Conv2d(8, 12, 3, stride=2, padding=1)
        self.fc = nn.Linear(12, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn0(self.conv0(x)))
        y = F.relu(self.bn1(self.conv1(h)))
        h = F.relu(self.bn2(self.conv2(y)) + h)
        z = self.down(h)  # pooled next: its result must stay NCHW
        return self.fc(F.adaptive_avg_pool2d(F.relu(z), 1).flatten(1))


class VggBit(nn.Module):
    """conv-BN-ReLU-pool stages, a pooling whose window is not its stride, a flatten and a head."""

    def __init__(self) -> None:
        super().__init__()
        self.feature = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1, bias=False),
            nn.BatchNorm2d(8),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(8, 8, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(3, stride=1),  # overlapping windows: not the kernel's pooling
            nn.Conv2d(8, 6, 3, padding=1),
            nn.BatchNorm2d(6),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
        )
        self.fc = nn.Linear(6, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.feature(x).flatten(1))


class FlatView(nn.Module):
    """A conv whose activation is viewed flat: a view a batch-last tensor cannot take."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 8 * 8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv(x))
        return self.fc(h.view(-1).view(x.shape[0], -1))


class Wrap(pl.LightningModule):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x):  # noqa: ANN001, ANN201
        return self.net(x)

    def training_step(self, batch, batch_idx):  # noqa: ANN001, ANN201
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):  # noqa: ANN201
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)


def _router(net: nn.Module, density: float = 0.4) -> SparseComputeRouter:
    torch.manual_seed(1)
    params = dict(net.named_parameters())
    masks = {n: torch.rand_like(p) < density for n, p in params.items() if p.dim() > 1}
    masked = MaskedParams({n: params[n] for n in masks}, masks)
    masked.apply_()
    return SparseComputeRouter(net, masked, mode="sparse")


def test_plan_switches_exactly_the_convs_whose_results_stay_among_layout_free_ops():
    torch.manual_seed(0)
    net = ResNetBit()
    router = _router(net)
    # conv0 reaches conv1 and, through the residual addition, `down`; conv2 reaches `down`; `down` is pooled
    assert router.batch_last_layers == ["conv0.weight", "conv1.weight", "conv2.weight"]
    bns = {n for n, m in net.named_modules() if isinstance(m, nn.BatchNorm2d) and "forward" in m.__dict__}
    assert bns == {"bn0", "bn1", "bn2"}
    outs = {}
    for name in ("conv0", "conv1", "conv2", "down"):
        getattr(net, name).register_forward_hook(lambda m, a, o, name=name: outs.__setitem__(name, o))
    x = torch.randn(5, 3, 8, 8)
    for training in (True, False):
        net.train(training)
        net(x)
        assert {n: is_batch_last(o) and not o.is_contiguous() for n, o in outs.items()} == {
            "conv0": True,
            "conv1": True,
            "conv2": True,
            "down": False,
        }
    # outside the traced forward (a layer called on its own) results are NCHW again
    assert net.conv1(torch.randn(5, 8, 8, 8)).is_contiguous()
    router.remove()
    assert not any("forward" in m.__dict__ for m in net.modules())
    assert not net._forward_hooks and not net._forward_pre_hooks  # the scope's hooks
    net(x)
    assert not is_batch_last(outs["conv0"])


def test_plan_pools_in_the_kernels_layout_where_the_window_is_the_stride():
    torch.manual_seed(0)
    net = VggBit()
    router = _router(net)
    assert router.batch_last_layers == [
        "feature.0.weight"
    ]  # feature.4 reaches the 3/1 pooling, feature.7 the head
    routed = {
        n
        for n, m in net.named_modules()
        if not isinstance(m, (nn.Conv2d, nn.Linear)) and "forward" in m.__dict__
    }
    assert routed == {"feature.1", "feature.3"}
    seen = []
    net.feature[3].register_forward_hook(
        lambda m, a, o: seen.append(is_batch_last(o) and not o.is_contiguous())
    )
    net(torch.randn(4, 3, 8, 8))
    assert seen == [True]


def test_a_result_that_reaches_a_view_is_not_switched_and_trains():
    torch.manual_seed(0)
    net = FlatView()
    router = _router(net)
    assert router.batch_last_layers == []
    net(torch.randn(2, 3, 8, 8)).sum().backward()  # a batch-last result would fail the flat view


def _loader(batch_size: int) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(7 * 20, 3, 8, 8, generator=g)
    y = torch.randint(0, 10, (7 * 20,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=False)


@pytest.mark.parametrize("batch_size", [7, 32])
@pytest.mark.parametrize("make", [ResNetBit, VggBit])
def test_fit_with_the_plan_matches_dense_compute(tmp_path, batch_size, make):
    def fit(compute: str, layouts: list[bool]) -> Wrap:
        torch.manual_seed(0)
        module = Wrap(make())
        watched = module.net.conv1 if make is ResNetBit else module.net.feature[3]
        watched.register_forward_hook(lambda m, a, o: layouts.append(is_batch_last(o)))
        cb = StaticSparsity(density=0.4, distribution="erk", compute=compute)
        make_trainer(tmp_path / compute, [cb], max_steps=20).fit(module, _loader(batch_size))
        return module

    seen_dense: list[bool] = []
    seen_sparse: list[bool] = []
    dense, sparse = fit("dense", seen_dense), fit("sparse", seen_sparse)
    # the plan really ran in every training step (the first call is the callback's FLOPs count)
    assert seen_sparse[-20:] == [True] * 20 and not any(seen_dense)
    for (name, p), q in zip(sparse.state_dict().items(), dense.state_dict().values()):
        if p.is_floating_point():  # weights, BatchNorm affine parameters and running statistics
            rel = float((p - q).abs().max() / q.abs().max().clamp_min(1e-12))
            assert rel <= 1e-4, name
        else:
            assert torch.equal(p, q), name  # num_batches_tracked


@pytest.mark.parametrize("shape", [(5, 6, 4, 3), (7, 3, 13, 15)])  # per channel 60 and 1365 values
@pytest.mark.parametrize("momentum", [0.1, None])
def test_batchnorm_on_batch_last_blocks_equals_batchnorm(momentum, shape):
    torch.manual_seed(0)
    C = shape[1]
    ref = nn.BatchNorm2d(C, momentum=momentum)
    with torch.no_grad():
        ref.weight.uniform_(0.5, 2)
        ref.bias.uniform_(-1, 1)
    ours = type(ref)(C, momentum=momentum)
    ours.load_state_dict(ref.state_dict())
    for step in range(3):
        x = torch.randn(shape) * (step + 1) + 3 * step
        g = torch.randn(shape)
        xa, xb = x.clone().requires_grad_(True), to_batch_last(x).requires_grad_(True)
        ya, yb = ref(xa), _batch_last_batchnorm(ours, xb)
        assert is_batch_last(yb) and not yb.is_contiguous()
        assert type(yb.grad_fn).__name__ == "_BatchNormBatchLastBackward"  # the kernel, not the fallback
        torch.testing.assert_close(yb, ya, rtol=1e-5, atol=1e-5)
        ga = torch.autograd.grad(ya, [xa, ref.weight, ref.bias], g)
        gb = torch.autograd.grad(yb, [xb, ours.weight, ours.bias], to_batch_last(g))
        for u, v in zip(gb, ga):
            torch.testing.assert_close(u, v, rtol=1e-4, atol=1e-5)
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[k], v, rtol=1e-5, atol=1e-6)
    ref.eval(), ours.eval()
    x = torch.randn(shape)
    torch.testing.assert_close(_batch_last_batchnorm(ours, to_batch_last(x)), ref(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(_batch_last_batchnorm(ours, x), ref(x))  # NCHW input: BatchNorm2d itself


def test_in_place_activation_on_a_batch_last_result_keeps_the_gradients():
    # a batch-last result is a tensor of its own, not an autograd view: ReLU(inplace=True) may modify it
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(4, 5, 3, padding=1), nn.Flatten()
    )
    x = torch.randn(6, 3, 5, 5)
    router = _router(net)
    assert router.batch_last_layers == ["0.weight"]
    got = torch.autograd.grad(net(x).square().sum(), list(net.parameters()))
    router.remove()
    want = torch.autograd.grad(net(x).square().sum(), list(net.parameters()))
    for p, g, w in zip(net.parameters(), got, want):  # weight gradients at the active weights only
        torch.testing.assert_close(g, w * (p != 0) if p.dim() > 1 else w, rtol=1e-4, atol=1e-5)


class Gated(nn.Module):
    """Data-dependent control flow (no fx trace) around a block that traces."""

    def __init__(self) -> None:
        super().__init__()
        self.block = nn.Sequential(
            nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 4, 3), nn.Flatten()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.block(x)
        return h if bool(h.sum() > 0) else -h


def test_a_module_that_does_not_trace_is_planned_through_its_children(caplog):
    torch.manual_seed(0)
    net = Gated()
    with caplog.at_level("INFO", logger="er_lightning"):
        router = _router(net)
    assert "Gated does not trace with torch.fx" in caplog.text
    assert router.batch_last_layers == ["block.0.weight"]
    x = torch.randn(5, 3, 6, 6)
    got = torch.autograd.grad(net(x).square().sum(), list(net.parameters()))
    router.remove()
    want = torch.autograd.grad(net(x).square().sum(), list(net.parameters()))
    for p, g, w in zip(net.parameters(), got, want):
        torch.testing.assert_close(g, w * (p != 0) if p.dim() > 1 else w, rtol=1e-4, atol=1e-5)


def test_the_plan_can_be_switched_off_by_the_environment(monkeypatch):
    monkeypatch.setenv("ER_LIGHTNING_NO_LAYOUT_PLAN", "1")
    torch.manual_seed(0)
    net = ResNetBit()
    router = _router(net)
    assert router.batch_last_layers == []
    assert not any("forward" in m.__dict__ for m in net.modules() if isinstance(m, nn.BatchNorm2d))
    assert not net._forward_hooks  # no scope hooks either
    assert net(torch.randn(2, 3, 8, 8)).shape == (2, 10)


class Mlp(nn.Module):
    """A transformer-style MLP on (N, T, E) tokens with a residual, then a layer whose result is viewed."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(12, 24)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(24, 12)
        self.fc3 = nn.Linear(12, 24)  # its result is viewed: must stay row-major
        self.head = nn.Linear(24, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x + self.fc2(F.dropout(self.act(self.fc1(x)), 0.0, self.training))
        z = self.fc3(h)
        return self.head(z.view(-1, 24)).view(x.shape[0], x.shape[1], 5)


def test_a_linear_whose_result_reaches_only_activations_and_linears_hands_it_on_batch_last():
    torch.manual_seed(0)
    net = Mlp()
    x = torch.randn(3, 7, 12, requires_grad=True)
    ref = net(x)
    ref_grads = torch.autograd.grad(ref.square().sum(), [x, net.fc1.weight, net.fc1.bias, net.fc2.weight])
    router = _router(net, density=1.0)  # all active: the same function as the dense model
    # fc1 reaches GELU, dropout and fc2; fc2 the residual addition and fc3; fc3 a view
    assert router.batch_last_layers == ["fc1.weight", "fc2.weight"]
    seen = []
    net.act.register_forward_hook(lambda m, a, o: seen.append((a[0].stride(), o.stride())))
    net.fc1.register_full_backward_hook(lambda m, gi, go: seen.append(go[0].stride()))
    out = net(x)
    grads = torch.autograd.grad(out.square().sum(), [x, net.fc1.weight, net.fc1.bias, net.fc2.weight])
    # (N, T, 24) stored as (24, N*T): strides (T, 1, N*T) on the way in and out, and for the gradient coming back
    assert seen == [((7, 1, 21), (7, 1, 21)), (7, 1, 21)]
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5)
    router.remove()
    assert net.fc1(x).is_contiguous()
