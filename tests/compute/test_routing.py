"""compute="sparse" / "auto" inside a real fit: same numbers as compute="dense", same model, clear fallbacks."""

from __future__ import annotations

import logging

import pytest
import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from er_lightning import GMP, SET, RigL, StaticSparsity, Supermask
from er_lightning.compute import kernels_available
from er_lightning.masking import MaskedParams
from er_lightning.masking.compute import SparseComputeRouter
from er_lightning.models import create_model
from tests.conftest import make_trainer

pytestmark = pytest.mark.skipif(not kernels_available(), reason="sparse kernels unavailable")


class OddNet(nn.Module):
    """Stride-2, padding-0 and 1x1 convs, BN, a linear head: every kernel path in one model."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 12, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(12)
        self.conv2 = nn.Conv2d(12, 16, (3, 2), stride=2, padding=0)
        self.short = nn.Conv2d(12, 16, 1, stride=2, bias=False)
        self.fc1 = nn.Linear(16 * 3 * 3, 32)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn1(self.conv1(x)))
        y = self.conv2(h)[..., :3, :3] + self.short(h)[..., :3, :3]
        return self.fc2(torch.relu(self.fc1(torch.relu(y).flatten(1))))


class OddModule(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = OddNet()

    def forward(self, x):  # noqa: ANN001, ANN201
        return self.net(x)

    def training_step(self, batch, batch_idx):  # noqa: ANN001, ANN201
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):  # noqa: ANN201
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)


def _loader(batch_size: int) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(7 * 20, 3, 8, 8, generator=g)
    y = torch.randint(0, 10, (7 * 20,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=False)


def _fit(tmp_path, callback, steps: int = 20, batch_size: int = 7, **trainer_kwargs):  # noqa: ANN001, ANN202
    torch.manual_seed(0)
    module = OddModule()
    trainer = make_trainer(tmp_path, [callback], max_steps=steps, **trainer_kwargs)
    trainer.fit(module, _loader(batch_size))
    return module, trainer


def _max_rel_diff(a: nn.Module, b: nn.Module) -> float:
    worst = 0.0
    for p, q in zip(a.state_dict().values(), b.state_dict().values()):
        if p.is_floating_point():
            worst = max(worst, float((p - q).abs().max() / q.abs().max().clamp_min(1e-12)))
    return worst


@pytest.mark.parametrize("batch_size", [7, 1, 32])
def test_sparse_fit_matches_dense_fit(tmp_path, batch_size):
    dense, _ = _fit(tmp_path / "d", StaticSparsity(density=0.3, distribution="erk"), batch_size=batch_size)
    cb = StaticSparsity(density=0.3, distribution="erk", compute="sparse")
    sparse, _ = _fit(tmp_path / "s", cb, batch_size=batch_size)
    assert list(dense.state_dict()) == list(sparse.state_dict())
    assert _max_rel_diff(sparse, dense) <= 1e-4
    # the kernels really ran, for every masked layer
    assert cb.router is None  # removed at teardown
    for name, p in sparse.named_parameters():
        if name in cb.masked.masks:
            assert int((p[~cb.masked.masks[name]] != 0).sum()) == 0


def test_routes_are_used_and_removed(tmp_path):
    cb = StaticSparsity(density=0.3, distribution="erk", compute="sparse")
    seen = {}

    class Spy(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):  # noqa: ANN001
            seen.update({n: r.sparse_calls for n, r in cb.router.routes.items()})

    torch.manual_seed(0)
    module = OddModule()
    make_trainer(tmp_path, [cb, Spy()], max_steps=3).fit(module, _loader(7))
    assert set(seen) == {
        "net.conv1.weight",
        "net.conv2.weight",
        "net.short.weight",
        "net.fc1.weight",
        "net.fc2.weight",
    }
    assert all(v == 3 for v in seen.values())
    assert "_conv_forward" not in module.net.conv1.__dict__ and "forward" not in module.net.fc1.__dict__


def test_rigl_sparse_compute_updates_like_dense(tmp_path):
    """Update steps compute dense (RigL grows by the dense gradient); masks and weights match dense compute."""
    kw = dict(density=0.3, update_every_steps=5, drop_fraction=0.3, stop_updates_at=1.0, seed=1)
    dense_cb, sparse_cb = RigL(**kw), RigL(**kw, compute="sparse")
    dense, _ = _fit(tmp_path / "d", dense_cb, steps=16)
    rebuilds = {}

    class Spy(pl.Callback):
        def on_train_end(self, trainer, pl_module):  # noqa: ANN001
            rebuilds.update({n: r.rebuilds for n, r in sparse_cb.router.routes.items()})

    torch.manual_seed(0)
    sparse = OddModule()
    make_trainer(tmp_path / "s", [sparse_cb, Spy()], max_steps=16).fit(sparse, _loader(7))
    for name in dense_cb.masked.names:
        assert torch.equal(dense_cb.masked.masks[name], sparse_cb.masked.masks[name]), name
    assert _max_rel_diff(sparse, dense) <= 1e-4
    # updates before steps 6, 11 and 16: the index is built once, then rebuilt lazily at the first forward after
    # each update (none follows the last one)
    assert all(v == 3 for v in rebuilds.values()), rebuilds


def test_auto_decides_once_per_layer_and_logs(tmp_path, caplog):
    cb = StaticSparsity(density=0.3, distribution="erk", compute="auto")
    decisions = {}

    class Spy(pl.Callback):
        def on_train_end(self, trainer, pl_module):  # noqa: ANN001
            decisions.update(cb.router.decisions())

    with caplog.at_level(logging.INFO, logger="er_lightning"):
        torch.manual_seed(0)
        make_trainer(tmp_path, [cb, Spy()], max_steps=3).fit(OddModule(), _loader(7))
    assert set(decisions.values()) <= {"sparse", "dense"} and len(decisions) == 5
    assert sum("(auto)" in r.message for r in caplog.records) == 5


def test_unsupported_layers_and_dtypes_fall_back_to_dense_with_a_reason(caplog):
    model = nn.Sequential(
        nn.Conv2d(4, 4, 3, groups=2, padding=1),
        nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"),
        nn.Conv1d(4, 4, 1),
    )
    names = ["0.weight", "1.weight", "2.weight"]
    params = dict(model.named_parameters())
    masked = MaskedParams({n: params[n] for n in names}, {n: torch.rand_like(params[n]) < 0.5 for n in names})
    with caplog.at_level(logging.INFO, logger="er_lightning"):
        router = SparseComputeRouter(model, masked, "sparse")
    assert router.routes == {}
    assert "groups=2" in router.dense_layers["0.weight"]
    assert "padding_mode='reflect'" in router.dense_layers["1.weight"]
    assert "Conv1d" in router.dense_layers["2.weight"]
    assert sum("computes dense" in r.message for r in caplog.records) == 3

    lin = nn.Linear(5, 3).double()
    masked = MaskedParams({"weight": lin.weight}, {"weight": torch.rand(3, 5) < 0.5})
    masked.apply_()
    router = SparseComputeRouter(lin, masked, "sparse")
    x = torch.randn(2, 5, dtype=torch.float64)
    with caplog.at_level(logging.INFO, logger="er_lightning"):
        torch.testing.assert_close(lin(x), nn.functional.linear(x, lin.weight, lin.bias))
        lin(x)
    assert sum("float32" in r.message for r in caplog.records) == 1  # said once, not every call
    router.remove()


def test_bad_compute_arguments_raise():
    with pytest.raises(ValueError, match="compute must be one of"):
        StaticSparsity(compute="fast")
    with pytest.raises(TypeError, match="compute"):  # learned masks: no such option (export with to_sparse)
        Supermask(compute="sparse")


def test_sparse_checkpoint_loads_into_a_plain_dense_model(tmp_path):
    cb = StaticSparsity(density=0.3, compute="sparse")
    module, trainer = _fit(tmp_path, cb, steps=4)
    path = tmp_path / "m.ckpt"
    trainer.save_checkpoint(path)
    state = torch.load(path, weights_only=True)["state_dict"]
    plain = OddModule()
    plain.load_state_dict(state)
    x = torch.randn(3, 3, 8, 8)
    module.eval(), plain.eval()
    torch.testing.assert_close(plain(x), module(x))


@pytest.mark.parametrize(
    "make",
    [
        lambda c: SET(density=0.3, update_every_steps=4, stop_updates_at=1.0, seed=2, compute=c),
        lambda c: GMP(init_density=0.5, final_density=0.1, update_every_steps=3, seed=2, compute=c),
    ],
    ids=["SET", "GMP"],
)
def test_topology_changing_callbacks_match_dense_compute(tmp_path, make):
    dense_cb, sparse_cb = make("dense"), make("sparse")
    dense, _ = _fit(tmp_path / "d", dense_cb, steps=12)
    sparse, _ = _fit(tmp_path / "s", sparse_cb, steps=12)
    for name in dense_cb.masked.names:
        assert torch.equal(dense_cb.masked.masks[name], sparse_cb.masked.masks[name]), name
    assert _max_rel_diff(sparse, dense) <= 1e-4


def test_mixed_precision_falls_back_to_dense_and_keeps_zeros(tmp_path, caplog):
    cb = StaticSparsity(density=0.3, compute="sparse")
    with caplog.at_level(logging.INFO, logger="er_lightning"):
        module, _ = _fit(tmp_path, cb, steps=3)
        torch.manual_seed(0)
        module = OddModule()
        make_trainer(tmp_path, [cb], max_steps=3, precision="bf16-mixed").fit(module, _loader(7))
    assert any("autocast" in r.message for r in caplog.records)
    for name, p in module.named_parameters():
        if name in cb.masked.masks:
            assert int((p[~cb.masked.masks[name]] != 0).sum()) == 0


def test_checkpoint_resumes_across_compute_modes(tmp_path):
    """compute is not part of the mask config: a sparse-compute checkpoint resumes with compute='dense'."""
    torch.manual_seed(0)
    module = OddModule()
    trainer = make_trainer(tmp_path, [StaticSparsity(density=0.3, compute="sparse")], max_steps=3)
    trainer.fit(module, _loader(7))
    path = tmp_path / "a.ckpt"
    trainer.save_checkpoint(path)
    cb = StaticSparsity(density=0.3, compute="dense")
    resumed = make_trainer(tmp_path, [cb], max_steps=5)
    resumed.fit(OddModule(), _loader(7), ckpt_path=path)
    assert resumed.global_step == 5
    saved = torch.load(path, weights_only=False)["callbacks"]
    (state,) = [v for k, v in saved.items() if "StaticSparsity" in k]
    for name, mask in state["masks"].items():
        assert torch.equal(cb.masked.masks[name], mask)


def test_gradient_accumulation_and_clipping_match_dense_compute(tmp_path):
    """p.grad accumulates over micro-batches and is clipped exactly as with dense compute."""
    kw = dict(accumulate_grad_batches=3, gradient_clip_val=0.5)
    dense, _ = _fit(tmp_path / "d", StaticSparsity(density=0.3), steps=6, **kw)
    sparse, _ = _fit(tmp_path / "s", StaticSparsity(density=0.3, compute="sparse"), steps=6, **kw)
    assert _max_rel_diff(sparse, dense) <= 1e-4


def _routed_attention(**kw):  # noqa: ANN003, ANN202
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 4, **kw)
    names = [n for n in ("in_proj_weight", "out_proj.weight") if n in dict(mha.named_parameters())]
    params = dict(mha.named_parameters())
    masked = MaskedParams({n: params[n] for n in names}, {n: torch.rand_like(params[n]) < 0.4 for n in names})
    masked.apply_()
    return mha, masked


def _attention_grads(mha, x, **kw):  # noqa: ANN001, ANN003, ANN202
    xx = x.clone().requires_grad_()
    out, weights = mha(xx, xx, xx, **kw)
    wanted = [xx, mha.in_proj_weight, mha.out_proj.weight, mha.in_proj_bias]
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    return out, weights, torch.autograd.grad(out, wanted, g)


@pytest.mark.parametrize(
    "batch_first, unbatched, mask, padding, need_weights, causal",
    [
        (True, False, None, False, False, False),
        (True, False, "causal", False, False, True),  # is_causal: scaled_dot_product_attention's own mask
        (False, False, "float", True, True, False),  # float mask + padding merged, explicit weights
        (True, False, "heads", True, False, False),  # a (N*heads, L, S) bool mask + bool padding
        (True, False, "causal", True, False, True),  # padding merged into the mask turns is_causal off
        (True, False, "causal", True, "per head", True),  # weights per head
        (False, True, "causal", False, True, False),  # unbatched input
    ],
)
def test_self_attention_projections_compute_sparse_and_equal_dense(
    batch_first, unbatched, mask, padding, need_weights, causal
):
    mha, masked = _routed_attention(batch_first=batch_first)
    N, L = 3, 5
    x = torch.randn(L, 16) if unbatched else torch.randn(*((N, L) if batch_first else (L, N)), 16)
    attn_mask = {
        None: None,
        "causal": torch.triu(torch.ones(L, L, dtype=torch.bool), 1),
        "float": torch.randn(L, L),
        "heads": torch.rand(N * 4, L, L) < 0.3,
    }[mask]
    if mask == "heads":
        attn_mask[..., 0] = False
    kpm = None
    if padding:  # the last key of the first sequence is padding (same mask dtype as attn_mask)
        kpm = torch.zeros(N, L, dtype=torch.float32 if mask == "float" else torch.bool)
        kpm[0, -1] = -1e9 if mask == "float" else True
    kw = dict(
        key_padding_mask=kpm,
        need_weights=bool(need_weights),
        attn_mask=attn_mask,
        average_attn_weights=need_weights != "per head",
        is_causal=causal,
    )
    ref = _attention_grads(mha, x, **kw)
    router = SparseComputeRouter(mha, masked, "sparse")
    got = _attention_grads(mha, x, **kw)
    assert {n: r.sparse_calls for n, r in router.routes.items()} == {
        "in_proj_weight": 1,
        "out_proj.weight": 1,
    }
    router.remove()
    assert "forward" not in mha.__dict__ and "forward" not in mha.out_proj.__dict__
    torch.testing.assert_close(got[0], ref[0], rtol=1e-5, atol=1e-6)
    if need_weights:
        torch.testing.assert_close(got[1], ref[1], rtol=1e-5, atol=1e-6)
    else:
        assert got[1] is None and ref[1] is None
    masks = [None, masked.masks["in_proj_weight"], masked.masks["out_proj.weight"], None]
    for g, r, m in zip(got[2], ref[2], masks):
        torch.testing.assert_close(g, r if m is None else r * m, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shared_kv", [True, False])
def test_cross_attention_projects_each_input_with_the_packed_layer(shared_kv):
    mha, masked = _routed_attention(batch_first=True)
    q, k = torch.randn(2, 3, 16), torch.randn(2, 4, 16)
    v = k if shared_kv else torch.randn(2, 4, 16)
    kpm = torch.tensor([[False, False, False, True], [False] * 4])

    def run():  # noqa: ANN202
        qq, kk = q.clone().requires_grad_(), k.clone().requires_grad_()
        vv = kk if shared_kv else v.clone().requires_grad_()
        out, weights = mha(qq, kk, vv, key_padding_mask=kpm)
        wanted = [qq, kk, mha.in_proj_weight, mha.out_proj.weight] + ([] if shared_kv else [vv])
        return [out, weights, *torch.autograd.grad(out.square().sum(), wanted)]

    ref = run()
    router = SparseComputeRouter(mha, masked, "sparse")
    got = run()
    calls = {n: r.sparse_calls for n, r in router.routes.items()}
    router.remove()
    assert calls == {"in_proj_weight": 2 if shared_kv else 3, "out_proj.weight": 1}
    masks = [None, None, None, None, masked.masks["in_proj_weight"], masked.masks["out_proj.weight"], None]
    for g, r, m in zip(got, ref, masks):
        torch.testing.assert_close(g, r if m is None else r * m, rtol=1e-5, atol=1e-6)


def test_attention_without_a_sparse_path_computes_dense_and_says_why():
    for kw, why in ((dict(kdim=8, vdim=8), "kdim/vdim"), (dict(add_bias_kv=True), "add_bias_kv")):
        mha, masked = _routed_attention(**kw)
        router = SparseComputeRouter(mha, masked, "sparse")
        assert router.routes == {} and "forward" not in mha.__dict__
        assert all(why in reason for reason in router.dense_layers.values()), router.dense_layers


class _LMModule(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.lm = create_model("transformer_lm", num_classes=24, seq_len=8, dim=16, depth=2, heads=2)

    def forward(self, tokens):  # noqa: ANN001, ANN201
        return self.lm(tokens[:, :-1])

    def training_step(self, batch, batch_idx):  # noqa: ANN001, ANN201
        tokens = batch[0]
        return nn.functional.cross_entropy(self(tokens).reshape(-1, 24), tokens[:, 1:].reshape(-1))

    def configure_optimizers(self):  # noqa: ANN201
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


def _lm_fit(tmp_path, callback, spy=None):  # noqa: ANN001, ANN202
    torch.manual_seed(0)
    module = _LMModule()
    tokens = torch.randint(0, 24, (7 * 20, 9), generator=torch.Generator().manual_seed(0))
    callbacks = [callback] + ([spy] if spy else [])
    make_trainer(tmp_path, callbacks, max_steps=20).fit(
        module, DataLoader(TensorDataset(tokens), batch_size=7)
    )
    return module


def test_transformer_fit_with_sparse_attention_matches_dense_fit(tmp_path):
    dense = _lm_fit(tmp_path / "d", StaticSparsity(density=0.3))
    cb = StaticSparsity(density=0.3, compute="sparse")
    calls = {}

    planned = []

    class Spy(pl.Callback):
        def on_train_end(self, trainer, pl_module):  # noqa: ANN001
            calls.update({n: r.sparse_calls for n, r in cb.router.routes.items()})
            planned.extend(cb.router.batch_last_layers)

    sparse = _lm_fit(tmp_path / "s", cb, Spy())
    # each block's fc1 hands its result to fc2 batch-last (through GELU); fc2 feeds the residual stream
    assert planned == [f"lm.blocks.{i}.fc1.weight" for i in range(2)]
    assert _max_rel_diff(sparse, dense) <= 1e-4
    attention = [n for n in calls if ".attn." in n]
    projections = ("in_proj_weight", "out_proj.weight")
    assert sorted(attention) == [f"lm.blocks.{i}.attn.{p}" for i in range(2) for p in projections]
    assert all(v == 20 for v in calls.values()), calls
