"""Images stored one folder per class, the layout mini-ImageNet and most custom data come in::

    root/
        class_a/ img001.png img002.png ...
        class_b/ ...

Class ids follow the sorted folder names; labels come from the directory listing alone, and
images are decoded only when an episode asks for them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from metalearn.tasks.datasets import LabelledDataset, StoredInputs, uint8_to_unit
from metalearn.tasks.describe import describe_value

__all__ = ["IMAGE_EXTENSIONS", "ImageFolderDataset"]

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"})


def _import_pil():
    try:
        from PIL import Image
    except ImportError as error:
        raise ImportError(
            "ImageFolderDataset decodes images with Pillow, which is not installed; "
            "install it with `pip install torch-metalearn[vision]` (or `pip install Pillow`)"
        ) from error
    return Image


def _is_visible(path: Path) -> bool:
    return not path.name.startswith(".")


def _image_sizes(paths: Sequence[Path]) -> dict[tuple[int, int], list[Path]]:
    """The files of each ``(H, W)``, read from the image headers only (Pillow decodes lazily)."""
    image_module = _import_pil()
    sizes: dict[tuple[int, int], list[Path]] = {}
    for path in paths:
        with image_module.open(path) as image:
            width, height = image.size
        sizes.setdefault((height, width), []).append(path)
    return sizes


def _check_one_size(root: Path, paths: Sequence[Path]) -> None:
    """Raises `ValueError` naming files of each size if the images do not all share one size."""
    sizes = _image_sizes(paths)
    if len(sizes) <= 1:
        return
    ranked = sorted(sizes.items(), key=lambda item: -len(item[1]))
    shown = "; ".join(
        f"{h}x{w} (H x W): {len(files)} file(s), e.g. "
        + ", ".join(str(f.relative_to(root)) for f in files[:3])
        for (h, w), files in ranked[:4]
    )
    (h, w), _ = ranked[0]
    raise ValueError(
        f"the images under {root} have {len(sizes)} different sizes ({shown}), so episodes cannot stack. "
        f"Pass image_size=({h}, {w}) (or another (H, W)) to resize every image, or resize the files"
    )


class ImageFolderDataset(LabelledDataset):
    """A class-per-folder image dataset, decoded lazily with Pillow.

    Every visible sub-folder of ``root`` is a class; sorted folder names get class ids
    ``0 .. C-1``. Files with an image extension (`IMAGE_EXTENSIONS`, case-insensitive)
    inside a class folder are its items, in sorted order; other files are ignored.

    Args:
        root: the folder holding one sub-folder per class.
        transform: optional callable applied to each decoded image tensor.
        image_size: resize every image to ``(H, W)`` (or ``(n, n)`` for an int), with
            bilinear filtering; ``None`` keeps each image's size, and then all images must
            share one size (checked at construction from the image headers, which reads
            every file's first bytes; an error names files of each size).
        mode: ``"RGB"`` (3 channels) or ``"L"`` (grayscale, 1 channel).
        cache: keep decoded images in memory (per process) after the first decode. The
            cached tensor is the one after ``image_size`` and before ``transform``.

    Attributes:
        class_names: folder name of each class id.
        paths: image path of each item.
        labels: class id of each item (``int64``).

    Raises:
        FileNotFoundError: if ``root`` does not exist or is not a folder.
        ValueError: if ``root`` has no class folders, a class folder has no images, or
            (``image_size=None``) the images differ in size.
        ImportError: if Pillow is not installed.
    """

    def __init__(
        self,
        root: str | Path,
        *,
        transform: Callable[[Tensor], Tensor] | None = None,
        image_size: int | tuple[int, int] | None = None,
        mode: str = "RGB",
        cache: bool = False,
    ) -> None:
        _import_pil()
        if mode not in ("RGB", "L"):
            raise ValueError(f'mode must be "RGB" or "L" (grayscale), got {mode!r}')
        if isinstance(image_size, int):
            image_size = (image_size, image_size)
        if image_size is not None and (len(image_size) != 2 or min(image_size) < 1):
            raise ValueError(f"image_size must be a positive int or an (H, W) pair, got {image_size!r}")
        self.root = Path(root)
        if not self.root.exists():
            raise FileNotFoundError(
                f"dataset root {self.root} does not exist; check the path, or download the data there first"
            )
        if not self.root.is_dir():
            raise FileNotFoundError(f"dataset root {self.root} is a file, not a folder of class folders")
        class_dirs = sorted(p for p in self.root.iterdir() if p.is_dir() and _is_visible(p))
        if not class_dirs:
            raise ValueError(
                f"{self.root} has no class folders; put the images of each class in their own sub-folder "
                "(root/<class name>/<image>)"
            )
        paths: list[Path] = []
        labels: list[int] = []
        for class_id, folder in enumerate(class_dirs):
            images = sorted(
                p for p in folder.iterdir() if p.is_file() and _is_visible(p) and p.suffix.lower() in IMAGE_EXTENSIONS
            )
            if not images:
                raise ValueError(
                    f"class folder {folder} holds no images (extensions {sorted(IMAGE_EXTENSIONS)}); "
                    "add its images or remove the folder"
                )
            paths.extend(images)
            labels.extend([class_id] * len(images))
        if image_size is None:
            _check_one_size(self.root, paths)
        self.class_names = [p.name for p in class_dirs]
        self.paths = paths
        self.labels = torch.tensor(labels, dtype=torch.int64)
        self.transform = transform
        self.image_size = None if image_size is None else (int(image_size[0]), int(image_size[1]))
        self.mode = mode
        self.cache = cache
        self._cache: dict[int, Tensor] = {}

    #: the folder's location and the cache switch do not change the items (the files enter
    #: `describe` by their paths relative to ``root``)
    describe_skip = ("root", "paths", "cache")

    def describe(self) -> dict[str, Any]:
        """`LabelledDataset.describe`, with the image files relative to ``root`` (so a moved folder
        still describes the same data)."""
        files = [p.relative_to(self.root).as_posix() for p in self.paths]
        return {**super().describe(), "files": describe_value(files)}

    def _decode(self, index: int) -> Tensor:
        return uint8_to_unit(self._decode_uint8(index))

    def stored_inputs(self) -> StoredInputs | None:
        """Every image decoded once to ``uint8 [n, C, H, W]`` (what `CachedDataset` holds), and
        their conversion to ``[0, 1]``; ``None`` with a ``transform`` (it runs on the floats)."""
        if self.transform is not None:
            return None
        return torch.stack([self._decode_uint8(i) for i in range(len(self.paths))]), uint8_to_unit

    def _decode_uint8(self, index: int) -> Tensor:
        image_module = _import_pil()
        with image_module.open(self.paths[index]) as image:
            image = image.convert(self.mode)
            if self.image_size is not None:
                height, width = self.image_size
                resampling = getattr(image_module, "Resampling", image_module)  # Pillow < 9.1 has no Resampling
                image = image.resize((width, height), resampling.BILINEAR)
            array = np.asarray(image, dtype=np.uint8)
        if array.ndim == 2:
            array = array[:, :, None]
        return torch.from_numpy(array.copy()).permute(2, 0, 1)

    def get_input(self, index: int) -> Tensor:
        """Decodes image ``index`` to a float32 tensor ``[C, H, W]`` in ``[0, 1]``."""
        index = int(index)
        if not 0 <= index < len(self.paths):
            raise IndexError(f"index {index} out of range for a dataset of {len(self.paths)} images")
        if self.cache and index in self._cache:
            x = self._cache[index]
        else:
            x = self._decode(index)
            if self.cache:
                self._cache[index] = x
        return self.transform(x) if self.transform is not None else x

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.root)!r}, classes={len(self.class_names)}, images={len(self)})"
