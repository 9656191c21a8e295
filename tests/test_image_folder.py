"""ImageFolderDataset on a tiny class-per-folder PNG tree built in tmp_path."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from metalearn.tasks import EpisodicTaskSet, ImageFolderDataset
from metalearn.tasks import image_folder as image_folder_module

Image = pytest.importorskip("PIL.Image")

# class folder -> (number of images, RGB colour of its images); folder names unsorted on purpose
CLASSES = {"zebra": (3, (250, 0, 0)), "ant": (4, (0, 128, 0)), "moth": (5, (0, 0, 64))}


def colour_of(name: str, index: int) -> tuple[int, int, int]:
    r, g, b = CLASSES[name][1]
    return (r, g, min(b + index, 255))  # the blue channel numbers the image within its class


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "images"
    for name, (count, _) in CLASSES.items():
        folder = root / name
        folder.mkdir(parents=True)
        for i in range(count):
            Image.new("RGB", (6, 4), colour_of(name, i)).save(folder / f"img{i:02d}.png")
        (folder / "notes.txt").write_text("not an image")
        (folder / ".hidden.png").write_bytes(b"not even a png")
    (root / ".cache").mkdir()  # hidden folder: not a class
    (root / "README.md").write_text("files at the root are not classes")
    return root


def test_classes_and_labels_from_listing(tree):
    ds = ImageFolderDataset(tree)
    assert ds.class_names == ["ant", "moth", "zebra"]
    assert ds.labels.dtype == torch.int64
    assert ds.labels.tolist() == [0] * 4 + [1] * 5 + [2] * 3
    assert torch.equal(ds.classes, torch.arange(3))
    assert len(ds) == 12
    assert [p.name for p in ds.paths[:4]] == ["img00.png", "img01.png", "img02.png", "img03.png"]


def test_construction_decodes_nothing(tree, monkeypatch):
    opened = []
    monkeypatch.setattr(Image, "open", lambda *a, **k: opened.append(a) or pytest.fail("decoded at init"))
    ImageFolderDataset(tree, image_size=(4, 6))  # a resize option: not even a header is read
    assert opened == []


def test_size_check_reads_headers_only(tree, monkeypatch):
    # without image_size, construction reads each file's header to check one shared size, but decodes none
    monkeypatch.setattr(Image.Image, "load", lambda self: pytest.fail("decoded at init"))
    ds = ImageFolderDataset(tree)
    assert len(ds) == 12


def test_get_input_rgb(tree):
    ds = ImageFolderDataset(tree)
    x = ds.get_input(5)  # moth, image 1
    assert x.shape == (3, 4, 6) and x.dtype == torch.float32
    assert 0.0 <= x.min() and x.max() <= 1.0
    expected = torch.tensor(colour_of("moth", 1), dtype=torch.float32) / 255
    torch.testing.assert_close(x[:, 0, 0], expected)
    assert ds[5][1] == 1
    with pytest.raises(IndexError):
        ds.get_input(12)


def test_grayscale_resize_transform_and_cache(tree):
    ds = ImageFolderDataset(tree, mode="L", image_size=(8, 10), transform=lambda x: x * 2, cache=True)
    x = ds.get_input(0)
    assert x.shape == (1, 8, 10)
    gray = round(0.299 * 0 + 0.587 * 128 + 0.114 * 0)  # Pillow's ITU-R 601-2 luma of (0, 128, 0)
    torch.testing.assert_close(x, torch.full((1, 8, 10), 2 * gray / 255), atol=2 * 1.5 / 255, rtol=0)
    assert 0 in ds._cache
    torch.testing.assert_close(ds.get_input(0), x)
    assert ImageFolderDataset(tree, image_size=5).get_input(0).shape == (3, 5, 5)


def test_episodes_from_image_folder(tree):
    ds = ImageFolderDataset(tree)
    task = EpisodicTaskSet(ds, 3, 1, 2)[0]
    assert task.train[0].shape == (3, 3, 4, 6) and task.val[0].shape == (6, 3, 4, 6)
    # the image's colour tells its class; labels must agree with it
    reds, greens = task.val[0][:, 0, 0, 0], task.val[0][:, 1, 0, 0]
    classes = torch.where(reds > 0.9, 2, torch.where(greens > 0.4, 0, 1))
    for j in range(3):
        assert classes[task.val[1] == j].unique().numel() == 1


# -- errors ---------------------------------------------------------------------------------


def test_missing_root(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ImageFolderDataset(tmp_path / "nowhere")
    file = tmp_path / "file.png"
    file.write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="not a folder"):
        ImageFolderDataset(file)


def test_root_without_class_folders(tmp_path):
    Image.new("RGB", (2, 2)).save(tmp_path / "loose.png")
    with pytest.raises(ValueError, match="no class folders.*sub-folder"):
        ImageFolderDataset(tmp_path)


def test_empty_class_folder(tree):
    (tree / "bee").mkdir()
    with pytest.raises(ValueError, match=r"bee holds no images"):
        ImageFolderDataset(tree)


def test_bad_arguments(tree):
    with pytest.raises(ValueError, match="mode"):
        ImageFolderDataset(tree, mode="CMYK")
    with pytest.raises(ValueError, match="image_size"):
        ImageFolderDataset(tree, image_size=(0, 4))


def test_missing_pillow_names_the_extra(tree, monkeypatch):
    monkeypatch.setitem(sys.modules, "PIL", None)  # makes `from PIL import Image` fail
    with pytest.raises(ImportError, match=r"pip install torch-metalearn\[vision\]"):
        image_folder_module._import_pil()
    with pytest.raises(ImportError, match="vision"):
        ImageFolderDataset(tree)
