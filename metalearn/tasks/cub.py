"""CUB-200-2011 (Wah et al., 2011): 200 bird species, 11,788 photographs.

The few-shot split is the 100 / 50 / 50 one of Chen et al. (2019), "A Closer Look at Few-shot
Classification" (after Hilliard et al., 2018): ``split_lists/cub.json``, class folder names of
the official archive. The form read is the official ``CUB_200_2011.tgz`` (from
https://www.vision.caltech.edu/datasets/cub_200_2011/), or the folder it extracts to, laid out as
``CUB_200_2011/images/<NNN.Species_Name>/<file>.jpg``. The photographs differ in size: each is
resized to ``image_size`` x ``image_size`` (bilinear), as is usual in this benchmark.

There is no download: no checksum of the archive is published by its source or by an established
library that this could be checked against here.
"""

from __future__ import annotations

import functools
import os
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from metalearn.tasks.benchmark import (
    BenchmarkFormatError,
    BenchmarkImages,
    Decoded,
    cache_folder,
    check_classes,
    check_split_name,
    decode_rgb,
    fingerprint,
    join_pools,
    load_or_decode,
    published_split,
    refuse_download,
    split_pools,
)

__all__ = ["CUB"]

ARCHIVE_NAME = "CUB_200_2011.tgz"
_TOP = "CUB_200_2011"
_HOME = "https://www.vision.caltech.edu/datasets/cub_200_2011/"
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")

Entry = tuple[str, str, Callable[[], bytes]]  # (class folder, file name, read)


def _locate(root: Path) -> Path:
    """The extracted images folder (preferred: no decompression) or the archive."""
    for images in (root / _TOP / "images", root / "images"):
        if images.is_dir():
            return images
    archive = root / ARCHIVE_NAME
    if archive.is_file():
        return archive
    where = "does not exist" if not root.exists() else f"has no {ARCHIVE_NAME} and no {_TOP}/images/ folder"
    raise FileNotFoundError(
        f"CUB: {root} {where}. Get the official {ARCHIVE_NAME} from {_HOME} and put it (or the {_TOP}/ folder it "
        f"extracts to) in {root}"
    )


def _folder_entries(images: Path, wanted: set[str]) -> Iterator[Entry]:
    for folder in sorted(p for p in images.iterdir() if p.is_dir() and p.name in wanted):
        for path in sorted(folder.iterdir()):
            if path.suffix.lower() in _IMAGE_SUFFIXES and not path.name.startswith("."):
                yield folder.name, path.name, path.read_bytes


def _archive_entries(archive: Path, wanted: set[str]) -> list[tuple[str, str, bytes]]:
    out = []
    try:
        with tarfile.open(archive, "r:*") as tar:
            for member in tar:
                parts = member.name.split("/")
                if (
                    member.isfile()
                    and len(parts) == 4
                    and parts[:2] == [_TOP, "images"]
                    and parts[2] in wanted
                    and parts[3].lower().endswith(_IMAGE_SUFFIXES)
                    and not parts[3].startswith(".")
                ):
                    f = tar.extractfile(member)
                    assert f is not None
                    out.append((parts[2], parts[3], f.read()))
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise BenchmarkFormatError(
            f"{archive} is not a readable tar archive ({exc}); it may be truncated. Get the official {ARCHIVE_NAME} "
            f"from {_HOME} again"
        ) from exc
    return sorted(out, key=lambda e: e[:2])


def _decode(source: Path, classes: list[str], image_size: int) -> Decoded:
    wanted = set(classes)
    if source.is_dir():
        entries = [(c, n, read()) for c, n, read in _folder_entries(source, wanted)]
    else:
        entries = _archive_entries(source, wanted)
    check_classes(sorted({c for c, _, _ in entries}), classes, "CUB", str(source))
    position = {c: i for i, c in enumerate(classes)}
    entries.sort(key=lambda e: (position[e[0]], e[1]))
    images = np.empty((len(entries), 3, image_size, image_size), dtype=np.uint8)
    labels = np.empty(len(entries), dtype=np.int64)
    for i, (cls, name, data) in enumerate(entries):
        images[i] = decode_rgb(data, image_size, f"{source}: {cls}/{name}")
        labels[i] = position[cls]
    return Decoded(images=images, labels=labels, class_names=classes)


class CUB(BenchmarkImages):
    """CUB-200-2011 as an in-memory `LabelledDataset` (`BenchmarkImages`), resized RGB.

    Args:
        root: folder with ``CUB_200_2011.tgz`` or the ``CUB_200_2011/`` folder it extracts to
            (the folder is read when both are there).
        split: ``"train"`` (100 classes), ``"val"`` (50), ``"test"`` (50) or ``"all"`` (200;
            `few_shot_split` gives the three pools).
        image_size: side of the square images (84 is the usual size).
        download: must be false: there is no verifiable download (``True`` raises `ValueError`
            saying where to get the archive).
        cache_dir: where the decoded arrays are cached; default ``root/.metalearn_cache``.

    Attributes:
        images: ``uint8 [n, 3, image_size, image_size]``.
        labels: ``int64 [n]``.
        class_names: class folder names (``"001.Black_footed_Albatross"``, ...) in the published order.

    Raises:
        FileNotFoundError: neither the archive nor the folder is in ``root``.
        BenchmarkFormatError: the archive is unreadable, an image cannot be decoded, or a
            published class is missing.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        *,
        split: str = "train",
        image_size: int = 84,
        download: bool = False,
        cache_dir: str | os.PathLike | None = None,
    ) -> None:
        check_split_name(split)
        refuse_download(download, "CUB-200-2011", f"Get the official {ARCHIVE_NAME} from {_HOME} and put it in {root}")
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
            raise ValueError(f"image_size must be a positive int, got {image_size!r}")
        self.root = Path(root)
        self.image_size = image_size
        self.cache_dir = cache_folder(self.root, cache_dir)
        source = _locate(self.root)
        published = published_split("cub")
        pools = split_pools(split)
        loaded = []
        for pool in pools:
            classes = list(published[pool])
            files = [source] if source.is_file() else [source / c for c in classes if (source / c).is_dir()]
            header = {"dataset": "cub", "pool": pool, "image_size": image_size, "source": fingerprint(files)}
            cache_file = self.cache_dir / f"cub-{pool}-{image_size}px.npz"
            decode = functools.partial(_decode, source, classes, image_size)
            loaded.append(load_or_decode(cache_file, header, decode))
        decoded, sizes, digest = join_pools(pools, loaded)
        super().__init__(decoded, split=split, pool_sizes=sizes, digest=digest)
