from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from conftest import PlainModule, make_trainer, random_loader
from pytorch_lightning.callbacks import Callback, ModelCheckpoint

from er_lightning.callbacks.dynamic import (
    GMP,
    SET,
    DynamicSparsity,
    GraNet,
    RigL,
    drop_and_grow,
)
from er_lightning.sparsity.schedules import ConstantDrop, CosineDrop, cubic_density, drop_count
from er_lightning.sparsity.topk import exact_count

NAMES = ["net.conv1.weight", "net.conv2.weight", "net.fc.weight"]
N_TOTAL = 8 * 3 * 9 + 16 * 8 * 9 + 10 * 16


class Probe(Callback):
    """Placed after the DST callback: sees each update right after it, before the optimizer step."""

    def __init__(self, cb: DynamicSparsity) -> None:
        self.cb = cb
        self.records: list[dict] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):  # noqa: ANN001
        up = self.cb.last_update
        if up is None or (self.records and self.records[-1]["step"] == up.step):
            return
        params = dict(pl_module.named_parameters())
        rec = {
            "step": up.step,
            "target": up.target_density,
            "fraction": up.drop_fraction,
            "masks": {n: m.clone() for n, m in self.cb.masked.masks.items()},
            "dropped": {n: t.clone() for n, t in up.dropped.items()},
            "grown": {n: t.clone() for n, t in up.grown.items()},
            "weights_at_grown": {n: params[n].detach()[up.grown[n]].clone() for n in up.grown},
            "state_at_grown": {
                n: [
                    v[up.grown[n]].clone()
                    for v in optimizer.state.get(params[n], {}).values()
                    if torch.is_tensor(v) and v.shape == params[n].shape
                ]
                for n in up.grown
            },
            "state_kinds": {
                n: sorted(
                    k
                    for k, v in optimizer.state.get(params[n], {}).items()
                    if torch.is_tensor(v) and v.shape == params[n].shape
                )
                for n in up.grown
            },
        }
        self.records.append(rec)


def _fit(tmp_path, cb, max_steps=8, optimizer="sgd", module=None, **kwargs):  # noqa: ANN001, ANN202
    torch.manual_seed(0)
    module = module or PlainModule(optimizer=optimizer, lr=0.01)
    probe = Probe(cb)
    trainer = make_trainer(tmp_path, [cb, probe], max_steps=max_steps, **kwargs)
    trainer.fit(module, random_loader())
    return module, trainer, probe


def _initial_masks(cb_factory, tmp_path):  # noqa: ANN001, ANN202
    cb = cb_factory()
    module = PlainModule()
    trainer = make_trainer(tmp_path, [cb])
    trainer.strategy.connect(module)
    module.trainer = trainer  # type: ignore[misc]
    cb.setup(trainer, module, "fit")
    return cb.masked.state_masks()


# ------------------------------------------------------------------ the per-layer step, on hand-built tensors


def test_rigl_grows_exactly_the_top_gradient_positions():
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [0, 1, 0, 0, 1, 0]], dtype=torch.bool)
    weight = torch.tensor([[0.5, -0.05, 0.9, 0, 0, 0], [0, 0.2, 0, 0, -0.01, 0]])
    grad = torch.tensor([[9.0, 8.0, 0.1, 0.3, -0.7, 0.2], [0.6, 0.0, -0.05, 0.4, 5.0, 0.65]])
    up = drop_and_grow(mask, weight.abs(), grad.abs(), n_drop=2)
    # smallest |W| among active: -0.01 (1,4) and -0.05 (0,1)
    assert up.dropped.nonzero().tolist() == [[0, 1], [1, 4]]
    # largest |g| among the inactive positions that were not just dropped: -0.7 (0,4) and 0.65 (1,5);
    # (0,1) and (1,4) have larger gradients but were dropped in this update
    assert up.grown.nonzero().tolist() == [[0, 4], [1, 5]]
    assert int(up.mask.sum()) == int(mask.sum())
    assert not (up.dropped & up.grown).any()
    assert torch.equal(up.mask, (mask & ~up.dropped) | up.grown)

    # upstream's behaviour on request: the just-dropped (0,1) and (1,4) have the largest gradients and come back
    again = drop_and_grow(mask, weight.abs(), grad.abs(), n_drop=2, allow_regrow_dropped=True)
    assert again.grown.nonzero().tolist() == [[0, 1], [1, 4]]
    assert torch.equal(again.mask, mask)


def test_drop_and_grow_caps_at_free_positions_and_respects_exclude():
    mask = torch.tensor([True, True, True, False])
    w = torch.tensor([0.3, 0.1, 0.2, 0.0])
    g = torch.tensor([0.0, 0.0, 0.0, 1.0])
    up = drop_and_grow(mask, w, g, n_drop=2)  # one free slot: only one swap, count kept
    assert up.dropped.tolist() == [False, True, False, False]
    assert up.grown.tolist() == [False, False, False, True]
    blocked = drop_and_grow(mask, w, g, n_drop=2, exclude=torch.tensor([False, False, False, True]))
    assert torch.equal(blocked.mask, mask) and not blocked.grown.any()


def test_drop_and_grow_breaks_ties_by_index():
    mask = torch.tensor([True, True, True, True, False, False, False, False])
    up = drop_and_grow(mask, torch.ones(8), torch.zeros(8), n_drop=2)
    assert up.dropped.nonzero().view(-1).tolist() == [2, 3]  # equal scores: highest index goes
    assert up.grown.nonzero().view(-1).tolist() == [4, 5]  # equal scores: lowest index grows


# ------------------------------------------------------------------ SET / RigL in real fits


@pytest.mark.parametrize("method", [SET, RigL])
def test_updates_conserve_per_layer_counts_and_change_masks(tmp_path, method):
    kwargs = dict(density=0.3, distribution="uniform", update_every_steps=2, stop_updates_at=1.0, seed=4)
    initial = _initial_masks(lambda: method(**kwargs), tmp_path / "init")
    cb = method(**kwargs)
    module, trainer, probe = _fit(tmp_path, cb, max_steps=8)
    assert [r["step"] for r in probe.records] == [2, 4, 6]  # multiples of update_every_steps, never step 0
    for rec in probe.records:
        for name in NAMES:
            assert int(rec["masks"][name].sum()) == int(initial[name].sum()), (rec["step"], name)
            assert int(rec["grown"][name].sum()) == int(rec["dropped"][name].sum())
            assert int(rec["grown"][name].sum()) == drop_count(rec["fraction"], int(initial[name].sum()))
            assert not (rec["grown"][name] & rec["dropped"][name]).any()  # never regrow what was just dropped
    final = cb.masked.state_masks()
    assert any(not torch.equal(final[n], initial[n]) for n in NAMES)
    params = dict(module.named_parameters())
    opt = trainer.optimizers[0]
    for name in NAMES:
        mask = cb.masked.masks[name]
        assert (params[name][~mask] == 0).all()
        assert (opt.state[params[name]]["momentum_buffer"][~mask] == 0).all()
    # drop fraction: cosine from 0.3 to 0.005 over the 8 steps
    assert [r["fraction"] for r in probe.records] == pytest.approx([CosineDrop(0.3)(s, 8) for s in (2, 4, 6)])


@pytest.mark.parametrize(
    "method,optimizer,regrow_dropped",
    [(SET, "sgd", False), (SET, "adam", True), (RigL, "sgd", True), (RigL, "adam", False)],
)
def test_regrown_weights_and_their_optimizer_state_are_zero(tmp_path, optimizer, method, regrow_dropped):
    cb = method(
        density=0.3,
        distribution="uniform",
        update_every_steps=3,
        stop_updates_at=1.0,
        seed=1,
        allow_regrow_dropped=regrow_dropped,
    )
    _, _, probe = _fit(tmp_path, cb, max_steps=7, optimizer=optimizer)
    assert [r["step"] for r in probe.records] == [3, 6]
    expected_kinds = ["momentum_buffer"] if optimizer == "sgd" else ["exp_avg", "exp_avg_sq"]
    grown_total = regrown_dropped = 0
    for rec in probe.records:
        for name in NAMES:
            grown_total += int(rec["grown"][name].sum())
            regrown_dropped += int((rec["grown"][name] & rec["dropped"][name]).sum())
            assert (rec["weights_at_grown"][name] == 0).all()
            assert rec["state_kinds"][name] == expected_kinds
            for t in rec["state_at_grown"][name]:
                assert (t == 0).all()
    assert grown_total > 0
    # with regrowth of dropped weights allowed, some grown weights were active (nonzero weight and state) a moment
    # before: the explicit zeroing is what makes them start at 0
    assert (regrown_dropped > 0) == regrow_dropped


def test_rigl_growth_matches_the_gradient_in_a_fit(tmp_path):
    """In a real fit, the grown positions are the top-|grad| ones among the eligible inactive positions."""

    cb = RigL(density=0.3, distribution="uniform", update_every_steps=2, stop_updates_at=1.0)
    seen = {}
    original = cb.grow_scores

    def spy(name, weight, grad, step):  # noqa: ANN001, ANN202
        scores = original(name, weight, grad, step)
        seen[(step, name)] = scores.clone()
        return scores

    cb.grow_scores = spy  # type: ignore[method-assign]
    _, _, probe = _fit(tmp_path, cb, max_steps=5)
    assert [r["step"] for r in probe.records] == [2, 4]
    for rec in probe.records:
        for name in NAMES:
            scores = seen[(rec["step"], name)]
            grown = rec["grown"][name]
            before = (rec["masks"][name] & ~grown) | rec["dropped"][name]
            eligible = ~before
            k = int(grown.sum())
            assert k > 0
            worst_grown = scores[grown].min()
            best_other = scores[eligible & ~grown].max()
            assert worst_grown >= best_other


def test_stop_updates_at_freezes_the_masks(tmp_path):
    cb = RigL(density=0.3, distribution="uniform", update_every_steps=2, stop_updates_at=0.5)
    _, _, probe = _fit(tmp_path, cb, max_steps=12)  # stop at step 6
    assert [r["step"] for r in probe.records] == [2, 4]
    last = probe.records[-1]["masks"]
    assert all(torch.equal(cb.masked.masks[n], last[n]) for n in NAMES)


def test_updates_with_gradient_accumulation(tmp_path):
    cb = RigL(density=0.3, distribution="uniform", update_every_steps=2, stop_updates_at=1.0)
    initial = _initial_masks(lambda: RigL(density=0.3, distribution="uniform"), tmp_path / "i")
    _, trainer, probe = _fit(tmp_path, cb, max_steps=5, accumulate_grad_batches=2)
    assert trainer.global_step == 5
    assert [r["step"] for r in probe.records] == [2, 4]
    for name in NAMES:
        assert int(cb.masked.masks[name].sum()) == int(initial[name].sum())


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_momentum_growth_runs_and_conserves_counts(tmp_path, optimizer):
    kwargs = dict(
        density=0.3, distribution="uniform", growth="momentum", update_every_steps=2, stop_updates_at=1.0
    )
    initial = _initial_masks(lambda: RigL(**kwargs), tmp_path / "i")
    cb = RigL(**kwargs)
    _, _, probe = _fit(tmp_path, cb, max_steps=5, optimizer=optimizer)
    assert len(probe.records) == 2
    for name in NAMES:
        assert int(cb.masked.masks[name].sum()) == int(initial[name].sum())


# ------------------------------------------------------------------ gradual pruning


@pytest.mark.parametrize("method", [GraNet, GMP])
def test_gradual_pruning_hits_exact_global_targets(tmp_path, method):
    # 4 batches per epoch, 12 steps; window epochs 0 → 2 = steps 0 → 8 = updates 0 → 4 (every 2 steps)
    kwargs = dict(init_density=0.5 if method is GraNet else 1.0, final_density=0.1)
    cb = method(**kwargs, update_every_steps=2, prune_end_epoch=2.0, distribution="uniform", seed=2)
    _, _, probe = _fit(tmp_path, cb, max_steps=12)
    assert cb._window == (0, 4)
    d_i = kwargs["init_density"]
    pruned = [r for r in probe.records if r["target"] is not None]
    assert [r["step"] for r in pruned] == [2, 4, 6, 8]
    for rec in pruned:
        c = rec["step"] // 2
        target = cubic_density(c, d_i, 0.1, 0, 4)
        assert rec["target"] == pytest.approx(target)
        assert sum(int(m.sum()) for m in rec["masks"].values()) == exact_count(target, N_TOTAL)
    assert pruned[-1]["target"] == 0.1
    assert sum(int(m.sum()) for m in cb.masked.masks.values()) == exact_count(0.1, N_TOTAL)
    if method is GraNet:  # prune-and-regrow keeps going after the window, at the final density
        assert [r["step"] for r in probe.records] == [2, 4, 6, 8, 10]
        assert probe.records[-1]["target"] is None
        assert sum(int(m.sum()) for m in probe.records[-1]["masks"].values()) == exact_count(0.1, N_TOTAL)
        assert probe.records[-1]["fraction"] == pytest.approx(CosineDrop(0.5)(10, 12))
    else:  # GMP stops after the window and never regrows
        assert [r["step"] for r in probe.records] == [2, 4, 6, 8]
        for prev, rec in zip(probe.records, probe.records[1:]):
            for name in NAMES:
                assert not (rec["masks"][name] & ~prev["masks"][name]).any()


def test_gmp_from_dense_starts_with_full_masks(tmp_path):
    initial = _initial_masks(lambda: GMP(final_density=0.2), tmp_path)
    assert all(bool(m.all()) for m in initial.values())


def test_layerwise_scope_hits_per_layer_targets(tmp_path):
    cb = GraNet(
        init_density=0.5,
        final_density=0.1,
        scope="layerwise",
        distribution="erk",
        update_every_steps=2,
        prune_end_epoch=2.0,
        seed=3,
    )
    _, _, probe = _fit(tmp_path, cb, max_steps=12)
    initial_targets = dict(cb.target_densities)
    assert initial_targets["net.conv1.weight"] != initial_targets["net.conv2.weight"]
    pruned = [r for r in probe.records if r["target"] is not None]
    assert len(pruned) == 4
    for rec in pruned:
        for name in NAMES:
            layer_target = min(initial_targets[name] * rec["target"] / 0.5, 1.0)
            numel = rec["masks"][name].numel()
            assert int(rec["masks"][name].sum()) == exact_count(layer_target, numel), (rec["step"], name)
    for name in NAMES:
        numel = cb.masked.masks[name].numel()
        assert int(cb.masked.masks[name].sum()) == exact_count(initial_targets[name] * 0.2, numel)


def test_window_beyond_training_raises(tmp_path):
    cb = GMP(final_density=0.1, update_every_steps=2, prune_end_epoch=5.0)
    trainer = make_trainer(tmp_path, [cb], max_steps=-1, max_epochs=2)
    with pytest.raises(ValueError, match="beyond the end of training"):
        trainer.fit(PlainModule(), random_loader())


# ------------------------------------------------------------------ SynFlow pruning


def test_synflow_prune_keeps_exact_counts_and_leaves_the_model_unchanged(tmp_path):
    torch.manual_seed(0)
    module = PlainModule()
    cb = GMP(final_density=0.2, prune="synflow", input_shape=[3, 8, 8], update_every_steps=1)
    trainer = make_trainer(tmp_path, [cb])
    trainer.strategy.connect(module)
    module.trainer = trainer  # type: ignore[misc]
    cb.setup(trainer, module, "fit")
    cb._total_steps, cb._window = 10, (0, 4)
    module.train()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    rng = torch.get_rng_state()
    cb._update(trainer, module, step=2, pruning=True, regrow=False)
    target = cubic_density(2, 1.0, 0.2, 0, 4)
    assert sum(int(m.sum()) for m in cb.masked.masks.values()) == exact_count(target, N_TOTAL)
    after = module.state_dict()
    for key, value in before.items():
        if key in NAMES:
            mask = cb.masked.masks[key]
            assert torch.equal(after[key][mask], value[mask])
            assert (after[key][~mask] == 0).all()
        else:  # biases, BN affine parameters and running statistics untouched
            assert torch.equal(after[key], value), key
    assert module.training
    assert all(p.grad is None for p in module.parameters())
    assert torch.equal(torch.get_rng_state(), rng)
    # SynFlow is not magnitude: the kept set differs from a global |W| top-k
    flat_w = torch.cat([before[n].abs().reshape(-1) for n in NAMES])
    k = exact_count(target, N_TOTAL)
    kept_by_w = set(torch.sort(flat_w, descending=True, stable=True).indices[:k].tolist())
    kept = set(torch.cat([cb.masked.masks[n].reshape(-1) for n in NAMES]).nonzero().view(-1).tolist())
    assert kept != kept_by_w


def test_synflow_in_a_fit_takes_the_input_shape_from_the_batch(tmp_path):
    cb = GraNet(
        init_density=0.5, final_density=0.2, prune="synflow", update_every_steps=2, distribution="uniform"
    )
    _, _, probe = _fit(tmp_path, cb, max_steps=6)
    assert cb._seen_input_shape == [3, 8, 8]
    assert [r["step"] for r in probe.records] == [2, 4]
    assert sum(int(m.sum()) for m in cb.masked.masks.values()) == exact_count(0.2, N_TOTAL)


# ------------------------------------------------------------------ resume


def _fit_epochs(tmp_path, cb, max_epochs, ckpt_path=None, module=None):  # noqa: ANN001, ANN202
    torch.manual_seed(0)
    module = module or PlainModule()
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, save_on_train_epoch_end=True)
    trainer = make_trainer(
        tmp_path, [cb, ckpt], max_steps=-1, max_epochs=max_epochs, enable_checkpointing=True
    )
    trainer.fit(module, random_loader(n=32), ckpt_path=ckpt_path)  # two steps per epoch
    return module, trainer


@pytest.mark.parametrize(
    "factory",
    [
        lambda: SET(density=0.3, distribution="uniform", update_every_steps=1, stop_updates_at=1.0, seed=3),
        lambda: GraNet(
            init_density=0.5, final_density=0.1, update_every_steps=1, prune_end_epoch=2.0, seed=3
        ),
        lambda: RigL(
            density=0.3, distribution="uniform", update_every_steps=1, stop_updates_at=1.0, growth="momentum"
        ),
    ],
    ids=["SET", "GraNet", "RigL-momentum"],
)
def test_resume_between_updates_matches_an_uninterrupted_run(tmp_path, factory):
    full_cb = factory()
    full_module, _ = _fit_epochs(tmp_path / "full", full_cb, max_epochs=3)  # updates at steps 1..5
    ckpt = tmp_path / "full" / "ckpt" / "epoch=0-step=2.ckpt"
    assert ckpt.exists()
    resumed_cb = factory()
    torch.manual_seed(99)
    resumed_module, trainer = _fit_epochs(
        tmp_path / "resume", resumed_cb, max_epochs=3, ckpt_path=ckpt, module=PlainModule()
    )
    assert trainer.global_step == 6
    for name in NAMES:
        assert torch.equal(resumed_cb.masked.masks[name], full_cb.masked.masks[name]), name
        assert torch.equal(resumed_cb._ever_active[name], full_cb._ever_active[name]), name
        if (
            isinstance(full_cb, RigL) and full_cb.growth == "momentum"
        ):  # the dense-gradient average resumes too
            assert torch.equal(resumed_cb.grad_momentum[name], full_cb.grad_momentum[name]), name
    # the masks did change after the checkpoint (otherwise this test would prove little)
    saved = torch.load(ckpt, weights_only=False)["callbacks"]
    state = next(v for k, v in saved.items() if type(full_cb).__name__ in k)
    assert any(not torch.equal(state["masks"][n], full_cb.masked.masks[n].cpu()) for n in NAMES)
    full = dict(full_module.named_parameters())
    for name, p in resumed_module.named_parameters():
        torch.testing.assert_close(p, full[name], rtol=0, atol=0)


def test_resume_with_another_drop_fraction_raises(tmp_path):
    _fit_epochs(tmp_path / "a", SET(density=0.3, update_every_steps=1, drop_fraction=0.3), max_epochs=1)
    ckpt = tmp_path / "a" / "ckpt" / "epoch=0-step=2.ckpt"
    with pytest.raises(ValueError, match="drop_fraction"):
        _fit_epochs(
            tmp_path / "b",
            SET(density=0.3, update_every_steps=1, drop_fraction=ConstantDrop(0.3)),
            max_epochs=2,
            ckpt_path=ckpt,
        )


# ------------------------------------------------------------------ logging


def test_tensorboard_gets_dst_scalars(tmp_path):
    from pytorch_lightning.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    torch.manual_seed(0)
    cb = RigL(
        density=0.3,
        distribution="uniform",
        update_every_steps=2,
        stop_updates_at=1.0,
        log_layer_densities=True,
    )
    logger = TensorBoardLogger(str(tmp_path), name="tb")
    # Lightning's default log_every_n_steps=50 writes no step of this run: the updates are written all the same
    trainer = make_trainer(tmp_path, [cb], max_steps=8, logger=logger)
    trainer.fit(PlainModule(), random_loader())
    acc = EventAccumulator(logger.log_dir)
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {
        "sparsity/density_global",
        "dst/dropped",
        "dst/grown",
        "dst/initial_overlap",
        "dst/itop_rate",
        "dst/drop_fraction",
        "dst/drop_fraction_scheduled",
        "sparsity/density/net.conv2.weight",
    } <= tags
    overlap = [e.value for e in acc.Scalars("dst/initial_overlap")]
    assert [e.step for e in acc.Scalars("dst/itop_rate")] == [2, 4, 6]  # at the step of each update
    itop = [e.value for e in acc.Scalars("dst/itop_rate")]
    dropped = [e.value for e in acc.Scalars("dst/dropped")]
    grown = [e.value for e in acc.Scalars("dst/grown")]
    fraction = [e.value for e in acc.Scalars("dst/drop_fraction_scheduled")]
    assert len(overlap) == len(itop) == 3  # updates at steps 2, 4, 6
    assert all(0 < c < 1 for c in overlap)
    assert all(i >= 0.3 - 1e-3 for i in itop)
    assert itop == sorted(itop) and itop[-1] > itop[0]
    assert dropped == grown and all(d > 0 for d in dropped)
    assert fraction == pytest.approx([CosineDrop(0.3)(s, 8) for s in (2, 4, 6)], abs=1e-6)
    density = [e.value for e in acc.Scalars("sparsity/density_global")]
    assert all(d == pytest.approx(cb.masked.global_density(), abs=1e-6) for d in density)
    # itop_rate equals the ever-active fraction the callback holds
    ever = sum(int(m.sum()) for m in cb._ever_active.values())
    assert itop[-1] == pytest.approx(ever / N_TOTAL, abs=1e-6)


# ------------------------------------------------------------------ bad input


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="update_every_steps must be >= 1"):
        SET(update_every_steps=0)
    with pytest.raises(TypeError, match="update_every_steps must be an int"):
        RigL(update_every_steps=1.5)  # type: ignore[arg-type]
    for bad in (1.0, -0.2):
        with pytest.raises(ValueError, match=r"drop_fraction must be in \[0, 1\)"):
            RigL(drop_fraction=bad)
    with pytest.raises(TypeError, match="drop_fraction"):
        SET(drop_fraction="cosine")  # type: ignore[arg-type]
    for bad in (0, 1.5, -0.1):
        with pytest.raises(ValueError, match=r"stop_updates_at .*\(0, 1\]"):
            RigL(stop_updates_at=bad)
    with pytest.raises(ValueError, match=r"final_density \(0.2\) must be <= init_density \(0.1\)"):
        GraNet(init_density=0.1, final_density=0.2)
    with pytest.raises(ValueError, match=r"prune_end_epoch \(5.0\) must be >= prune_start_epoch \(10.0\)"):
        GMP(final_density=0.1, prune_start_epoch=10, prune_end_epoch=5)
    with pytest.raises(ValueError, match="prune must be one of"):
        RigL(prune="snip")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="growth must be one of"):
        RigL(growth="random")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="scope must be one of"):
        GraNet(scope="per_layer")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="density must be"):
        GraNet(init_density=0.0)
    with pytest.raises(ValueError, match="input_shape"):
        GMP(prune="synflow", input_shape=[3, 0, 8])
    with pytest.raises(TypeError, match="DynamicSparsity defines no grow_scores.*SET, RigL, GraNet"):
        DynamicSparsity()
    with pytest.raises(TypeError, match="allow_regrow_dropped must be True or False"):
        GraNet(allow_regrow_dropped="False")  # type: ignore[arg-type]
    for bad in (1.0, -0.1, True, "0.9"):
        with pytest.raises(ValueError, match=r"growth_momentum .* \[0, 1\)"):
            RigL(growth="momentum", growth_momentum=bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"floor \(0.5\) must be <= CosineDrop.initial"):
        RigL(drop_fraction=CosineDrop(0.1, floor=0.5))


def test_no_update_before_first_period_and_masks_static_without_updates(tmp_path):
    kwargs = dict(density=0.3, distribution="uniform", update_every_steps=50)
    initial = _initial_masks(lambda: SET(**kwargs), tmp_path / "i")
    cb = SET(**kwargs)
    with pytest.warns(UserWarning, match="never change"):
        _, _, probe = _fit(tmp_path, cb, max_steps=6)
    assert probe.records == []
    assert all(torch.equal(cb.masked.masks[n], initial[n]) for n in NAMES)


def test_dst_callbacks_work_on_a_plain_module_with_trainer_defaults(tmp_path):
    """Exercise the whole loop through a user's module with pl.Trainer and a validation loop."""
    torch.manual_seed(0)
    cb = GraNet(init_density=0.4, final_density=0.2, update_every_steps=2, distribution="erk")
    trainer = make_trainer(tmp_path, [cb], max_steps=-1, max_epochs=2, limit_val_batches=1)
    trainer.fit(PlainModule(), random_loader(), random_loader(n=16))
    assert trainer.global_step == 8
    assert isinstance(trainer.lightning_module, pl.LightningModule)
    assert sum(int(m.sum()) for m in cb.masked.masks.values()) == exact_count(0.2, N_TOTAL)


def test_granet_worked_example_schedule_from_trainer_counts():
    """Spec §3.6: 450 steps/epoch, 160 epochs, an update every 1000 steps, window epochs 0 → 110."""
    from types import SimpleNamespace

    cb = GraNet(init_density=0.01, final_density=0.001, update_every_steps=1000, prune_end_epoch=110)
    trainer = SimpleNamespace(
        estimated_stepping_batches=72_000, num_training_batches=450, accumulate_grad_batches=1
    )
    cb._resolve_schedule(trainer)  # type: ignore[arg-type]
    assert cb._window == (0, 49) and cb._stop_step == 72_000
    assert cb._phases(49_000) == (True, True) and cb._phases(50_000) == (False, True)
    assert cubic_density(48, 0.01, 0.001, *cb._window) == pytest.approx(0.00100008, abs=1e-8)
    assert cubic_density(49, 0.01, 0.001, *cb._window) == 0.001
    # with accumulation over 2 batches an epoch has 225 steps: 36,000 in all, window end at update 24
    trainer = SimpleNamespace(
        estimated_stepping_batches=36_000, num_training_batches=450, accumulate_grad_batches=2
    )
    cb._resolve_schedule(trainer)  # type: ignore[arg-type]
    assert cb._window == (0, 24)


def test_rigl_starts_from_the_layer_ratios_of_a_mask_file(tmp_path):
    """ER_imp / ER_snip starts for DST: custom densities read from a saved mask."""
    from er_lightning.masking import mask_file_densities, save_masks

    source = {
        "net.conv1.weight": torch.rand(8, 3, 3, 3) < 0.5,
        "net.conv2.weight": torch.rand(16, 8, 3, 3) < 0.1,
        "net.fc.weight": torch.rand(10, 16) < 0.3,
    }
    save_masks(source, tmp_path / "m.pt")
    torch.manual_seed(0)
    module = PlainModule()
    densities = mask_file_densities(tmp_path / "m.pt", module)
    cb = RigL(density=0.2, distribution="custom", custom_densities=densities, update_every_steps=100)
    make_trainer(tmp_path, [cb], max_steps=1).fit(module, random_loader())
    for name, mask in source.items():
        assert int(cb.masked.masks[name].sum()) == int(mask.sum()), name


def test_rigl_leaves_a_frozen_layer_alone_and_says_so(tmp_path):
    """requires_grad=False: dropping and regrowing at 0 would erode the layer for good (issue 12 #6)."""

    class AtStart(Callback):
        def on_train_start(self, trainer, pl_module):  # noqa: ANN001, ANN201
            self.masks = {n: m.clone() for n, m in cb.masked.masks.items()}
            self.frozen = pl_module.net.conv1.weight.detach().clone()

    torch.manual_seed(0)
    module = PlainModule()
    module.net.conv1.weight.requires_grad_(False)
    cb = RigL(density=0.3, update_every_steps=1, drop_fraction=0.5, stop_updates_at=1.0)
    start = AtStart()
    with pytest.warns(
        UserWarning, match=r"\['net\.conv1\.weight'\] have requires_grad=False, so prune-and-regrow skips"
    ):
        make_trainer(tmp_path, [cb, start], max_steps=5).fit(module, random_loader())
    assert cb._last_update_step == 4  # updates ran at steps 1-4
    assert torch.equal(cb.masked.masks["net.conv1.weight"], start.masks["net.conv1.weight"])
    assert torch.equal(module.net.conv1.weight, start.frozen)  # not one active weight reset to 0
    assert int(torch.count_nonzero(start.frozen)) == int(start.masks["net.conv1.weight"].sum())
    name = "net.conv2.weight"  # a trainable sparse layer still updates, at a constant count (fc is dense at ERK 0.3)
    assert not torch.equal(cb.masked.masks[name], start.masks[name])
    assert int(cb.masked.masks[name].sum()) == int(start.masks[name].sum())
