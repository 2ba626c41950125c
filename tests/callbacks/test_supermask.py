from __future__ import annotations

import math

import pytest
import pytorch_lightning as pl
import torch
from conftest import PlainModule, TinyNet, make_trainer, random_loader
from pytorch_lightning.callbacks import Callback, ModelCheckpoint
from torch import nn
from torch.nn.utils import parametrize

from er_lightning.callbacks.base import _stream_seed
from er_lightning.callbacks.static import StaticSparsity
from er_lightning.callbacks.supermask import _SCORE_STREAM, Supermask
from er_lightning.masking.supermask import (
    GlobalTopK,
    SupermaskParametrization,
    bake_supermasks,
    candidate_values,
    init_frozen_weights_,
    init_scores,
    kept_count,
    top_in_support,
)
from er_lightning.masking.targets import original_fqn
from er_lightning.sparsity.anneal import annealed_densities, level_at_step
from er_lightning.sparsity.sampling import layer_generator
from er_lightning.sparsity.topk import global_topk_masks, topk_mask

NAMES = ["net.conv1.weight", "net.conv2.weight", "net.fc.weight"]


def _setup(cb: Supermask, module: pl.LightningModule, tmp_path) -> pl.Trainer:  # noqa: ANN001
    trainer = make_trainer(tmp_path, [cb])
    trainer.strategy.connect(module)
    module.trainer = trainer  # type: ignore[misc]
    cb.setup(trainer, module, "fit")
    return trainer


def _originals(module: nn.Module) -> dict[str, torch.Tensor]:
    """Frozen weights by their pre-parametrization names."""
    return {original_fqn(n): p for n, p in module.named_parameters() if n.endswith(".original")}


# ---------------------------------------------------------------------------------------------- annealing
def test_annealing_reproduces_upstream_sequences():
    expected = {
        (0.2, 0.5): [0.48164, 0.38664, 0.31037, 0.24915, 0.2],  # README
        (0.1, 0.3): [0.3, 0.20965, 0.14651, 0.10238, 0.1],  # run_cifar.py
        (0.05, 0.2): [0.2, 0.12167, 0.07402, 0.05, 0.05],
    }
    for (k, er), values in expected.items():
        got = annealed_densities(k, er, levels=5, start=0.6)
        assert got == pytest.approx(values, abs=5e-6)
        assert got[-1] == k  # exactly the target at the last level
    assert annealed_densities(0.2, 0.5, levels=3, anneal=False) == [0.2, 0.2, 0.2]
    assert annealed_densities(0.2, 0.5, levels=1) == [0.2]


def test_level_at_step_splits_into_equal_chunks():
    total = 500 * 391  # README: 5 levels x 100 epochs of 391 steps
    bounds = [s for s in range(1, total) if level_at_step(s, total, 5) != level_at_step(s - 1, total, 5)]
    assert bounds == [100 * 391, 200 * 391, 300 * 391, 400 * 391]
    assert level_at_step(total + 10, total, 5) == 4
    assert [level_at_step(s, 7, 3) for s in range(7)] == [0, 0, 0, 1, 1, 2, 2]


def test_annealing_bad_arguments():
    with pytest.raises(ValueError, match="must not exceed er_density"):
        annealed_densities(0.6, 0.5, levels=2)
    with pytest.raises(ValueError, match="levels must be >= 1"):
        annealed_densities(0.2, 0.5, levels=0)
    with pytest.raises(ValueError, match="start"):
        annealed_densities(0.2, 0.5, levels=2, start=0.1)
    with pytest.raises(ValueError, match=r"er_density must be in \(0, 1\]"):
        annealed_densities(0.2, 1.5, levels=2)


# ---------------------------------------------------------------------------------------------- top-k
def test_kept_count_is_floor_without_float_error():
    assert kept_count(0.2, 216) == 43
    assert kept_count(0.29, 100) == 29  # 0.29 * 100 = 28.999999999999996
    assert kept_count(1.0, 5) == 5
    assert kept_count(0.001, 10) == 0


@pytest.mark.parametrize("tied", [False, True])
def test_per_layer_selection_matches_the_reference_topk(tied):
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        shape = (7, 5, 3)
        scores = torch.randn(shape, generator=g)
        if tied:
            scores = torch.round(scores * 2) / 2  # many equal magnitudes
        support = torch.rand(shape, generator=g) < 0.4
        keep = int(torch.randint(0, int(support.sum()) + 1, (1,), generator=g))
        got = top_in_support(candidate_values(scores, support), keep).view(shape)
        ref = topk_mask(scores.abs(), keep, candidates=support)
        assert torch.equal(got, ref)
        assert int(got.sum()) == keep
        assert not (got & ~support).any()


def test_constant_scores_choose_the_first_support_positions():
    support = torch.tensor([0, 1, 1, 0, 1, 1, 1], dtype=torch.bool)
    got = top_in_support(candidate_values(torch.full((7,), 0.5), support), 3)
    assert got.tolist() == [False, True, True, False, True, False, False]


@pytest.mark.parametrize("tied", [False, True])
def test_global_selection_matches_the_reference(tied):
    g = torch.Generator().manual_seed(1)
    shapes = [(4, 3, 3, 3), (6, 4), (10,)]
    for _ in range(10):
        selector = GlobalTopK()
        params, scores, supports = [], {}, {}
        for i, shape in enumerate(shapes):
            s = torch.randn(shape, generator=g)
            if tied:
                s = torch.round(s)
            m = torch.rand(shape, generator=g) < 0.5
            scores[str(i)], supports[str(i)] = s, m
            params.append(SupermaskParametrization(s, support=m, selector=selector))
        total_support = sum(int(m.sum()) for m in supports.values())
        selector.keep = int(torch.randint(0, total_support + 1, (1,), generator=g))
        ref = global_topk_masks({n: s.abs() for n, s in scores.items()}, selector.keep, supports)
        for i, p in enumerate(params):
            assert torch.equal(p.selected(), ref[str(i)])
        assert sum(int(p.selected().sum()) for p in params) == selector.keep


def test_global_threshold_follows_score_updates():
    selector = GlobalTopK()
    a = SupermaskParametrization(torch.tensor([3.0, 1.0]), selector=selector)
    b = SupermaskParametrization(torch.tensor([2.0, 0.5]), selector=selector)
    selector.keep = 2
    assert a.selected().tolist() == [True, False] and b.selected().tolist() == [True, False]
    with torch.no_grad():
        b.scores.add_(torch.tensor([0.0, 5.0]))  # an in-place update, as an optimizer step makes
    assert a.selected().tolist() == [True, False] and b.selected().tolist() == [False, True]


def test_straight_through_gradient_is_grad_times_weight_times_sign():
    torch.manual_seed(0)
    lin = nn.Linear(6, 4, bias=False)
    w = lin.weight.detach().clone()
    scores = torch.randn(4, 6)
    support = torch.rand(4, 6) < 0.6
    p = SupermaskParametrization(scores, support=support, keep=5)
    lin.weight.requires_grad_(False)
    with torch.no_grad():
        lin.weight.mul_(support)
    parametrize.register_parametrization(lin, "weight", p, unsafe=True)
    x = torch.randn(3, 6)
    lin(x).pow(2).sum().backward()
    b = p.selected()
    assert int(b.sum()) == 5 and not (b & ~support).any()
    w_eff = (w * support * b).requires_grad_(True)
    torch.nn.functional.linear(x, w_eff).pow(2).sum().backward()
    expected = w_eff.grad * (w * support) * torch.sign(scores)
    torch.testing.assert_close(p.scores.grad, expected)
    assert lin.parametrizations.weight.original.grad is None
    assert (p.scores.grad[~support] == 0).all()  # no signal outside the ER mask


# ---------------------------------------------------------------------------------------------- callback setup
def test_setup_masks_exact_counts_inside_the_er_support(tmp_path, tiny_module):
    cb = Supermask(density=0.2, er_density=0.5, distribution="uniform", seed=3)
    _setup(cb, tiny_module, tmp_path)
    static = StaticSparsity(density=0.5, distribution="uniform", seed=3)
    _setup(static, PlainModule(), tmp_path)
    weights = _originals(tiny_module)
    assert list(cb.weight_masks) == NAMES
    for name, p in cb.weight_masks.items():
        er = cb.masked.masks[name]
        assert torch.equal(er, static.masked.masks[name])  # M_ER drawn exactly as StaticSparsity draws it
        b = p.selected()
        assert b.dtype == torch.bool
        assert int(b.sum()) == math.floor(0.2 * b.numel())
        assert not (b & ~er).any()
        w = weights[name]
        assert not w.requires_grad
        assert (w[~er] == 0).all() and (w[er] != 0).all()
        owner = tiny_module.get_submodule(name.rpartition(".")[0])
        effective = owner.weight
        assert torch.count_nonzero(effective) == math.floor(0.2 * b.numel())
        assert (effective[~er] == 0).all()
        mask = p.mask()
        assert set(mask.unique().tolist()) <= {0.0, 1.0}
    trainable = [n for n, q in tiny_module.named_parameters() if q.requires_grad]
    assert trainable == [f"{n.rpartition('.')[0]}.parametrizations.weight.0.scores" for n in NAMES]


def test_weight_object_survives_parametrization(tmp_path, tiny_module):
    before = tiny_module.net.conv1.weight
    cb = Supermask(density=0.2, er_density=0.5)
    _setup(cb, tiny_module, tmp_path)
    assert tiny_module.net.conv1.parametrizations.weight.original is before
    assert cb.masked.params[0] is before


def test_model_without_maskable_layers_raises(tmp_path):
    class NoConv(PlainModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Flatten(), nn.BatchNorm1d(192))

    with pytest.raises(ValueError, match="no parameter is left to mask"):
        _setup(Supermask(), NoConv(), tmp_path)
    with pytest.raises(ValueError, match=">= 2 dims"):
        _setup(Supermask(include=["net.fc.bias"]), PlainModule(), tmp_path)


def test_bad_arguments():
    with pytest.raises(ValueError, match="must not exceed er_density"):
        Supermask(density=0.6, er_density=0.5)
    for bad in (0, 1.5, -0.1, float("nan")):
        with pytest.raises(ValueError, match="density must be"):
            Supermask(density=bad)
        with pytest.raises(ValueError, match="er_density must be"):
            Supermask(er_density=bad)
    with pytest.raises(ValueError, match="levels must be >= 1"):
        Supermask(levels=0)
    with pytest.raises(TypeError, match="levels must be an int"):
        Supermask(levels=2.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown weight_init 'xavier'"):
        Supermask(weight_init="xavier")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown score_init 'ones'"):
        Supermask(score_init="ones")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="scope"):
        Supermask(scope="model")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="start"):
        Supermask(density=0.2, start=0.1)
    with pytest.raises(ValueError, match="bias_gain"):
        Supermask(bias_gain=0)
    with pytest.raises(ValueError, match="unknown distribution"):
        Supermask(distribution="snipp")


# ---------------------------------------------------------------------------------------------- inits
def test_weight_inits_follow_upstream_rules():
    def layers():  # noqa: ANN202
        torch.manual_seed(0)
        conv = nn.Conv2d(64, 128, 3)
        lin = nn.Linear(128, 10)
        return conv, lin

    conv, lin = layers()
    init_frozen_weights_([(conv.weight, conv.bias), (lin.weight, lin.bias)], "kn-zero-bias", seed=1)
    sigma = math.sqrt(2 / (64 * 9))
    assert conv.weight.std().item() == pytest.approx(sigma, rel=0.03)
    assert (conv.bias == 0).all() and (lin.bias == 0).all()

    conv, lin = layers()
    init_frozen_weights_([(conv.weight, conv.bias), (lin.weight, lin.bias)], "signed-const-with-bias", seed=1)
    assert set(conv.weight.unique().tolist()) == pytest.approx([-sigma, sigma])
    assert set(lin.bias.abs().unique().tolist()) == pytest.approx([math.sqrt(2 / 128)])

    conv, lin = layers()
    init_frozen_weights_(
        [(conv.weight, conv.bias)], "signed-const-zero-bias", seed=1, scale=1 / math.sqrt(0.25)
    )
    assert conv.weight.abs().unique().tolist() == pytest.approx([2 * sigma])
    assert (conv.bias == 0).all()

    big = nn.Linear(4, 20000)
    init_frozen_weights_([(big.weight, big.bias)], "kn-nonzero-bias", seed=1, bias_gain=0.05)
    assert big.bias.std().item() == pytest.approx(0.05 * math.sqrt(2 / 4), rel=0.03)

    # seeded: the global RNG does not matter
    a, _ = layers()
    torch.manual_seed(123)
    b = nn.Conv2d(64, 128, 3)
    init_frozen_weights_([(a.weight, None)], "kn-zero-bias", seed=7)
    init_frozen_weights_([(b.weight, None)], "kn-zero-bias", seed=7)
    assert torch.equal(a.weight, b.weight)


def test_callback_weight_init_scales_by_the_final_density(tmp_path, tiny_module):
    cb = Supermask(density=0.25, er_density=0.5, weight_init="signed-const-zero-bias", scale_fan=True, seed=6)
    _setup(cb, tiny_module, tmp_path)
    weights = _originals(tiny_module)
    for name, mask in cb.masked.masks.items():
        fan = math.prod(mask.shape[1:])
        magnitudes = weights[name][mask].abs().unique().tolist()
        assert magnitudes == pytest.approx([math.sqrt(2 / fan) / math.sqrt(0.25)])
    assert (tiny_module.net.fc.bias == 0).all()


def test_score_inits(tmp_path):
    g = torch.Generator().manual_seed(0)
    s = init_scores((128, 64, 3, 3), "kaiming_uniform", generator=g, fan=576)
    assert s.abs().max().item() <= 1 / math.sqrt(576)
    assert s.abs().max().item() > 0.95 / math.sqrt(576)
    bias = init_scores((128,), "kaiming_uniform", generator=g, fan=576, bias=True)
    assert bias.abs().max().item() <= math.sqrt(6 / 576)
    assert (init_scores((3, 3), "constant", generator=g, fan=3) == 0.5).all()

    torch.manual_seed(0)
    module = PlainModule()
    cb = Supermask(density=0.2, er_density=0.5, score_init="upstream", seed=4)
    _setup(cb, module, tmp_path)
    assert (cb.scores["net.conv1.weight"] == 0.5).all()
    assert (cb.scores["net.conv2.weight"] == 0.5).all()
    fc = cb.scores["net.fc.weight"]
    expected = init_scores(
        fc.shape, "kaiming_uniform", generator=layer_generator(_stream_seed(4, _SCORE_STREAM), 2), fan=16
    )
    assert torch.equal(fc.detach(), expected)
    # tied scores: B is the first floor(k n) positions of the ER support in flat order
    er = cb.masked.masks["net.conv1.weight"].reshape(-1)
    first = torch.nonzero(er).view(-1)[: math.floor(0.2 * er.numel())]
    b = cb.weight_masks["net.conv1.weight"].selected().reshape(-1)
    assert torch.equal(torch.nonzero(b).view(-1), first)


# ---------------------------------------------------------------------------------------------- training
class _Probe(Callback):
    """Snapshots parameters at fit start and records which parameters get gradients."""

    def __init__(self) -> None:
        self.before: dict[str, torch.Tensor] = {}
        self.with_grad: set[str] = set()
        self.k: list[float] = []
        self.lr: list[float] = []

    def on_fit_start(self, trainer, pl_module):  # noqa: ANN001, ANN201
        self.before = {n: p.detach().clone() for n, p in pl_module.named_parameters()}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):  # noqa: ANN001, ANN201
        sm = next(c for c in trainer.callbacks if isinstance(c, Supermask))
        self.k.append(sm.k)
        self.lr.append(trainer.optimizers[0].param_groups[0]["lr"])

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):  # noqa: ANN001, ANN201
        self.with_grad |= {n for n, p in pl_module.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_fit_trains_scores_only_and_weights_stay_bit_identical(tmp_path, optimizer):
    torch.manual_seed(0)
    module = PlainModule(optimizer=optimizer, lr=0.05)
    cb = Supermask(density=0.2, er_density=0.5, seed=1)
    probe = _Probe()
    make_trainer(tmp_path, [cb, probe], max_steps=5).fit(module, random_loader())
    scores = {n for n in probe.before if n.endswith(".scores")}
    assert len(scores) == 3
    assert probe.with_grad == scores
    for name, p in module.named_parameters():
        if name in scores:
            assert not torch.equal(p, probe.before[name]), name
        else:
            assert torch.equal(p, probe.before[name]), name
    for name, p in cb.weight_masks.items():
        b = p.selected()
        assert int(b.sum()) == math.floor(0.2 * b.numel())
        assert not (b & ~cb.masked.masks[name]).any()


def test_other_parameters_train_when_not_frozen(tmp_path):
    torch.manual_seed(0)
    module = PlainModule(lr=0.05)
    cb = Supermask(density=0.2, er_density=0.5, freeze_other_parameters=False, weight_init="kn-nonzero-bias")
    probe = _Probe()
    make_trainer(tmp_path, [cb, probe], max_steps=3).fit(module, random_loader())
    params = dict(module.named_parameters())
    assert not torch.equal(params["net.bn1.weight"], probe.before["net.bn1.weight"])
    assert not torch.equal(params["net.fc.bias"], probe.before["net.fc.bias"])
    for name in probe.before:
        if name.endswith(".original"):
            assert torch.equal(params[name], probe.before[name])


def test_scored_biases_keep_floor_k_n_and_train(tmp_path):
    torch.manual_seed(0)
    module = PlainModule(lr=0.05)
    cb = Supermask(density=0.3, er_density=0.5, score_biases=True, weight_init="kn-nonzero-bias")
    probe = _Probe()
    make_trainer(tmp_path, [cb, probe], max_steps=3).fit(module, random_loader())
    assert list(cb.bias_masks) == ["net.fc.weight"]  # the only masked layer with a bias
    bp = cb.bias_masks["net.fc.weight"]
    assert int(bp.selected().sum()) == math.floor(0.3 * 10)
    assert torch.count_nonzero(module.net.fc.bias) == 3
    assert "net.fc.parametrizations.bias.0.scores" in probe.with_grad
    assert torch.equal(
        module.net.fc.parametrizations.bias.original, probe.before["net.fc.parametrizations.bias.original"]
    )


def test_global_scope_keeps_floor_k_total(tmp_path):
    torch.manual_seed(0)
    module = PlainModule(lr=0.05)
    cb = Supermask(density=0.25, er_density=0.5, scope="global", seed=2)
    make_trainer(tmp_path, [cb], max_steps=3).fit(module, random_loader())
    b = cb.binary_masks()
    total = sum(x.numel() for x in b.values())
    assert sum(int(x.sum()) for x in b.values()) == math.floor(0.25 * total)
    ref = global_topk_masks(
        {n: s.detach().abs() for n, s in cb.scores.items()}, math.floor(0.25 * total), cb.masked.masks
    )
    assert all(torch.equal(b[n], ref[n]) for n in b)
    assert len({int(x.sum()) / x.numel() for x in b.values()}) > 1  # layers differ under a global top-k


@pytest.mark.parametrize(
    "optimizer,impl",
    [("adam", "fused"), ("adam", "foreach"), ("adam", "for-loop"), ("sgd", "fused"), ("adamw", "fused")],
)
def test_global_scope_follows_the_scores_under_every_optimizer_implementation(tmp_path, optimizer, impl):
    """Fused steps do not bump the scores' version counters; B must still be the top-k of the current scores."""

    class Module(PlainModule):
        def configure_optimizers(self):  # noqa: ANN201
            kwargs = {"fused": True} if impl == "fused" else {"foreach": impl == "foreach"}
            cls = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}[optimizer]
            extra = {"momentum": 0.9} if optimizer == "sgd" else {}
            return cls(self.parameters(), lr=0.05, **extra, **kwargs)

    class Check(Callback):
        """After every optimizer step, compare the B the forward uses with a fresh global top-k."""

        def __init__(self, cb: Supermask) -> None:
            self.cb, self.checked = cb, 0

        def on_train_start(self, trainer, pl_module):  # noqa: ANN001, ANN201
            self.start = {n: s.detach().clone() for n, s in self.cb.scores.items()}

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):  # noqa: ANN001, ANN201
            b = self.cb.binary_masks()  # through the shared GlobalTopK plan, as the forward
            total = sum(x.numel() for x in b.values())
            keep = math.floor(0.25 * total)
            ref = global_topk_masks(
                {n: s.detach().abs() for n, s in self.cb.scores.items()}, keep, self.cb.masked.masks
            )
            differ = sum(int((b[n] ^ ref[n]).sum()) for n in b)
            assert differ == 0, (trainer.global_step, differ)
            self.checked += 1

    torch.manual_seed(0)
    cb = Supermask(density=0.25, er_density=0.5, scope="global", seed=2)
    check = Check(cb)
    trainer = make_trainer(tmp_path, [cb, check], max_steps=5)
    trainer.fit(Module(), random_loader())
    assert check.checked == 5
    assert cb._step_hooks == []  # the step hooks are gone after fit
    assert all(
        not torch.equal(check.start[n], s.detach()) for n, s in cb.scores.items()
    )  # the scores trained


def test_optimizer_missing_scores_raises(tmp_path):
    class Stale(PlainModule):
        def __init__(self) -> None:
            super().__init__()
            self.frozen_list = list(self.parameters())  # built before Supermask adds the scores

        def configure_optimizers(self):  # noqa: ANN201
            return torch.optim.SGD(self.frozen_list, lr=0.1)

    with pytest.raises(RuntimeError, match="score parameters are in no optimizer"):
        make_trainer(tmp_path, [Supermask()], max_steps=1).fit(Stale(), random_loader())


def test_levels_anneal_k_and_restart_the_lr_schedule(tmp_path):
    from er_lightning.module import SparseLightningModule

    torch.manual_seed(0)
    module = SparseLightningModule(TinyNet(), lr=0.1, lr_schedule="multistep", milestones=[1], gamma=0.1)
    cb = Supermask(density=0.2, er_density=0.5, levels=2, start=0.6)
    probe = _Probe()
    # 2 steps per epoch, 4 epochs: level 1 starts at step 4
    make_trainer(tmp_path, [cb, probe], max_steps=-1, max_epochs=4).fit(module, random_loader(n=32))
    k0, k1 = annealed_densities(0.2, 0.5, levels=2, start=0.6)
    assert probe.k == [k0] * 4 + [k1] * 4
    assert probe.lr == pytest.approx([0.1, 0.1, 0.01, 0.01, 0.1, 0.1, 0.01, 0.01])
    assert cb.level == 1 and cb.k == 0.2


def test_no_anneal_keeps_the_target_and_plain_modules_warn(tmp_path):
    torch.manual_seed(0)
    cb = Supermask(density=0.2, er_density=0.5, levels=2, anneal=False)
    probe = _Probe()
    with pytest.warns(UserWarning, match="no reset_lr_schedule"):
        make_trainer(tmp_path, [cb, probe], max_steps=4).fit(PlainModule(), random_loader())
    assert probe.k == [0.2] * 4
    assert probe.lr == [0.05] * 4


# ---------------------------------------------------------------------------------------------- resume, export
def _fit_with_ckpt(tmp_path, cb, max_epochs, ckpt_path=None, module=None):  # noqa: ANN001, ANN202
    torch.manual_seed(0)
    module = module or PlainModule()
    ckpt = ModelCheckpoint(
        dirpath=tmp_path / "ckpt", save_last=True, save_top_k=-1, save_on_train_epoch_end=True
    )
    trainer = make_trainer(
        tmp_path, [cb, ckpt], max_steps=-1, max_epochs=max_epochs, enable_checkpointing=True
    )
    trainer.fit(module, random_loader(n=32), ckpt_path=ckpt_path)
    return module, trainer


def _args() -> dict:
    return dict(density=0.2, er_density=0.5, levels=2, seed=1, restart_lr_each_level=False)


def test_resume_restores_scores_masks_and_level(tmp_path):
    # 3 epochs of 2 steps, 2 levels: level 1 starts at step 3, after the epoch-0 checkpoint (step 2)
    full_cb = Supermask(**_args())
    full, _ = _fit_with_ckpt(tmp_path / "full", full_cb, max_epochs=3)
    ckpt = tmp_path / "full" / "ckpt" / "epoch=0-step=2.ckpt"
    state = torch.load(ckpt, weights_only=False)["callbacks"]
    saved = next(v for k, v in state.items() if k.startswith("Supermask"))
    assert saved["level"] == 0 and saved["k"] == pytest.approx(annealed_densities(0.2, 0.5, 2)[0])

    resumed_cb = Supermask(**_args())
    torch.manual_seed(99)
    resumed, _ = _fit_with_ckpt(
        tmp_path / "resume", resumed_cb, max_epochs=3, ckpt_path=ckpt, module=PlainModule()
    )
    ref = dict(full.named_parameters())
    for name, p in resumed.named_parameters():
        assert torch.equal(p, ref[name]), name
    assert resumed_cb.level == full_cb.level == 1 and resumed_cb.k == full_cb.k == 0.2
    for name in NAMES:
        assert torch.equal(resumed_cb.masked.masks[name], full_cb.masked.masks[name])


def test_resume_with_other_config_raises(tmp_path):
    _fit_with_ckpt(tmp_path / "a", Supermask(**_args()), max_epochs=1)
    ckpt = tmp_path / "a" / "ckpt" / "last.ckpt"
    with pytest.raises(ValueError, match=r"levels: checkpoint 2 vs now 3"):
        _fit_with_ckpt(tmp_path / "b", Supermask(**{**_args(), "levels": 3}), max_epochs=2, ckpt_path=ckpt)


class _WithValidation(PlainModule):
    def validation_step(self, batch, batch_idx):  # noqa: ANN001, ANN201
        x, y = batch
        self.log("val/loss", nn.functional.cross_entropy(self(x), y))


def test_bake_gives_a_plain_model_with_identical_outputs(tmp_path):
    torch.manual_seed(0)
    module = _WithValidation(lr=0.05)
    cb = Supermask(density=0.2, er_density=0.5, seed=5)
    trainer = make_trainer(tmp_path, [cb], max_steps=3)
    trainer.fit(module, random_loader())
    before = cb.binary_masks()
    trainer.validate(module, random_loader(n=16))  # setup runs again: same parametrizations, same B
    assert all(torch.equal(before[n], b) for n, b in cb.binary_masks().items())
    module.eval()
    baked = cb.bake(module)
    assert not any(parametrize.is_parametrized(m) for m in baked.modules())
    plain = PlainModule()
    plain.load_state_dict(baked.state_dict())  # strict: plain names, no callback needed
    plain.eval()
    x = random_loader(n=8, batch_size=8, seed=3).dataset.tensors[0]
    with torch.no_grad():
        assert torch.equal(plain(x), module(x))
    for name, p in cb.weight_masks.items():
        w = plain.get_parameter(name)
        assert torch.count_nonzero(w) == int(p.selected().sum())
        assert (w[~cb.masked.masks[name]] == 0).all()
    assert parametrize.is_parametrized(module.net.conv1)  # the original is untouched
    with torch.no_grad():
        assert torch.equal(module(x), plain(x))
    assert bake_supermasks(module.net).conv1.weight.shape == (8, 3, 3, 3)


def test_tensorboard_gets_k_density_and_flips(tmp_path):
    from pytorch_lightning.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    torch.manual_seed(0)
    cb = Supermask(
        density=0.2, er_density=0.5, levels=2, log_layer_densities=True, restart_lr_each_level=False
    )
    logger = TensorBoardLogger(str(tmp_path), name="tb")
    make_trainer(tmp_path, [cb], max_steps=-1, max_epochs=2, logger=logger).fit(
        PlainModule(lr=0.5), random_loader(n=32)
    )
    acc = EventAccumulator(logger.log_dir)
    acc.Reload()
    scalars = acc.Tags()["scalars"]
    assert {"slt/k", "slt/flipped", "slt/level", "sparsity/density_global", "slt/er_density_global"} <= set(
        scalars
    )
    ks = [e.value for e in acc.Scalars("slt/k")]
    assert ks[0] == pytest.approx(annealed_densities(0.2, 0.5, 2)[0]) and ks[-1] == pytest.approx(0.2)
    total = sum(m.numel() for m in cb.masked.masks.values())
    kept = sum(math.floor(0.2 * m.numel()) for m in cb.masked.masks.values())
    assert acc.Scalars("sparsity/density_global")[-1].value == pytest.approx(kept / total, abs=1e-6)
    assert acc.Scalars("slt/er_density_global")[-1].value == pytest.approx(0.5, abs=1e-3)
    flips = [e.value for e in acc.Scalars("slt/flipped")]
    assert all(0 <= f <= 1 for f in flips) and max(flips) > 0  # k dropped between the two epochs
    assert "sparsity/density/net.fc.weight" in scalars


def test_support_follows_dtype_and_device_moves(tmp_path, tiny_module):
    cb = Supermask(density=0.2, er_density=0.5)
    _setup(cb, tiny_module, tmp_path)
    tiny_module.to(torch.float64)
    p = cb.weight_masks["net.conv1.weight"]
    assert p.support.dtype == torch.bool and p.scores.dtype == torch.float64
    out = tiny_module(torch.randn(2, 3, 8, 8, dtype=torch.float64))
    assert out.dtype == torch.float64
    # and the device: the meta device stands in for an accelerator on a CPU-only machine
    tiny_module.to("meta")
    for p in (*cb.weight_masks.values(), *cb.bias_masks.values()):
        assert p.support is None or p.support.device.type == "meta"
        assert p.scores.device.type == "meta"
    assert all(pp.support.device.type == "meta" for pp in cb.weight_masks.values())


def test_cpu_kth_largest_is_exact_on_large_tensors_with_ties():
    from er_lightning.masking.supermask import kth_largest

    g = torch.Generator().manual_seed(0)
    n = 70_000  # above the sampled-selection threshold
    cases = [
        torch.randn(n, generator=g).abs(),
        torch.randint(0, 50, (n,), generator=g).float(),  # heavy ties
        torch.where(torch.rand(n, generator=g) < 0.5, torch.rand(n, generator=g), torch.full((n,), -1.0)),
    ]
    for values in cases:
        for k in (1, 7, n // 5, n // 2, n - 3, n):
            expected = torch.kthvalue(values, n - k + 1).values
            assert kth_largest(values, k) == expected, k
