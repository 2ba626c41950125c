"""Tiny-ImageNet-200 data module reading the official ``tiny-imagenet-200`` folder layout."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from PIL import Image
from torch import Tensor
from torchvision.datasets.utils import download_and_extract_archive
from torchvision.transforms.v2 import functional as F

from er_lightning.data._common import ImageClassificationDataModule, Stats, check_choice

TINY_IMAGENET_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
"""The official archive (about 237 MB)."""
TINY_IMAGENET_MD5 = "90528d7ca1a48142e341f4ef8d21d0de"
"""MD5 of ``tiny-imagenet-200.zip``, checked after download."""

TinyImageNetNormalization = Literal["imagenet", "none"]

TINY_IMAGENET_STATS: dict[str, Stats | None] = {
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "none": None,
}
"""Normalisation presets: ``imagenet`` = the usual ImageNet statistics (as upstream's loaders use), ``none`` =
only scale to [0, 1]."""

_IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")


class ImageFileSource:
    """Labelled image files decoded on access to uint8 RGB tensors (C, H, W); grayscale files become RGB.

    ``targets`` holds the class indices as an int64 tensor.

    Args:
        paths: image files.
        targets: class index of each file.
    """

    def __init__(self, paths: list[Path], targets: list[int]) -> None:
        """Keep the file list; nothing is decoded until ``raw``."""
        if len(paths) != len(targets):
            raise ValueError(f"got {len(paths)} paths but {len(targets)} targets")
        self.paths = paths
        self.targets = torch.tensor(targets, dtype=torch.int64)

    def __len__(self) -> int:
        """Return the number of images."""
        return len(self.paths)

    def raw(self, index: int) -> tuple[Tensor, int]:
        """Decode image ``index`` (uint8, 3×H×W) and return it with its class index."""
        with Image.open(self.paths[index]) as image:
            tensor = F.pil_to_tensor(image.convert("RGB"))
        return tensor, int(self.targets[index])


class TinyImageNetDataModule(ImageClassificationDataModule):
    """Tiny-ImageNet-200: 100,000 training and 10,000 validation 64×64 colour images in 200 classes.

    Expects the official layout under ``data_dir``::

        tiny-imagenet-200/wnids.txt                      one wnid per line; class index = line position
        tiny-imagenet-200/train/<wnid>/images/*.JPEG     500 training images per class
        tiny-imagenet-200/val/images/*.JPEG              10,000 labelled images
        tiny-imagenet-200/val/val_annotations.txt        lines "filename<TAB>wnid<TAB>x<TAB>y<TAB>w<TAB>h"

    The official ``val`` split (labelled) serves as the test set, and as the validation set unless ``val_split``
    holds out training images; the unlabelled ``test`` folder is ignored. Images are used at their native 64×64
    (upstream's loader used RandomResizedCrop 224, which does not fit its CIFAR-style VGG; spec Q17).

    Example:
        >>> dm = TinyImageNetDataModule(data_dir="data", download=True, batch_size=256)  # doctest: +SKIP
        >>> dm.prepare_data(); dm.setup("fit")  # doctest: +SKIP
        >>> TinyImageNetDataModule.num_classes, TinyImageNetDataModule.image_size
        (200, 64)
    """

    num_classes = 200
    image_size = 64
    in_channels = 3

    def __init__(
        self,
        data_dir: str = "data",
        download: bool = False,
        batch_size: int = 128,
        eval_batch_size: int | None = None,
        num_workers: int = 4,
        val_split: int | float = 0,
        split_seed: int = 0,
        train_subset: int | None = None,
        augment: bool = True,
        crop_padding: int = 4,
        padding_mode: Literal["constant", "reflect"] = "constant",
        normalization: TinyImageNetNormalization = "imagenet",
        pin_memory: bool | None = None,
    ) -> None:
        """Configure the data module; nothing is read until ``prepare_data``/``setup``.

        Args:
            data_dir: folder that holds (or will receive) ``tiny-imagenet-200/``.
            download: fetch and unzip the official archive in ``prepare_data`` when ``wnids.txt`` is missing.
            batch_size: training batch size.
            eval_batch_size: validation/test batch size; ``None`` = ``batch_size``.
            num_workers: DataLoader worker processes (JPEG decoding happens there; persistent when > 0).
            val_split: 0 = validate on the official val set. An int > 0 holds out that many training images, a
                float in (0, 1) that fraction, drawn with ``split_seed``.
            split_seed: seed of the held-out split (independent of the global RNG).
            train_subset: use only the first N training images in (class, file name) order, before
                ``val_split``; ``None`` = all.
            augment: random 64×64 crop after padding ``crop_padding`` pixels, and a random horizontal flip, on
                training images only.
            crop_padding: padding on each side before the random crop, in pixels (4 or 8 are common).
            padding_mode: ``"constant"`` (zeros) or ``"reflect"``.
            normalization: ``"imagenet"`` (mean (0.485, 0.456, 0.406), std (0.229, 0.224, 0.225)) or
                ``"none"`` (only scale to [0, 1]).
            pin_memory: pin batches in page-locked memory; ``None`` = only when CUDA is available.
        """
        check_choice("normalization", normalization, tuple(TINY_IMAGENET_STATS))
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
            stats=TINY_IMAGENET_STATS[normalization],
            pin_memory=pin_memory,
        )
        self.normalization = normalization
        self.wnids: list[str] | None = None
        self.save_hyperparameters()

    @property
    def root(self) -> Path:
        """The dataset folder, ``<data_dir>/tiny-imagenet-200``."""
        return Path(self.data_dir) / "tiny-imagenet-200"

    def _not_found(self, path: Path) -> FileNotFoundError:
        return FileNotFoundError(
            f"Tiny-ImageNet file not found: {path}. Set `download: true` "
            f"(TinyImageNetDataModule(download=True)) to fetch {TINY_IMAGENET_URL}, or unzip "
            f"tiny-imagenet-200.zip into {Path(self.data_dir).resolve()} so that {self.root / 'wnids.txt'} exists."
        )

    def prepare_data(self) -> None:
        """Download and unzip the official archive when ``download`` is set and ``wnids.txt`` is missing."""
        if self.download and not (self.root / "wnids.txt").is_file():
            download_and_extract_archive(TINY_IMAGENET_URL, self.data_dir, md5=TINY_IMAGENET_MD5)

    def _read_wnids(self) -> list[str]:
        if self.wnids is not None:
            return self.wnids
        path = self.root / "wnids.txt"
        if not path.is_file():
            raise self._not_found(path)
        wnids: list[str] = []
        seen: dict[str, int] = {}
        for lineno, line in enumerate(path.read_text().splitlines(), start=1):
            wnid = line.strip()
            if not wnid:
                continue
            if wnid in seen:
                raise ValueError(f"{path}, line {lineno}: wnid {wnid!r} repeats line {seen[wnid]}")
            seen[wnid] = lineno
            wnids.append(wnid)
        if not wnids:
            raise ValueError(f"{path} lists no wnids; expected one class id per line (200 for Tiny-ImageNet)")
        self.wnids = wnids
        return wnids

    def _load_train_source(self) -> ImageFileSource:
        paths: list[Path] = []
        targets: list[int] = []
        for index, wnid in enumerate(self._read_wnids()):
            folder = self.root / "train" / wnid / "images"
            if not folder.is_dir():
                raise self._not_found(folder)
            files = sorted(p for p in folder.iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES)
            if not files:
                raise FileNotFoundError(f"no training images (*.JPEG) in {folder} for class {wnid!r}")
            paths.extend(files)
            targets.extend([index] * len(files))
        return ImageFileSource(paths, targets)

    def _load_test_source(self) -> ImageFileSource:
        class_index = {wnid: i for i, wnid in enumerate(self._read_wnids())}
        annotations = self.root / "val" / "val_annotations.txt"
        images = self.root / "val" / "images"
        if not annotations.is_file():
            raise self._not_found(annotations)
        paths: list[Path] = []
        targets: list[int] = []
        for lineno, line in enumerate(annotations.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            fields = line.split()
            if len(fields) < 2:
                raise ValueError(
                    f"{annotations}, line {lineno}: expected 'filename<TAB>wnid<TAB>x<TAB>y<TAB>w<TAB>h', "
                    f"got {line!r}"
                )
            filename, wnid = fields[0], fields[1]
            if wnid not in class_index:
                raise ValueError(
                    f"{annotations}, line {lineno}: wnid {wnid!r} is not listed in {self.root / 'wnids.txt'} "
                    f"(line: {line!r})"
                )
            path = images / filename
            if not path.is_file():
                raise FileNotFoundError(
                    f"validation image not found: {path} (named in {annotations}, line {lineno}); re-extract "
                    "tiny-imagenet-200.zip or set `download: true` after removing the incomplete folder."
                )
            paths.append(path)
            targets.append(class_index[wnid])
        if not paths:
            raise ValueError(f"{annotations} lists no validation images")
        return ImageFileSource(paths, targets)
