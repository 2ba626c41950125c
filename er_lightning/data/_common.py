"""Shared pieces of the image-classification data modules: views, transforms, splits, loaders."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

import pytorch_lightning as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

Stats = tuple[tuple[float, ...], tuple[float, ...]]
"""A normalisation preset: per-channel ``(mean, std)`` applied to images scaled to [0, 1]."""


class RawImageSource(Protocol):
    """A collection of labelled images before any transform.

    ``raw(i)`` returns the i-th image as a ``uint8`` tensor of shape (C, H, W) and its class index; ``targets``
    holds all class indices as an int64 tensor (N,), without decoding images.
    """

    targets: Tensor

    def __len__(self) -> int:
        """Return the number of images."""
        ...

    def raw(self, index: int) -> tuple[Tensor, int]:
        """Return image ``index`` as a uint8 (C, H, W) tensor and its class index."""
        ...


class ArrayImageSource:
    """Images held in memory as one ``uint8`` tensor of shape (N, C, H, W) with ``int64`` targets (N,).

    Args:
        images: uint8 tensor (N, C, H, W).
        targets: int64 tensor (N,) of class indices.
    """

    def __init__(self, images: Tensor, targets: Tensor) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(
                f"images must be a uint8 tensor (N, C, H, W), got {images.dtype} {tuple(images.shape)}"
            )
        if targets.shape != (images.shape[0],):
            raise ValueError(f"targets must have shape ({images.shape[0]},), got {tuple(targets.shape)}")
        self.images = images
        self.targets = targets.to(torch.int64)

    def __len__(self) -> int:
        """Return the number of images."""
        return int(self.images.shape[0])

    def raw(self, index: int) -> tuple[Tensor, int]:
        """Return image ``index`` (uint8, C×H×W) and its class index."""
        return self.images[index], int(self.targets[index])


class TransformedView(Dataset[tuple[Tensor, int]]):
    """A dataset over some ``indices`` of a :class:`RawImageSource`, with a transform on the image.

    Several views (train with augmentation, held-out validation without) share one source, so the images are
    read or held in memory once.

    Args:
        source: the images.
        indices: positions in ``source`` this view exposes, in order; ``None`` means all of them.
        transform: applied to the uint8 (C, H, W) image tensor; returns the model input.
    """

    def __init__(
        self, source: RawImageSource, indices: Tensor | None, transform: Callable[[Tensor], Tensor]
    ) -> None:
        self.source = source
        self.indices = torch.arange(len(source)) if indices is None else indices.to(torch.int64)
        self.transform = transform

    def __len__(self) -> int:
        """Return the number of images in this view."""
        return int(self.indices.numel())

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        """Return the transformed image and its class index."""
        image, target = self.source.raw(int(self.indices[index]))
        return self.transform(image), target

    @property
    def targets(self) -> Tensor:
        """Class indices of this view, in order (int64, without decoding images)."""
        return self.source.targets[self.indices]


def build_transform(
    *,
    augment: bool,
    image_size: int,
    crop_padding: int,
    padding_mode: str,
    stats: Stats | None,
) -> v2.Compose:
    """Build the per-image pipeline on uint8 (C, H, W) tensors.

    With ``augment``: random ``image_size`` crop after padding ``crop_padding`` pixels on each side, then a random
    horizontal flip. Always: scale to float in [0, 1] (divide by 255), then ``(x - mean) / std`` when ``stats``
    is given.

    Args:
        augment: whether to add the random crop and flip.
        image_size: side of the square output crop, in pixels.
        crop_padding: pixels of padding on each side before the random crop.
        padding_mode: ``"constant"`` (zeros) or ``"reflect"``.
        stats: ``(mean, std)`` per channel, or ``None`` for no normalisation.

    Returns:
        A picklable ``torchvision.transforms.v2.Compose``.
    """
    ops: list[Callable[..., object]] = []
    if augment:
        ops.append(v2.RandomCrop(image_size, padding=crop_padding, padding_mode=padding_mode))
        ops.append(v2.RandomHorizontalFlip())
    ops.append(v2.ToDtype(torch.float32, scale=True))
    if stats is not None:
        ops.append(v2.Normalize(mean=list(stats[0]), std=list(stats[1])))
    return v2.Compose(ops)


def check_positive_int(name: str, value: object) -> None:
    """Raise unless ``value`` is an ``int`` (not ``bool``) ≥ 1."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def check_non_negative_int(name: str, value: object) -> None:
    """Raise unless ``value`` is an ``int`` (not ``bool``) ≥ 0."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be an integer >= 0, got {value!r}")


def check_val_split(value: object) -> None:
    """Check ``val_split``: 0, a positive image count (int) or a fraction in (0, 1) (float)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(
            f"val_split must be an int (number of images) or a float (fraction), got {type(value).__name__}"
        )
    if isinstance(value, int) and value < 0:
        raise ValueError(
            f"val_split as an int is a number of held-out training images and must be >= 0, got {value}"
        )
    if isinstance(value, float) and not 0.0 <= value < 1.0:
        raise ValueError(f"val_split as a float is a fraction of the training images in [0, 1), got {value}")


def check_choice(name: str, value: object, allowed: Sequence[str]) -> None:
    """Raise unless ``value`` is one of ``allowed``, listing them."""
    if value not in allowed:
        raise ValueError(f"{name} must be one of {list(allowed)}, got {value!r}")


def seeded_split(
    pool: Tensor, val_split: int | float, seed: int, *, what: str = "training images"
) -> tuple[Tensor, Tensor]:
    """Split ``pool`` (indices) into (train, val) with a seeded random permutation.

    The held-out count is ``val_split`` itself for an int, ``round(val_split * len(pool))`` for a float. The same
    ``pool``, ``val_split`` and ``seed`` give the same split on every machine (CPU ``torch.Generator``); the
    global RNG is not touched. Both parts are returned sorted.

    Args:
        pool: 1-D int64 tensor of candidate indices.
        val_split: see above; 0 returns ``(pool, empty)``.
        seed: seed of the permutation.
        what: what ``pool`` holds, for error messages.

    Returns:
        ``(train_indices, val_indices)``.

    Raises:
        ValueError: if the split would leave no training image or no validation image.
    """
    n = int(pool.numel())
    n_val = int(round(val_split * n)) if isinstance(val_split, float) else int(val_split)
    if val_split == 0:
        return pool.clone(), pool[:0].clone()
    if n_val < 1 or n_val >= n:
        raise ValueError(
            f"val_split={val_split!r} holds out {n_val} of {n} {what}; at least 1 must be held out and at "
            f"least 1 left for training. Use an int in [1, {n - 1}] or a fraction in ({1 / n:.3g}, 1), or 0 to "
            "validate on the test set."
        )
    generator = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=generator)
    val = pool[perm[:n_val]].sort().values
    train = pool[perm[n_val:]].sort().values
    return train, val


class ImageClassificationDataModule(pl.LightningDataModule):
    """Common base of the image data modules: optional seeded validation split, transforms and loaders.

    Subclasses set ``num_classes``, ``image_size`` and ``in_channels``, and implement ``_load_train_source`` and
    ``_load_test_source``. Validation uses the test set unless ``val_split`` holds out part of the training set.
    After ``setup`` the views are available as ``train_dataset``, ``val_dataset`` and ``test_dataset``.
    """

    num_classes: int
    image_size: int
    in_channels: int = 3

    def __init__(
        self,
        *,
        data_dir: str,
        download: bool,
        batch_size: int,
        eval_batch_size: int | None,
        num_workers: int,
        val_split: int | float,
        split_seed: int,
        train_subset: int | None,
        augment: bool,
        crop_padding: int,
        padding_mode: str,
        stats: Stats | None,
        pin_memory: bool | None,
    ) -> None:
        super().__init__()
        check_positive_int("batch_size", batch_size)
        if eval_batch_size is not None:
            check_positive_int("eval_batch_size", eval_batch_size)
        check_non_negative_int("num_workers", num_workers)
        check_val_split(val_split)
        if isinstance(split_seed, bool) or not isinstance(split_seed, int):
            raise TypeError(f"split_seed must be an int, got {split_seed!r}")
        if train_subset is not None:
            check_positive_int("train_subset", train_subset)
        check_non_negative_int("crop_padding", crop_padding)
        check_choice("padding_mode", padding_mode, ("constant", "reflect"))
        self.data_dir = str(data_dir)
        self.download = bool(download)
        self.batch_size = batch_size
        self.eval_batch_size = batch_size if eval_batch_size is None else eval_batch_size
        self.num_workers = num_workers
        self.val_split = val_split
        self.split_seed = split_seed
        self.train_subset = train_subset
        self.augment = bool(augment)
        self.crop_padding = crop_padding
        self.padding_mode = padding_mode
        self.stats = stats
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else bool(pin_memory)
        self.train_dataset: TransformedView | None = None
        self.val_dataset: TransformedView | None = None
        self.test_dataset: TransformedView | None = None
        self._train_source: RawImageSource | None = None
        self._test_source: RawImageSource | None = None

    # Subclass hooks -----------------------------------------------------------------------------------------
    def _load_train_source(self) -> RawImageSource:
        raise NotImplementedError

    def _load_test_source(self) -> RawImageSource:
        raise NotImplementedError

    # Transforms ---------------------------------------------------------------------------------------------
    @property
    def train_transform(self) -> v2.Compose:
        """The training pipeline (augmentation if ``augment``, then scaling and normalisation)."""
        return build_transform(
            augment=self.augment,
            image_size=self.image_size,
            crop_padding=self.crop_padding,
            padding_mode=self.padding_mode,
            stats=self.stats,
        )

    @property
    def eval_transform(self) -> v2.Compose:
        """The evaluation pipeline (scaling and normalisation only)."""
        return build_transform(
            augment=False,
            image_size=self.image_size,
            crop_padding=0,
            padding_mode="constant",
            stats=self.stats,
        )

    # Lightning hooks ----------------------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        """Read the data and build the views needed for ``stage`` (idempotent).

        Args:
            stage: ``"fit"``, ``"validate"``, ``"test"``, ``"predict"`` or ``None`` (everything).
        """
        needs_train = stage in (None, "fit") or (stage == "validate" and self.val_split != 0)
        needs_test = stage in (None, "fit", "test", "predict") or (
            stage == "validate" and self.val_split == 0
        )
        if needs_train and self.train_dataset is None:
            if self._train_source is None:
                self._train_source = self._load_train_source()
            source = self._train_source
            n = len(source)
            if self.train_subset is not None and self.train_subset > n:
                raise ValueError(
                    f"train_subset={self.train_subset} exceeds the {n} training images available"
                )
            pool = torch.arange(n if self.train_subset is None else self.train_subset)
            train_idx, val_idx = seeded_split(pool, self.val_split, self.split_seed)
            self.train_dataset = TransformedView(source, train_idx, self.train_transform)
            if self.val_split != 0:
                self.val_dataset = TransformedView(source, val_idx, self.eval_transform)
        if needs_test and self.test_dataset is None:
            if self._test_source is None:
                self._test_source = self._load_test_source()
            self.test_dataset = TransformedView(self._test_source, None, self.eval_transform)
        if self.val_split == 0 and self.test_dataset is not None:
            self.val_dataset = self.test_dataset

    def _loader(
        self, dataset: TransformedView | None, name: str, batch_size: int, shuffle: bool
    ) -> DataLoader:
        if dataset is None:
            raise RuntimeError(
                f"{type(self).__name__}.{name}_dataloader() called before setup(); call setup('fit') "
                "(or 'validate'/'test') first, or pass the data module to a Trainer."
            )
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled training batches of ``batch_size``."""
        return self._loader(self.train_dataset, "train", self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        """Validation batches: the held-out split, or the test set when ``val_split == 0``."""
        return self._loader(self.val_dataset, "val", self.eval_batch_size, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        """Test-set batches of ``eval_batch_size``."""
        return self._loader(self.test_dataset, "test", self.eval_batch_size, shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        """The test set again (images and labels), for ``Trainer.predict``."""
        return self._loader(self.test_dataset, "predict", self.eval_batch_size, shuffle=False)
