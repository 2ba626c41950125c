from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from PIL import Image

from er_lightning.data import TINY_IMAGENET_STATS, TinyImageNetDataModule

WNIDS = ["n02", "n01", "n03"]  # deliberately unsorted: the class index is the line position
COLOURS = {"n02": (255, 0, 0), "n01": (0, 255, 0), "n03": (0, 0, 255)}
VAL = [("val_0.JPEG", "n03"), ("val_1.JPEG", "n02"), ("val_2.JPEG", "n01"), ("val_3.JPEG", "n03")]


def _jpeg(path: Path, colour: tuple[int, int, int], mode: str = "RGB") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.new("RGB", (64, 64), colour)
    (image.convert("L") if mode == "L" else image).save(path, "JPEG", quality=95)


def write_tiny_imagenet(root: Path, per_class: int = 3) -> Path:
    base = root / "tiny-imagenet-200"
    base.mkdir(parents=True)
    (base / "wnids.txt").write_text("\n".join(WNIDS) + "\n")
    for wnid in WNIDS:
        for i in range(per_class):
            _jpeg(base / "train" / wnid / "images" / f"{wnid}_{i}.JPEG", COLOURS[wnid])
        (base / "train" / wnid / f"{wnid}_boxes.txt").write_text("")  # present in the real archive
    lines = []
    for name, wnid in VAL:
        _jpeg(base / "val" / "images" / name, COLOURS[wnid], mode="L" if name == "val_3.JPEG" else "RGB")
        lines.append(f"{name}\t{wnid}\t0\t0\t63\t63")
    (base / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    return base


@pytest.fixture
def tiny(tmp_path: Path) -> Path:
    write_tiny_imagenet(tmp_path)
    return tmp_path


def test_labels_follow_wnids_order_and_val_annotations(tiny: Path) -> None:
    dm = TinyImageNetDataModule(data_dir=str(tiny), num_workers=0)
    dm.setup("fit")
    assert dm.wnids == WNIDS
    assert dm.train_dataset.targets.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert dm.val_dataset is dm.test_dataset
    assert dm.test_dataset.targets.tolist() == [2, 0, 1, 2]
    image, label = dm.train_dataset[4]
    assert image.shape == (3, 64, 64) and image.dtype == torch.float32 and label == 1
    gray, _ = dm.test_dataset[3]  # a grayscale JPEG becomes three equal channels
    assert gray.shape == (3, 64, 64)
    assert (dm.num_classes, dm.image_size, dm.in_channels) == (200, 64, 3)


def test_imagenet_normalization_on_known_pixel(tiny: Path) -> None:
    dm = TinyImageNetDataModule(data_dir=str(tiny), num_workers=0)
    dm.setup("test")
    image, label = dm.test_dataset[1]  # solid red, class n02 = index 0
    assert label == 0
    mean, std = TINY_IMAGENET_STATS["imagenet"]
    expected = torch.tensor([(1 - mean[0]) / std[0], (0 - mean[1]) / std[1], (0 - mean[2]) / std[2]])
    # JPEG may move a solid colour by a couple of levels.
    torch.testing.assert_close(image[:, 32, 32], expected, atol=3 / 255 / 0.224, rtol=0)


def test_augmentation_keeps_size_and_pads(tiny: Path) -> None:
    torch.manual_seed(0)
    dm = TinyImageNetDataModule(data_dir=str(tiny), num_workers=0, crop_padding=8, normalization="none")
    dm.setup("fit")
    views = torch.stack([dm.train_dataset[0][0] for _ in range(10)])
    assert views.shape == (10, 3, 64, 64)
    # Solid red: any pixel with red near 0 must come from the zero padding.
    assert (views[:, 0] < 0.05).any()


def test_seeded_val_split(tiny: Path) -> None:
    def split(seed: int) -> list[int]:
        dm = TinyImageNetDataModule(data_dir=str(tiny), val_split=3, split_seed=seed, num_workers=0)
        dm.setup("fit")
        assert len(dm.train_dataset) == 6
        assert set(dm.train_dataset.indices.tolist()).isdisjoint(dm.val_dataset.indices.tolist())
        return dm.val_dataset.indices.tolist()

    assert split(3) == split(3)
    assert len({tuple(split(s)) for s in range(6)}) > 1


def test_missing_root_names_wnids_path(tmp_path: Path) -> None:
    dm = TinyImageNetDataModule(data_dir=str(tmp_path))
    with pytest.raises(FileNotFoundError) as info:
        dm.setup("fit")
    message = str(info.value)
    assert str(tmp_path / "tiny-imagenet-200" / "wnids.txt") in message
    assert "download: true" in message and "tiny-imagenet-200.zip" in message


def test_missing_train_folder_names_path(tiny: Path) -> None:
    folder = tiny / "tiny-imagenet-200" / "train" / "n01" / "images"
    for file in folder.iterdir():
        file.unlink()
    folder.rmdir()
    with pytest.raises(FileNotFoundError, match=re.escape(str(folder))):
        TinyImageNetDataModule(data_dir=str(tiny)).setup("fit")


def test_missing_val_annotations_and_images(tiny: Path) -> None:
    annotations = tiny / "tiny-imagenet-200" / "val" / "val_annotations.txt"
    image = tiny / "tiny-imagenet-200" / "val" / "images" / "val_2.JPEG"
    image.unlink()
    with pytest.raises(FileNotFoundError, match=r"val_2\.JPEG.*line 3"):
        TinyImageNetDataModule(data_dir=str(tiny)).setup("test")
    annotations.unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(str(annotations))):
        TinyImageNetDataModule(data_dir=str(tiny)).setup("test")


def test_bad_annotation_line_reports_file_and_line(tiny: Path) -> None:
    annotations = tiny / "tiny-imagenet-200" / "val" / "val_annotations.txt"
    lines = annotations.read_text().splitlines()
    lines[2] = "val_2.JPEG"
    annotations.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError) as info:
        TinyImageNetDataModule(data_dir=str(tiny)).setup("test")
    message = str(info.value)
    assert str(annotations) in message and "line 3" in message and "'val_2.JPEG'" in message


def test_unknown_wnid_reports_line(tiny: Path) -> None:
    annotations = tiny / "tiny-imagenet-200" / "val" / "val_annotations.txt"
    lines = annotations.read_text().splitlines()
    lines[1] = "val_1.JPEG\tn99\t0\t0\t63\t63"
    annotations.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"line 2: wnid 'n99' is not listed in .*wnids\.txt"):
        TinyImageNetDataModule(data_dir=str(tiny)).setup("test")


def test_duplicate_wnid_rejected(tiny: Path) -> None:
    (tiny / "tiny-imagenet-200" / "wnids.txt").write_text("n02\nn01\nn02\n")
    with pytest.raises(ValueError, match=r"line 3: wnid 'n02' repeats line 1"):
        TinyImageNetDataModule(data_dir=str(tiny)).setup("test")


def test_prepare_data_download(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import er_lightning.data.tiny_imagenet as module

    calls: list[tuple] = []

    def fake_download(url: str, download_root: str, **kwargs) -> None:
        calls.append((url, download_root, kwargs))
        write_tiny_imagenet(Path(download_root))

    monkeypatch.setattr(module, "download_and_extract_archive", fake_download)
    TinyImageNetDataModule(data_dir=str(tmp_path)).prepare_data()
    assert calls == []
    dm = TinyImageNetDataModule(data_dir=str(tmp_path), download=True, num_workers=0)
    dm.prepare_data()
    dm.prepare_data()
    assert calls == [
        ("http://cs231n.stanford.edu/tiny-imagenet-200.zip", str(tmp_path), {"md5": module.TINY_IMAGENET_MD5})
    ]
    dm.setup("fit")
    assert len(dm.train_dataset) == 9


def test_dataloader_batches(tiny: Path) -> None:
    dm = TinyImageNetDataModule(data_dir=str(tiny), batch_size=4, eval_batch_size=3, num_workers=0)
    dm.setup("fit")
    images, labels = next(iter(dm.train_dataloader()))
    assert images.shape == (4, 3, 64, 64) and labels.dtype == torch.int64
    assert [len(b[1]) for b in dm.val_dataloader()] == [3, 1]


def test_bad_normalization() -> None:
    with pytest.raises(ValueError, match=r"normalization must be one of \['imagenet', 'none'\], got 'dst'"):
        TinyImageNetDataModule(normalization="dst")
