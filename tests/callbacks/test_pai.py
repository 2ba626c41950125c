"""StaticSparsity with layer ratios from pruning-at-init scores or a mask file (ER_snip, ER_synflow, ER_imp)."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from conftest import PlainModule, TinyNet, make_trainer, random_loader
from torch.utils.data import DataLoader

from er_lightning.callbacks.static import SOURCE_DISTRIBUTIONS, StaticSparsity
from er_lightning.masking.io import save_masks
from er_lightning.sparsity.sampling import layer_generator, resample_like
from er_lightning.sparsity.scores import prune_at_init
from er_lightning.sparsity.topk import exact_count

NAMES = ["net.conv1.weight", "net.conv2.weight", "net.fc.weight"]
SHAPES = {"net.conv1.weight": (8, 3, 3, 3), "net.conv2.weight": (16, 8, 3, 3), "net.fc.weight": (10, 16)}
TOTAL = sum(torch.Size(s).numel() for s in SHAPES.values())
INPUT = [3, 8, 8]


class DataModule(PlainModule):
    """A user's module that brings its own training data."""

    def train_dataloader(self):  # noqa: ANN201
        return random_loader(n=32, batch_size=8, seed=1)


class Data(pl.LightningDataModule):
    def train_dataloader(self):  # noqa: ANN201
        return random_loader(n=32, batch_size=8, seed=2)


def _setup(cb: StaticSparsity, module: pl.LightningModule, tmp_path, stage: str = "fit") -> pl.Trainer:  # noqa: ANN001
    trainer = make_trainer(tmp_path, [cb])
    trainer.strategy.connect(module)
    module.trainer = trainer  # type: ignore[misc]
    cb.setup(trainer, module, stage)
    return trainer


def _file_masks(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    densities = {"net.conv1.weight": 0.7, "net.conv2.weight": 0.15, "net.fc.weight": 0.4}
    return {n: torch.rand(SHAPES[n], generator=g) < densities[n] for n in NAMES}


def _kwargs(distribution: str, tmp_path) -> dict:  # noqa: ANN001
    if distribution == "from_mask":
        path = tmp_path / "mask.pt"
        save_masks(_file_masks(), path)
        return {"mask_file": str(path)}
    if distribution == "synflow":
        return {"input_shape": INPUT, "rounds": 5}
    return {}


def _expected_source(
    distribution: str, module: pl.LightningModule, density: float
) -> dict[str, torch.Tensor]:
    """The source mask computed independently, on a copy of the module before setup."""
    if distribution == "from_mask":
        return _file_masks()
    batches = [next(iter(module.train_dataloader()))] if distribution in ("snip", "grasp") else None
    return prune_at_init(
        distribution,
        copy.deepcopy(module),
        NAMES,
        density,
        batches=batches,
        input_shape=INPUT,
        rounds=5,
    )


@pytest.mark.parametrize("placement", ["random", "scores"])
@pytest.mark.parametrize("distribution", SOURCE_DISTRIBUTIONS)
def test_exact_counts_for_every_source_and_placement(tmp_path, distribution, placement):
    torch.manual_seed(0)
    module = DataModule()
    expected = _expected_source(distribution, module, 0.2)
    cb = StaticSparsity(
        density=0.2, distribution=distribution, placement=placement, seed=4, **_kwargs(distribution, tmp_path)
    )
    _setup(cb, module, tmp_path)
    params = dict(module.named_parameters())
    assert cb.masked.names == NAMES
    if distribution != "from_mask":  # one global threshold at the requested density
        assert sum(int(m.sum()) for m in expected.values()) == exact_count(0.2, TOTAL)
    for name in NAMES:
        mask = cb.masked.masks[name]
        assert int(mask.sum()) == int(expected[name].sum()), name  # layer counts of the source, exactly
        assert cb.target_densities[name] == int(expected[name].sum()) / mask.numel()
        assert torch.count_nonzero(params[name]) == int(mask.sum())
        if placement == "scores":
            assert torch.equal(mask, expected[name].cpu()), name
    if placement == "random":  # fresh positions: some layer must differ from the source
        assert any(not torch.equal(cb.masked.masks[n], expected[n].cpu()) for n in NAMES)


def test_random_placement_is_the_shuffled_source(tmp_path):
    """placement='random' with exact sampling equals resample_like on the source with layer_generator(seed, l)."""
    torch.manual_seed(0)
    module = DataModule()
    source = _expected_source("snip", module, 0.1)
    cb = StaticSparsity(density=0.1, distribution="snip", placement="random", seed=9)
    _setup(cb, module, tmp_path)
    for index, name in enumerate(NAMES):
        shuffled = resample_like(source[name].cpu(), generator=layer_generator(9, index))
        assert torch.equal(cb.masked.masks[name], shuffled), name


def test_snip_scores_match_prune_at_init_in_a_real_fit(tmp_path):
    """The plain-loader case (trainer.fit(model, loader)): scores read the loader's first batches."""
    torch.manual_seed(0)
    module = PlainModule()
    loader = random_loader(n=32, batch_size=8, seed=3)
    batches = list(loader)[:2]
    expected = prune_at_init("snip", copy.deepcopy(module), NAMES, 0.15, batches=batches, num_batches=2)
    cb = StaticSparsity(density=0.15, distribution="snip", placement="scores", num_batches=2)
    make_trainer(tmp_path, [cb], max_steps=2).fit(module, loader)
    for name in NAMES:
        assert torch.equal(cb.masked.masks[name], expected[name]), name
    params = dict(module.named_parameters())
    for name in NAMES:
        assert (params[name][~cb.masked.masks[name]] == 0).all()


def test_snip_reads_the_datamodule(tmp_path):
    torch.manual_seed(0)
    module = PlainModule()
    batches = [next(iter(Data().train_dataloader()))]
    expected = prune_at_init("grasp", copy.deepcopy(module), NAMES, 0.3, batches=batches)
    cb = StaticSparsity(density=0.3, distribution="grasp", placement="scores")
    make_trainer(tmp_path, [cb], max_steps=1).fit(module, datamodule=Data())
    for name in NAMES:
        assert torch.equal(cb.masked.masks[name], expected[name]), name


class ShuffledData(PlainModule):
    """Training data with a shuffling sampler, which draws from the global RNG when iterated."""

    def train_dataloader(self):  # noqa: ANN201
        return DataLoader(random_loader(n=32).dataset, batch_size=8, shuffle=True)


def test_scoring_leaves_module_and_rng_unchanged(tmp_path):
    torch.manual_seed(0)
    module = ShuffledData()
    rng = torch.get_rng_state()
    iter(module.train_dataloader()).__next__()
    assert not torch.equal(torch.get_rng_state(), rng)  # iterating the loader alone would advance the RNG
    module.train()
    before = copy.deepcopy(module.state_dict())
    rng = torch.get_rng_state()
    cb = StaticSparsity(density=0.1, distribution="snip", placement="scores")
    _setup(cb, module, tmp_path)
    assert torch.equal(torch.get_rng_state(), rng)
    assert module.training
    assert all(p.grad is None for p in module.parameters())
    after = module.state_dict()
    for key, value in before.items():
        if key in cb.masked.masks:
            mask = cb.masked.masks[key]
            assert torch.equal(after[key][mask], value[mask]), key
            assert (after[key][~mask] == 0).all(), key
        else:  # biases, BN affine parameters and running statistics
            assert torch.equal(after[key], value), key


def test_synflow_input_shape_sources(tmp_path):
    torch.manual_seed(0)
    module = PlainModule()
    ref = prune_at_init("synflow", copy.deepcopy(module), NAMES, 0.1, input_shape=INPUT, rounds=3)
    # from an attribute of the module
    module_attr = copy.deepcopy(module)
    module_attr.input_shape = tuple(INPUT)
    cb = StaticSparsity(density=0.1, distribution="synflow", placement="scores", rounds=3)
    _setup(cb, module_attr, tmp_path / "a")
    assert all(torch.equal(cb.masked.masks[n], ref[n]) for n in NAMES)
    # from the first training batch
    module_data = DataModule()
    module_data.load_state_dict(module.state_dict())
    cb = StaticSparsity(density=0.1, distribution="synflow", placement="scores", rounds=3)
    _setup(cb, module_data, tmp_path / "b")
    assert all(torch.equal(cb.masked.masks[n], ref[n]) for n in NAMES)
    # nowhere to find it
    cb = StaticSparsity(density=0.1, distribution="synflow", rounds=3)
    with pytest.raises(ValueError, match="synflow needs the shape of one input"):
        _setup(cb, copy.deepcopy(module), tmp_path / "c")


def test_synflow_reads_backbone_input_shape(tmp_path):
    from er_lightning.module import SparseLightningModule

    torch.manual_seed(0)
    net = TinyNet()
    net.input_shape = (3, 8, 8)
    module = SparseLightningModule(net, num_classes=10)
    names = ["model.conv1.weight", "model.conv2.weight", "model.fc.weight"]
    ref = prune_at_init("synflow", copy.deepcopy(module), names, 0.1, input_shape=INPUT, rounds=3)
    cb = StaticSparsity(density=0.1, distribution="synflow", placement="scores", rounds=3)
    _setup(cb, module, tmp_path)
    assert cb.masked.names == names
    assert all(torch.equal(cb.masked.masks[n], ref[n]) for n in names)


def test_snip_without_data_raises(tmp_path):
    cb = StaticSparsity(density=0.1, distribution="snip")
    with pytest.raises(
        ValueError, match="snip needs training batches: attach a datamodule or define train_dataloader"
    ):
        _setup(cb, PlainModule(), tmp_path)
    cb = StaticSparsity(density=0.1, distribution="snip", num_batches=5)
    with pytest.raises(ValueError, match="yields only 4 batches"):
        _setup(cb, DataModule(), tmp_path)


def test_snip_in_a_test_stage_without_data_leaves_the_module(tmp_path):
    module = PlainModule()
    before = copy.deepcopy(module.state_dict())
    cb = StaticSparsity(density=0.1, distribution="snip")
    _setup(cb, module, tmp_path, stage="test")
    assert cb.masked is None
    assert all(torch.equal(v, module.state_dict()[k]) for k, v in before.items())


def test_mask_file_mismatch_lists_differences(tmp_path):
    masks = _file_masks()
    masks["net.extra.weight"] = masks.pop("net.fc.weight")
    masks["net.conv1.weight"] = torch.ones(8, 3, 1, 1, dtype=torch.bool)
    path = tmp_path / "bad.pt"
    save_masks(masks, path)
    cb = StaticSparsity(distribution="from_mask", mask_file=str(path))
    with pytest.raises(ValueError) as err:
        _setup(cb, PlainModule(), tmp_path)
    message = str(err.value)
    assert "missing from" in message and "net.fc.weight" in message
    assert "not masked in the model: ['net.extra.weight']" in message
    assert "net.conv1.weight: file (8, 3, 1, 1) vs model (8, 3, 3, 3)" in message
    with pytest.raises(FileNotFoundError, match="mask file not found"):
        _setup(
            StaticSparsity(distribution="from_mask", mask_file=str(tmp_path / "nope.pt")),
            PlainModule(),
            tmp_path,
        )


def test_bad_arguments():
    with pytest.raises(ValueError, match="placement='scores'.*density rule"):
        StaticSparsity(distribution="erk", placement="scores")
    with pytest.raises(ValueError, match="placement must be"):
        StaticSparsity(distribution="snip", placement="best")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="init='he_sparse' re-draws"):
        StaticSparsity(distribution="snip", placement="scores", init="he_sparse")
    with pytest.raises(ValueError, match="needs mask_file"):
        StaticSparsity(distribution="from_mask")
    with pytest.raises(ValueError, match="only read with distribution='from_mask'"):
        StaticSparsity(distribution="snip", mask_file="x.pt")
    with pytest.raises(ValueError, match="rounds must be >= 1"):
        StaticSparsity(distribution="synflow", rounds=0)
    with pytest.raises(ValueError, match="num_batches must be >= 1"):
        StaticSparsity(distribution="snip", num_batches=0)
    with pytest.raises(ValueError, match="input_shape must be"):
        StaticSparsity(distribution="synflow", input_shape=[3, 0, 8])
    for bad in (0, 1.5, -0.2, float("nan")):
        with pytest.raises(ValueError, match="density must be"):
            StaticSparsity(density=bad, distribution="snip")
    with pytest.raises(ValueError, match=r"unknown distribution 'ER_snip'"):
        StaticSparsity(distribution="ER_snip")


def test_resume_restores_score_masks(tmp_path):
    """The checkpoint's masks win over a re-scoring at setup (which here sees other weights)."""
    from pytorch_lightning.callbacks import ModelCheckpoint

    def fit(root, max_epochs, ckpt_path=None):  # noqa: ANN001, ANN202
        cb = StaticSparsity(density=0.2, distribution="snip", placement="scores")
        ckpt = ModelCheckpoint(dirpath=root / "ckpt", save_last=True, save_on_train_epoch_end=True)
        trainer = make_trainer(
            root, [cb, ckpt], max_steps=-1, max_epochs=max_epochs, enable_checkpointing=True
        )
        trainer.fit(DataModule(), ckpt_path=ckpt_path)
        return cb

    torch.manual_seed(0)
    full = fit(tmp_path / "full", 2)
    torch.manual_seed(0)
    fit(tmp_path / "part", 1)
    torch.manual_seed(123)  # the resumed process scores other initial weights at setup
    resumed = fit(tmp_path / "resume", 2, ckpt_path=tmp_path / "part" / "ckpt" / "last.ckpt")
    for name in NAMES:
        assert torch.equal(resumed.masked.masks[name], full.masked.masks[name]), name


@pytest.mark.dist
def test_snip_masks_identical_on_two_ranks(tmp_path):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration"))
    from ddp_helpers import run_ddp

    r0, r1 = run_ddp(
        tmp_path,
        "er_lightning.callbacks.static.StaticSparsity",
        {"density": 0.2, "distribution": "snip", "placement": "scores", "verify_masks": True},
        max_steps=2,
    )
    m0, m1 = r0["callback"]["masks"], r1["callback"]["masks"]
    assert list(m0) == NAMES
    assert sum(int(m.sum()) for m in m0.values()) == exact_count(0.2, TOTAL)
    for name in NAMES:
        assert torch.equal(m0[name], m1[name]), name
        assert torch.equal(r0["model"][name], r1["model"][name]), name
        assert (r0["model"][name][~m0[name]] == 0).all()
