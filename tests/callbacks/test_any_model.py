"""Callbacks on models a user brings: a transformer LM with a tied head, large dense tensors, manual optimization."""

from __future__ import annotations

import logging
import re

import pytest
import pytorch_lightning as pl
import torch
from conftest import PlainModule, make_trainer, random_loader
from torch import nn

from er_lightning import SparseLightningModule
from er_lightning.callbacks import RigL, SoftThreshold, StaticSparsity, Supermask
from er_lightning.data import SyntheticTokensDataModule
from er_lightning.masking.masked import count_zeros
from er_lightning.sparsity import layer_densities
from er_lightning.sparsity.scores import prune_at_init
from er_lightning.sparsity.topk import exact_count

LM_TARGETS = [
    "model.token.weight",
    "model.position.weight",
    "model.blocks.0.attn.in_proj_weight",
    "model.blocks.0.attn.out_proj.weight",
    "model.blocks.0.fc1.weight",
    "model.blocks.0.fc2.weight",
]


def _lm(**kwargs) -> SparseLightningModule:  # noqa: ANN003
    torch.manual_seed(0)
    model_kwargs = {"seq_len": 8, "dim": 16, "depth": 1, "heads": 2, **kwargs}
    return SparseLightningModule(
        "transformer_lm", num_classes=32, model_kwargs=model_kwargs, optimizer="adam", lr=1e-2
    )


def _tokens() -> SyntheticTokensDataModule:
    return SyntheticTokensDataModule(vocab_size=32, seq_len=8, num_train=64, num_val=16, batch_size=16)


def _state_dict_zeros(module: nn.Module) -> tuple[int, int]:
    """Zeros over the parameter entries of state_dict, a tensor shared by several keys counted once."""
    params = {id(p) for p in module.parameters()}
    unique = {id(t): t for t in module.state_dict(keep_vars=True).values() if id(t) in params}
    return sum(int((t == 0).sum()) for t in unique.values()), sum(t.numel() for t in unique.values())


@pytest.mark.parametrize(
    ("callback", "distribution"),
    [(StaticSparsity, "uniform"), (StaticSparsity, "erk"), (RigL, "erk")],
)
def test_tied_lm_masks_every_matmul_and_embedding_weight_once(tmp_path, caplog, callback, distribution):
    module = _lm()
    kwargs = {"update_every_steps": 2} if callback is RigL else {}
    cb = callback(density=0.1, distribution=distribution, embeddings=True, seed=1, **kwargs)
    trainer = make_trainer(tmp_path, [cb], max_steps=4)
    with caplog.at_level(logging.INFO):
        trainer.fit(module, datamodule=_tokens())
    assert cb.masked.names == LM_TARGETS  # head.weight is token.weight: one target, one mask
    assert module.model.head.weight is module.model.token.weight
    params = dict(module.named_parameters())
    shapes = {n: tuple(params[n].shape) for n in LM_TARGETS}
    expected = layer_densities(shapes, 0.1, distribution)
    kept_all = 0
    for name in LM_TARGETS:
        mask = cb.masked.masks[name]
        assert int(mask.sum()) == exact_count(expected[name], mask.numel())  # exact count per tensor
        assert (params[name][~mask] == 0).all()
        kept_all += int(mask.sum())
    numel_all = sum(params[n].numel() for n in LM_TARGETS)
    assert abs(kept_all - 0.1 * numel_all) <= len(LM_TARGETS) / 2  # rounding of one count per tensor
    # the setup table lists the tied tensor under both names, and its whole-model line matches state_dict
    table = next(r.getMessage() for r in caplog.records if "whole model" in r.getMessage())
    assert "model.token.weight = model.model.head.weight" not in table
    assert "model.token.weight = model.head.weight" in table
    line = re.search(r"whole model\s+(\d+) parameters\s+([\d.]+)\s+(\d+)\s+\((\d+) zero\)", table)
    assert line is not None
    total, nonzero, zeros = int(line.group(1)), int(line.group(3)), int(line.group(4))
    assert total == sum(p.numel() for p in module.parameters())
    assert nonzero + zeros == total
    masked_line = re.search(r"masked tensors\s+(\d+) weights\s+([\d.]+)\s+(\d+)", table)
    assert int(masked_line.group(1)) == numel_all
    assert int(masked_line.group(3)) == kept_all


def test_whole_model_line_agrees_with_state_dict_zeros(tmp_path):
    module = _lm()
    cb = StaticSparsity(density=0.2, distribution="erk", embeddings=True)
    trainer = make_trainer(tmp_path, [cb])
    trainer.strategy.connect(module)
    module.trainer = trainer  # type: ignore[misc]
    cb.setup(trainer, module, "fit")
    table = cb.setup_table(module)
    zeros, total = _state_dict_zeros(module)
    assert count_zeros(module) == (zeros, total)
    assert f"{total} parameters" in table
    assert f"{total - zeros:>10d}  ({zeros} zero)" in table
    masked_zeros = sum(int((~m).sum()) for m in cb.masked.masks.values())
    assert zeros >= masked_zeros  # masked zeros, plus zero-initialised biases


def test_large_dense_tensors_are_listed_in_a_warning(tmp_path):
    module = SparseLightningModule(
        "transformer_lm",
        num_classes=512,
        model_kwargs={"seq_len": 8, "dim": 16, "depth": 1, "heads": 2, "tie_weights": False},
    )
    for embeddings, warns in ((False, True), (True, False)):
        cb = StaticSparsity(density=0.1, embeddings=embeddings)
        trainer = make_trainer(tmp_path, [cb])
        trainer.strategy.connect(module)
        module.trainer = trainer  # type: ignore[misc]
        with pytest.warns(UserWarning) if warns else _no_warning() as record:
            cb.setup(trainer, module, "fit")
        if warns:
            text = " ".join(str(w.message) for w in record)
            assert "model.token.weight (8192 = " in text
            assert "embeddings=True" in text
        module = SparseLightningModule(
            "transformer_lm",
            num_classes=512,
            model_kwargs={"seq_len": 8, "dim": 16, "depth": 1, "heads": 2, "tie_weights": False},
        )


class _no_warning:  # noqa: N801 - used as a context manager like pytest.warns
    def __enter__(self) -> None:
        import warnings

        self._ctx = warnings.catch_warnings()
        self._ctx.__enter__()
        warnings.filterwarnings("error", message=".*leave these large parameters dense.*")

    def __exit__(self, *exc: object) -> None:
        self._ctx.__exit__(*exc)


# ---------------------------------------------------------------------------------------------- manual optimization
class TwoOptimizers(pl.LightningModule):
    """A GAN-shaped module: two nets, two Adam optimizers, stepped by hand in training_step."""

    def __init__(self, raw_optimizer: bool) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.gen = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 8))
        self.disc = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))
        self.raw_optimizer = raw_optimizer
        self.steps = 0

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.gen(z)

    def training_step(self, batch, batch_idx):  # noqa: ANN001, ANN201
        z = batch[0]
        opt_g, opt_d = self.optimizers(use_pl_optimizer=not self.raw_optimizer)
        fake = self.gen(z)
        loss_d = self.disc(fake.detach()).mean() - self.disc(torch.randn_like(fake)).mean()
        opt_d.zero_grad()
        self.manual_backward(loss_d)
        opt_d.step()
        loss_g = -self.disc(self.gen(z)).mean()
        opt_g.zero_grad()
        self.manual_backward(loss_g)
        opt_g.step()
        self.steps += 2

    def configure_optimizers(self):  # noqa: ANN201
        return (
            torch.optim.Adam(self.gen.parameters(), lr=1e-2),
            torch.optim.Adam(self.disc.parameters(), lr=1e-2, weight_decay=0.1),
        )


@pytest.mark.parametrize("raw_optimizer", [False, True])
def test_manual_optimization_with_two_optimizers_keeps_masks_exact(tmp_path, raw_optimizer):
    torch.manual_seed(0)
    module = TwoOptimizers(raw_optimizer)
    cb = StaticSparsity(density=0.3, distribution="erk")
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(32, 4)), batch_size=8)
    trainer = make_trainer(tmp_path, [cb], max_steps=-1, max_epochs=2)
    trainer.fit(module, train_dataloaders=loader)
    assert module.steps == 16
    assert cb.masked.names == ["gen.0.weight", "gen.2.weight", "disc.0.weight", "disc.2.weight"]
    params = dict(module.named_parameters())
    for name, mask in cb.masked.masks.items():
        p = params[name]
        assert (p[~mask] == 0).all(), name
        assert (p[mask] != 0).any()
        for opt in trainer.optimizers:
            for key in ("exp_avg", "exp_avg_sq"):
                if p in opt.state:
                    assert (opt.state[p][key][~mask] == 0).all(), (name, key)
    assert cb._step_hooks == []  # removed at the end of fit


# ---------------------------------------------------------------------------------------------- scores from the module
def _setup_only(cb, module, datamodule, tmp_path) -> pl.Trainer:  # noqa: ANN001
    trainer = make_trainer(tmp_path, [cb])
    trainer.strategy.connect(module)
    module.trainer = trainer  # type: ignore[misc]
    trainer.datamodule = datamodule  # type: ignore[misc]
    datamodule.trainer = trainer
    cb.setup(trainer, module, "fit")
    return trainer


def _flat_ce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def test_snip_on_the_lm_takes_the_loss_from_training_step(tmp_path):
    module = _lm()
    names = LM_TARGETS
    dm = _tokens()
    batches = [next(iter(dm.train_dataloader()))]
    # the LM's training_step is token-level cross-entropy: the same masks as that loss given by hand
    expected = prune_at_init("snip", module, names, 0.1, batches=batches, loss_fn=_flat_ce)
    cb = StaticSparsity(density=0.1, distribution="snip", placement="scores", embeddings=True)
    _setup_only(cb, module, dm, tmp_path)
    for n in names:
        assert torch.equal(cb.masked.masks[n], expected[n]), n
    assert sum(int(m.sum()) for m in cb.masked.masks.values()) == round(
        0.1 * sum(m.numel() for m in cb.masked.masks.values())
    )


class SquaredErrorModule(PlainModule):
    """Trains on a squared error of the logits, not on cross-entropy: SNIP/GraSP must use this loss."""

    def training_step(self, batch, batch_idx):  # noqa: ANN001, ANN201
        x, y = batch
        self.log("train/loss", 0.0)  # logging on the scoring copy is dropped, not an error
        return {"loss": _squared_error(self(x), y)}


def _squared_error(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((logits - nn.functional.one_hot(y, 10).float()) ** 2).sum(-1).mean()


@pytest.mark.parametrize("criterion", ["snip", "grasp"])
def test_scores_use_the_modules_own_loss_or_loss_fn(tmp_path, criterion):
    torch.manual_seed(0)
    module = SquaredErrorModule()
    loader = random_loader()
    names = ["net.conv1.weight", "net.conv2.weight", "net.fc.weight"]
    batches = [next(iter(loader))]
    own = prune_at_init(criterion, module, names, 0.2, batches=batches, loss_fn=_squared_error)
    ce = prune_at_init(criterion, module, names, 0.2, batches=batches)
    assert any(not torch.equal(own[n], ce[n]) for n in names)
    for loss_fn, expected in ((None, own), (nn.functional.cross_entropy, ce)):
        cb = StaticSparsity(density=0.2, distribution=criterion, placement="scores", loss_fn=loss_fn)
        trainer = make_trainer(tmp_path, [cb])
        trainer.fit_loop._data_source.instance = None  # only the module's own loader below
        module.train_dataloader = lambda: loader  # type: ignore[method-assign]
        trainer.strategy.connect(module)
        module.trainer = trainer  # type: ignore[misc]
        cb.setup(trainer, module, "fit")
        for n in names:
            assert torch.equal(cb.masked.masks[n], expected[n].cpu()), (criterion, loss_fn, n)
        torch.manual_seed(0)
        module = SquaredErrorModule()


def test_manual_optimization_needs_loss_fn_for_snip(tmp_path):
    module = TwoOptimizers(raw_optimizer=False)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(torch.randn(16, 4), torch.randn(16, 8)), batch_size=8
    )
    cb = StaticSparsity(density=0.3, distribution="snip")
    trainer = make_trainer(tmp_path, [cb])
    with pytest.raises(ValueError, match="manual optimization .* Pass loss_fn"):
        trainer.fit(module, train_dataloaders=loader)
    cb = StaticSparsity(density=0.3, distribution="snip", loss_fn=nn.functional.mse_loss)
    trainer = make_trainer(tmp_path, [cb], max_steps=2)
    trainer.fit(module, train_dataloaders=loader)
    assert sum(int(m.sum()) for m in cb.masked.masks.values()) == round(
        0.3 * sum(m.numel() for m in cb.masked.masks.values())
    )


@pytest.mark.parametrize("criterion", ["synflow", "grasp"])
def test_synflow_and_grasp_run_on_the_lm(tmp_path, criterion):
    module = _lm()
    cb = StaticSparsity(density=0.1, distribution=criterion, embeddings=True, rounds=5)
    trainer = make_trainer(tmp_path, [cb], max_steps=2)
    trainer.fit(module, datamodule=_tokens())
    assert cb.masked.names == LM_TARGETS
    for name, mask in cb.masked.masks.items():
        # placement="random": ER masks with the criterion's layer ratios, exact count per tensor
        assert int(mask.sum()) == exact_count(cb.target_densities[name], mask.numel())
        assert (dict(module.named_parameters())[name][~mask] == 0).all()


# ---------------------------------------------------------------------------------------------- parametrizing callbacks
@pytest.mark.parametrize("callback", [Supermask, SoftThreshold])
def test_parametrizing_callbacks_refuse_a_tied_tensor(tmp_path, callback):
    module = _lm()
    cb = callback()
    trainer = make_trainer(tmp_path, [cb])
    trainer.strategy.connect(module)
    module.trainer = trainer  # type: ignore[misc]
    with pytest.raises(
        ValueError, match=r"shared with other modules.*'model.token.weight': \['model.head.weight'\]"
    ):
        cb.setup(trainer, module, "fit")
    cb = callback(exclude=["*.token.weight"])
    trainer = make_trainer(tmp_path, [cb])
    module = _lm()
    trainer.strategy.connect(module)
    module.trainer = trainer  # type: ignore[misc]
    cb.setup(trainer, module, "fit")
    assert "model.token.weight" not in cb.masked.names


def test_checkpoints_without_the_embeddings_key_load_with_its_default(tmp_path):
    module = _lm()
    cb = StaticSparsity(density=0.2)
    trainer = make_trainer(tmp_path, [cb])
    trainer.strategy.connect(module)
    module.trainer = trainer  # type: ignore[misc]
    cb.setup(trainer, module, "fit")
    state = cb.state_dict()
    del state["config"]["embeddings"]  # written before the option existed
    cb.load_state_dict(state)
    other = StaticSparsity(density=0.2, embeddings=True)
    trainer = make_trainer(tmp_path, [other])
    module = _lm()
    trainer.strategy.connect(module)
    module.trainer = trainer  # type: ignore[misc]
    other.setup(trainer, module, "fit")
    with pytest.raises(ValueError, match="embeddings: checkpoint False vs now True"):
        other.load_state_dict(state)
