from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from er_lightning.data import CIFAR10_STATS, CIFAR100_STATS, CIFAR10DataModule, CIFAR100DataModule
from er_lightning.data.cifar import _CIFARDataModule

PER_BATCH = 4  # CIFAR-10: 5 training batches of 4 images = 20 training images
N_TEST = 6


def _image_rows(rng: np.random.Generator, n: int) -> np.ndarray:
    # Values 1..255 so that zero padding is recognisable in augmented crops.
    return rng.integers(1, 256, size=(n, 3072), dtype=np.uint8)


def _dump(path: Path, entry: dict, bytes_keys: bool) -> None:
    # Real CIFAR pickles come from Python 2 (keys decode to str); Python 3 writers give bytes keys.
    if bytes_keys:
        entry = {key.encode(): value for key, value in entry.items()}
    with path.open("wb") as handle:
        pickle.dump(entry, handle, protocol=2)


def write_cifar10(
    root: Path, *, bytes_keys: bool = True, seed: int = 0
) -> tuple[np.ndarray, list[int], np.ndarray]:
    """Write a miniature cifar-10-batches-py; return (train rows, train labels, test rows)."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rows, labels = [], []
    for b in range(1, 6):
        data = _image_rows(rng, PER_BATCH)
        lab = [(PER_BATCH * (b - 1) + i) % 10 for i in range(PER_BATCH)]
        _dump(
            folder / f"data_batch_{b}", {"data": data, "labels": lab, "batch_label": f"batch {b}"}, bytes_keys
        )
        rows.append(data)
        labels.extend(lab)
    test = _image_rows(rng, N_TEST)
    _dump(folder / "test_batch", {"data": test, "labels": [9 - i for i in range(N_TEST)]}, bytes_keys)
    names = [f"class{i}" for i in range(10)]
    _dump(folder / "batches.meta", {"label_names": names, "num_vis": 3072}, bytes_keys)
    return np.concatenate(rows), labels, test


def write_cifar100(root: Path, n_train: int = 10, n_test: int = 5) -> tuple[np.ndarray, list[int]]:
    rng = np.random.default_rng(1)
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    data = _image_rows(rng, n_train)
    fine = [99 - 7 * i for i in range(n_train)]
    _dump(folder / "train", {"data": data, "fine_labels": fine, "coarse_labels": [0] * n_train}, True)
    _dump(folder / "test", {"data": _image_rows(rng, n_test), "fine_labels": list(range(n_test))}, True)
    _dump(folder / "meta", {"fine_label_names": [f"fine{i}".encode() for i in range(100)]}, True)
    return data, fine


@pytest.fixture
def cifar10_dir(tmp_path: Path) -> tuple[Path, np.ndarray, list[int], np.ndarray]:
    rows, labels, test = write_cifar10(tmp_path)
    return tmp_path, rows, labels, test


@pytest.mark.parametrize("bytes_keys", [True, False])
def test_reads_images_and_labels_in_file_order(tmp_path: Path, bytes_keys: bool) -> None:
    rows, labels, test = write_cifar10(tmp_path, bytes_keys=bytes_keys)
    dm = CIFAR10DataModule(data_dir=str(tmp_path), augment=False, normalization="none")
    dm.setup("fit")
    assert len(dm.train_dataset) == 5 * PER_BATCH
    assert dm.train_dataset.targets.tolist() == labels
    assert dm.val_dataset is dm.test_dataset
    assert dm.test_dataset.targets.tolist() == [9 - i for i in range(N_TEST)]
    image, label = dm.train_dataset[7]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32 and label == labels[7]
    # Row layout: 1024 red values, then green, then blue, each row-major.
    expected = torch.from_numpy(rows[7].reshape(3, 32, 32)).float() / 255
    torch.testing.assert_close(image, expected)
    torch.testing.assert_close(
        dm.test_dataset[2][0], torch.from_numpy(test[2].reshape(3, 32, 32)).float() / 255
    )
    assert dm.class_names == [f"class{i}" for i in range(10)]
    assert (dm.num_classes, dm.image_size, dm.in_channels) == (10, 32, 3)


def test_matches_torchvision_reader(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torchvision.datasets.cifar as tv_cifar

    rows, labels, _ = write_cifar10(tmp_path, bytes_keys=False)
    # torchvision insists on the official MD5s; bypass only that check to compare the decoding.
    monkeypatch.setattr(tv_cifar, "check_integrity", lambda *args, **kwargs: True)
    reference = tv_cifar.CIFAR10(str(tmp_path), train=True)
    dm = CIFAR10DataModule(data_dir=str(tmp_path), augment=False, normalization="none")
    dm.setup("fit")
    assert reference.targets == dm.train_dataset.targets.tolist()
    for i in (0, 13, 19):
        pil, _ = reference[i]
        ours = (dm.train_dataset[i][0] * 255).round().to(torch.uint8)
        assert torch.equal(ours, torch.from_numpy(np.array(pil)).permute(2, 0, 1))


def _solid_red_batch(folder: Path, files: list[str], label_key: str) -> None:
    data = np.zeros((2, 3072), dtype=np.uint8)
    data[:, :1024] = 255  # red plane full, green and blue zero
    for name in files:
        _dump(folder / name, {"data": data, label_key: [0, 1]}, True)


@pytest.mark.parametrize(
    ("cls", "preset"),
    [
        (CIFAR10DataModule, "dst"),
        (CIFAR10DataModule, "slt"),
        (CIFAR10DataModule, "str"),
        (CIFAR100DataModule, "dst"),
        (CIFAR100DataModule, "str"),
        (CIFAR100DataModule, "slt"),
    ],
)
def test_normalization_presets_on_known_pixel(
    tmp_path: Path, cls: type[_CIFARDataModule], preset: str
) -> None:
    folder = tmp_path / cls._torchvision_class.base_folder
    folder.mkdir()
    tv = cls._torchvision_class
    _solid_red_batch(folder, [name for name, _ in tv.train_list + tv.test_list], cls._label_key)
    dm = cls(data_dir=str(tmp_path), normalization=preset)
    dm.setup("test")
    image = dm.test_dataset[0][0]
    mean, std = (CIFAR10_STATS if cls is CIFAR10DataModule else CIFAR100_STATS)[preset]
    expected = [(1.0 - mean[0]) / std[0], (0.0 - mean[1]) / std[1], (0.0 - mean[2]) / std[2]]
    torch.testing.assert_close(image[:, 5, 7], torch.tensor(expected))
    if preset == "slt":
        assert image[:, 0, 0].tolist() == [1.0, -1.0, -1.0]


def test_documented_preset_values() -> None:
    assert CIFAR10_STATS["dst"] == ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010))
    assert CIFAR10_STATS["str"] == CIFAR10_STATS["dst"]
    assert CIFAR100_STATS["str"] == ((0.507, 0.487, 0.441), (0.267, 0.256, 0.276))
    assert CIFAR100_STATS["dst"][0][0] == 0.5070751592371323
    assert CIFAR10_STATS["none"] is None


def test_seeded_val_split_is_disjoint_and_deterministic(cifar10_dir) -> None:
    root, _, labels, _ = cifar10_dir

    def split(seed: int, val_split: int | float) -> tuple[list[int], list[int]]:
        dm = CIFAR10DataModule(data_dir=str(root), val_split=val_split, split_seed=seed)
        dm.setup("fit")
        assert dm.val_dataset is not dm.test_dataset
        train, val = dm.train_dataset.indices.tolist(), dm.val_dataset.indices.tolist()
        assert dm.val_dataset.targets.tolist() == [labels[i] for i in val]
        return train, val

    train, val = split(0, 5)
    assert len(val) == 5 and len(train) == 15
    assert sorted(train + val) == list(range(20))
    assert split(0, 5) == (train, val)
    assert split(1, 5) != (train, val)
    assert len(split(0, 0.25)[1]) == 5  # round(0.25 * 20)
    assert len(split(0, 0.1)[1]) == 2


def test_val_split_uses_eval_transform(cifar10_dir) -> None:
    root, rows, _, _ = cifar10_dir
    dm = CIFAR10DataModule(data_dir=str(root), val_split=4, normalization="none", augment=True)
    dm.setup("fit")
    i = int(dm.val_dataset.indices[0])
    expected = torch.from_numpy(rows[i].reshape(3, 32, 32)).float() / 255
    for _ in range(3):
        torch.testing.assert_close(dm.val_dataset[0][0], expected)


def test_train_subset_takes_first_images(cifar10_dir) -> None:
    root, _, labels, _ = cifar10_dir
    dm = CIFAR10DataModule(data_dir=str(root), train_subset=12)
    dm.setup("fit")
    assert dm.train_dataset.indices.tolist() == list(range(12))
    assert dm.train_dataset.targets.tolist() == labels[:12]
    dm = CIFAR10DataModule(data_dir=str(root), train_subset=12, val_split=3, split_seed=5)
    dm.setup("fit")
    assert len(dm.train_dataset) == 9 and len(dm.val_dataset) == 3
    assert max(dm.train_dataset.indices.tolist() + dm.val_dataset.indices.tolist()) < 12
    with pytest.raises(ValueError, match="train_subset=21 exceeds the 20"):
        CIFAR10DataModule(data_dir=str(root), train_subset=21).setup("fit")


def test_val_split_too_large_for_data(cifar10_dir) -> None:
    root = cifar10_dir[0]
    with pytest.raises(ValueError, match="holds out 20 of 20"):
        CIFAR10DataModule(data_dir=str(root), val_split=20).setup("fit")


def test_augmentation_crops_and_flips_with_chosen_padding(cifar10_dir) -> None:
    root, rows, _, _ = cifar10_dir
    original = torch.from_numpy(rows[3].reshape(3, 32, 32)).float() / 255
    torch.manual_seed(0)
    dm = CIFAR10DataModule(data_dir=str(root), normalization="none", crop_padding=4)
    dm.setup("fit")
    views = [dm.train_dataset[3][0] for _ in range(20)]
    assert all(v.shape == (3, 32, 32) for v in views)
    assert any(not torch.equal(v, original) for v in views)
    assert any((v == 0).any() for v in views)  # zero padding shows up (images hold no zeros)
    allowed = set((original * 255).round().int().unique().tolist()) | {0}
    assert set((torch.stack(views) * 255).round().int().unique().tolist()) <= allowed

    torch.manual_seed(0)
    dm = CIFAR10DataModule(data_dir=str(root), normalization="none", padding_mode="reflect")
    dm.setup("fit")
    views = [dm.train_dataset[3][0] for _ in range(20)]
    assert all((v > 0).all() for v in views)  # reflected pixels, never zeros


def test_dataloaders_batch_shapes(cifar10_dir) -> None:
    root = cifar10_dir[0]
    dm = CIFAR10DataModule(data_dir=str(root), batch_size=8, eval_batch_size=4, num_workers=0)
    with pytest.raises(RuntimeError, match="before setup"):
        dm.train_dataloader()
    dm.setup("fit")
    images, labels = next(iter(dm.train_dataloader()))
    assert images.shape == (8, 3, 32, 32) and images.dtype == torch.float32
    assert labels.dtype == torch.int64
    assert [len(b[1]) for b in dm.val_dataloader()] == [4, 2]
    assert len(dm.train_dataloader()) == 3  # 20 images, batch 8, last one partial


def test_setup_test_stage_reads_only_test_files(cifar10_dir) -> None:
    root = cifar10_dir[0]
    (root / "cifar-10-batches-py" / "data_batch_2").unlink()
    dm = CIFAR10DataModule(data_dir=str(root))
    dm.setup("test")
    assert len(dm.test_dataset) == N_TEST and dm.train_dataset is None


def test_missing_file_names_path_and_remedy(cifar10_dir) -> None:
    root = cifar10_dir[0]
    missing = root / "cifar-10-batches-py" / "data_batch_3"
    missing.unlink()
    dm = CIFAR10DataModule(data_dir=str(root))
    with pytest.raises(FileNotFoundError) as info:
        dm.setup("fit")
    message = str(info.value)
    assert str(missing) in message
    assert "download: true" in message and "cifar-10-python.tar.gz" in message


def test_missing_dataset_dir(tmp_path: Path) -> None:
    dm = CIFAR100DataModule(data_dir=str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match=r"CIFAR-100 file not found: .*cifar-100-python.train"):
        dm.setup("fit")


def test_bad_label_names_the_file(tmp_path: Path) -> None:
    write_cifar10(tmp_path)
    path = tmp_path / "cifar-10-batches-py" / "test_batch"
    _dump(path, {"data": np.zeros((2, 3072), np.uint8), "labels": [3, 10]}, True)
    with pytest.raises(ValueError, match=r"test_batch: labels must be in \[0, 10\), found 10"):
        CIFAR10DataModule(data_dir=str(tmp_path)).setup("test")
    _dump(path, {"data": np.zeros((2, 100), np.uint8), "labels": [3, 1]}, True)
    with pytest.raises(ValueError, match=r"shape \(N, 3072\)"):
        CIFAR10DataModule(data_dir=str(tmp_path)).setup("test")


def test_cifar100_fine_labels(tmp_path: Path) -> None:
    data, fine = write_cifar100(tmp_path)
    dm = CIFAR100DataModule(data_dir=str(tmp_path), normalization="none", augment=False)
    dm.setup(None)
    assert dm.num_classes == 100
    assert dm.train_dataset.targets.tolist() == fine
    assert dm.test_dataset.targets.tolist() == [0, 1, 2, 3, 4]
    torch.testing.assert_close(
        dm.train_dataset[4][0], torch.from_numpy(data[4].reshape(3, 32, 32)).float() / 255
    )
    assert dm.class_names is not None and dm.class_names[99] == "fine99"


def test_prepare_data_downloads_only_when_asked_and_missing(tmp_path: Path, monkeypatch) -> None:
    import er_lightning.data.cifar as cifar_module

    calls: list[tuple] = []

    def fake_download(url: str, download_root: str, **kwargs) -> None:
        calls.append((url, download_root, kwargs))
        write_cifar10(Path(download_root))

    monkeypatch.setattr(cifar_module, "download_and_extract_archive", fake_download)
    CIFAR10DataModule(data_dir=str(tmp_path), download=False).prepare_data()
    assert calls == []
    dm = CIFAR10DataModule(data_dir=str(tmp_path), download=True)
    dm.prepare_data()
    assert calls == [
        (
            "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
            str(tmp_path),
            {"filename": "cifar-10-python.tar.gz", "md5": "c58f30108f718f92721af3b95e74349a"},
        )
    ]
    dm.prepare_data()  # files now present: no second download
    assert len(calls) == 1
    dm.setup("fit")
    assert len(dm.train_dataset) == 20


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (
            {"normalization": "imagenet"},
            ValueError,
            r"normalization must be one of \['dst', 'slt', 'str', 'none'\]",
        ),
        ({"val_split": -1}, ValueError, "val_split"),
        ({"val_split": 1.0}, ValueError, r"fraction of the training images in \[0, 1\)"),
        ({"val_split": True}, TypeError, "val_split"),
        ({"batch_size": 0}, ValueError, "batch_size must be a positive integer, got 0"),
        ({"eval_batch_size": -2}, ValueError, "eval_batch_size"),
        ({"num_workers": -1}, ValueError, "num_workers"),
        ({"train_subset": 0}, ValueError, "train_subset"),
        ({"padding_mode": "edge"}, ValueError, "padding_mode must be one of"),
        ({"split_seed": 1.5}, TypeError, "split_seed"),
    ],
)
def test_bad_arguments(kwargs: dict, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        CIFAR10DataModule(**kwargs)


def test_lightning_cli_parses_signature() -> None:
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(CIFAR10DataModule, "data")
    cfg = parser.parse_args(
        ["--data.val_split=5000", "--data.normalization=slt", "--data.eval_batch_size=1000"]
    )
    assert cfg.data.val_split == 5000 and isinstance(cfg.data.val_split, int)
    assert cfg.data.normalization == "slt" and cfg.data.eval_batch_size == 1000
    cfg = parser.parse_args(["--data.val_split=0.1"])
    assert cfg.data.val_split == pytest.approx(0.1) and isinstance(cfg.data.val_split, float)
    with pytest.raises(Exception, match="normalization"):
        parser.parse_args(["--data.normalization=bogus"])


def test_hyperparameters_saved(tmp_path: Path) -> None:
    dm = CIFAR100DataModule(data_dir=str(tmp_path), val_split=0.1, normalization="str")
    assert dm.hparams["val_split"] == 0.1 and dm.hparams["normalization"] == "str"
    assert dm.hparams["data_dir"] == str(tmp_path)


class _Payload:
    """Unpickling this runs ``exec``: what a crafted CIFAR file could hide (issue 12 #3)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204
        return (exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",))


@pytest.mark.parametrize("victim", ["data_batch_1", "batches.meta"])
def test_crafted_pickle_is_refused_without_running_its_payload(tmp_path: Path, victim: str) -> None:
    write_cifar10(tmp_path)
    marker = tmp_path / "payload_ran"
    path = tmp_path / "cifar-10-batches-py" / victim
    entry = {"data": np.zeros((2, 3072), np.uint8), "labels": [0, 1], "label_names": _Payload(marker)}
    with path.open("wb") as handle:
        pickle.dump(entry, handle, protocol=2)
    with pytest.raises(ValueError, match=r"refusing to unpickle (__builtin__|builtins)\.exec") as info:
        CIFAR10DataModule(data_dir=str(tmp_path)).setup("fit")
    assert not marker.exists()
    message = str(info.value)
    assert str(path) in message and "download: true" in message and "cifar-10-python.tar.gz" in message


def test_non_uint8_array_is_refused(tmp_path: Path) -> None:
    write_cifar10(tmp_path)
    path = tmp_path / "cifar-10-batches-py" / "test_batch"
    _dump(path, {"data": np.zeros((2, 3072), np.float64), "labels": [0, 1]}, True)
    with pytest.raises(ValueError, match=r"test_batch: .*only uint8 arrays are allowed"):
        CIFAR10DataModule(data_dir=str(tmp_path)).setup("test")


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_damaged_file_names_the_file_and_how_to_redownload(tmp_path: Path, damage: str) -> None:
    write_cifar10(tmp_path)
    path = tmp_path / "cifar-10-batches-py" / "test_batch"
    whole = path.read_bytes()
    path.write_bytes(
        {"truncated": whole[: len(whole) // 2], "garbage": b"\x00not a pickle" * 50, "empty": b""}[damage]
    )
    with pytest.raises(ValueError, match="not a readable CIFAR pickle") as info:
        CIFAR10DataModule(data_dir=str(tmp_path)).setup("test")
    message = str(info.value)
    assert str(path) in message and "truncated or damaged" in message and "re-download" in message


@pytest.mark.parametrize("protocol", [2, 4, 5, "numpy1"])
def test_official_layouts_still_load(tmp_path: Path, protocol: int | str) -> None:
    """Python 2 / numpy 1.x files name numpy.core.multiarray; Python 3 rewrites use protocols 2-5."""
    write_cifar10(tmp_path)
    path = tmp_path / "cifar-10-batches-py" / "test_batch"
    data = np.arange(2 * 3072, dtype=np.int64).astype(np.uint8).reshape(2, 3072)
    entry = {"data": data, "labels": [4, 7]}
    blob = pickle.dumps(entry, protocol=2 if protocol == "numpy1" else protocol)
    if protocol == "numpy1":
        blob = blob.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
        assert b"cnumpy.core.multiarray\n_reconstruct" in blob
    path.write_bytes(blob)
    dm = CIFAR10DataModule(data_dir=str(tmp_path), normalization="none", augment=False)
    dm.setup("test")
    image, label = dm.test_dataset[1]
    assert label == 7
    assert torch.equal((image * 255).round().to(torch.uint8).reshape(-1), torch.from_numpy(data[1]))
