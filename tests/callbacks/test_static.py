from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from conftest import PlainModule, make_trainer, random_loader
from pytorch_lightning.callbacks import ModelCheckpoint

from er_lightning.callbacks import DISTRIBUTION_ALIASES, StaticSparsity
from er_lightning.callbacks.base import resolve_distribution
from er_lightning.sparsity import layer_densities
from er_lightning.sparsity.topk import exact_count

NAMES = ["net.conv1.weight", "net.conv2.weight", "net.fc.weight"]


def _setup(cb: StaticSparsity, module: pl.LightningModule, tmp_path) -> pl.Trainer:  # noqa: ANN001
    trainer = make_trainer(tmp_path, [cb])
    trainer.strategy.connect(module)
    module.trainer = trainer  # type: ignore[misc]
    cb.setup(trainer, module, "fit")
    return trainer


@pytest.mark.parametrize("distribution", ["uniform", "er", "erk", "balanced", "pyramidal"])
def test_setup_keeps_exact_counts_and_zeroes_weights(tmp_path, tiny_module, distribution):
    cb = StaticSparsity(density=0.3, distribution=distribution, seed=3)
    _setup(cb, tiny_module, tmp_path)
    params = dict(tiny_module.named_parameters())
    shapes = {n: tuple(params[n].shape) for n in NAMES}
    expected = layer_densities(shapes, 0.3, distribution)
    assert cb.masked.names == NAMES
    for name in NAMES:
        mask = cb.masked.masks[name]
        assert int(mask.sum()) == exact_count(expected[name], mask.numel())
        assert (params[name][~mask] == 0).all()
        assert torch.count_nonzero(params[name]) == int(mask.sum())


def test_same_seed_same_masks_whatever_the_global_rng(tmp_path):
    masks = []
    for global_seed in (0, 123):
        torch.manual_seed(global_seed)
        module = PlainModule()
        torch.rand(100)
        cb = StaticSparsity(density=0.2, seed=7)
        _setup(cb, module, tmp_path)
        masks.append(cb.masked.state_masks())
    assert all(torch.equal(masks[0][n], masks[1][n]) for n in NAMES)
    other = StaticSparsity(density=0.2, seed=8)
    _setup(other, PlainModule(), tmp_path)
    assert not torch.equal(other.masked.masks[NAMES[1]], masks[0][NAMES[1]])


@pytest.mark.parametrize(
    "optimizer,kwargs",
    [
        ("sgd", {}),
        ("adam", {}),
        ("adamw", {}),
        ("rmsprop", {}),
        ("sgd", {"accumulate_grad_batches": 2, "gradient_clip_val": 0.5}),
        ("adamw", {"precision": "bf16-mixed"}),
        (
            "sgd",
            {"precision": "16-mixed"},
        ),  # on CPU: fp16 autocast, no GradScaler (a GPU run covers unscaling)
    ],
)
def test_fit_keeps_weights_and_optimizer_state_zero(tmp_path, optimizer, kwargs):
    torch.manual_seed(0)
    module = PlainModule(optimizer=optimizer, lr=0.01)
    cb = StaticSparsity(density=0.25, distribution="erk", seed=1)
    trainer = make_trainer(tmp_path, [cb], max_steps=5, **kwargs)
    trainer.fit(module, random_loader())
    params = dict(module.named_parameters())
    opt = trainer.optimizers[0]
    for name in NAMES:
        mask = cb.masked.masks[name]
        p = params[name]
        assert (p[~mask] == 0).all(), name
        assert (p[mask] != 0).all(), name  # active weights were trained, not wiped
        state = [v for v in opt.state[p].values() if torch.is_tensor(v) and v.shape == p.shape]
        assert state, f"{optimizer} keeps no parameter-shaped state"
        for t in state:
            assert (t[~mask] == 0).all(), (name, optimizer)


def test_rezero_every_step_guards_optimizers_that_break_the_invariant(tmp_path):
    class Noisy(torch.optim.SGD):
        """An optimizer that writes to every weight, masked or not."""

        @torch.no_grad()
        def step(self, closure=None):  # noqa: ANN001, ANN201
            loss = super().step(closure)
            for group in self.param_groups:
                for p in group["params"]:
                    p.add_(1e-3)
            return loss

    class M(PlainModule):
        def configure_optimizers(self):  # noqa: ANN201
            return Noisy(self.parameters(), lr=0.01, momentum=0.9)

    torch.manual_seed(0)
    module = M()
    cb = StaticSparsity(density=0.25, rezero_every_step=True)
    make_trainer(tmp_path, [cb], max_steps=3).fit(module, random_loader())
    params = dict(module.named_parameters())
    for name in NAMES:
        assert (params[name][~cb.masked.masks[name]] == 0).all()


def test_aliases_and_bad_arguments():
    assert resolve_distribution("ERK") == "erk"
    assert resolve_distribution("ER_same_params") == "balanced"
    assert resolve_distribution("ER_same_params_per_layer") == "balanced"
    assert resolve_distribution("pyramid") == "pyramidal"
    assert resolve_distribution("pyramid_sparsity") == "pyramidal"
    assert resolve_distribution("ER_init") == "uniform"
    assert set(DISTRIBUTION_ALIASES) >= {"ERK", "ER_same_params", "pyramid", "ER_init"}
    with pytest.raises(ValueError, match=r"unknown distribution 'snipp'.*valid"):
        StaticSparsity(density=0.1, distribution="snipp")
    for bad in (0, 1.5, -0.1, float("nan")):
        with pytest.raises(ValueError, match="density must be"):
            StaticSparsity(density=bad)
    with pytest.raises(ValueError, match="sampling"):
        StaticSparsity(sampling="poisson")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown init"):
        StaticSparsity(init="xavier")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="custom_densities"):
        StaticSparsity(distribution="custom")
    flags = (
        "embeddings",
        "dense_first_layer",
        "dense_last_layer",
        "redistribute",
        "flow_preservation",
        "ortho_repair",
        "rezero_every_step",
        "verify_masks",
        "log_layer_densities",
    )
    for flag in flags:  # YAML strings and numbers are not flags: bool("False") would be True
        for bad in ("False", "true", 1, None):
            with pytest.raises(TypeError, match=f"{flag} must be True or False, got"):
                StaticSparsity(**{flag: bad})


def test_pattern_matching_nothing_raises_at_setup(tmp_path, tiny_module):
    cb = StaticSparsity(density=0.5, exclude=["*.nothing"])
    with pytest.raises(ValueError, match=r"exclude pattern.*net\.conv1\.weight"):
        _setup(cb, tiny_module, tmp_path)


def test_custom_densities_and_dense_last_layer(tmp_path, tiny_module):
    custom = {"net.conv1.weight": 1.0, "net.conv2.weight": 0.5}
    cb = StaticSparsity(distribution="custom", custom_densities=custom, dense_last_layer=True)
    _setup(cb, tiny_module, tmp_path)
    assert cb.masked.names == NAMES[:2]
    assert int(cb.masked.masks["net.conv1.weight"].sum()) == 8 * 3 * 9
    assert int(cb.masked.masks["net.conv2.weight"].sum()) == exact_count(0.5, 16 * 8 * 9)


def test_flow_preservation_connects_every_unit(tmp_path, tiny_module):
    cb = StaticSparsity(density=0.02, distribution="uniform", flow_preservation=True, seed=0)
    _setup(cb, tiny_module, tmp_path)
    assert cb.flow_repairs, "at density 0.02 some units must have been disconnected"
    for name in NAMES:
        m = cb.masked.masks[name]
        assert m.reshape(m.shape[0], -1).any(dim=1).all()
        assert m.reshape(m.shape[0], m.shape[1], -1).any(dim=(0, 2)).all()


def test_he_sparse_init_uses_layer_density(tmp_path):
    torch.manual_seed(0)
    module = PlainModule()
    module.net.conv2 = torch.nn.Conv2d(8, 256, 3, bias=False)
    module.net.bn2 = torch.nn.BatchNorm2d(256)
    module.net.fc = torch.nn.Linear(256, 10)
    cb = StaticSparsity(density=0.5, distribution="uniform", init="he_sparse")
    _setup(cb, module, tmp_path)
    w = module.net.conv2.weight[cb.masked.masks["net.conv2.weight"]]
    expected = (2 / (8 * 9 * 0.5)) ** 0.5
    assert abs(w.std().item() - expected) / expected < 0.05


def test_setup_is_idempotent_for_later_stages(tmp_path, tiny_module):
    cb = StaticSparsity(density=0.3)
    trainer = _setup(cb, tiny_module, tmp_path)
    before = cb.masked.state_masks()
    obj = cb.masked.masks[NAMES[0]]
    cb.setup(trainer, tiny_module, "test")
    assert cb.masked.masks[NAMES[0]] is obj
    assert all(torch.equal(before[n], cb.masked.masks[n]) for n in NAMES)


def _fit_with_ckpt(tmp_path, cb, max_epochs, ckpt_path=None, module=None):  # noqa: ANN001, ANN202
    """Fit for whole epochs (a run stopped by max_steps resumes mid-epoch and replays a batch in Lightning)."""
    torch.manual_seed(0)
    module = module or PlainModule()
    # two steps per epoch, checkpoints at epoch ends: the plain DataLoader then resumes in the same order
    ckpt = ModelCheckpoint(
        dirpath=tmp_path / "ckpt", save_last=True, save_top_k=-1, save_on_train_epoch_end=True
    )
    trainer = make_trainer(
        tmp_path, [cb, ckpt], max_steps=-1, max_epochs=max_epochs, enable_checkpointing=True
    )
    trainer.fit(module, random_loader(n=32), ckpt_path=ckpt_path)
    return module, trainer


def test_resume_restores_masks_and_continues_identically(tmp_path):
    full_module, _ = _fit_with_ckpt(tmp_path / "full", StaticSparsity(density=0.3, seed=1), max_epochs=2)
    _fit_with_ckpt(tmp_path / "part", StaticSparsity(density=0.3, seed=1), max_epochs=1)
    ckpt = tmp_path / "part" / "ckpt" / "last.ckpt"
    # A different seed would draw different masks at setup; the checkpoint must win only if configs agree.
    resumed_cb = StaticSparsity(density=0.3, seed=1)
    torch.manual_seed(99)  # the resumed process starts from unrelated weights
    resumed_module, _ = _fit_with_ckpt(
        tmp_path / "resume", resumed_cb, max_epochs=2, ckpt_path=ckpt, module=PlainModule()
    )
    full = dict(full_module.named_parameters())
    for name, p in resumed_module.named_parameters():
        torch.testing.assert_close(p, full[name], rtol=0, atol=0)


def test_resume_with_other_config_or_without_state_raises(tmp_path):
    _fit_with_ckpt(tmp_path / "a", StaticSparsity(density=0.3, seed=1), max_epochs=1)
    ckpt = tmp_path / "a" / "ckpt" / "last.ckpt"
    with pytest.raises(ValueError, match=r"seed: checkpoint 1 vs now 2"):
        _fit_with_ckpt(tmp_path / "b", StaticSparsity(density=0.3, seed=2), max_epochs=2, ckpt_path=ckpt)
    torch.manual_seed(0)
    dense_ckpt = tmp_path / "dense.ckpt"
    trainer = make_trainer(tmp_path / "d", [], max_steps=1)
    trainer.fit(PlainModule(), random_loader())
    trainer.save_checkpoint(dense_ckpt)
    with pytest.raises(RuntimeError, match="no state for StaticSparsity"):
        _fit_with_ckpt(
            tmp_path / "c", StaticSparsity(density=0.3, seed=1), max_epochs=2, ckpt_path=dense_ckpt
        )


def test_tensorboard_gets_global_density(tmp_path):
    from pytorch_lightning.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    torch.manual_seed(0)
    cb = StaticSparsity(density=0.25, log_layer_densities=True)
    logger = TensorBoardLogger(str(tmp_path), name="tb")
    trainer = make_trainer(tmp_path, [cb], max_steps=2, logger=logger)
    trainer.fit(PlainModule(), random_loader())
    acc = EventAccumulator(logger.log_dir)
    acc.Reload()
    scalars = acc.Tags()["scalars"]
    assert "sparsity/density_global" in scalars
    value = acc.Scalars("sparsity/density_global")[0].value
    assert value == pytest.approx(cb.masked.global_density(), abs=1e-6)
    assert value == pytest.approx(0.25, abs=2e-3)
    assert "sparsity/density/net.fc.weight" in scalars
    assert "sparsity/layer_densities" in acc.Tags()["images"]


@pytest.mark.slow
def test_compiled_model_keeps_zeros(tmp_path):
    """A torch.compile'd backbone: in-place masks need no recompile and stay exact (about 30 s on CPU)."""
    torch.manual_seed(0)
    module = PlainModule(optimizer="adamw", lr=0.01)
    module.net = torch.compile(module.net)
    cb = StaticSparsity(density=0.25)
    make_trainer(tmp_path, [cb], max_steps=4).fit(module, random_loader())
    params = dict(module.named_parameters())
    assert cb.masked.names == [n.replace("net.", "net._orig_mod.") for n in NAMES]
    for name in cb.masked.names:
        mask = cb.masked.masks[name]
        assert (params[name][~mask] == 0).all()
        assert (params[name][mask] != 0).all()


def test_fresh_callback_outside_fit_leaves_trained_weights_alone(tmp_path):
    torch.manual_seed(0)
    module = PlainModule()
    make_trainer(tmp_path, [StaticSparsity(density=0.3, seed=1)], max_steps=2).fit(module, random_loader())
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    # evaluating with a new instance (other seed, no checkpoint) must not zero anything
    make_trainer(tmp_path, [StaticSparsity(density=0.3, seed=2)]).validate(module, random_loader())
    for name, p in module.named_parameters():
        assert torch.equal(p, before[name]), name


def test_two_sparsity_callbacks_are_refused(tmp_path, tiny_module):
    from er_lightning.callbacks import RigL

    trainer = make_trainer(tmp_path, [StaticSparsity(density=0.3), RigL(density=0.3)], max_steps=1)
    with pytest.raises(ValueError, match=r"use exactly one sparsity callback"):
        trainer.fit(tiny_module, random_loader())


def test_public_exports():
    import er_lightning
    import er_lightning.callbacks as cbs

    for name in (
        "StaticSparsity",
        "SET",
        "RigL",
        "GraNet",
        "GMP",
        "Supermask",
        "SoftThreshold",
        "IterativeMagnitudePruning",
    ):
        assert getattr(cbs, name) is getattr(er_lightning, name)
