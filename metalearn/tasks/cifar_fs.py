"""CIFAR-FS (Bertinetto et al., 2019) and FC100 (Oreshkin et al., 2018), from the CIFAR-100 archive.

Both are built from the official CIFAR-100 python archive ``cifar-100-python.tar.gz``
(https://www.cs.toronto.edu/~kriz/cifar.html), whose ``train`` (50000 images), ``test`` (10000)
and ``meta`` pickles hold 32x32 RGB images, a fine label (100 classes) and a coarse label (20
superclasses) for each. The few-shot splits pool the archive's train and test images, 600 per
class:

- **CIFAR-FS** ("Meta-learning with differentiable closed-form solvers"): 64 / 16 / 20 fine
  classes drawn at random.
- **FC100** ("TADAM: Task dependent adaptive metric for improved few-shot learning"): split by
  superclass, 12 / 4 / 4 superclasses (60 / 20 / 20 classes), so that train and test classes are
  semantically further apart.

The class lists are the published ones (``split_lists/cifar_fs.json``, ``fc100.json``).
"""

from __future__ import annotations

import os
import tarfile
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np

from metalearn.tasks.benchmark import (
    BenchmarkFormatError,
    BenchmarkImages,
    Decoded,
    as_text,
    cache_folder,
    check_split_name,
    concat_pools,
    fingerprint,
    load_or_decode,
    published_split,
    safe_unpickle,
    split_pools,
)
from metalearn.tasks.download import download_file
from metalearn.tasks.omniglot import RemoteFile

__all__ = ["CIFAR100_ARCHIVE", "CIFARFS", "FC100"]

ARCHIVE_NAME = "cifar-100-python.tar.gz"
_FOLDER = "cifar-100-python"
_MEMBERS = ("train", "test", "meta")
_HOME = "https://www.cs.toronto.edu/~kriz/cifar.html"

# The md5 is the one published with the archive on its page and in torchvision's source
# (torchvision/datasets/cifar.py, CIFAR100.tgz_md5); the size is not published there.
CIFAR100_ARCHIVE: Mapping[str, RemoteFile] = MappingProxyType(
    {
        ARCHIVE_NAME: RemoteFile(
            url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
            checksum=("md5", "eb9058c3a382ffc7106e4002c42a8d85"),
        )
    }
)


def _locate(root: Path, download: bool, sources: Mapping[str, RemoteFile]) -> Path:
    """The archive (preferred) or its extracted folder in ``root``; downloads the archive if allowed."""
    archive, folder = root / ARCHIVE_NAME, root / _FOLDER
    if archive.is_file():
        return archive
    if folder.is_dir():
        return folder
    if download:
        if ARCHIVE_NAME not in sources:
            raise KeyError(f"sources has no entry for {ARCHIVE_NAME!r}; give a RemoteFile for it")
        remote = sources[ARCHIVE_NAME]
        return download_file(remote.url, archive, checksum=remote.checksum, expected_size=remote.size)
    where = "does not exist" if not root.exists() else f"has no {ARCHIVE_NAME} and no {_FOLDER}/ folder"
    raise FileNotFoundError(
        f"CIFAR-100: {root} {where}. Put the official {ARCHIVE_NAME} (the python version, from {_HOME}) in "
        f"{root}, or pass download=True to fetch it"
    )


def _read_members(source: Path) -> dict[str, Any]:
    """The ``train``, ``test`` and ``meta`` pickles of the archive (or folder), unpickled safely."""
    out: dict[str, Any] = {}
    if source.is_dir():
        for name in _MEMBERS:
            path = source / name
            if not path.is_file():
                raise BenchmarkFormatError(
                    f"{source} has no {name} file; extract the official {ARCHIVE_NAME} (from {_HOME}) into "
                    f"{source.parent} again"
                )
            with open(path, "rb") as f:
                out[name] = safe_unpickle(f, str(path))
        return out
    try:
        with tarfile.open(source, "r:gz") as tar:
            for name in _MEMBERS:
                try:
                    member = tar.extractfile(f"{_FOLDER}/{name}")
                except KeyError:
                    member = None
                if member is None:
                    raise BenchmarkFormatError(
                        f"{source} has no member {_FOLDER}/{name}: it is not the python version of CIFAR-100. "
                        f"Get {ARCHIVE_NAME} from {_HOME}"
                    )
                with member:
                    out[name] = safe_unpickle(member, f"{source}:{_FOLDER}/{name}")
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise BenchmarkFormatError(
            f"{source} is not a readable tar.gz archive ({exc}); it may be truncated. Delete it and pass "
            f"download=True, or put the official {ARCHIVE_NAME} from {_HOME} there"
        ) from exc
    return out


def _pooled(members: dict[str, Any], where: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str], list[str]]:
    """Train and test images pooled: ``(images [n,3,32,32], fine, coarse, fine names, coarse names)``."""
    try:
        images = np.concatenate([np.asarray(members[s]["data"], dtype=np.uint8) for s in ("train", "test")])
        fine = np.concatenate([np.asarray(members[s]["fine_labels"], dtype=np.int64) for s in ("train", "test")])
        coarse = np.concatenate([np.asarray(members[s]["coarse_labels"], dtype=np.int64) for s in ("train", "test")])
        fine_names = [as_text(n) for n in members["meta"]["fine_label_names"]]
        coarse_names = [as_text(n) for n in members["meta"]["coarse_label_names"]]
        images = images.reshape(-1, 3, 32, 32)  # each row: 1024 red, 1024 green, 1024 blue values, row-major
    except (KeyError, TypeError, ValueError) as exc:
        raise BenchmarkFormatError(
            f"{where} does not have the layout of the CIFAR-100 python version ({type(exc).__name__}: {exc}); "
            f"get {ARCHIVE_NAME} from {_HOME}"
        ) from exc
    if fine.shape != (images.shape[0],) or coarse.shape != fine.shape:
        raise BenchmarkFormatError(f"{where}: the label lists do not match the number of images")
    return images, fine, coarse, fine_names, coarse_names


def _select(images: np.ndarray, fine: np.ndarray, fine_names: list[str], classes: list[str]) -> Decoded:
    """The images of ``classes`` (fine names), relabelled ``0 .. len(classes)-1`` in that order."""
    position = {name: i for i, name in enumerate(fine_names)}
    relabel = np.full(len(fine_names), -1, dtype=np.int64)
    for new, name in enumerate(classes):
        relabel[position[name]] = new
    labels = relabel[fine]
    keep = np.flatnonzero(labels >= 0)
    order = keep[np.argsort(labels[keep], kind="stable")]  # grouped by class, archive order within
    return Decoded(images=np.ascontiguousarray(images[order]), labels=labels[order], class_names=list(classes))


class _CIFAR100Split(BenchmarkImages):
    """A few-shot split of CIFAR-100's fine classes (`CIFARFS` and `FC100` say which)."""

    _list_name: str = ""

    def __init__(
        self,
        root: str | os.PathLike,
        *,
        split: str = "train",
        download: bool = False,
        cache_dir: str | os.PathLike | None = None,
        sources: Mapping[str, RemoteFile] | None = None,
    ) -> None:
        check_split_name(split)
        self.root = Path(root)
        self.cache_dir = cache_folder(self.root, cache_dir)
        source = _locate(self.root, download, CIFAR100_ARCHIVE if sources is None else sources)
        files = [source] if source.is_file() else [source / m for m in _MEMBERS]
        header = {"dataset": self._list_name, "split": split, "source": fingerprint(files)}
        cache_file = self.cache_dir / f"{self._list_name}-{split}.npz"
        pools = split_pools(split)
        sizes: dict[str, int] = {}

        def decode() -> Decoded:
            images, fine, coarse, fine_names, coarse_names = _pooled(_read_members(source), str(source))
            parts = []
            for pool in pools:
                classes = self._pool_classes(pool, fine, coarse, fine_names, coarse_names, str(source))
                parts.append(_select(images, fine, fine_names, classes))
            return concat_pools(parts)

        decoded, digest = load_or_decode(cache_file, header, decode)
        for pool in pools:
            sizes[pool] = len(self._published_classes(pool, decoded.class_names))
        super().__init__(decoded, split=split, pool_sizes=sizes, digest=digest)

    def _pool_classes(self, pool, fine, coarse, fine_names, coarse_names, where) -> list[str]:  # pragma: no cover
        raise NotImplementedError

    def _published_classes(self, pool: str, names: list[str]) -> list[str]:  # pragma: no cover
        raise NotImplementedError


def _check_names(wanted: list[str], present: list[str], what: str, where: str) -> None:
    missing = [n for n in wanted if n not in present]
    if missing:
        raise BenchmarkFormatError(
            f"{where} has no {what} named {missing[:3]} ({len(missing)} missing): it is not the official "
            f"CIFAR-100 python archive. Get {ARCHIVE_NAME} from {_HOME}"
        )


class CIFARFS(_CIFAR100Split):
    """CIFAR-FS (Bertinetto et al., 2019): 64 / 16 / 20 CIFAR-100 classes, 600 32x32 images each.

    ``root`` holds the official ``cifar-100-python.tar.gz`` (the python version, from
    https://www.cs.toronto.edu/~kriz/cifar.html) or the ``cifar-100-python/`` folder it extracts
    to; the archive is preferred when both are there.

    Args:
        root: folder with the archive.
        split: ``"train"`` (64 classes), ``"val"`` (16), ``"test"`` (20) or ``"all"`` (100;
            `few_shot_split` gives the three pools).
        download: fetch the archive if missing (over HTTPS, verified against its published md5,
            written atomically).
        cache_dir: where the selected images are cached; default ``root/.metalearn_cache``.
        sources: where ``download`` fetches the archive from; default `CIFAR100_ARCHIVE`.

    Attributes:
        images: ``uint8 [n, 3, 32, 32]``.
        labels: ``int64 [n]``.
        class_names: fine label names in the order of the published list (``split_lists/cifar_fs.json``).

    Raises:
        FileNotFoundError: the archive is missing and ``download`` is false.
        BenchmarkFormatError: the archive is not CIFAR-100's python version.
        metalearn.tasks.download.DownloadError: a download failed verification or broke off.
    """

    _list_name = "cifar_fs"

    def _pool_classes(self, pool, fine, coarse, fine_names, coarse_names, where) -> list[str]:
        classes = list(published_split("cifar_fs")[pool])
        _check_names(classes, fine_names, "fine class", where)
        return classes

    def _published_classes(self, pool: str, names: list[str]) -> list[str]:
        return list(published_split("cifar_fs")[pool])


class FC100(_CIFAR100Split):
    """FC100 (Oreshkin et al., 2018): CIFAR-100 split by superclass, 12 / 4 / 4 superclasses
    (60 / 20 / 20 classes), 600 32x32 images per class.

    Same files and arguments as `CIFARFS`. A pool holds every fine class of its superclasses,
    ordered by superclass (in the published list's order, ``split_lists/fc100.json``), then by
    fine label id within a superclass.

    Attributes:
        superclasses: the superclass (coarse label name) of each class id.
    """

    _list_name = "fc100"

    def __init__(self, root: str | os.PathLike, **kwargs: Any) -> None:
        super().__init__(root, **kwargs)
        coarse_of = published_split("cifar100_coarse")["coarse_of"]
        self.superclasses: tuple[str, ...] = tuple(coarse_of[n] for n in self.class_names)

    def _pool_classes(self, pool, fine, coarse, fine_names, coarse_names, where) -> list[str]:
        supers = list(published_split("fc100")[pool])
        _check_names(supers, coarse_names, "superclass", where)
        classes: list[str] = []
        for name in supers:
            ids = np.unique(fine[coarse == coarse_names.index(name)])
            classes.extend(fine_names[i] for i in ids)
        return classes

    def _published_classes(self, pool: str, names: list[str]) -> list[str]:
        coarse_of = published_split("cifar100_coarse")["coarse_of"]
        supers = set(published_split("fc100")[pool])
        return [n for n in names if coarse_of.get(n) in supers]
