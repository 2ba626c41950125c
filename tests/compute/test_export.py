"""to_sparse: inference copies on the sparse kernels, equal to the dense model, saved and loaded as plain tensors."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from er_lightning import RigL, SoftThreshold, StaticSparsity, Supermask
from er_lightning.compute import kernels_available
from er_lightning.export import (
    SparseAttention,
    SparseConv2d,
    SparseLinear,
    load_sparse,
    save_sparse,
    to_sparse,
)
from er_lightning.models import create_model
from tests.conftest import PlainModule, make_trainer, random_loader

pytestmark = pytest.mark.skipif(not kernels_available(), reason="sparse kernels unavailable")


class _Backbone(PlainModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = create_model("resnet20", num_classes=10, input_size=8)


def _trained(tmp_path, callback, steps: int = 3) -> PlainModule:  # noqa: ANN001
    torch.manual_seed(0)
    module = _Backbone()
    make_trainer(tmp_path, [callback], max_steps=steps).fit(module, random_loader())
    return module.eval()


def _check_equal(sparse: nn.Module, dense: nn.Module, batch: int) -> None:
    x = torch.randn(batch, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(sparse(x), dense(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("callback", [StaticSparsity(density=0.1), RigL(density=0.1, update_every_steps=1)])
def test_to_sparse_equals_the_dense_model_with_batchnorm_folded(tmp_path, callback):
    module = _trained(tmp_path, callback)
    fast = to_sparse(module.net)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fast.modules())
    kinds = [type(m) for m in fast.modules()]
    # resnet20 has 21 convs (stem, 18 in blocks, 2 shortcuts) and a linear head; layers above max_density=0.5
    # (ERK's small stem and head) stay dense
    dense_convs = sum(
        1 for n, p in module.net.named_parameters() if p.dim() == 4 and float((p != 0).float().mean()) > 0.5
    )
    assert kinds.count(SparseConv2d) == 21 - dense_convs
    for batch in (1, 7, 32):
        _check_equal(fast, module.net, batch)
    # the trained module is untouched and still has its BatchNorms
    assert any(isinstance(m, nn.BatchNorm2d) for m in module.net.modules())


def test_saved_export_loads_with_weights_only_into_a_fresh_architecture(tmp_path):
    module = _trained(tmp_path, StaticSparsity(density=0.1))
    fast = to_sparse(module.net)
    path = tmp_path / "sparse.pt"
    save_sparse(fast, path)
    torch.load(path, weights_only=True)  # plain tensors, lists and strings
    fresh = create_model("resnet20", num_classes=10, input_size=8)
    loaded = load_sparse(fresh, path)
    _check_equal(loaded, module.net, 5)
    # active counts survive exactly
    for (n, a), (_, b) in zip(fast.named_buffers(), loaded.named_buffers()):
        assert torch.equal(a, b), n


def test_export_from_supermask_bake_and_soft_threshold_finalize(tmp_path):
    torch.manual_seed(0)
    sm = PlainModule()
    cb = Supermask(density=0.2, er_density=0.5, seed=5)
    make_trainer(tmp_path / "a", [cb], max_steps=3).fit(sm, random_loader())
    sm.eval()
    baked = cb.bake(sm)
    fast = to_sparse(baked.net)
    assert any(isinstance(m, SparseConv2d) for m in fast.modules())
    _check_equal(fast, sm.net, 4)

    torch.manual_seed(0)
    st = PlainModule()
    cb2 = SoftThreshold(density=0.3, distribution="uniform", s_init=-2.5, seed=3)
    make_trainer(tmp_path / "b", [cb2], max_steps=3).fit(st, random_loader())
    st.eval()
    plain = cb2.finalize(st)
    _check_equal(to_sparse(plain.net, max_density=1.0), st.net, 4)


def test_load_sparse_refuses_foreign_or_tampered_files(tmp_path):
    module = _trained(tmp_path, StaticSparsity(density=0.1))
    fast = to_sparse(module.net)
    path = tmp_path / "sparse.pt"
    save_sparse(fast, path)
    data = torch.load(path, weights_only=True)
    fresh = create_model("resnet20", num_classes=10, input_size=8)

    torch.save({"state_dict": data["state_dict"]}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not an er_lightning sparse export"):
        load_sparse(fresh, tmp_path / "other.pt")

    bad = dict(data, sparse_layers=[*data["sparse_layers"], "layer9.conv"])
    torch.save(bad, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="layer9.conv"):
        load_sparse(fresh, tmp_path / "bad.pt")

    assert data["attention_layers"] == []
    torch.save(dict(data, attention_layers=["layer1"]), tmp_path / "attn.pt")
    with pytest.raises(ValueError, match=r"attention layers \['layer1'\]"):
        load_sparse(fresh, tmp_path / "attn.pt")

    name = data["sparse_layers"][0]
    sd = dict(data["state_dict"])
    sd[f"{name}.indices"] = sd[f"{name}.indices"].clone()
    sd[f"{name}.indices"][-1] = 10**9
    torch.save(dict(data, state_dict=sd), tmp_path / "oob.pt")
    with pytest.raises(RuntimeError, match="indices must lie in"):
        load_sparse(fresh, tmp_path / "oob.pt")


def test_to_sparse_validates_arguments():
    net = nn.Sequential(nn.Linear(4, 3))
    with pytest.raises(ValueError, match="max_density"):
        to_sparse(net, max_density=0.0)
    with pytest.raises(ValueError, match="does not have"):
        to_sparse(net, masks={"1.weight": torch.ones(3, 4, dtype=torch.bool)})
    with pytest.raises(ValueError, match="shape"):
        to_sparse(net, masks={"0.weight": torch.ones(4, 3, dtype=torch.bool)})


def test_to_sparse_with_an_example_input_times_every_candidate_layer(tmp_path, caplog):
    module = _trained(tmp_path, StaticSparsity(density=0.1))
    x = torch.randn(4, 3, 8, 8)
    with caplog.at_level(logging.INFO, logger="er_lightning"):
        fast = to_sparse(module.net, example_input=x)
    decided = [r.message for r in caplog.records if "ms, sparse" in r.message]
    candidates = sum(
        1 for p in module.net.parameters() if p.dim() in (2, 4) and float((p != 0).float().mean()) <= 0.5
    )
    assert len(decided) == candidates  # one timed decision per candidate layer, logged
    kept_sparse = sum(isinstance(m, (SparseConv2d, SparseLinear)) and m.density < 1 for m in fast.modules())
    assert kept_sparse == sum("sparse" in m.rsplit(":", 1)[1] for m in decided)
    # the dense convs next to sparse ones (the stem, shortcuts that stayed dense) are timed in the kernels'
    # layout too: each decision logged, the layers taken computing with all their weights
    neighbours = [r.message for r in caplog.records if "next to sparse layers" in r.message]
    assert neighbours
    full = sum(isinstance(m, SparseConv2d) and m.density == 1 for m in fast.modules())
    assert full == sum(m.endswith(": kernels") for m in neighbours)
    _check_equal(fast, module.net, 4)


def test_the_probe_keeps_each_sides_best_time_over_two_sweeps(monkeypatch):
    """A burst of load that slows one side of a layer in one sweep does not decide it: two sweeps over all layers,
    the second in reverse order, each side's best time."""
    import er_lightning.export as export

    seen = []
    # (dense, sparse) times per call, in call order: sweep 1 is layers a, b; sweep 2 is b, a
    times = iter([(1.0, 3.0), (2.0, 1.0), (2.0, 1.5), (1.5, 0.5)])

    def fake(dense, sparse, x):  # noqa: ANN001, ANN202
        seen.append(dense)
        t_dense, t_sparse = next(times)
        return t_sparse < t_dense, t_dense, t_sparse

    monkeypatch.setattr(export, "_faster_sparse", fake)
    got = export._probe([("a", None, None), ("b", None, None)])
    assert seen == ["a", "b", "b", "a"]
    # a: dense best 1.0 (sweep 1), sparse best 0.5 (sweep 2) -> sparse; b: dense 2.0, sparse 1.0 -> sparse
    assert got == [(True, 1.0, 0.5), (True, 2.0, 1.0)]


@pytest.mark.parametrize("faster", [True, False])
def test_dense_convs_next_to_sparse_ones_follow_their_timed_decision(monkeypatch, caplog, tmp_path, faster):
    """The stem (whose result reaches sparse `a`) and the 1x1 shortcut (input from the pooled stem, result
    added before `c`) are timed with the transposes they need; the decision picks the module, the values
    stay the dense model's, and save/load keep it."""
    import er_lightning.export as export

    torch.manual_seed(0)
    net = _Mixed().eval()
    with torch.no_grad():
        for conv in (net.a, net.b, net.c, net.head):
            conv.weight.mul_(torch.rand_like(conv.weight) < 0.3)
    timed = []
    real = export._faster_sparse

    def decide(dense, sparse, x, **kw):  # noqa: ANN001, ANN202
        if isinstance(sparse, SparseConv2d) and sparse.density == 1:
            timed.append((tuple(sparse.weight_shape), export.is_batch_last(x) and x.shape[0] > 1))
            torch.testing.assert_close(export.to_contiguous(dense(x)), export.to_contiguous(sparse(x)))
            return (True, 2.0, 1.0) if faster else (False, 1.0, 2.0)
        return real(dense, sparse, x, **kw)

    monkeypatch.setattr(export, "_faster_sparse", decide)
    x = torch.randn(6, 3, 8, 8)
    with caplog.at_level(logging.INFO, logger="er_lightning"):
        fast = to_sparse(net, example_input=x)
    # both read NCHW inputs (the model's, the pooled dense stem's); both results reach sparse convs
    # each timed in both sweeps of the probe
    assert sorted(timed) == [((8, 3, 3, 3), False)] * 2 + [((8, 8, 1, 1), False)] * 2
    kinds = {n: type(m) for n, m in fast.named_modules() if n in ("stem", "short")}
    want = SparseConv2d if faster else nn.Conv2d
    assert kinds == {"stem": want, "short": want}
    path = tmp_path / "m.pt"
    save_sparse(fast, path)  # layers holding every weight save and load as any sparse layer
    again = load_sparse(_Mixed(), path)
    assert {n: type(m) for n, m in again.named_modules() if n in ("stem", "short")} == kinds
    for batch in (1, 7, 32):
        xb = torch.randn(batch, 3, 8, 8)
        with torch.no_grad():
            torch.testing.assert_close(fast(xb), net(xb), rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(again(xb), net(xb), rtol=1e-4, atol=1e-4)


class _Mixed(nn.Module):
    """conv -> relu -> maxpool -> conv -> conv plus a dense 1x1 shortcut -> relu -> conv plus its input -> `.view`
    (which fails on a batch-last tensor) -> head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.pool = nn.MaxPool2d(2)
        self.a = nn.Conv2d(8, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 3, padding=1)
        self.short = nn.Conv2d(8, 8, 1)
        self.c = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Linear(8 * 4 * 4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(torch.relu(self.bn(self.stem(x))))
        y = self.b(torch.relu(self.a(x))) + self.short(x)
        y = torch.relu(y)
        z = self.c(y) + y
        return self.head(z.view(-1, 16).view(z.size(0), -1))  # merging batch and channels needs NCHW


def test_sparse_convs_hand_batch_last_results_only_to_layers_that_take_any_layout(tmp_path):
    torch.manual_seed(0)
    net = _Mixed().eval()
    with torch.no_grad():
        net.bn.running_mean.normal_()
        net.bn.running_var.uniform_(0.5, 2.0)
        for conv in (net.stem, net.a, net.b, net.c, net.head):
            conv.weight.mul_(torch.rand_like(conv.weight) < 0.3)
    fast = to_sparse(net)  # the 1x1 shortcut stays dense (density 1 > max_density)
    convs = {n: m for n, m in fast.named_modules() if isinstance(m, SparseConv2d)}
    # stem feeds `a` through relu and max pooling, `a` feeds `b`, `b` feeds `c` through the residual addition
    # (whose dense operand is brought into the same layout); `c` only reaches the `.view`, through an addition
    # with a batch-last value, so that addition's result is made contiguous before the view
    plan = {"stem": True, "a": True, "b": True, "c": False}
    assert {n: m.batch_last_out for n, m in convs.items()} == plan
    # `a` (through its in-place ReLU) feeds only `b`, stride 1, padding 1: it writes into b's padded planes;
    # the stem feeds the pooling, `b` an addition whose result is another buffer
    assert {n: m.out_border for n, m in convs.items()} == {
        "stem": None,
        "a": (1, 1, 1, 1),
        "b": None,
        "c": None,
    }
    from er_lightning.export import BatchLastMaxPool2d

    assert isinstance(fast.pool, BatchLastMaxPool2d)
    for batch in (1, 7, 32):
        x = torch.randn(batch, 3, 8, 8)
        with torch.no_grad():
            torch.testing.assert_close(fast(x), net(x), rtol=1e-4, atol=1e-4)
    code = fast.code
    assert "to_contiguous(pool)" in code  # before the dense shortcut
    assert "to_batch_last(short)" in code  # the shortcut's result, before the addition
    assert "to_batch_last(c)" in code and "to_contiguous(add_1)" in code
    # the plan survives save and load
    path = tmp_path / "m.pt"
    save_sparse(fast, path)
    again = load_sparse(_Mixed(), path)
    assert {n: m.batch_last_out for n, m in again.named_modules() if isinstance(m, SparseConv2d)} == plan
    x = torch.randn(7, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(again(x), net(x), rtol=1e-4, atol=1e-4)


class _Shared(nn.Module):
    """A conv result read twice (must not be overwritten) and one read once (may be)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(4, 4, 3, padding=1)
        self.b = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.a(x)
        z = torch.relu(y) + y
        return torch.relu(self.b(z) + x)


def test_additions_and_relus_reuse_only_results_nothing_else_reads():
    torch.manual_seed(1)
    net = _Shared().eval()
    with torch.no_grad():
        for conv in (net.a, net.b):
            conv.weight.mul_(torch.rand_like(conv.weight) < 0.3)
    fast = to_sparse(net, fold_batchnorm=True)
    for batch in (1, 3):
        x = torch.randn(batch, 4, 6, 6)
        with torch.no_grad():
            torch.testing.assert_close(fast(x), net(x), rtol=1e-5, atol=1e-5)
            # the input is not among what gets overwritten
            x0 = x.clone()
            fast(x)
            torch.testing.assert_close(x, x0, rtol=0, atol=0)
    code = fast.code
    assert code.count("relu_(") == 1 and code.count("add_into(") == 1  # only around `b`


def test_one_exported_model_serves_two_threads_at_once():
    """Layer buffers are claimed atomically: two threads running the same export get their own memory."""
    import threading

    torch.manual_seed(2)
    net = _Mixed().eval()
    with torch.no_grad():
        for conv in (net.stem, net.a, net.b, net.c, net.head):
            conv.weight.mul_(torch.rand_like(conv.weight) < 0.3)
    fast = to_sparse(net)
    inputs = [torch.randn(16, 3, 8, 8) for _ in range(2)]
    with torch.no_grad():
        refs = [net(x) for x in inputs]
    errors: list[float] = []

    def worker(i: int) -> None:
        with torch.no_grad():
            for _ in range(40):
                errors.append(float((fast(inputs[i]) - refs[i]).abs().max()))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(errors) == 80 and max(errors) < 1e-4


def test_a_result_computed_as_one_span_over_several_rows_is_not_written_into_padded_planes():
    # a 1x1 conv (no tap shift) on a small map at batch 1 computes its whole plane as one span; written into
    # the next layer's zero-bordered planes that span ran over the borders (a wrong result before the fix)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(8, 8, 1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.Flatten()).eval()
    with torch.no_grad():
        for conv in (net[0], net[2]):
            conv.weight.mul_(torch.rand_like(conv.weight) < 0.3)
    fast = to_sparse(net)
    assert fast.get_submodule("0").out_border == (1, 1, 1, 1)
    for batch in (1, 2, 7, 32):
        x = torch.randn(batch, 8, 4, 4)
        with torch.no_grad():
            torch.testing.assert_close(fast(x), net(x), rtol=1e-5, atol=1e-5)


class _Blocks(nn.Module):
    """Two residual blocks: an identity shortcut, then a dense 1x1 shortcut computed after the block's convs."""

    def __init__(self) -> None:
        super().__init__()
        self.a1 = nn.Conv2d(8, 8, 3, padding=1)
        self.a2 = nn.Conv2d(8, 8, 3, padding=1)
        self.b1 = nn.Conv2d(8, 12, 3, padding=1)
        self.b2 = nn.Conv2d(12, 12, 3, padding=1)
        self.short = nn.Conv2d(8, 12, 1)
        self.head = nn.Conv2d(12, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.a2(torch.relu(self.a1(x))) + x)
        h = torch.relu(self.b2(torch.relu(self.b1(h))) + self.short(h))
        return self.head(h).flatten(1)


def test_additions_and_relus_after_a_sparse_conv_are_fused_into_its_stores(tmp_path):
    torch.manual_seed(3)
    net = _Blocks().eval()
    with torch.no_grad():
        for conv in (net.a1, net.a2, net.b1, net.b2, net.head):
            conv.weight.mul_(torch.rand_like(conv.weight) < 0.3)
    fast = to_sparse(net)
    fused = {n: m.epilogue_relu for n, m in fast.named_modules() if isinstance(m, SparseConv2d)}
    assert fused == {"a1": True, "a2": True, "b1": True, "b2": True, "head": False}
    # the residuals are the convs' second inputs; the dense shortcut moved before b2, which reads its result
    code = fast.code
    assert "add_into" not in code and "relu_" not in code
    assert code.index("self.short(") < code.index("self.b2(")
    for batch in (1, 7, 32):
        x = torch.randn(batch, 8, 6, 6)
        with torch.no_grad():
            torch.testing.assert_close(fast(x), net(x), rtol=1e-5, atol=1e-5)
    path = tmp_path / "blocks.pt"
    save_sparse(fast, path)
    again = load_sparse(_Blocks(), path)
    x = torch.randn(7, 8, 6, 6)
    with torch.no_grad():
        torch.testing.assert_close(again(x), net(x), rtol=1e-5, atol=1e-5)


def test_a_transformer_exports_with_attention_projections_on_the_kernels(tmp_path):
    """MultiheadAttention reads its projection weights itself: the export replaces it with a SparseAttention whose
    projections are layers, converted like every other Linear; outputs equal, save and load round-trip."""
    torch.manual_seed(0)
    model = create_model("transformer_lm", num_classes=40, seq_len=8, dim=16, depth=2, heads=2).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and "embed" not in name and "token" not in name and "position" not in name:
                p.mul_(torch.rand_like(p) < 0.2)
    tokens = torch.randint(0, 40, (3, 8))
    fast = to_sparse(model)
    kinds = {n: type(m) for n, m in fast.named_modules()}
    layers = ("attn.in_proj", "attn.out_proj", "fc1", "fc2")
    assert [n for n, k in kinds.items() if k is SparseLinear] == [
        f"blocks.{i}.{n}" for i in range(2) for n in layers
    ]
    assert [n for n, k in kinds.items() if k is SparseAttention] == ["blocks.0.attn", "blocks.1.attn"]
    assert not any(isinstance(m, nn.MultiheadAttention) for m in fast.modules())
    with torch.no_grad():
        torch.testing.assert_close(fast(tokens), model(tokens), rtol=1e-4, atol=1e-4)
    path = tmp_path / "lm.pt"
    save_sparse(fast, path)
    loaded = load_sparse(
        create_model("transformer_lm", num_classes=40, seq_len=8, dim=16, depth=2, heads=2), path
    )
    with torch.no_grad():
        torch.testing.assert_close(loaded(tokens), model(tokens), rtol=1e-4, atol=1e-4)
    assert [n for n, m in loaded.named_modules() if isinstance(m, SparseLinear)] == [
        n for n, k in kinds.items() if k is SparseLinear
    ]


def test_attention_export_matches_torch_for_cross_attention_and_masks():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 4).eval()  # sequence-first
    with torch.no_grad():
        for p in (mha.in_proj_weight, mha.out_proj.weight):
            p.mul_(torch.rand_like(p) < 0.2)
    wrapped = nn.ModuleDict({"attn": mha})
    fast = to_sparse(wrapped)
    assert isinstance(fast["attn"], SparseAttention)
    assert isinstance(fast["attn"].in_proj, SparseLinear) and isinstance(fast["attn"].out_proj, SparseLinear)
    q, kv = torch.randn(5, 2, 16), torch.randn(7, 2, 16)
    kpm = torch.zeros(2, 7, dtype=torch.bool)
    kpm[1, -2:] = True
    with torch.no_grad():
        for args in ((q, q, q), (q, kv, kv), (q, kv, torch.randn(7, 2, 16))):
            got, got_w = fast["attn"](*args, key_padding_mask=kpm if args[1] is kv else None)
            ref, ref_w = mha(*args, key_padding_mask=kpm if args[1] is kv else None)
            torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(got_w, ref_w, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("batch_first", [True, False])
def test_torch_transformer_layers_export_with_sparse_attention(batch_first):
    """nn.TransformerEncoder(Layer) inspects its attention before choosing a fused path that reads the dense
    projection weights itself: the export keeps it on the plain path, which calls SparseAttention."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=batch_first)
    enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=batch_first).eval()
    dec = nn.TransformerDecoderLayer(16, 2, 32, dropout=0.0, batch_first=batch_first).eval()
    with torch.no_grad():
        for p in [*enc.parameters(), *dec.parameters()]:
            if p.dim() == 2:
                p.mul_(torch.rand_like(p) < 0.2)
    fast_enc, fast_dec = to_sparse(enc), to_sparse(dec)
    assert sum(isinstance(m, SparseAttention) for m in fast_enc.modules()) == 2
    assert sum(isinstance(m, SparseAttention) for m in fast_dec.modules()) == 2  # self- and cross-attention
    assert sum(isinstance(m, SparseLinear) for m in fast_enc.modules()) == 8
    src, tgt = torch.randn(3, 5, 16), torch.randn(3, 4, 16)
    if not batch_first:
        src, tgt = src.transpose(0, 1), tgt.transpose(0, 1)
    with torch.no_grad():
        torch.testing.assert_close(fast_enc(src), enc(src), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(fast_dec(tgt, src), dec(tgt, src), rtol=1e-4, atol=1e-5)
