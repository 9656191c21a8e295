"""What the few-shot image benchmarks share: published class splits, safe pickle reading, the cache.

Each benchmark (`MiniImageNet`, `TieredImageNet`, `CIFARFS`, `FC100`, `CUB`) is a
`BenchmarkImages`: every image of its split decoded once into one ``uint8`` tensor
``[n, 3, H, W]`` kept in memory, so `BenchmarkImages.gather` is one indexing operation, as for
`metalearn.tasks.Omniglot`. The decoded arrays are cached on disk (an ``.npz`` file read without
pickle, with a JSON header naming the source files' sizes and mtimes and a SHA-256 of the
arrays); a later load reads the cache in seconds.

The class lists of the splits are the published ones, shipped with the package as JSON files in
``metalearn/tasks/split_lists/`` (each names the repository and path it was copied from).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import pickle
import tempfile
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import IO, Any, TypeVar

import numpy as np
import torch
from torch import Tensor

from metalearn.tasks.datasets import LabelledDataset, select_rows, uint8_to_unit
from metalearn.tasks.describe import describe_value
from metalearn.tasks.download import default_file_mode
from metalearn.tasks.splits import ClassSplit

__all__ = [
    "BENCHMARK_SPLITS",
    "BenchmarkFormatError",
    "BenchmarkImages",
    "published_split",
    "safe_unpickle",
]

CACHE_FORMAT_VERSION = 1
#: the split names of every benchmark; ``"all"`` is the three pools together (train, val, test)
BENCHMARK_SPLITS = ("train", "val", "test", "all")
_POOLS = ("train", "val", "test")
_T = TypeVar("_T")


class BenchmarkFormatError(ValueError):
    """A file that should hold a benchmark does not (wrong layout, wrong classes, unreadable)."""


# -- the published class lists ----------------------------------------------------------------


def published_split(name: str) -> dict[str, Any]:
    """The published class lists of benchmark ``name`` (a file of ``metalearn/tasks/split_lists``).

    Returns:
        The JSON object: ``"train"``, ``"val"``, ``"test"`` lists (or other keys the file
        documents), ``"dataset"`` (what the names are) and ``"source"`` (where they come from).
    """
    path = resources.files("metalearn.tasks").joinpath("split_lists").joinpath(f"{name}.json")
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ValueError(f"no published split list named {name!r} ships with metalearn") from None
    return json.loads(text)


def check_split_name(split: str) -> None:
    """Raises `ValueError` for a split that is not one of `BENCHMARK_SPLITS`."""
    if split not in BENCHMARK_SPLITS:
        raise ValueError(f"split must be one of {list(BENCHMARK_SPLITS)}, got {split!r}")


def refuse_download(download: bool, dataset: str, where_to_get: str) -> None:
    """Raises `ValueError` for ``download=True`` on a benchmark that has no verifiable download."""
    if download:
        raise ValueError(
            f"{dataset} cannot be downloaded: no stable source publishes a checksum it could be verified against. "
            f"{where_to_get}, and load it with download=False"
        )


def split_pools(split: str) -> tuple[str, ...]:
    """The pools a split reads: one, or all three for ``"all"``."""
    return _POOLS if split == "all" else (split,)


# -- reading pickles without running arbitrary code ----------------------------------------------

# numpy arrays and scalars pickle through these; the benchmark pickles hold nothing else but
# builtins (dicts, lists, strings, numbers)
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("builtins", "bytearray"),
    ("_codecs", "encode"),  # how Python 3 pickles bytes with protocol < 3
}


class _SafeUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a benchmark pickle")
        return super().find_class(module, name)


def safe_unpickle(file: IO[bytes], where: str) -> Any:
    """Unpickles ``file``, allowing only numpy arrays and builtin containers (no code runs).

    Pickles written by Python 2 are read with ``encoding="latin1"`` (as numpy advises), and dict
    keys that are ``bytes`` become ``str``.

    Raises:
        BenchmarkFormatError: the file is not a pickle, or holds other objects.
    """
    try:
        obj = _SafeUnpickler(file, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, ImportError, IndexError) as exc:
        raise BenchmarkFormatError(
            f"{where} is not a readable benchmark pickle ({type(exc).__name__}: {exc}); it may be truncated "
            "or another file. Get an intact copy of it"
        ) from exc
    if isinstance(obj, dict):
        obj = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}
    return obj


def as_text(value: Any) -> str:
    """A name from a pickle (``str``, or ``bytes`` from Python 2) as ``str``."""
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


# -- decoding images ---------------------------------------------------------------------------


def pillow():
    """The Pillow ``Image`` module, or an `ImportError` saying how to install it."""
    try:
        from PIL import Image
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "decoding benchmark images needs Pillow: pip install 'torch-metalearn[vision]' (or pip install Pillow)"
        ) from exc
    return Image


def decode_rgb(data: bytes, size: int | None, where: str) -> np.ndarray:
    """An encoded image (PNG, JPEG, ...) as ``uint8 [3, size, size]`` (bilinear resize when needed)."""
    Image = pillow()
    try:
        with Image.open(io.BytesIO(data)) as im:
            rgb = im.convert("RGB")
    except (OSError, ValueError) as exc:
        raise BenchmarkFormatError(f"{where} cannot be decoded as an image ({exc}); the file is damaged") from exc
    if size is not None and rgb.size != (size, size):
        rgb = rgb.resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(rgb, dtype=np.uint8).transpose(2, 0, 1)


# -- the in-memory dataset ---------------------------------------------------------------------


@dataclass
class Decoded:
    """A split, decoded: images ``uint8 [n, 3, H, W]``, labels ``int64 [n]`` from 0, one name per class."""

    images: np.ndarray
    labels: np.ndarray
    class_names: list[str]


class BenchmarkImages(LabelledDataset):
    """The base of the benchmark datasets: a split's images in memory, its classes named.

    Class ids follow the published lists: for ``split="all"`` the train classes first, then
    val, then test (`few_shot_split` gives those pools); a single split numbers its own
    classes from 0 in its list's order.

    Attributes:
        images: ``uint8`` tensor ``[n, 3, H, W]``.
        labels: ``int64`` tensor ``[n]``.
        class_names: ``class_names[c]`` names class ``c`` (as in the published list).
        pool_sizes: number of classes of each pool read, e.g. ``{"train": 64}``.
    """

    #: where the files are, and the arrays themselves (they enter `describe` by their digest)
    describe_skip = ("root", "cache_dir", "images", "labels", "class_names")

    def __init__(self, decoded: Decoded, *, split: str, pool_sizes: Mapping[str, int], digest: str) -> None:
        self.split = split
        self.images: Tensor = torch.from_numpy(decoded.images)
        self.labels = torch.from_numpy(decoded.labels)
        self.class_names: tuple[str, ...] = tuple(decoded.class_names)
        self.pool_sizes = dict(pool_sizes)
        self._digest = digest

    def describe(self) -> dict[str, Any]:
        """`LabelledDataset.describe`, with the arrays as the digest stored with the cache (hashing
        a few GB of images at every run would take longer than the run's first steps)."""
        return {
            **super().describe(),
            "arrays_sha256": self._digest,
            "class_names": describe_value(list(self.class_names)),
        }

    @property
    def num_classes(self) -> int:
        """Number of classes in this split."""
        return len(self.class_names)

    def get_input(self, index: int) -> Tensor:
        """Image ``index`` as ``float32 [3, H, W]`` in ``[0, 1]``."""
        return uint8_to_unit(self.images[index])

    def gather(self, indices: Tensor) -> Tensor:
        """Images at ``indices`` as ``float32 [k, 3, H, W]`` in ``[0, 1]``."""
        return uint8_to_unit(select_rows(self.images, indices))

    def few_shot_split(self) -> ClassSplit:
        """The published split as class pools: train classes as ``source``, val as
        ``validation``, test as ``target``. Needs ``split="all"``."""
        if self.split != "all":
            raise ValueError(
                f"few_shot_split needs the three pools, but this dataset is split={self.split!r}; "
                f"load {type(self).__name__}(root, split='all'), or use this split's classes directly "
                "(dataset.classes)"
            )
        n_train, n_val = self.pool_sizes["train"], self.pool_sizes["val"]
        ids = torch.arange(self.num_classes)
        return ClassSplit(
            source=ids[:n_train], validation=ids[n_train : n_train + n_val], target=ids[n_train + n_val :]
        )

    def __repr__(self) -> str:
        size = tuple(self.images.shape[1:])
        name = type(self).__name__
        return f"{name}(split={self.split!r}, images={len(self)}, classes={self.num_classes}, shape={size})"


def concat_pools(parts: Sequence[Decoded]) -> Decoded:
    """Pools decoded one by one, as one split whose class ids follow on from pool to pool."""
    if len(parts) == 1:
        return parts[0]
    offsets = np.cumsum([0] + [len(p.class_names) for p in parts[:-1]])
    return Decoded(
        images=np.concatenate([p.images for p in parts]),
        labels=np.concatenate([p.labels + off for p, off in zip(parts, offsets, strict=True)]),
        class_names=[n for p in parts for n in p.class_names],
    )


def join_pools(pools: Sequence[str], loaded: Sequence[tuple[Decoded, str]]) -> tuple[Decoded, dict[str, int], str]:
    """Pools loaded one by one, each ``(decoded, digest)`` as `load_or_decode` returns it, as what a
    `BenchmarkImages` is made of: one split (`concat_pools`), the number of classes of each pool, and
    the digests joined by ``":"``."""
    parts = [decoded for decoded, _ in loaded]
    sizes = {pool: len(p.class_names) for pool, p in zip(pools, parts, strict=True)}
    return concat_pools(parts), sizes, ":".join(digest for _, digest in loaded)


def check_classes(found: Sequence[str], published: Sequence[str], what: str, where: str) -> None:
    """Raises `BenchmarkFormatError` if the classes in the data are not the published ones."""
    missing = sorted(set(published) - set(found))
    extra = sorted(set(found) - set(published))
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"{len(missing)} published classes are missing (e.g. {missing[:3]})")
        if extra:
            parts.append(f"{len(extra)} classes are not in the published list (e.g. {extra[:3]})")
        raise BenchmarkFormatError(
            f"{where} does not hold the published {what} classes: {'; '.join(parts)}. Use the files of the "
            "standard distribution (see docs/datasets.md), or build the dataset from your own class list"
        )


# -- the cache ---------------------------------------------------------------------------------


def cache_folder(root: Path, cache_dir: str | os.PathLike | None) -> Path:
    """Where a dataset read from ``root`` caches its decoded arrays: ``cache_dir``, by default
    ``root/.metalearn_cache``."""
    return Path(cache_dir) if cache_dir is not None else root / ".metalearn_cache"


def fingerprint(paths: Sequence[Path]) -> list[dict[str, Any]]:
    """What identifies the source files cheaply: name, size and mtime of each file; for a folder, the
    number, total size and latest mtime of the files under it (a file replaced in place shows)."""
    out = []
    for path in paths:
        if path.is_dir():
            files = total = latest = 0
            for dirpath, _, names in os.walk(path):
                for name in names:
                    st = os.stat(os.path.join(dirpath, name))
                    files, total, latest = files + 1, total + st.st_size, max(latest, st.st_mtime_ns)
            out.append({"name": path.name, "files": files, "bytes": total, "mtime_ns": latest})
        else:
            st = path.stat()
            out.append({"name": path.name, "bytes": st.st_size, "mtime_ns": st.st_mtime_ns})
    return out


def arrays_digest(images: np.ndarray, labels: np.ndarray) -> str:
    """SHA-256 of the arrays' bytes (C order)."""
    digest = hashlib.sha256()
    digest.update(np.ascontiguousarray(images).data)
    digest.update(np.ascontiguousarray(labels).data)
    return digest.hexdigest()


def load_or_decode(cache_file: Path, header: dict[str, Any], decode: Callable[[], Decoded]) -> tuple[Decoded, str]:
    """The decoded split from ``cache_file`` when its header matches ``header``, else decoded and cached.

    Returns:
        ``(decoded, digest)``, the digest being `arrays_digest` of the arrays.
    """
    header = {"format_version": CACHE_FORMAT_VERSION, **header}
    if cache_file.exists():
        cached = read_cache_file(cache_file, header, _parse_cache, what="benchmark", source="the source files")
        if cached is not None:
            return cached
    decoded = decode()
    digest = arrays_digest(decoded.images, decoded.labels)
    stored = dict(header, class_names=list(decoded.class_names), sha256=digest)
    write_cache_file(cache_file, stored, decoded.images, decoded.labels, what="benchmark", source="the source files")
    return decoded, digest


def _parse_cache(header: dict[str, Any], images: np.ndarray, labels: np.ndarray) -> tuple[Decoded, str]:
    """A benchmark cache's arrays with the class names of its header (`read_cache_file` checked the rest)."""
    names = header["class_names"]
    if not all(isinstance(n, str) for n in names) or (labels.size and labels.max() >= len(names)):
        raise ValueError("the class names of the header do not match the labels")
    return Decoded(images=images, labels=labels, class_names=list(names)), header["sha256"]


def read_cache_file(
    cache_file: Path,
    expected: dict[str, Any],
    parse: Callable[[dict[str, Any], np.ndarray, np.ndarray], _T],
    *,
    what: str,
    source: str,
) -> _T | None:
    """The arrays cached in ``cache_file`` as ``parse(header, images, labels)`` makes them, or ``None`` when
    they must be rebuilt: quietly when the header does not match ``expected`` (another format version,
    setting or source), with a `RuntimeWarning` (``"{what} cache ... is corrupt; rebuilding it from
    {source}"``) when the file cannot be trusted.

    Checked here for every cache: ``uint8`` images ``[n, C, H, W]``, ``int64`` labels ``[n]`` from 0 and
    the SHA-256 of both (``header["sha256"]``, `arrays_digest`); ``parse`` checks what its dataset adds
    to the header, raising any exception for a file that does not hold it. The warning points at the
    dataset's caller: this is called by the function its constructor calls.
    """
    try:
        with np.load(cache_file, allow_pickle=False) as npz:
            header = json.loads(npz["header"].tobytes().decode("utf-8"))
            if {k: header.get(k) for k in expected} != expected:
                return None  # stale: another format version, setting or source; rebuilt quietly
            images, labels = npz["images"], npz["labels"]
        if (
            images.dtype != np.uint8
            or images.ndim != 4
            or labels.dtype != np.int64
            or labels.shape != (images.shape[0],)
            or (labels.size and labels.min() < 0)
        ):
            raise ValueError("the arrays do not match the header (shape, dtype or labels)")
        parsed = parse(header, images, labels)
        if arrays_digest(images, labels) != header["sha256"]:  # last: it reads every byte
            raise ValueError("the arrays do not match the checksum of the header")
    except Exception as exc:  # any failure to read means the file cannot be trusted
        warnings.warn(
            f"{what} cache {cache_file} is corrupt ({type(exc).__name__}: {exc}); rebuilding it from {source}",
            RuntimeWarning,
            stacklevel=4,
        )
        return None
    return parsed


def write_cache_file(
    cache_file: Path, header: dict[str, Any], images: np.ndarray, labels: np.ndarray, *, what: str, source: str
) -> None:
    """Writes ``header`` (as JSON) and the arrays to ``cache_file`` atomically (temp file + ``os.replace``);
    warns and carries on if it cannot (``"could not write the {what} cache ...; the next load will decode
    {source} again"``). The warning points at the dataset's caller, as in `read_cache_file`."""
    header_bytes = np.frombuffer(json.dumps(header, sort_keys=True).encode("utf-8"), dtype=np.uint8)
    tmp: Path | None = None
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=cache_file.parent, prefix=f".{cache_file.name}.", suffix=".tmp")
        tmp = Path(tmp_name)
        if hasattr(os, "fchmod"):
            os.fchmod(fd, default_file_mode())  # the process's normal mode, not mkstemp's 0o600
        with os.fdopen(fd, "wb") as f:
            np.savez(f, header=header_bytes, images=images, labels=labels)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, cache_file)
    except OSError as exc:
        if tmp is not None:
            with contextlib.suppress(OSError):
                tmp.unlink()
        warnings.warn(
            f"could not write the {what} cache to {cache_file} ({exc}); the next load will decode {source} "
            "again. Pass cache_dir= a writable folder to cache it",
            RuntimeWarning,
            stacklevel=4,
        )
