from __future__ import annotations

import json
import math

import pytest
import pytorch_lightning as pl
import torch
from conftest import PlainModule, TinyNet, make_trainer, random_loader
from pytorch_lightning.callbacks import Callback, ModelCheckpoint
from torch import nn

from er_lightning.callbacks.soft_threshold import SoftThreshold, scheduled_density
from er_lightning.callbacks.static import StaticSparsity
from er_lightning.masking.io import load_masks
from er_lightning.masking.soft_threshold import (
    SoftThresholdParametrization,
    attach_soft_threshold_,
    bake_state_dict,
    critical_shifts,
    load_densities,
    original_fqn,
    rescale_densities,
    save_densities,
    shift_for_count,
    soft_threshold,
)
from er_lightning.sparsity import layer_densities
from er_lightning.sparsity.topk import exact_count

NAMES = ["net.conv1.weight", "net.conv2.weight", "net.fc.weight"]
SHAPES = {"net.conv1.weight": (8, 3, 3, 3), "net.conv2.weight": (16, 8, 3, 3), "net.fc.weight": (10, 16)}


def _setup(cb: pl.Callback, module: pl.LightningModule, tmp_path) -> pl.Trainer:  # noqa: ANN001
    trainer = make_trainer(tmp_path, [cb])
    trainer.strategy.connect(module)
    module.trainer = trainer  # type: ignore[misc]
    cb.setup(trainer, module, "fit")
    return trainer


def _layer(
    module: pl.LightningModule, fqn: str
) -> tuple[torch.Tensor, SoftThresholdParametrization, torch.Tensor]:
    """(W, parametrization, Ŵ) of a soft-thresholded layer named by its original FQN."""
    mod = module.get_submodule(fqn.rpartition(".")[0])
    plist = mod.parametrizations.weight
    return plist.original, plist[0], mod.weight


# ------------------------------------------------------------------------------------------ the function
def test_soft_threshold_values_by_hand():
    w = torch.tensor([[0.5, -0.5, 0.1, -0.05, 0.0, 0.3]])
    s = torch.tensor([[0.0]])  # sigmoid(0) = 0.5
    out = soft_threshold(w, torch.logit(torch.tensor([[0.2]])))
    torch.testing.assert_close(out, torch.tensor([[0.3, -0.3, 0.0, 0.0, 0.0, 0.1]]))
    assert torch.equal(soft_threshold(w, s), torch.zeros_like(w))  # |W| <= 0.5 everywhere: all exactly zero
    # identity: g(s) = max(s, 0); a negative s thresholds nothing (and 0 stays 0)
    torch.testing.assert_close(
        soft_threshold(w, torch.tensor([[0.1]]), "identity"), torch.tensor([[0.4, -0.4, 0, 0, 0, 0.2]])
    )
    assert torch.equal(soft_threshold(w, torch.tensor([[-3.0]]), "identity"), w)


@pytest.mark.parametrize("sparse_function,s", [("sigmoid", -1.5), ("identity", 0.15)])
@pytest.mark.parametrize("per_channel", [False, True])
def test_gradcheck_away_from_the_kink(sparse_function, s, per_channel):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(4, 3, 2, 2, generator=g, dtype=torch.float64)
    thr = 1 / (1 + math.exp(-s)) if sparse_function == "sigmoid" else s
    # keep every |W| at least 0.02 away from the threshold (the kink) and from 0 (sign)
    w = torch.where((w.abs() - thr).abs() < 0.02, w + 0.1 * torch.sign(w), w)
    w = torch.where(w.abs() < 0.02, torch.full_like(w, 0.5), w).requires_grad_()
    shape = (4, 1, 1, 1) if per_channel else (1, 1, 1, 1)
    s_t = torch.full(shape, s, dtype=torch.float64) + 0.01 * torch.arange(shape[0], dtype=torch.float64).view(
        -1, 1, 1, 1
    )
    s_t.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda a, b: soft_threshold(a, b, sparse_function), (w, s_t), eps=1e-6, atol=1e-7
    )


def test_gradients_are_str_gradients():
    w = torch.tensor([0.6, -0.4, 0.05, -0.02, 0.0], requires_grad=True)
    s = torch.tensor([-2.0], requires_grad=True)  # g = sigmoid(-2) = 0.1192
    gout = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    soft_threshold(w, s).backward(gout)
    active = torch.tensor([1.0, 1.0, 0.0, 0.0, 0.0])
    torch.testing.assert_close(w.grad, gout * active)  # dŴ/dW = 1 on active entries, 0 elsewhere
    sig = torch.sigmoid(torch.tensor(-2.0))
    expected_s = -(sig * (1 - sig)) * (1.0 * 1 + 2.0 * -1)  # -g'(s)·Σ_active sign(W)·dL/dŴ
    torch.testing.assert_close(s.grad, expected_s.reshape(1))


def test_parametrization_names_and_shapes():
    conv = nn.Conv2d(3, 5, 3, bias=False)
    w = conv.weight
    p = attach_soft_threshold_(conv, "weight", s_init=-4.0, per_channel=True)
    assert conv.parametrizations.weight.original is w  # same Parameter object, new FQN
    assert [n for n, _ in conv.named_parameters()] == [
        "parametrizations.weight.original",
        "parametrizations.weight.0.threshold",
    ]
    assert tuple(p.threshold.shape) == (5, 1, 1, 1)
    assert torch.equal(p.threshold, torch.full((5, 1, 1, 1), -4.0))
    assert original_fqn("net.conv1.parametrizations.weight.original") == "net.conv1.weight"
    assert original_fqn("parametrizations.bias.original") == "bias"
    with pytest.raises(ValueError, match="s_init must be a finite"):
        SoftThresholdParametrization((1,), float("inf"))
    with pytest.raises(ValueError, match="unknown sparse_function 'tanh'"):
        SoftThresholdParametrization((1,), 0.0, "tanh")  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------ the controller maths
def test_critical_shifts_and_shift_for_count_by_hand():
    w = torch.tensor([0.5, -0.2, 0.0, 1.5, 0.1])
    s = torch.tensor([-1.0])
    crit = critical_shifts(w, s, "sigmoid")
    logit = lambda x: math.log(x / (1 - x))  # noqa: E731
    assert crit[0].item() == pytest.approx(logit(0.5) + 1.0)
    assert crit[1].item() == pytest.approx(logit(0.2) + 1.0)
    assert crit[2].item() == -math.inf and crit[3].item() == math.inf
    for k in range(5):
        shift = shift_for_count(crit, k)
        kept = int((soft_threshold(w, s + shift) != 0).sum())
        assert kept == max(min(k, 4), 1), (k, shift)  # |W| >= 1 is always kept, W = 0 never
    assert shift_for_count(crit, 2) == 0.0  # g = sigmoid(-1) = 0.269 already keeps exactly 0.5 and 1.5
    assert shift_for_count(crit, 3) < 0.0  # keeping 0.2 as well lowers the threshold
    crit_id = critical_shifts(w, torch.tensor([0.15]), "identity")
    torch.testing.assert_close(crit_id[[0, 1, 4]], torch.tensor([0.35, 0.05, -0.05], dtype=torch.float64))


def test_scheduled_density():
    assert scheduled_density(0.0, 0.5, 0.1, "cosine") == pytest.approx(0.5)
    assert scheduled_density(0.5, 0.5, 0.1, "cosine") == pytest.approx(0.3)
    assert scheduled_density(1.0, 0.5, 0.1, "cosine") == pytest.approx(0.1)
    assert scheduled_density(0.25, 0.5, 0.1, "linear", start=0.0, end=0.5) == pytest.approx(0.3)
    assert scheduled_density(0.9, 0.5, 0.1, "linear", start=0.0, end=0.5) == pytest.approx(0.1)
    assert scheduled_density(0.3, 0.5, 0.1, "constant", start=0.2) == pytest.approx(0.1)


# ------------------------------------------------------------------------------------------ masks and setup
@pytest.mark.parametrize(
    "distribution,redistribute",
    [("uniform", True), ("erk", False), ("erk", True), ("balanced", False), ("pyramidal", True)],
)
def test_same_support_as_static_sparsity(tmp_path, distribution, redistribute):
    torch.manual_seed(0)
    static_module, st_module = PlainModule(), PlainModule()
    st_module.load_state_dict(static_module.state_dict())
    kwargs = dict(density=0.3, distribution=distribution, redistribute=redistribute, seed=4)
    static = StaticSparsity(**kwargs)
    _setup(static, static_module, tmp_path)
    cb = SoftThreshold(s_init=-200, **kwargs)
    _setup(cb, st_module, tmp_path)
    expected = layer_densities(SHAPES, 0.3, distribution, redistribute=redistribute)
    assert cb.masked.names == NAMES
    for name in NAMES:
        mask = cb.masked.masks[name]
        assert torch.equal(mask, static.masked.masks[name])
        assert int(mask.sum()) == exact_count(expected[name], mask.numel())
        w, p, w_hat = _layer(st_module, name)
        assert (w[~mask] == 0).all() and (w_hat[~mask] == 0).all()
        assert torch.equal(w_hat, w)  # s = -200: g = 0 in float32, Ŵ = W on the support
        assert tuple(p.threshold.shape) == (1,) * w.dim()
    names = [n for n, _ in st_module.named_parameters()]
    assert "net.conv1.parametrizations.weight.0.threshold" in names
    assert "net.conv1.weight" not in names


def test_fit_keeps_zeros_and_trains_thresholds(tmp_path):
    torch.manual_seed(0)
    module = PlainModule(optimizer="sgd", lr=0.05, weight_decay=5e-4)
    cb = SoftThreshold(density=0.4, distribution="erk", s_init=-2.5, per_channel=True, seed=2)
    trainer = make_trainer(tmp_path, [cb], max_steps=6)
    trainer.fit(module, random_loader())
    opt = trainer.optimizers[0]
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    saw_below_threshold = False
    for name in NAMES:
        mask = cb.masked.masks[name]
        w, p, w_hat = _layer(module, name)
        g = p.g().detach()
        assert (w[~mask] == 0).all(), name  # W stays 0 outside M_ER
        assert (w_hat[~mask] == 0).all(), name
        below = w.abs() <= g
        assert (w_hat[below] == 0).all(), name  # Ŵ = 0 wherever |W| <= g(s)
        torch.testing.assert_close(w_hat[~below].abs(), (w.abs() - g.expand_as(w))[~below])
        saw_below_threshold |= bool((below & mask).any())
        assert id(p.threshold) in in_opt
        assert not torch.equal(p.threshold, torch.full_like(p.threshold, -2.5)), name  # s was trained
        assert tuple(p.threshold.shape)[0] == w.shape[0]
        for t in (v for v in opt.state[w].values() if torch.is_tensor(v) and v.shape == w.shape):
            assert (t[~mask] == 0).all()
    assert saw_below_threshold  # the test really exercised thresholding on the support
    assert cb.effective_global_density() < cb.masked.global_density()


def test_kaiming_normal_init_is_seeded(tmp_path):
    stds = []
    weights = []
    for global_seed in (0, 1):
        torch.manual_seed(global_seed)
        module = PlainModule()
        module.net.conv2 = nn.Conv2d(8, 256, 3, bias=False)
        module.net.bn2 = nn.BatchNorm2d(256)
        module.net.fc = nn.Linear(256, 10)
        cb = SoftThreshold(density=1.0, distribution="uniform", init="kaiming_normal", seed=3)
        _setup(cb, module, tmp_path)
        w = _layer(module, "net.conv2.weight")[0].detach().clone()
        weights.append(w)
        stds.append(w.std().item())
    assert torch.equal(weights[0], weights[1])  # from the callback's seed, not the global RNG
    assert stds[0] == pytest.approx(math.sqrt(2 / (8 * 9)), rel=0.03)


def test_setup_again_is_idempotent_and_second_callback_refuses(tmp_path, tiny_module):
    cb = SoftThreshold(density=0.3, s_init=-3.0)
    trainer = _setup(cb, tiny_module, tmp_path)
    cb.setup(trainer, tiny_module, "validate")
    names = [n for n, _ in tiny_module.named_parameters()]
    assert sum(n.endswith(".threshold") for n in names) == 3  # not stacked twice
    with pytest.raises(RuntimeError, match="already carries soft-threshold"):
        _setup(SoftThreshold(density=0.3), tiny_module, tmp_path)


def test_refuses_tensors_parametrized_by_something_else(tmp_path):
    class Double(nn.Module):
        def forward(self, w: torch.Tensor) -> torch.Tensor:
            return 2 * w

    module = PlainModule()
    torch.nn.utils.parametrize.register_parametrization(module.net.conv2, "weight", Double())
    with pytest.raises(ValueError, match=r"already parametrized.*net.conv2.parametrizations.weight.original"):
        _setup(SoftThreshold(density=0.5), module, tmp_path)


# ------------------------------------------------------------------------------------------ bad input
def test_bad_arguments_raise():
    with pytest.raises(
        ValueError, match=r"unknown init 'xavier'.*'he_sparse', 'looks_linear', 'kaiming_normal'"
    ):
        SoftThreshold(density=0.3, init="xavier")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"unknown distribution 'random'.*str_induced"):
        SoftThreshold(distribution="random")
    with pytest.raises(ValueError, match="unknown sparse_function 'relu'"):
        SoftThreshold(sparse_function="relu")  # type: ignore[arg-type]
    for bad in (float("nan"), float("inf"), "x"):
        with pytest.raises(ValueError, match="s_init must be a finite"):
            SoftThreshold(s_init=bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="needs densities_file"):
        SoftThreshold(distribution="str_induced")
    with pytest.raises(ValueError, match="only read with distribution='str_induced'"):
        SoftThreshold(distribution="erk", densities_file="d.json")
    with pytest.raises(ValueError, match="density=None is only allowed"):
        SoftThreshold(density=None, distribution="erk")
    with pytest.raises(ValueError, match="exceeds the ER support"):
        SoftThreshold(density=0.2, target_density=0.3)
    with pytest.raises(ValueError, match="target_start and target_end"):
        SoftThreshold(density=0.2, target_density=0.1, target_start=0.5, target_end=0.5)
    with pytest.raises(ValueError, match="target_schedule"):
        SoftThreshold(target_schedule="exp")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="density must be"):
        SoftThreshold(density=0.0)
    assert SoftThreshold(distribution="str-induced-er", densities_file="x.json").distribution == "str_induced"


def test_s_init_that_zeroes_everything_raises_at_setup(tmp_path, tiny_module):
    with pytest.raises(ValueError, match=r"s_init=100.0.*zeroes every weight"):
        _setup(SoftThreshold(density=0.5, s_init=100.0), tiny_module, tmp_path)


# ------------------------------------------------------------------------------------------ str_induced
def test_rescale_densities_by_hand():
    shapes = {"a": (10, 10), "b": (10, 10), "c": (800,)}
    d = {"a": 0.5, "b": 0.25, "c": 0.1}
    out = rescale_densities(shapes, d, 0.4)
    # eps = 400/155 makes "a" overflow -> dense; then eps = 300/105 for the rest
    assert out["a"] == 1.0
    assert out["b"] == pytest.approx(0.25 * 300 / 105)
    assert out["c"] == pytest.approx(0.1 * 300 / 105)
    assert 100 * out["a"] + 100 * out["b"] + 800 * out["c"] == pytest.approx(400)
    with pytest.raises(ValueError, match=r"at most 0.200000"):
        rescale_densities(shapes, {"a": 0.5, "b": 0.5, "c": 0.0}, 0.3)


def test_str_induced_reads_exported_densities(tmp_path):
    torch.manual_seed(0)
    first = SoftThreshold(density=0.5, distribution="erk", s_init=-2.5, seed=1)
    make_trainer(tmp_path / "a", [first], max_steps=4).fit(PlainModule(), random_loader())
    path = tmp_path / "densities.json"
    written = first.export_densities(path)
    realised = first.effective_densities()
    obj = json.loads(path.read_text())
    assert obj["densities"] == pytest.approx(realised)
    assert obj["global"] == pytest.approx(first.effective_global_density())
    assert load_densities(path, SHAPES) == pytest.approx(realised)
    assert written["densities"] == pytest.approx(realised)

    # as-is (density=None): each layer keeps round(d_l · n_l) entries
    as_is = SoftThreshold(
        density=None, distribution="str_induced", densities_file=str(path), s_init=-200, seed=9
    )
    _setup(as_is, PlainModule(), tmp_path)
    for name in NAMES:
        mask = as_is.masked.masks[name]
        assert int(mask.sum()) == exact_count(realised[name], mask.numel())
    # rescaled to an overall 0.3 (with redistribution of overflow)
    scaled = SoftThreshold(density=0.3, distribution="str_induced", densities_file=str(path), seed=9)
    _setup(scaled, PlainModule(), tmp_path)
    expected = rescale_densities(SHAPES, realised, 0.3)
    assert scaled.target_densities == pytest.approx(expected)
    numel = sum(math.prod(s) for s in SHAPES.values())
    assert sum(expected[n] * math.prod(SHAPES[n]) for n in NAMES) / numel == pytest.approx(0.3)
    assert scaled.masked.global_density() == pytest.approx(0.3, abs=2 / numel)


def test_str_induced_file_that_does_not_match_raises(tmp_path):
    bad = tmp_path / "bad.json"
    save_densities(
        bad,
        {"net.conv1.weight": 0.5, "net.other.weight": 0.1},
        {"net.conv1.weight": (8, 3, 3, 3), "net.other.weight": (4, 4)},
    )
    cb = SoftThreshold(density=None, distribution="str_induced", densities_file=str(bad))
    with pytest.raises(
        ValueError, match=r"missing from the file: \['net.conv2.weight', 'net.fc.weight'\].*net.other.weight"
    ):
        _setup(cb, PlainModule(), tmp_path)
    pct = tmp_path / "pct.json"
    pct.write_text(json.dumps({"densities": {n: 80.0 for n in NAMES}}))
    with pytest.raises(ValueError, match="looks like a percentage"):
        load_densities(pct, SHAPES)
    upstream = tmp_path / "upstream.json"
    upstream.write_text(json.dumps({"conv1": 12.0, "total": 70.0}))
    with pytest.raises(ValueError, match="upstream STR sparsity file"):
        load_densities(upstream, SHAPES)
    shape = tmp_path / "shape.json"
    save_densities(shape, {n: 0.5 for n in NAMES}, {**SHAPES, "net.fc.weight": (10, 32)})
    with pytest.raises(ValueError, match=r"shape mismatches.*net.fc.weight"):
        load_densities(shape, SHAPES)
    with pytest.raises(FileNotFoundError):
        load_densities(tmp_path / "nothing.json", SHAPES)


# ------------------------------------------------------------------------------------------ controller in a fit
class _Recorder(Callback):
    def __init__(self, cb: SoftThreshold) -> None:
        self.cb = cb
        self.seen: list[tuple[int, float]] = []

    def on_train_epoch_end(self, trainer, pl_module):  # noqa: ANN001, ANN201
        self.seen.append((trainer.global_step, self.cb.effective_global_density()))


def test_controller_follows_schedule_and_reaches_target(tmp_path):
    torch.manual_seed(0)
    cb = SoftThreshold(
        density=0.5, distribution="erk", s_init=-200, seed=1, target_density=0.1, target_schedule="linear"
    )
    rec = _Recorder(cb)
    trainer = make_trainer(tmp_path, [cb, rec], max_steps=-1, max_epochs=4)
    trainer.fit(PlainModule(), random_loader(n=32))
    numel = sum(math.prod(s) for s in SHAPES.values())
    assert cb.start_density == pytest.approx(0.5, abs=1 / numel)  # s = -200: Ŵ = W on the support
    total = trainer.estimated_stepping_batches
    for step, realised in rec.seen:
        expected = scheduled_density(step / total, cb.start_density, 0.1, "linear")
        assert realised == pytest.approx(expected, abs=2 / numel), step
    assert cb.effective_global_density() == pytest.approx(0.1, abs=2 / numel)
    for name in NAMES:  # still nothing outside the support
        _, _, w_hat = _layer(trainer.lightning_module, name)
        assert (w_hat[~cb.masked.masks[name]] == 0).all()


# ------------------------------------------------------------------------------------------ resume
class _StopAfter(Callback):
    """Stop after ``epochs`` epochs of a longer run (the controller's schedule depends on the run's length)."""

    def __init__(self, epochs: int) -> None:
        self.epochs = epochs

    def on_train_epoch_end(self, trainer, pl_module):  # noqa: ANN001, ANN201
        if trainer.current_epoch + 1 >= self.epochs:
            trainer.should_stop = True


def _fit_with_ckpt(tmp_path, cb, max_epochs, ckpt_path=None, module=None, stop_after=None):  # noqa: ANN001, ANN202
    torch.manual_seed(0)
    module = module or PlainModule()
    ckpt = ModelCheckpoint(
        dirpath=tmp_path / "ckpt", save_last=True, save_top_k=-1, save_on_train_epoch_end=True
    )
    extra = [_StopAfter(stop_after)] if stop_after else []
    trainer = make_trainer(
        tmp_path, [cb, ckpt, *extra], max_steps=-1, max_epochs=max_epochs, enable_checkpointing=True
    )
    trainer.fit(module, random_loader(n=32), ckpt_path=ckpt_path)
    return module, trainer


def _make(**kw):  # noqa: ANN003, ANN202
    return SoftThreshold(density=0.4, distribution="erk", s_init=-2.5, seed=1, target_density=0.2, **kw)


def test_resume_restores_thresholds_masks_and_controller(tmp_path):
    full_module, _ = _fit_with_ckpt(tmp_path / "full", full_cb := _make(), max_epochs=3)
    _fit_with_ckpt(tmp_path / "part", _make(), max_epochs=3, stop_after=1)
    resumed_cb = _make()
    torch.manual_seed(99)
    resumed_module, _ = _fit_with_ckpt(
        tmp_path / "resume",
        resumed_cb,
        max_epochs=3,
        ckpt_path=tmp_path / "part" / "ckpt" / "last.ckpt",
        module=PlainModule(),
    )
    assert resumed_cb.start_density == full_cb.start_density
    for name in NAMES:
        assert torch.equal(resumed_cb.masked.masks[name], full_cb.masked.masks[name])
    full = dict(full_module.named_parameters())
    resumed = dict(resumed_module.named_parameters())
    assert sum(n.endswith(".threshold") for n in resumed) == 3
    for name, p in resumed.items():
        torch.testing.assert_close(p, full[name], rtol=0, atol=0)
    part = tmp_path / "part" / "ckpt" / "last.ckpt"
    with pytest.raises(ValueError, match=r"sparse_function: checkpoint 'sigmoid' vs now 'identity'"):
        _fit_with_ckpt(tmp_path / "x", _make(sparse_function="identity"), max_epochs=3, ckpt_path=part)
    # a per-channel model cannot even load the per-layer thresholds (torch names the tensors)
    with pytest.raises(
        RuntimeError, match=r"size mismatch for net.conv1.parametrizations.weight.0.threshold"
    ):
        _fit_with_ckpt(tmp_path / "y", _make(per_channel=True), max_epochs=3, ckpt_path=part)


# ------------------------------------------------------------------------------------------ export
def test_finalize_and_export_masks(tmp_path):
    torch.manual_seed(0)
    module = PlainModule()
    cb = SoftThreshold(density=0.5, distribution="uniform", s_init=-2.5, seed=3)
    make_trainer(tmp_path, [cb], max_steps=3).fit(module, random_loader())
    module.eval()
    x = torch.randn(4, 3, 8, 8)
    plain = cb.finalize(module)
    assert not any("parametrizations" in n for n, _ in plain.named_parameters())
    assert any(
        "parametrizations" in n for n, _ in module.named_parameters()
    )  # the trained module is untouched
    params = dict(plain.named_parameters())
    for name in NAMES:
        assert isinstance(params[name], nn.Parameter)
        assert torch.equal(params[name], _layer(module, name)[2])
    torch.testing.assert_close(plain(x), module(x))
    fresh = PlainModule()
    fresh.load_state_dict(plain.state_dict())  # plain keys load into the unparametrized class
    fresh.eval()
    torch.testing.assert_close(fresh(x), module(x))
    baked = bake_state_dict(module.state_dict())  # a training checkpoint's state_dict, without the callback
    assert set(baked) == set(fresh.state_dict())
    fresh.load_state_dict(baked)
    torch.testing.assert_close(fresh(x), module(x))
    masks = cb.export_masks(tmp_path / "masks.pt")
    loaded = load_masks(tmp_path / "masks.pt", SHAPES)
    for name in NAMES:
        assert torch.equal(loaded[name], masks[name])
        assert torch.equal(loaded[name], params[name] != 0)
        assert not (loaded[name] & ~cb.masked.masks[name]).any()  # effective mask ⊆ ER support
    cb.export_masks(tmp_path / "s.pt", which="support")
    support = load_masks(tmp_path / "s.pt", SHAPES)
    assert all(torch.equal(support[n], cb.masked.masks[n]) for n in NAMES)
    with pytest.raises(ValueError, match="carries no soft-threshold"):
        cb.finalize(TinyNet())


# ------------------------------------------------------------------------------------------ logging
def test_tensorboard_tags(tmp_path):
    from pytorch_lightning.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    torch.manual_seed(0)
    cb = SoftThreshold(
        density=0.4, distribution="erk", s_init=-2.5, log_layer_densities=True, target_density=0.3
    )
    logger = TensorBoardLogger(str(tmp_path), name="tb")
    trainer = make_trainer(tmp_path, [cb], max_steps=-1, max_epochs=2, logger=logger)
    trainer.fit(PlainModule(), random_loader(n=32))
    acc = EventAccumulator(logger.log_dir)
    acc.Reload()
    scalars = acc.Tags()["scalars"]
    for tag in (
        "sparsity/density_global",
        "str/density_global",
        "str/support_density_global",
        "str/threshold/net.conv1.weight",
        "str/threshold/net.fc.weight",
        "sparsity/density/net.conv2.weight",
        "str/target_density",
        "str/control_shift",
    ):
        assert tag in scalars, tag
    last = acc.Scalars("str/density_global")[-1].value
    assert last == pytest.approx(cb.effective_global_density(), abs=1e-6)
    assert last == pytest.approx(0.3, abs=2e-3)
    assert acc.Scalars("sparsity/density_global")[-1].value == pytest.approx(last, abs=1e-6)
    assert acc.Scalars("str/support_density_global")[-1].value == pytest.approx(0.4, abs=1e-3)
    g = cb.thresholds()["net.conv1.weight"].item()
    assert acc.Scalars("str/threshold/net.conv1.weight")[-1].value == pytest.approx(g, rel=1e-5)
    assert len(acc.Scalars("str/density_global")) == 3  # train start + 2 epoch ends
