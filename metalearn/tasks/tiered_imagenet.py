"""tiered-ImageNet (Ren et al., 2018, "Meta-learning for semi-supervised few-shot classification").

608 ImageNet classes grouped into 34 categories; the split is by category, so train and test
classes are semantically apart: 351 train classes (20 categories), 97 val (6), 160 test (8), at
84x84. The form read is the one published with the paper's code (github.com/renmengye/
few-shot-ssl-public, ``fewshot/data/tiered_imagenet.py`` and ``compress_tiered_imagenet.py``) and
distributed as ``tiered-imagenet.tar``:

- ``<split>_images_png.pkl``: a pickled list with one PNG-encoded 84x84 image per example (each a
  ``uint8`` numpy array of the PNG's bytes, as ``cv2.imencode`` returns it, or ``bytes``);
- ``<split>_labels.pkl``: a pickled dict with ``"label_specific"`` (the class of each image),
  ``"label_general"`` (its category), ``"label_specific_str"`` and ``"label_general_str"``
  (their names), for ``split`` in ``train``, ``val``, ``test``.

The files may lie in ``root`` or in ``root/tiered-imagenet/`` (as the archive extracts). There is
no download (the archive is only on Google Drive, without a published checksum).

Class names are checked against the published lists (``split_lists/tiered_imagenet.json``).
"""

from __future__ import annotations

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

__all__ = ["TieredImageNet"]

IMAGE_SIZE = 84
_ORIGIN = "github.com/renmengye/few-shot-ssl-public"


def _files(root: Path, pool: str) -> tuple[Path, Path]:
    """The (images, labels) pickles of ``pool``, in ``root`` or ``root/tiered-imagenet``."""
    for folder in (root, root / "tiered-imagenet"):
        images, labels = folder / f"{pool}_images_png.pkl", folder / f"{pool}_labels.pkl"
        if images.is_file() and labels.is_file():
            return images, labels
    where = "does not exist" if not root.exists() else f"has no {pool}_images_png.pkl and {pool}_labels.pkl"
    raise FileNotFoundError(
        f"tiered-ImageNet: {root} {where} (looked in {root} and {root / 'tiered-imagenet'}). tiered-ImageNet is not "
        f"downloadable from a source with a published checksum: get the pickles published with {_ORIGIN} "
        f"(tiered-imagenet.tar) and extract them into {root} (see docs/datasets.md)"
    )


def _decode_pool(images_pkl: Path, labels_pkl: Path, pool: str) -> tuple[Decoded, list[str]]:
    """One pool, decoded and grouped by class; also the category of each class."""
    with open(labels_pkl, "rb") as f:
        meta = safe_unpickle(f, str(labels_pkl))
    try:
        specific = np.asarray(meta["label_specific"], dtype=np.int64)
        general = np.asarray(meta["label_general"], dtype=np.int64)
        names = [as_text(n) for n in meta["label_specific_str"]]
        categories = [as_text(n) for n in meta["label_general_str"]]
    except (KeyError, TypeError, ValueError) as exc:
        raise BenchmarkFormatError(
            f"{labels_pkl} is not a tiered-ImageNet label pickle (a dict with label_specific, label_general, "
            f"label_specific_str, label_general_str): {type(exc).__name__}: {exc}"
        ) from exc
    check_classes(names, list(published_split("tiered_imagenet")[pool]), f"tiered-ImageNet {pool}", str(labels_pkl))
    with open(images_pkl, "rb") as f:
        encoded = safe_unpickle(f, str(images_pkl))
    if not isinstance(encoded, list) or len(encoded) != specific.size:
        n = len(encoded) if isinstance(encoded, list) else type(encoded).__name__
        raise BenchmarkFormatError(
            f"{images_pkl} must be a list of {specific.size} PNG images (one per label in {labels_pkl.name}), got {n}"
        )
    if specific.size and (specific.min() < 0 or specific.max() >= len(names)):
        raise BenchmarkFormatError(f"{labels_pkl}: label_specific holds ids outside 0..{len(names) - 1}")
    order = np.argsort(specific, kind="stable")  # grouped by class, file order within
    images = np.empty((specific.size, 3, IMAGE_SIZE, IMAGE_SIZE), dtype=np.uint8)
    for row, i in enumerate(order):
        data = encoded[i]
        data = data.tobytes() if isinstance(data, np.ndarray) else bytes(data)
        images[row] = decode_rgb(data, IMAGE_SIZE, f"{images_pkl} item {i}")
    category_of = [""] * len(names)
    for s, g in zip(specific.tolist(), general.tolist(), strict=True):
        category_of[s] = categories[g]
    return Decoded(images=images, labels=specific[order], class_names=names), category_of


class TieredImageNet(BenchmarkImages):
    """tiered-ImageNet as an in-memory `LabelledDataset` (`BenchmarkImages`), 84x84 RGB.

    Memory: the whole train split is about 9.5 GB of ``uint8`` (448,695 images); val and test
    are 2.6 and 4.4 GB.

    Args:
        root: folder with ``<split>_images_png.pkl`` and ``<split>_labels.pkl`` (or their
            ``tiered-imagenet/`` folder).
        split: ``"train"`` (351 classes), ``"val"`` (97), ``"test"`` (160) or ``"all"`` (608).
        download: must be false: there is no verifiable download (``True`` raises `ValueError`
            saying where to get the files).
        cache_dir: where the decoded arrays are cached; default ``root/.metalearn_cache``.

    Attributes:
        images: ``uint8 [n, 3, 84, 84]``.
        labels: ``int64 [n]``.
        class_names: the class names of the pickles (``label_specific_str``), in their order.
        categories: the category (``label_general_str``) of each class.

    Raises:
        FileNotFoundError: a split's pickles are missing (the message says where to get them).
        BenchmarkFormatError: a pickle is not in this format, or holds other classes than the
            published split.
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
        refuse_download(
            download, "tiered-ImageNet", f"Get the pickles published with {_ORIGIN} and extract them into {root}"
        )
        self.root = Path(root)
        self.cache_dir = cache_folder(self.root, cache_dir)
        pools = split_pools(split)
        files = {pool: _files(self.root, pool) for pool in pools}  # every file checked before any work
        loaded, categories = [], []
        for pool in pools:
            images_pkl, labels_pkl = files[pool]
            header = {"dataset": "tiered_imagenet", "pool": pool, "source": fingerprint([images_pkl, labels_pkl])}
            kept: dict[str, list[str]] = {}

            def decode(i=images_pkl, lab=labels_pkl, p=pool, kept=kept) -> Decoded:
                decoded, kept["categories"] = _decode_pool(i, lab, p)
                return decoded

            cache_file = self.cache_dir / f"tiered_imagenet-{pool}-{IMAGE_SIZE}px.npz"
            decoded, digest = load_or_decode(cache_file, header, decode)
            if "categories" not in kept:  # read from the cache: the categories come from the small label pickle
                kept["categories"] = _categories(labels_pkl, decoded.class_names)
            loaded.append((decoded, digest))
            categories.extend(kept["categories"])
        joined, sizes, joined_digest = join_pools(pools, loaded)
        super().__init__(joined, split=split, pool_sizes=sizes, digest=joined_digest)
        self.categories: tuple[str, ...] = tuple(categories)


def _categories(labels_pkl: Path, names: list[str]) -> list[str]:
    with open(labels_pkl, "rb") as f:
        meta = safe_unpickle(f, str(labels_pkl))
    general = [as_text(n) for n in meta["label_general_str"]]
    of = {}
    specific, by_image = np.asarray(meta["label_specific"]).tolist(), np.asarray(meta["label_general"]).tolist()
    for s, g in zip(specific, by_image, strict=True):
        of[s] = general[g]
    return [of.get(i, "") for i in range(len(names))]
