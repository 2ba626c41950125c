"""CIFAR-10 and CIFAR-100 data modules reading the official "python version" pickles.

Files are found and downloaded with the names, URLs and checksums of torchvision's ``CIFAR10``/``CIFAR100``; the
pickles are then read here (same format, same result as torchvision) instead of through those classes, because
torchvision re-hashes all ~180 MB at every construction and refuses any file whose MD5 differs, which would also
reject the small synthetic batches the tests write. Reading ourselves also lets errors name the missing file, and
lets us unpickle safely: torchvision calls plain ``pickle.load``, which runs whatever a crafted ``data_batch_1``
holds, while :class:`_CifarUnpickler` builds only what official files contain (dicts, lists, bytes, str, ints and
uint8 numpy arrays) and refuses anything else with an error naming the file. The archive's checksum is still
verified when ``download=True`` fetches it.
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


def _uint8_dtype(name: Any, align: Any = False, copy: Any = False) -> np.dtype[Any]:
    """``numpy.dtype`` as a pickle calls it, for ``uint8`` only (the only array dtype in CIFAR files)."""
    dtype = np.dtype(name) if isinstance(name, str) and name in ("u1", "uint8", "|u1") else None
    if dtype is None:
        raise pickle.UnpicklingError(f"numpy.dtype({name!r}): only uint8 arrays are allowed")
    return dtype


def _reconstruct(cls: Any, shape: Any, dtype_char: Any) -> np.ndarray:
    """``numpy``'s ``_reconstruct`` (protocols 0-4), for plain ndarrays only; the state then sets dtype and data."""
    if cls is not np.ndarray:
        raise pickle.UnpicklingError(f"_reconstruct({cls!r}): only numpy.ndarray is allowed")
    return _NUMPY_RECONSTRUCT(cls, shape, dtype_char)


def _frombuffer(buffer: Any, dtype: Any, shape: Any, order: Any) -> np.ndarray:
    """``numpy``'s ``_frombuffer`` (protocol 5): a uint8 array over a bytes buffer."""
    if not isinstance(dtype, np.dtype) or dtype != np.uint8 or not isinstance(buffer, (bytes, bytearray)):
        raise pickle.UnpicklingError(
            f"_frombuffer({type(buffer).__name__}, {dtype!r}): only uint8 bytes are allowed"
        )
    return _NUMPY_FROMBUFFER(buffer, dtype, shape, order)


def _latin1_encode(text: Any, encoding: Any = "utf-8") -> bytes:
    """``_codecs.encode`` as Python 3 pickles bytes at protocol 2: a ``str`` to ``bytes`` in latin-1."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"_codecs.encode({type(text).__name__}, {encoding!r}) is not allowed")
    return text.encode("latin1")


_NUMPY_RECONSTRUCT = np.zeros(1, np.uint8).__reduce__()[0]
_NUMPY_FROMBUFFER = np.zeros(1, np.uint8).__reduce_ex__(5)[0]

#: The only globals an official CIFAR pickle (Python 2, numpy 1.x) or a Python 3 rewrite of one may name:
#: numpy's ndarray reconstruction and dtype, and the bytes encoding of protocol 2. Each is admitted in a form
#: that accepts uint8 arrays only; everything else (os.system, builtins.eval, ...) is refused.
_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy.core.numeric", "_frombuffer"): _frombuffer,
    ("numpy._core.numeric", "_frombuffer"): _frombuffer,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): _uint8_dtype,
    ("_codecs", "encode"): _latin1_encode,
}


class _RefusedGlobal(pickle.UnpicklingError):
    """A pickle named a global outside :data:`_ALLOWED_GLOBALS`."""


class _CifarUnpickler(pickle.Unpickler):
    """Unpickler that builds only dicts, lists, bytes, str, ints and uint8 numpy arrays (what CIFAR files hold)."""

    def find_class(self, module: str, name: str) -> Any:
        """Return an allowed numpy/codecs callable; refuse every other global."""
        allowed = _ALLOWED_GLOBALS.get((module, name))
        if allowed is None:
            raise _RefusedGlobal(f"{module}.{name}")
        return allowed


def _read_pickle(path: Path, remedy: str) -> dict[str, Any]:
    """Read one CIFAR pickle with :class:`_CifarUnpickler`; any refusal or damage names the file and ``remedy``."""
    try:
        with path.open("rb") as handle:
            entry = _CifarUnpickler(handle, encoding="latin1").load()
    except _RefusedGlobal as err:
        raise ValueError(
            f"{path}: refusing to unpickle {err}: official CIFAR files hold only dicts, lists, bytes, str, ints "
            "and uint8 arrays, so this file was not written by the CIFAR authors and would run code if loaded "
            f"with pickle. Delete it and {remedy}"
        ) from None
    except Exception as err:  # noqa: BLE001 - truncated or garbage: EOFError, UnpicklingError, ValueError, ...
        raise ValueError(
            f"{path}: not a readable CIFAR pickle ({type(err).__name__}: {err}); the file is truncated or "
            f"damaged. Delete it and {remedy}"
        ) from err
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

    def _redownload(self) -> str:
        """How to get fresh files (the end of every "bad file" message)."""
        tv = self._torchvision_class
        return (
            f"re-download: remove {self.folder} and run with `download: true` ({type(self).__name__}"
            f"(download=True)), which fetches {tv.url} and checks its MD5, or extract {tv.filename} into "
            f"{Path(self.data_dir).resolve()} yourself."
        )

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
            entry = _read_pickle(path, self._redownload())
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
            names = _read_pickle(path, self._redownload()).get(meta["key"])
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
