"""mini-ImageNet (Vinyals et al., 2016), in the split of Ravi & Larochelle (2017).

100 ImageNet classes, 600 images each, at 84x84: 64 train, 16 val and 20 test classes
(``split_lists/mini_imagenet.json``). Two local forms are read, in this order of preference:

1. the widely used pickles ``mini-imagenet-cache-{train,val,test}.pkl`` (the val one also as
   ``mini-imagenet-cache-validation.pkl``, the name learn2learn saves it under): each a dict with
   ``"image_data"`` (``uint8 [N, 84, 84, 3]``) and ``"class_dict"`` (``{wnid: [indices]}``);
2. the split files of Ravi & Larochelle, ``{train,val,test}.csv`` (a ``filename,label``
   header, then one ``<file>,<wnid>`` row per image), with the images in ``images/``
   (``images/<file>``, or ``images/<wnid>/<file>``), resized to 84x84 if they are not.

Neither form can be downloaded from a stable source with a published checksum, so `MiniImageNet`
never downloads: the error says which files to put where.
"""

from __future__ import annotations

import csv
import functools
import os
from pathlib import Path

import numpy as np

from metalearn.tasks.benchmark import (
    BenchmarkFormatError,
    BenchmarkImages,
    Decoded,
    as_text,
    cache_folder,
    check_classes,
    check_split_name,
    decode_rgb,
    fingerprint,
    join_pools,
    load_or_decode,
    published_split,
    refuse_download,
    safe_unpickle,
    split_pools,
)

__all__ = ["MiniImageNet"]

IMAGE_SIZE = 84


def _where_to_get(root: Path) -> str:
    return (
        "mini-ImageNet is not downloadable from a source with a published checksum: put either the pickles "
        "mini-imagenet-cache-{train,val,test}.pkl, or Ravi & Larochelle's split files {train,val,test}.csv "
        f"(github.com/twitter/meta-learning-lstm, data/miniImagenet) with the images in an images/ folder, in {root} "
        "(see docs/datasets.md)"
    )


def _pickle_path(root: Path, pool: str) -> Path:
    """``mini-imagenet-cache-<pool>.pkl``; for val also the name learn2learn downloads it under."""
    path = root / f"mini-imagenet-cache-{pool}.pkl"
    if pool == "val" and not path.is_file() and (root / "mini-imagenet-cache-validation.pkl").is_file():
        return root / "mini-imagenet-cache-validation.pkl"
    return path


def _from_pickle(path: Path, pool: str, classes: list[str]) -> Decoded:
    with open(path, "rb") as f:
        data = safe_unpickle(f, str(path))
    try:
        images = np.asarray(data["image_data"])
        class_dict = {as_text(k): np.asarray(v, dtype=np.int64) for k, v in data["class_dict"].items()}
    except (KeyError, TypeError, AttributeError) as exc:
        raise BenchmarkFormatError(
            f"{path} is not a mini-ImageNet cache pickle (a dict with 'image_data' and 'class_dict'): {exc}"
        ) from exc
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[3] != 3:
        raise BenchmarkFormatError(
            f"{path}: 'image_data' must be uint8 [N, H, W, 3], got {images.dtype} {list(images.shape)}"
        )
    check_classes(list(class_dict), classes, f"mini-ImageNet {pool}", str(path))
    order = np.concatenate([class_dict[c] for c in classes])
    if order.size and (order.min() < 0 or order.max() >= images.shape[0]):
        raise BenchmarkFormatError(f"{path}: 'class_dict' indexes images beyond the {images.shape[0]} in 'image_data'")
    labels = np.concatenate([np.full(class_dict[c].size, i, dtype=np.int64) for i, c in enumerate(classes)])
    picked = images[order]
    if picked.shape[1:3] != (IMAGE_SIZE, IMAGE_SIZE):
        raise BenchmarkFormatError(f"{path}: images are {picked.shape[1]}x{picked.shape[2]}, expected 84x84")
    return Decoded(images=np.ascontiguousarray(picked.transpose(0, 3, 1, 2)), labels=labels, class_names=classes)


def _decode_pool(root: Path, pool: str, classes: list[str], form: str) -> Decoded:
    """One pool, from the pickle or from the split file and images."""
    if form == "pickle":
        return _from_pickle(_pickle_path(root, pool), pool, classes)
    return _from_csv(root, pool, classes)


def _csv_rows(path: Path) -> list[tuple[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    if not rows or [c.strip() for c in rows[0]] != ["filename", "label"]:
        raise BenchmarkFormatError(f"{path} does not start with the header 'filename,label' of the split files")
    body = [r for r in rows[1:] if r]
    bad = next((r for r in body if len(r) != 2), None)
    if bad is not None:
        raise BenchmarkFormatError(f"{path}: the row {bad} is not '<file>,<wnid>'")
    return [(r[0].strip(), r[1].strip()) for r in body]


def _image_file(images: Path, name: str, wnid: str, csv_path: Path) -> Path:
    for candidate in (images / name, images / wnid / name):
        if candidate.is_file():
            return candidate
    raise BenchmarkFormatError(
        f"{csv_path} lists {name}, but neither {images / name} nor {images / wnid / name} exists; put the "
        "mini-ImageNet images in that folder"
    )


def _from_csv(root: Path, pool: str, classes: list[str]) -> Decoded:
    csv_path, images_dir = root / f"{pool}.csv", root / "images"
    rows = _csv_rows(csv_path)
    check_classes(sorted({w for _, w in rows}), classes, f"mini-ImageNet {pool}", str(csv_path))
    position = {c: i for i, c in enumerate(classes)}
    rows.sort(key=lambda r: position[r[1]])  # grouped by class (stable: file order within a class)
    images = np.empty((len(rows), 3, IMAGE_SIZE, IMAGE_SIZE), dtype=np.uint8)
    labels = np.empty(len(rows), dtype=np.int64)
    for i, (name, wnid) in enumerate(rows):
        path = _image_file(images_dir, name, wnid, csv_path)
        images[i] = decode_rgb(path.read_bytes(), IMAGE_SIZE, str(path))
        labels[i] = position[wnid]
    return Decoded(images=images, labels=labels, class_names=classes)


class MiniImageNet(BenchmarkImages):
    """mini-ImageNet as an in-memory `LabelledDataset` (`BenchmarkImages`), 84x84 RGB.

    Args:
        root: folder with ``mini-imagenet-cache-<split>.pkl`` or ``<split>.csv`` + ``images/``
            (the pickle is read when both are there).
        split: ``"train"`` (64 classes), ``"val"`` (16), ``"test"`` (20) or ``"all"`` (100;
            `few_shot_split` gives the three pools).
        download: must be false: there is no verifiable download (``True`` raises `ValueError`
            saying where to get the files).
        cache_dir: where the decoded arrays are cached; default ``root/.metalearn_cache``.

    Attributes:
        images: ``uint8 [n, 3, 84, 84]``.
        labels: ``int64 [n]``.
        class_names: ImageNet synset ids (wnids) in the order of the published list.

    Raises:
        FileNotFoundError: neither form of a split is in ``root`` (the message says what to put there).
        BenchmarkFormatError: a file is not in the expected format, or holds other classes than the
            published split.

    Example::

        data = MiniImageNet("data/mini-imagenet", split="all")
        split = data.few_shot_split()          # 64 / 16 / 20 classes
    """

    def __init__(
        self,
        root: str | os.PathLike,
        *,
        split: str = "train",
        download: bool = False,
        cache_dir: str | os.PathLike | None = None,
    ) -> None:
        check_split_name(split)
        refuse_download(download, "mini-ImageNet", f"Put its files in {root} (see docs/datasets.md)")
        self.root = Path(root)
        self.cache_dir = cache_folder(self.root, cache_dir)
        published = published_split("mini_imagenet")
        pools = split_pools(split)
        forms = {pool: self._form(pool) for pool in pools}  # every file checked before any work
        loaded = []
        for pool in pools:
            classes = list(published[pool])
            form, files = forms[pool]
            header = {"dataset": "mini_imagenet", "pool": pool, "form": form, "source": fingerprint(files)}
            cache_file = self.cache_dir / f"mini_imagenet-{pool}-{IMAGE_SIZE}px.npz"
            decode = functools.partial(_decode_pool, self.root, pool, classes, form)
            loaded.append(load_or_decode(cache_file, header, decode))
        decoded, sizes, digest = join_pools(pools, loaded)
        super().__init__(decoded, split=split, pool_sizes=sizes, digest=digest)

    def _form(self, pool: str) -> tuple[str, list[Path]]:
        """Which form holds ``pool`` (``"pickle"`` or ``"csv"``) and its files (for the cache's fingerprint)."""
        pkl = _pickle_path(self.root, pool)
        if pkl.is_file():
            return "pickle", [pkl]
        csv_path = self.root / f"{pool}.csv"
        if csv_path.is_file():
            if not (self.root / "images").is_dir():
                raise FileNotFoundError(
                    f"mini-ImageNet: {csv_path} is there but {self.root / 'images'} is not; put the images it lists "
                    "in that folder"
                )
            return "csv", [csv_path, self.root / "images"]
        where = "does not exist" if not self.root.exists() else f"has neither {pkl.name} nor {pool}.csv"
        raise FileNotFoundError(f"mini-ImageNet: {self.root} {where}. " + _where_to_get(self.root))
