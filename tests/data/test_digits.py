from __future__ import annotations

import sys

import pytest
import pytorch_lightning as pl
import torch
from torch import nn

from er_lightning.data import DIGITS_MEAN, DIGITS_STD, DigitsDataModule


def _setup(**kwargs) -> DigitsDataModule:
    dm = DigitsDataModule(**kwargs)
    dm.setup("fit")
    return dm


def test_split_sizes_cover_all_images_once() -> None:
    dm = _setup(val_fraction=0.1)
    idx = dm.split_indices
    sizes = {name: len(v) for name, v in idx.items()}
    assert sizes == {"train": 1257, "val": 180, "test": 360}
    assert sum(sizes.values()) == 1797
    assert sorted(torch.cat(list(idx.values())).tolist()) == list(range(1797))
    assert len(dm.train_dataset) == 1257 and len(dm.val_dataset) == 180 and len(dm.test_dataset) == 360


def test_shapes_dtypes_and_attributes() -> None:
    dm = _setup()
    image, label = dm.train_dataset[0]
    assert image.shape == (1, 8, 8) and image.dtype == torch.float32
    assert label.dtype == torch.int64 and 0 <= int(label) < 10
    images, labels = next(iter(dm.train_dataloader()))
    assert images.shape == (64, 1, 8, 8)
    assert (dm.num_classes, dm.in_channels, dm.image_size) == (10, 1, 8)


def test_same_seed_same_split_other_seed_differs() -> None:
    a, b, c = (
        _setup(split_seed=3, val_fraction=0.1),
        _setup(split_seed=3, val_fraction=0.1),
        _setup(split_seed=4),
    )
    for name in ("train", "val", "test"):
        assert torch.equal(a.split_indices[name], b.split_indices[name])
    assert torch.equal(a.train_dataset.tensors[0], b.train_dataset.tensors[0])
    assert not torch.equal(a.split_indices["test"], c.split_indices["test"])


def test_stratified_test_part_keeps_class_shares() -> None:
    dm = _setup(test_fraction=0.2)
    all_labels = torch.cat([dm.train_dataset.tensors[1], dm.test_dataset.tensors[1]])
    expected = torch.bincount(all_labels, minlength=10).double() * 0.2
    counts = torch.bincount(dm.test_dataset.tensors[1], minlength=10).double()
    assert (counts - expected).abs().max() <= 1.0


def test_validation_defaults_to_test_part() -> None:
    dm = _setup()
    assert dm.val_dataset is dm.test_dataset
    assert len(dm.split_indices["val"]) == 0
    assert len(dm.train_dataset) + len(dm.test_dataset) == 1797


def test_normalization_constants() -> None:
    raw = _setup(normalize=False).train_dataset.tensors[0]
    assert raw.min() == 0.0 and raw.max() == 1.0  # 0..16 scaled by 1/16
    normed = _setup(normalize=True).train_dataset.tensors[0]
    torch.testing.assert_close(normed, (raw - DIGITS_MEAN) / DIGITS_STD)
    full = torch.cat([raw, _setup(normalize=False).test_dataset.tensors[0]])
    assert full.mean().item() == pytest.approx(DIGITS_MEAN, abs=1e-4)
    assert full.std(unbiased=False).item() == pytest.approx(DIGITS_STD, abs=1e-4)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"test_fraction": 0.0}, r"test_fraction must be in \(0, 1\), got 0.0"),
        ({"test_fraction": 1.2}, "test_fraction"),
        ({"val_fraction": 0.8}, r"val_fraction must be in \[0, 1 - test_fraction\)"),
        ({"val_fraction": -0.1}, "val_fraction"),
        ({"batch_size": 0}, "batch_size"),
    ],
)
def test_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        DigitsDataModule(**kwargs)


def test_missing_scikit_learn_names_demo_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "sklearn", None)
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    dm = DigitsDataModule()  # construction does not need it
    with pytest.raises(ModuleNotFoundError, match=r'pip install -e "\.\[demo\]"'):
        dm.setup("fit")


def test_dataloader_before_setup() -> None:
    with pytest.raises(RuntimeError, match="before setup"):
        DigitsDataModule().val_dataloader()


class _Softmax(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
        self.correct = 0
        self.seen = 0

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def test_step(self, batch, batch_idx):
        x, y = batch
        self.correct += int((self.net(x).argmax(1) == y).sum())
        self.seen += len(y)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=0.05)


def test_images_and_labels_line_up_for_a_trainer() -> None:
    # One epoch of a linear classifier reaches > 85 % (about 93 %) only if images and labels are paired and normalised sensibly.
    pl.seed_everything(0, verbose=False)
    dm = DigitsDataModule(batch_size=32)
    model = _Softmax()
    trainer = pl.Trainer(
        max_epochs=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    trainer.fit(model, datamodule=dm)
    trainer.test(model, datamodule=dm, verbose=False)
    assert model.seen == 360
    assert model.correct / model.seen > 0.85
