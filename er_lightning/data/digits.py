"""Handwritten-digits data module: scikit-learn's bundled 8×8 digits, no download needed."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

from er_lightning.data._common import check_non_negative_int, check_positive_int

DIGITS_MEAN = 0.3053
"""Mean pixel of all 1797 digits after scaling 0–16 to [0, 1] (0.30526…)."""
DIGITS_STD = 0.3760
"""Pixel standard deviation of all 1797 digits after scaling to [0, 1] (0.37605…)."""


def _load_digits() -> tuple[np.ndarray, np.ndarray]:
    """Return scikit-learn's digits as ``(images float64 (1797, 8, 8) in 0–16, labels int (1797,))``."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as error:
        raise ModuleNotFoundError(
            "DigitsDataModule needs scikit-learn, which ships the digits data set. Install the demo extra: "
            'pip install -e ".[demo]" (or pip install scikit-learn).'
        ) from error
    bunch: Any = load_digits()
    return np.asarray(bunch.images), np.asarray(bunch.target)


def _split_indices(
    labels: np.ndarray, test_fraction: float, val_fraction: float, seed: int, stratify: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Seeded (optionally stratified) split of ``range(len(labels))`` into sorted (train, val, test) indices."""
    from sklearn.model_selection import train_test_split

    everything = np.arange(len(labels))
    rest, test = train_test_split(
        everything, test_size=test_fraction, random_state=seed, stratify=labels if stratify else None
    )
    if val_fraction > 0:
        rest, val = train_test_split(
            rest,
            test_size=val_fraction / (1.0 - test_fraction),
            random_state=seed,
            stratify=labels[rest] if stratify else None,
        )
    else:
        val = everything[:0]
    return np.sort(rest), np.sort(val), np.sort(test)


class DigitsDataModule(pl.LightningDataModule):
    """The 1797 handwritten 8×8 digits bundled with scikit-learn (10 classes): a seconds-long CPU demo.

    Pixel values 0–16 are scaled to [0, 1] and, with ``normalize``, standardised with ``DIGITS_MEAN`` and
    ``DIGITS_STD``. The split into train/val/test is seeded by ``split_seed`` and stratified by class unless
    ``stratify=False``; with ``val_fraction=0`` the test part doubles as validation set. Batches are
    ``(images float32 (B, 1, 8, 8), labels int64 (B,))``. Needs scikit-learn (``pip install -e ".[demo]"``).

    Example:
        >>> dm = DigitsDataModule(batch_size=64, val_fraction=0.1)
        >>> dm.setup("fit")
        >>> images, labels = next(iter(dm.train_dataloader()))
        >>> tuple(images.shape), dm.num_classes
        ((64, 1, 8, 8), 10)
    """

    num_classes = 10
    in_channels = 1
    image_size = 8

    def __init__(
        self,
        batch_size: int = 64,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        test_fraction: float = 0.2,
        val_fraction: float = 0.0,
        split_seed: int = 0,
        stratify: bool = True,
        normalize: bool = True,
    ) -> None:
        """Configure the data module; the data are loaded in ``setup``.

        Args:
            batch_size: training batch size.
            eval_batch_size: validation/test batch size; ``None`` = ``batch_size``.
            num_workers: DataLoader worker processes; 0 (load in the main process) suits this tiny set.
            test_fraction: share of the 1797 images held out for testing, in (0, 1).
            val_fraction: share of all images held out for validation, in [0, 1 - test_fraction); 0 =
                validate on the test part.
            split_seed: seed of the split (the global RNG is not used).
            stratify: keep class proportions equal across the parts.
            normalize: standardise pixels with ``DIGITS_MEAN``/``DIGITS_STD`` after scaling to [0, 1].
        """
        super().__init__()
        check_positive_int("batch_size", batch_size)
        if eval_batch_size is not None:
            check_positive_int("eval_batch_size", eval_batch_size)
        check_non_negative_int("num_workers", num_workers)
        if isinstance(split_seed, bool) or not isinstance(split_seed, int):
            raise TypeError(f"split_seed must be an int, got {split_seed!r}")
        if not 0.0 < test_fraction < 1.0:
            raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
        if not 0.0 <= val_fraction < 1.0 - test_fraction:
            raise ValueError(
                f"val_fraction must be in [0, 1 - test_fraction) = [0, {1.0 - test_fraction:g}), got {val_fraction}"
            )
        self.batch_size = batch_size
        self.eval_batch_size = batch_size if eval_batch_size is None else eval_batch_size
        self.num_workers = num_workers
        self.test_fraction = float(test_fraction)
        self.val_fraction = float(val_fraction)
        self.split_seed = split_seed
        self.stratify = bool(stratify)
        self.normalize = bool(normalize)
        self.train_dataset: TensorDataset | None = None
        self.val_dataset: TensorDataset | None = None
        self.test_dataset: TensorDataset | None = None
        self.split_indices: dict[str, Tensor] | None = None
        self.save_hyperparameters()

    def prepare_data(self) -> None:
        """Check that scikit-learn is importable (the data ship with it; nothing is downloaded)."""
        _load_digits()

    def setup(self, stage: str | None = None) -> None:
        """Load the digits and build the three splits (idempotent; every stage gets all of them).

        Args:
            stage: ignored; the data set is small enough to prepare whole.
        """
        if self.train_dataset is not None:
            return
        images, labels = _load_digits()
        train, val, test = _split_indices(
            labels, self.test_fraction, self.val_fraction, self.split_seed, self.stratify
        )
        x = torch.from_numpy(images).to(torch.float32).div_(16.0).unsqueeze(1)  # (N, 1, 8, 8) in [0, 1]
        if self.normalize:
            x = (x - DIGITS_MEAN) / DIGITS_STD
        y = torch.from_numpy(labels).to(torch.int64)
        self.split_indices = {
            name: torch.from_numpy(idx) for name, idx in (("train", train), ("val", val), ("test", test))
        }
        self.train_dataset = TensorDataset(x[train], y[train])
        self.test_dataset = TensorDataset(x[test], y[test])
        self.val_dataset = TensorDataset(x[val], y[val]) if len(val) else self.test_dataset

    def _loader(self, dataset: TensorDataset | None, name: str, batch_size: int, shuffle: bool) -> DataLoader:
        if dataset is None:
            raise RuntimeError(
                f"DigitsDataModule.{name}_dataloader() called before setup(); call setup() first."
            )
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled training batches."""
        return self._loader(self.train_dataset, "train", self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        """Validation batches (the test part when ``val_fraction == 0``)."""
        return self._loader(self.val_dataset, "val", self.eval_batch_size, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        """Test batches."""
        return self._loader(self.test_dataset, "test", self.eval_batch_size, shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        """The test part again, for ``Trainer.predict``."""
        return self._loader(self.test_dataset, "predict", self.eval_batch_size, shuffle=False)
