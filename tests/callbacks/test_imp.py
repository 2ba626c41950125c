"""IterativeMagnitudePruning: exact level densities, rewinding, optimizer/LR resets, saved levels, resume."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from conftest import PlainModule, TinyNet, make_trainer, random_loader
from pytorch_lightning.callbacks import Callback, ModelCheckpoint

from er_lightning.callbacks.imp import IterativeMagnitudePruning
from er_lightning.callbacks.static import StaticSparsity
from er_lightning.masking.io import load_masks
from er_lightning.sparsity import layer_densities
from er_lightning.sparsity.topk import exact_count

NAMES = ["net.conv1.weight", "net.conv2.weight", "net.fc.weight"]
SHAPES = {"net.conv1.weight": (8, 3, 3, 3), "net.conv2.weight": (16, 8, 3, 3), "net.fc.weight": (10, 16)}
NUMEL = {n: torch.Size(s).numel() for n, s in SHAPES.items()}
TOTAL = sum(NUMEL.values())


class Probe(Callback):
    """Records parameters/buffers at chosen moments (placed before or after the IMP callback in the list)."""

    def __init__(self, at_step: int | None = None) -> None:
        self.at_step = at_step
        self.fit_start: dict[str, torch.Tensor] | None = None
        self.step_state: dict[str, torch.Tensor] | None = None
        self.epoch_end: list[dict[str, torch.Tensor]] = []
        self.lrs: list[float] = []

    @staticmethod
    def _state(module: pl.LightningModule) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in module.state_dict().items()}

    def on_fit_start(self, trainer, pl_module):  # noqa: ANN001, ANN201
        self.fit_start = self._state(pl_module)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):  # noqa: ANN001, ANN201
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):  # noqa: ANN001, ANN201
        if trainer.global_step == self.at_step and self.step_state is None:
            self.step_state = self._state(pl_module)

    def on_train_epoch_end(self, trainer, pl_module):  # noqa: ANN001, ANN201
        self.epoch_end.append(self._state(pl_module))


def _fit(
    root: Path,
    cb: IterativeMagnitudePruning,
    max_epochs: int,
    module=None,
    ckpt_path=None,
    before=(),
    after=(),
):  # noqa: ANN001, ANN202
    """Whole epochs of 2 steps each; checkpoints at epoch ends (see test_static.py on why)."""
    module = module if module is not None else PlainModule()
    ckpt = ModelCheckpoint(dirpath=root / "ckpt", save_last=True, save_top_k=-1, save_on_train_epoch_end=True)
    trainer = make_trainer(
        root, [*before, cb, *after, ckpt], max_steps=-1, max_epochs=max_epochs, enable_checkpointing=True
    )
    trainer.fit(module, random_loader(n=32), ckpt_path=ckpt_path)
    return module, trainer


def _count(masks: dict[str, torch.Tensor]) -> int:
    return sum(int(m.sum()) for m in masks.values())


def test_global_levels_hit_exact_densities_and_never_regrow(tmp_path):
    torch.manual_seed(0)
    cb = IterativeMagnitudePruning(epochs_per_level=1, levels=3, save_dir=str(tmp_path / "masks"))
    _fit(tmp_path, cb, max_epochs=4)
    assert cb.level == 3
    shapes = {n: SHAPES[n] for n in NAMES}
    levels = [load_masks(tmp_path / "masks" / f"level_{i}.pt", shapes) for i in range(4)]
    for i, masks in enumerate(levels):
        assert _count(masks) == exact_count(0.8**i, TOTAL), i
    for prev, nxt in zip(levels, levels[1:]):
        assert all(not (nxt[n] & ~prev[n]).any() for n in NAMES)  # only active weights are kept
    assert all(torch.equal(cb.masked.masks[n], levels[3][n]) for n in NAMES)
    assert cb.masked.global_density() == pytest.approx(exact_count(0.512, TOTAL) / TOTAL)


def test_sparse_start_and_explicit_densities(tmp_path):
    torch.manual_seed(0)
    cb = IterativeMagnitudePruning(
        epochs_per_level=1,
        densities=[0.35, 0.2],
        density=0.5,
        distribution="erk",
        save_dir=str(tmp_path / "m"),
    )
    _fit(tmp_path, cb, max_epochs=3)
    shapes = {n: SHAPES[n] for n in NAMES}
    start = load_masks(tmp_path / "m" / "level_0.pt", shapes)
    erk = layer_densities(shapes, 0.5, "erk")
    assert {n: int(m.sum()) for n, m in start.items()} == {n: exact_count(erk[n], NUMEL[n]) for n in NAMES}
    for i, d in enumerate([0.35, 0.2], start=1):
        assert _count(load_masks(tmp_path / "m" / f"level_{i}.pt", shapes)) == exact_count(d, TOTAL)


def test_layerwise_scope_shrinks_every_layer_by_the_same_factor(tmp_path):
    torch.manual_seed(0)
    cb = IterativeMagnitudePruning(
        epochs_per_level=1, levels=2, prune_factor=0.5, scope="layerwise", save_dir=str(tmp_path / "m")
    )
    _fit(tmp_path, cb, max_epochs=2)
    shapes = {n: SHAPES[n] for n in NAMES}
    for i in (1, 2):
        masks = load_masks(tmp_path / "m" / f"level_{i}.pt", shapes)
        assert {n: int(m.sum()) for n, m in masks.items()} == {
            n: exact_count(0.5**i, NUMEL[n]) for n in NAMES
        }


@pytest.mark.parametrize("rewind_buffers", [True, False])
def test_rewind_to_init_is_bit_exact_and_clears_optimizer_state(tmp_path, rewind_buffers):
    torch.manual_seed(0)
    probe = Probe()
    cb = IterativeMagnitudePruning(
        epochs_per_level=1, levels=1, rewind_buffers=rewind_buffers, save_dir=str(tmp_path / "m")
    )
    module, trainer = _fit(tmp_path, cb, max_epochs=1, after=[probe])
    init = probe.fit_start
    trained = probe.epoch_end[0]  # recorded after the prune: the rewound state
    final = module.state_dict()
    for key, value in final.items():
        if key in cb.masked.masks:
            mask = cb.masked.masks[key]
            assert torch.equal(value[mask], init[key][mask]), key  # bit for bit at kept positions
            assert (value[~mask] == 0).all(), key
        elif key.endswith(("running_mean", "running_var", "num_batches_tracked")):
            assert torch.equal(value, init[key]) == rewind_buffers, key
        else:
            assert torch.equal(value, init[key]), key
        assert torch.equal(value, trained[key]), key
    assert _count(cb.masked.masks) == exact_count(0.8, TOTAL)
    assert len(trainer.optimizers[0].state) == 0


def test_late_rewinding_and_no_rewinding(tmp_path):
    torch.manual_seed(0)
    probe = Probe(at_step=3)
    cb = IterativeMagnitudePruning(epochs_per_level=2, levels=1, rewind_step=3, save_dir=str(tmp_path / "m"))
    module, _ = _fit(tmp_path / "late", cb, max_epochs=2, after=[probe])
    params = dict(module.named_parameters())
    assert not torch.equal(probe.step_state[NAMES[0]], probe.fit_start[NAMES[0]])
    for name, p in params.items():
        expected = probe.step_state[name]
        if name in cb.masked.masks:
            expected = expected * cb.masked.masks[name]
        assert torch.equal(p.detach(), expected), name
    # BN running statistics rewind to step 3 as well (rewind_buffers=True): not the init's, not the trained ones
    buffers = dict(module.named_buffers())
    assert {n for n in buffers if n.endswith(("running_mean", "running_var", "num_batches_tracked"))} == {
        f"net.bn{i}.{k}" for i in (1, 2) for k in ("running_mean", "running_var", "num_batches_tracked")
    }
    for name, b in buffers.items():
        assert torch.equal(b, probe.step_state[name]), name
        assert not torch.equal(b, probe.fit_start[name]), name
    assert int(buffers["net.bn1.num_batches_tracked"]) == 3

    # rewind_step=None keeps the trained weights (masked), and reset_optimizer=False zeroes state only where pruned
    torch.manual_seed(0)
    before = Probe()  # placed before the IMP callback: sees the trained weights at the epoch end
    cb = IterativeMagnitudePruning(
        epochs_per_level=1, levels=1, rewind_step=None, reset_optimizer=False, save_dir=str(tmp_path / "m2")
    )
    module, trainer = _fit(tmp_path / "none", cb, max_epochs=1, before=[before])
    trained = before.epoch_end[0]
    opt = trainer.optimizers[0]
    for name, p in module.named_parameters():
        expected = trained[name] * cb.masked.masks[name] if name in cb.masked.masks else trained[name]
        assert torch.equal(p.detach(), expected), name
        if name in cb.masked.masks:
            momentum = opt.state[p]["momentum_buffer"]
            assert (momentum[~cb.masked.masks[name]] == 0).all()
            assert (momentum[cb.masked.masks[name]] != 0).any()


def test_rewind_step_after_first_prune_raises(tmp_path):
    cb = IterativeMagnitudePruning(epochs_per_level=1, levels=1, rewind_step=3, save_dir=str(tmp_path / "m"))
    with pytest.raises(ValueError, match=r"rewind_step=3 is after the first prune \(step 2"):
        _fit(tmp_path, cb, max_epochs=1)


def test_lr_schedule_restarts_every_level(tmp_path):
    from er_lightning.module import SparseLightningModule

    torch.manual_seed(0)
    module = SparseLightningModule(TinyNet(), num_classes=10, lr=0.1, lr_schedule="cosine", weight_decay=0.0)
    probe = Probe()
    cb = IterativeMagnitudePruning(epochs_per_level=2, levels=2, save_dir=str(tmp_path / "m"))
    _fit(tmp_path, cb, max_epochs=6, module=module, after=[probe])
    lrs = probe.lrs  # 12 steps: three 4-step cosine cycles (2 levels and the final 2 epochs)
    assert len(lrs) == 12
    assert lrs[0] == lrs[4] == lrs[8] == pytest.approx(0.1)
    assert lrs[0:4] == lrs[4:8] == lrs[8:12]
    assert lrs[3] < lrs[2] < lrs[1] < lrs[0]


def test_plain_module_with_scheduler_warns(tmp_path):
    class Scheduled(PlainModule):
        def configure_optimizers(self):  # noqa: ANN201
            opt = torch.optim.SGD(self.parameters(), lr=0.1)
            return [opt], [torch.optim.lr_scheduler.StepLR(opt, 1)]

    cb = IterativeMagnitudePruning(epochs_per_level=1, levels=2, save_dir=str(tmp_path / "m"))
    with (
        pytest.warns(UserWarning, match="no reset_lr_schedule"),
        pytest.warns(UserWarning, match="reaches only 1 of 2"),
    ):
        _fit(tmp_path, cb, max_epochs=1, module=Scheduled())


def test_level_masks_load_into_static_sparsity(tmp_path):
    torch.manual_seed(0)
    cb = IterativeMagnitudePruning(epochs_per_level=1, levels=2, save_dir=str(tmp_path / "m"))
    _fit(tmp_path, cb, max_epochs=2)
    path = str(tmp_path / "m" / "level_2.pt")
    for placement in ("scores", "random"):
        static = StaticSparsity(distribution="from_mask", mask_file=path, placement=placement, seed=1)
        _fit(tmp_path / placement, static, max_epochs=1)  # type: ignore[arg-type]
        for name in NAMES:
            assert int(static.masked.masks[name].sum()) == int(cb.masked.masks[name].sum()), name
        same = [torch.equal(static.masked.masks[n], cb.masked.masks[n]) for n in NAMES]
        if placement == "scores":  # the IMP positions themselves
            assert all(same)
        else:  # ER_imp: the IMP ratios at random positions: no partly pruned layer keeps IMP's positions
            partial = [n for n in NAMES if 0 < int(cb.masked.masks[n].sum()) < cb.masked.masks[n].numel()]
            assert partial and not any(
                torch.equal(static.masked.masks[n], cb.masked.masks[n]) for n in partial
            )


@pytest.mark.parametrize("lightning_module", ["plain", "sparse"])
def test_resume_mid_level_matches_an_uninterrupted_run(tmp_path, lightning_module):
    from er_lightning.module import SparseLightningModule

    def make_module() -> pl.LightningModule:
        if lightning_module == "plain":
            return PlainModule()
        return SparseLightningModule(TinyNet(), num_classes=10, lr=0.05, lr_schedule="cosine")

    def make_cb(name: str) -> IterativeMagnitudePruning:
        return IterativeMagnitudePruning(
            epochs_per_level=2, levels=2, rewind_step=1, save_dir=str(tmp_path / name)
        )

    torch.manual_seed(0)
    full_cb = make_cb("full_masks")
    full, _ = _fit(tmp_path / "full", full_cb, max_epochs=5, module=make_module())
    torch.manual_seed(0)
    part_cb = make_cb("part_masks")
    _fit(tmp_path / "part", part_cb, max_epochs=3, module=make_module())  # stops inside level 1
    assert part_cb.level == 1
    torch.manual_seed(99)  # the resumed process starts from unrelated weights and an unrelated setup mask
    resumed_cb = make_cb("resumed_masks")
    resumed, _ = _fit(
        tmp_path / "resume",
        resumed_cb,
        max_epochs=5,
        module=make_module(),
        ckpt_path=tmp_path / "part" / "ckpt" / "last.ckpt",
    )
    assert resumed_cb.level == full_cb.level == 2
    for name in NAMES if lightning_module == "plain" else [n.replace("net.", "model.") for n in NAMES]:
        assert torch.equal(resumed_cb.masked.masks[name], full_cb.masked.masks[name]), name
    full_params = dict(full.named_parameters())
    for name, p in resumed.named_parameters():
        assert torch.equal(p, full_params[name]), name
    shapes = {n: tuple(m.shape) for n, m in full_cb.masked.masks.items()}
    for i in (2,):  # levels written after the resume agree with the uninterrupted run's
        a = load_masks(tmp_path / "full_masks" / f"level_{i}.pt", shapes)
        b = load_masks(tmp_path / "resumed_masks" / f"level_{i}.pt", shapes)
        assert all(torch.equal(a[n], b[n]) for n in shapes)


def test_resume_from_a_validation_end_checkpoint_before_the_prune(tmp_path):
    """A checkpoint saved at validation end precedes the prune; Lightning re-runs on_train_epoch_end on resume."""

    class Validated(PlainModule):
        def validation_step(self, batch, batch_idx):  # noqa: ANN001, ANN201
            x, y = batch
            self.log("val_loss", torch.nn.functional.cross_entropy(self(x), y))

    def fit(root: Path, max_epochs: int, ckpt_path=None):  # noqa: ANN001, ANN202
        cb = IterativeMagnitudePruning(epochs_per_level=1, levels=2, save_dir=str(root / "m"))
        ckpt = ModelCheckpoint(
            dirpath=root / "ckpt", save_last=True, monitor="val_loss", save_on_train_epoch_end=False
        )
        trainer = make_trainer(
            root, [cb, ckpt], max_steps=-1, max_epochs=max_epochs, enable_checkpointing=True
        )
        module = Validated()
        trainer.fit(module, random_loader(n=32), random_loader(n=16, seed=5), ckpt_path=ckpt_path)
        return cb, module

    torch.manual_seed(0)
    full_cb, full = fit(tmp_path / "full", 3)
    torch.manual_seed(0)
    part_cb, _ = fit(tmp_path / "part", 1)
    saved = torch.load(tmp_path / "part" / "ckpt" / "last.ckpt", weights_only=False)
    imp_state = next(v for k, v in saved["callbacks"].items() if "IterativeMagnitudePruning" in k)
    assert imp_state["imp"]["level"] == 0 and part_cb.level == 1  # the checkpoint predates the prune
    torch.manual_seed(7)
    resumed_cb, resumed = fit(tmp_path / "resume", 3, ckpt_path=tmp_path / "part" / "ckpt" / "last.ckpt")
    assert resumed_cb.level == full_cb.level == 2
    assert all(torch.equal(resumed_cb.masked.masks[n], full_cb.masked.masks[n]) for n in NAMES)
    full_params = dict(full.named_parameters())
    for name, p in resumed.named_parameters():
        assert torch.equal(p, full_params[name]), name


def test_state_dict_round_trip_holds_level_and_snapshot(tmp_path):
    torch.manual_seed(0)
    cb = IterativeMagnitudePruning(epochs_per_level=1, levels=2, save_dir=str(tmp_path / "m"))
    _fit(tmp_path, cb, max_epochs=1)
    state = copy.deepcopy(cb.state_dict())
    assert state["imp"]["level"] == 1
    assert all(t.device.type == "cpu" for t in state["imp"]["rewind"]["params"].values())
    other = IterativeMagnitudePruning(epochs_per_level=1, levels=2, save_dir=str(tmp_path / "m"))
    trainer = make_trainer(tmp_path, [other])
    module = PlainModule()
    trainer.strategy.connect(module)
    module.trainer = trainer  # type: ignore[misc]
    other.setup(trainer, module, "fit")
    other.load_state_dict(state)
    assert other.level == 1
    assert all(torch.equal(other.masked.masks[n], cb.masked.masks[n]) for n in NAMES)
    with pytest.raises(ValueError, match="epochs_per_level: checkpoint 1 vs now 2"):
        IterativeMagnitudePruning(epochs_per_level=2, levels=2).load_state_dict(state)


def test_bad_arguments():
    with pytest.raises(ValueError, match="levels must be >= 1"):
        IterativeMagnitudePruning(epochs_per_level=1, levels=0)
    with pytest.raises(ValueError, match="epochs_per_level must be >= 1"):
        IterativeMagnitudePruning(epochs_per_level=0, levels=2)
    for bad in (0.0, 1.0, 1.5, -0.2):
        with pytest.raises(ValueError, match="prune_factor must be in"):
            IterativeMagnitudePruning(epochs_per_level=1, levels=2, prune_factor=bad)
    with pytest.raises(ValueError, match="needs the pruning schedule"):
        IterativeMagnitudePruning(epochs_per_level=1)
    with pytest.raises(ValueError, match="non-increasing"):
        IterativeMagnitudePruning(epochs_per_level=1, densities=[0.5, 0.6])
    with pytest.raises(ValueError, match="at most the starting density 0.5"):
        IterativeMagnitudePruning(epochs_per_level=1, densities=[0.6], density=0.5)
    for bad in (0.0, 1.2, float("nan")):
        with pytest.raises(ValueError, match=r"in \(0, 1\]"):
            IterativeMagnitudePruning(epochs_per_level=1, densities=[bad])
    with pytest.raises(ValueError, match="levels=3 but densities has 2"):
        IterativeMagnitudePruning(epochs_per_level=1, levels=3, densities=[0.5, 0.2])
    with pytest.raises(ValueError, match="rewind_step must be"):
        IterativeMagnitudePruning(epochs_per_level=1, levels=1, rewind_step=-1)
    with pytest.raises(ValueError, match="scope must be"):
        IterativeMagnitudePruning(epochs_per_level=1, levels=1, scope="per_layer")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="density must be"):
        IterativeMagnitudePruning(epochs_per_level=1, levels=1, density=0.0)
    for flag in (
        "rewind_buffers",
        "reset_optimizer",
        "rewind_optimizer",
        "reset_lr_schedule",
        "dense_first_layer",
    ):
        for bad in ("False", 0, None):
            with pytest.raises(TypeError, match=f"{flag} must be True or False, got"):
                IterativeMagnitudePruning(epochs_per_level=1, levels=1, **{flag: bad})
    with pytest.raises(ValueError, match="rewind_optimizer=True .* needs rewind_step"):
        IterativeMagnitudePruning(epochs_per_level=1, levels=1, rewind_step=None, rewind_optimizer=True)
    with pytest.raises(ValueError, match="reset_optimizer=True"):
        IterativeMagnitudePruning(epochs_per_level=1, levels=1, reset_optimizer=False, rewind_optimizer=True)


def test_run_ending_on_the_last_prune_warns_that_the_network_is_untrained(tmp_path):
    torch.manual_seed(0)
    cb = IterativeMagnitudePruning(epochs_per_level=1, levels=2, save_dir=str(tmp_path / "m"))
    with pytest.warns(
        UserWarning, match=r"max_epochs=2 = levels 2 x epochs_per_level 1.*never trained"
    ) as record:
        module, _ = _fit(tmp_path, cb, max_epochs=2)
    assert len([w for w in record if "never trained" in str(w.message)]) == 2  # at fit start and at the prune
    # and so it is: the weights are the initial ones under the last mask
    init = dict(cb._rewind["params"])
    for name, p in module.named_parameters():
        expected = init[name] * cb.masked.masks[name] if name in cb.masked.masks else init[name]
        assert torch.equal(p.detach(), expected), name
    # one final epoch more: no such warning
    torch.manual_seed(0)
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _fit(tmp_path / "more", IterativeMagnitudePruning(epochs_per_level=1, levels=2), max_epochs=3)
    assert not [w for w in caught if "never trained" in str(w.message)]


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_rewind_optimizer_restores_the_state_of_the_rewind_point(tmp_path, optimizer):
    class AtStep(Callback):
        def __init__(self) -> None:
            self.state = None

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):  # noqa: ANN001, ANN201
            if trainer.global_step == 3:
                opt = trainer.optimizers[0]
                self.state = {
                    n: {k: v.clone() for k, v in opt.state[p].items()}
                    for n, p in pl_module.named_parameters()
                }

    torch.manual_seed(0)
    probe = AtStep()
    cb = IterativeMagnitudePruning(
        epochs_per_level=2, levels=1, rewind_step=3, rewind_optimizer=True, save_dir=str(tmp_path / "m")
    )
    module = PlainModule(optimizer=optimizer)
    with pytest.warns(UserWarning, match="never trained"):
        module, trainer = _fit(
            tmp_path, cb, max_epochs=2, module=module, before=[probe]
        )  # prune after step 4
    opt = trainer.optimizers[0]
    kinds = ["momentum_buffer"] if optimizer == "sgd" else ["exp_avg", "exp_avg_sq", "step"]
    for name, p in module.named_parameters():
        state = opt.state[p]
        assert sorted(state) == sorted(kinds), name
        for key, value in state.items():
            expected = probe.state[name][key]
            if name in cb.masked.masks and value.shape == p.shape:
                expected = expected * cb.masked.masks[name]  # zeroed where pruned
            assert torch.equal(value, expected), (name, key)
    if optimizer == "adam":
        assert float(opt.state[dict(module.named_parameters())[NAMES[0]]]["step"]) == 3.0
    assert opt.param_groups[0]["lr"] == 0.05  # the hyper-parameters are the run's, not the snapshot's


@pytest.mark.dist
def test_imp_masks_identical_on_two_ranks(tmp_path):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration"))
    from ddp_helpers import run_ddp

    # 128 samples, batch 8, 2 ranks: 8 steps per epoch; prune at the end of epoch 0, then 2 steps of epoch 1
    r0, r1 = run_ddp(
        tmp_path,
        "er_lightning.callbacks.imp.IterativeMagnitudePruning",
        {"epochs_per_level": 1, "levels": 1, "density": 0.5, "distribution": "uniform", "verify_masks": True},
        max_steps=10,
    )
    assert r0["global_step"] == r1["global_step"] == 10
    m0, m1 = r0["callback"]["masks"], r1["callback"]["masks"]
    assert r0["callback"]["imp"]["level"] == r1["callback"]["imp"]["level"] == 1
    assert _count(m0) == exact_count(0.4, TOTAL)
    for name in NAMES:
        assert torch.equal(m0[name], m1[name]), name
        assert torch.equal(r0["model"][name], r1["model"][name]), name
        assert (r0["model"][name][~m0[name]] == 0).all()
    assert (tmp_path / "imp_masks" / "level_1.pt").is_file()


def test_resumed_run_writes_its_levels_into_the_first_runs_folder(tmp_path):
    """Default save_dir: a resume logs to version_1 but keeps every level in version_0/imp_masks (issue 12 #2)."""
    from pytorch_lightning.loggers import TensorBoardLogger

    def fit(max_epochs: int, ckpt_path=None) -> IterativeMagnitudePruning:  # noqa: ANN001
        cb = IterativeMagnitudePruning(epochs_per_level=1, levels=3)
        ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, save_on_train_epoch_end=True)
        logger = TensorBoardLogger(str(tmp_path / "runs"), name="imp")
        trainer = make_trainer(
            tmp_path,
            [cb, ckpt],
            max_steps=-1,
            max_epochs=max_epochs,
            logger=logger,
            enable_checkpointing=True,
        )
        torch.manual_seed(0)
        trainer.fit(PlainModule(), random_loader(n=32), ckpt_path=ckpt_path)
        return cb

    first = fit(2)
    assert first.level == 2
    resumed = fit(4, ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    assert resumed.level == 3
    runs = tmp_path / "runs" / "imp"
    assert (runs / "version_1").is_dir()  # the resumed run has its own log folder ...
    assert Path(resumed.mask_dir) == runs / "version_0" / "imp_masks"  # ... but not its own mask folder
    assert sorted(p.name for p in (runs / "version_0" / "imp_masks").iterdir()) == [
        f"level_{i}.pt" for i in range(4)
    ]
    assert not (runs / "version_1" / "imp_masks").exists()
    final = load_masks(runs / "version_0" / "imp_masks" / "level_3.pt", SHAPES)
    assert all(torch.equal(final[n], resumed.masked.masks[n]) for n in NAMES)
