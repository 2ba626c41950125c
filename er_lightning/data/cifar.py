"""CIFAR-10 and CIFAR-100 data modules reading the official "python version" pickles.

Files are found and downloaded with the names, URLs and checksums of torchvision's ``CIFAR10``/``CIFAR100``; the
pickles are then read here (same format, same result as torchvision) instead of through those classes, because
torchvision re-hashes all ~180 MB at every construction and refuses any file whose MD5 differs, which would also
reject the small synthetic batches the tests write. Reading ourselves also lets errors name the missing file.
The archive's checksum is still verified when ``download=True`` fetches it.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from torchvision.datasets import CIFAR10, CIFAR100
from torchvision.datasets.utils import download_and_extract_archive

from er_lightning.data._common import ArrayImageSource, ImageClassificationDataModule, Stats, check_choice

CifarNormalization = Literal["dst", "slt", "str", "none"]

CIFAR10_STATS: dict[str, Stats | None] = {
    "dst": ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
    "slt": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    "str": ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
    "none": None,
}
"""CIFAR-10 normalisation presets, ``name -> (mean, std)``: ``dst`` = ER_DST and ``str`` = STR (the same widely
used values), ``slt`` = ER_SLT's 0.5/0.5 (maps [0, 1] to [-1, 1]), ``none`` = only scale to [0, 1]."""

CIFAR100_STATS: dict[str, Stats | None] = {
    "dst": (
        (0.5070751592371323, 0.48654887331495095, 0.4409178433670343),
        (0.2673342858792401, 0.2564384629170883, 0.27615047132568404),
    ),
    "slt": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    "str": ((0.507, 0.487, 0.441), (0.267, 0.256, 0.276)),
    "none": None,
}
"""CIFAR-100 normalisation presets: ``dst`` = ER_DST's full-precision training-set statistics, ``str`` = the same
rounded to three decimals (STR), ``slt`` = 0.5/0.5, ``none`` = only scale to [0, 1]."""

_IMAGE_BYTES = 3 * 32 * 32


def _decode(value: Any) -> Any:
    return value.decode("latin1") if isinstance(value, bytes) else value


def _read_pickle(path: Path) -> dict[str, Any]:
    with path.open("rb") as handle:
        entry = pickle.load(handle, encoding="latin1")
    if not isinstance(entry, dict):
        raise ValueError(f"{path}: expected a pickled dict (CIFAR python format), got {type(entry).__name__}")
    # Python 2 pickles decode their keys to str with encoding="latin1"; files written by Python 3 keep bytes.
    return {_decode(key): value for key, value in entry.items()}


class _CIFARDataModule(ImageClassificationDataModule):
    """Shared implementation of :class:`CIFAR10DataModule` and :class:`CIFAR100DataModule`."""

    _torchvision_class: ClassVar[type[CIFAR10]]
    _label_key: ClassVar[str]
    _stats: ClassVar[dict[str, Stats | None]]
    _display_name: ClassVar[str]
    image_size = 32
    in_channels = 3

    def __init__(
        self,
        data_dir: str = "data",
        download: bool = False,
        batch_size: int = 128,
        eval_batch_size: int | None = None,
        num_workers: int = 2,
        val_split: int | float = 0,
        split_seed: int = 0,
        train_subset: int | None = None,
        augment: bool = True,
        crop_padding: int = 4,
        padding_mode: Literal["constant", "reflect"] = "constant",
        normalization: CifarNormalization = "dst",
        pin_memory: bool | None = None,
    ) -> None:
        """Configure the data module; nothing is read until ``prepare_data``/``setup``.

        Args:
            data_dir: folder that holds (or will receive) the extracted ``cifar-10-batches-py`` /
                ``cifar-100-python`` folder.
            download: fetch and extract the official archive in ``prepare_data`` when files are missing.
            batch_size: training batch size.
            eval_batch_size: validation/test batch size; ``None`` = ``batch_size``.
            num_workers: DataLoader worker processes (persistent when > 0).
            val_split: 0 = validate on the test set, as the papers do. An int > 0 holds out that many training
                images, a float in (0, 1) that fraction, drawn with ``split_seed``; they are not trained on.
            split_seed: seed of the held-out split (independent of the global RNG).
            train_subset: use only the first N training images (before ``val_split``); 45000 reproduces
                ER_DST's fixed CIFAR-10 split. ``None`` = all 50,000.
            augment: random 32×32 crop after padding ``crop_padding`` pixels, and a random horizontal flip, on
                training images only. ER_SLT trains without augmentation (``augment=False``).
            crop_padding: padding on each side before the random crop, in pixels.
            padding_mode: ``"constant"`` (zeros, torchvision's ``RandomCrop(32, padding=4)``, used by ER_DST
                CIFAR-100 and STR) or ``"reflect"`` (ER_DST's CIFAR-10 pipeline).
            normalization: named ``(mean, std)`` preset, see ``CIFAR10_STATS``/``CIFAR100_STATS``: ``"dst"``
                (ER_DST), ``"slt"`` (0.5/0.5, ER_SLT), ``"str"`` (STR), ``"none"`` (only scale to [0, 1]).
            pin_memory: pin batches in page-locked memory; ``None`` = only when CUDA is available.
        """
        check_choice("normalization", normalization, tuple(self._stats))
        super().__init__(
            data_dir=data_dir,
            download=download,
            batch_size=batch_size,
            eval_batch_size=eval_batch_size,
            num_workers=num_workers,
            val_split=val_split,
            split_seed=split_seed,
            train_subset=train_subset,
            augment=augment,
            crop_padding=crop_padding,
            padding_mode=padding_mode,
            stats=self._stats[normalization],
            pin_memory=pin_memory,
        )
        self.normalization = normalization
        self.class_names: list[str] | None = None
        self.save_hyperparameters()

    # Files ----------------------------------------------------------------------------------------------------
    @property
    def folder(self) -> Path:
        """The extracted dataset folder, ``<data_dir>/<torchvision base_folder>``."""
        return Path(self.data_dir) / self._torchvision_class.base_folder

    def _files(self, train: bool) -> list[Path]:
        entries = self._torchvision_class.train_list if train else self._torchvision_class.test_list
        return [self.folder / name for name, _md5 in entries]

    def _missing_files(self) -> list[Path]:
        return [path for path in self._files(True) + self._files(False) if not path.is_file()]

    def _not_found(self, path: Path) -> FileNotFoundError:
        tv = self._torchvision_class
        return FileNotFoundError(
            f"{self._display_name} file not found: {path}. Set `download: true` "
            f"({type(self).__name__}(download=True)) to fetch {tv.url}, or extract {tv.filename} into "
            f"{Path(self.data_dir).resolve()} so that {self.folder} holds "
            f"{', '.join(name for name, _ in tv.train_list + tv.test_list)}."
        )

    def prepare_data(self) -> None:
        """Download and extract the official archive when ``download`` is set and files are missing (rank 0)."""
        if self.download and self._missing_files():
            tv = self._torchvision_class
            download_and_extract_archive(tv.url, self.data_dir, filename=tv.filename, md5=tv.tgz_md5)

    def _read(self, train: bool) -> ArrayImageSource:
        missing = [path for path in self._files(train) if not path.is_file()]
        if missing:
            raise self._not_found(missing[0])
        images: list[np.ndarray] = []
        targets: list[int] = []
        for path in self._files(train):
            entry = _read_pickle(path)
            if "data" not in entry or self._label_key not in entry:
                raise ValueError(
                    f"{path}: expected keys 'data' and '{self._label_key}' (CIFAR python format), got "
                    f"{sorted(map(str, entry))}"
                )
            data = np.asarray(entry["data"])
            labels = [int(label) for label in entry[self._label_key]]
            if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != _IMAGE_BYTES:
                raise ValueError(
                    f"{path}: 'data' must be uint8 of shape (N, 3072), got {data.dtype} {data.shape}"
                )
            if len(labels) != data.shape[0]:
                raise ValueError(f"{path}: {data.shape[0]} images but {len(labels)} '{self._label_key}'")
            bad = [label for label in labels if not 0 <= label < self.num_classes]
            if bad:
                raise ValueError(f"{path}: labels must be in [0, {self.num_classes}), found {bad[0]}")
            images.append(data)
            targets.extend(labels)
        array = np.concatenate(images).reshape(-1, 3, 32, 32)  # rows are R plane, G plane, B plane
        self._read_class_names()
        return ArrayImageSource(torch.from_numpy(array), torch.tensor(targets, dtype=torch.int64))

    def _read_class_names(self) -> None:
        meta = self._torchvision_class.meta
        path = self.folder / meta["filename"]
        if self.class_names is None and path.is_file():
            names = _read_pickle(path).get(meta["key"])
            if names is not None:
                self.class_names = [str(_decode(name)) for name in names]

    def _load_train_source(self) -> ArrayImageSource:
        return self._read(train=True)

    def _load_test_source(self) -> ArrayImageSource:
        return self._read(train=False)


class CIFAR10DataModule(_CIFARDataModule):
    """CIFAR-10 (Krizhevsky, 2009): 50,000 training and 10,000 test 32×32 colour images in 10 classes.

    Validation uses the test set by default (``val_split=0``), the protocol of the upstream ER experiments;
    set ``val_split`` for an honest held-out split. Batches are ``(images float32 (B, 3, 32, 32), labels int64)``.

    Example:
        >>> dm = CIFAR10DataModule(data_dir="data", download=True, batch_size=128)  # doctest: +SKIP
        >>> dm.prepare_data(); dm.setup("fit")  # doctest: +SKIP
        >>> images, labels = next(iter(dm.train_dataloader()))  # doctest: +SKIP

    In a LightningCLI YAML::

        data:
          class_path: er_lightning.data.CIFAR10DataModule
          init_args: {data_dir: data, download: true, normalization: dst, padding_mode: reflect}
    """

    _torchvision_class = CIFAR10
    _label_key = "labels"
    _stats = CIFAR10_STATS
    _display_name = "CIFAR-10"
    num_classes = 10


class CIFAR100DataModule(_CIFARDataModule):
    """CIFAR-100 (Krizhevsky, 2009): 50,000 training and 10,000 test 32×32 colour images in 100 fine classes.

    Labels are the 100 ``fine_labels``. Validation uses the test set by default (``val_split=0``).

    Example:
        >>> dm = CIFAR100DataModule(data_dir="data", download=True, normalization="str")  # doctest: +SKIP
        >>> dm.prepare_data(); dm.setup("fit")  # doctest: +SKIP
        >>> CIFAR100DataModule.num_classes
        100
    """

    _torchvision_class = CIFAR100
    _label_key = "fine_labels"
    _stats = CIFAR100_STATS
    _display_name = "CIFAR-100"
    num_classes = 100
