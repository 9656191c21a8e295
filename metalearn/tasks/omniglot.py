"""Omniglot (Lake, Salakhutdinov & Tenenbaum, 2015): 1623 handwritten characters, 20 drawings each.

The data comes as two archives, ``images_background.zip`` (30 alphabets, 964 characters)
and ``images_evaluation.zip`` (20 alphabets, 659 characters), laid out as
``images_background/<Alphabet>/characterNN/<ID>_<NN>.png`` (105x105 one-bit PNGs).

`Omniglot` decodes a split once into a single ``uint8`` tensor and keeps it in memory;
`Omniglot.gather` is then one indexing operation. The decoded archives are cached on disk
(one ``.npz`` file per archive, read without pickle), so a later load takes well under a
second.

Pixel convention: values are ink coverage in ``[0, 1]``, 1 on the strokes and 0 on the
paper (the PNGs store black strokes on white; we store ``1 - gray``, as MAML and ProtoNets
do). Each 105x105 one-bit image is converted to 8-bit gray and resized with Pillow's
LANCZOS filter, as in MAML's preprocessing (Finn et al., 2017). The conversion to gray comes
first because Pillow resizes one-bit images with nearest-neighbour sampling whatever filter
is asked for.

Class ids follow the canonical order: characters of ``images_background`` first, then those
of ``images_evaluation``; within an archive, alphabets in sorted order (Python string order,
which is the C locale's for these ASCII names), then ``characterNN`` folders in order. A
dataset of one archive (``split="background"`` or ``"evaluation"``) numbers its own classes
from 0 in that order; with ``split="all"`` the evaluation ids follow on from 964.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import zipfile
import zlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

import numpy as np
import torch
from torch import Tensor

from metalearn.tasks.benchmark import arrays_digest, cache_folder, read_cache_file, write_cache_file
from metalearn.tasks.datasets import LabelledDataset, StoredInputs, select_rows, uint8_to_unit
from metalearn.tasks.download import download_file
from metalearn.tasks.splits import ClassSplit

__all__ = [
    "OMNIGLOT_ARCHIVES",
    "Omniglot",
    "OmniglotCharacter",
    "OmniglotFormatError",
    "RemoteFile",
]

CACHE_FORMAT_VERSION = 1
_ARCHIVE_NAMES = ("images_background", "images_evaluation")
_SPLITS = {
    "background": ("images_background",),
    "evaluation": ("images_evaluation",),
    "all": _ARCHIVE_NAMES,
}
# <Alphabet>/characterNN/<ID>_<NN>.png, relative to the archive's top folder
_PNG_PATH = re.compile(r"^(?P<alphabet>[^/]+)/(?P<character>character\d+)/(?P<file>\d+_\d+\.png)$")
_ORIGINALS = "https://github.com/brendenlake/omniglot/tree/master/python"


@dataclass(frozen=True)
class RemoteFile:
    """Where a file can be downloaded from, and how to verify it.

    Attributes:
        url: ``https://`` address.
        checksum: ``(hashlib algorithm, hex digest)`` of the file's bytes.
        size: exact size in bytes, or ``None`` if unknown.
    """

    url: str
    checksum: tuple[str, str]
    size: int | None = None


# The original archives of github.com/brendenlake/omniglot (python/ folder). Their sha256 is not
# recorded here because it could not be computed where this was written; the md5 and size are
# the published ones. md5 is no defence against a deliberate forgery, but together with the exact
# size it catches corrupted and truncated transfers, and the files come over HTTPS.
OMNIGLOT_ARCHIVES: Mapping[str, RemoteFile] = MappingProxyType(
    {
        "images_background": RemoteFile(
            url="https://raw.githubusercontent.com/brendenlake/omniglot/master/python/images_background.zip",
            checksum=("md5", "68d2efa1b9178cc56df9314c21c6e718"),
            size=9_464_212,
        ),
        "images_evaluation": RemoteFile(
            url="https://raw.githubusercontent.com/brendenlake/omniglot/master/python/images_evaluation.zip",
            checksum=("md5", "6b91aef0f799c5bb55b94e3f2daec811"),
            size=6_462_886,
        ),
    }
)


class OmniglotFormatError(ValueError):
    """A file or folder that should hold Omniglot does not (wrong layout, not a zip, bad PNG)."""


@dataclass(frozen=True)
class OmniglotCharacter:
    """What one class is.

    Attributes:
        alphabet: alphabet folder name, e.g. ``"Latin"``.
        character: character folder name, e.g. ``"character01"``.
        archive: ``"images_background"`` or ``"images_evaluation"``.
    """

    alphabet: str
    character: str
    archive: str


@dataclass
class _Decoded:
    """One archive, decoded: images ``uint8 [n, 1, s, s]``, labels ``int64 [n]`` from 0."""

    images: np.ndarray
    labels: np.ndarray
    characters: list[tuple[str, str]]


class Omniglot(LabelledDataset):
    """The Omniglot characters as an in-memory `LabelledDataset`.

    ``root`` holds the original ``images_background.zip`` and ``images_evaluation.zip``
    (from https://github.com/brendenlake/omniglot/tree/master/python), or the folders they
    extract to (``images_background/``, ``images_evaluation/``). When both a zip and its
    folder are present, the zip is read.

    Args:
        root: folder with the archives.
        split: ``"background"`` (964 classes), ``"evaluation"`` (659) or ``"all"`` (1623;
            the pool that the standard few-shot split, `few_shot_split`, is made over).
        download: fetch archives missing from ``root`` (over HTTPS, verified against the
            known size and checksum, written atomically).
        cache_dir: where the decoded arrays are cached; default ``root/.metalearn_cache``.
        image_size: side length of the square images (105 keeps the original resolution).
        sources: where ``download`` fetches each archive from, by archive name; default
            `OMNIGLOT_ARCHIVES` (a mirror, or a local server in tests, goes here).

    Attributes:
        images: ``uint8`` tensor ``[n, 1, image_size, image_size]`` (ink, 0..255).
        labels: ``int64`` tensor ``[n]`` of class ids in the canonical order.
        characters: ``characters[c]`` describes class ``c`` (`OmniglotCharacter`).

    Raises:
        FileNotFoundError: an archive is missing and ``download`` is false.
        OmniglotFormatError: an archive is not a zip, or does not have Omniglot's layout.
        metalearn.tasks.download.DownloadError: a download failed verification or broke off.

    Example::

        data = Omniglot("data/omniglot", split="all")
        split = data.few_shot_split()          # 1200 source / 423 target characters
    """

    #: where the files are does not change the items (their contents enter `describe` as a digest)
    describe_skip = ("root", "cache_dir")

    def __init__(
        self,
        root: str | os.PathLike,
        *,
        split: str = "all",
        download: bool = False,
        cache_dir: str | os.PathLike | None = None,
        image_size: int = 28,
        sources: Mapping[str, RemoteFile] | None = None,
    ) -> None:
        if split not in _SPLITS:
            raise ValueError(f"split must be one of {sorted(_SPLITS)}, got {split!r}")
        if not isinstance(image_size, int) or image_size < 1:
            raise ValueError(f"image_size must be a positive int, got {image_size!r}")
        self.root = Path(root)
        self.split = split
        self.image_size = image_size
        self.cache_dir = cache_folder(self.root, cache_dir)
        sources = OMNIGLOT_ARCHIVES if sources is None else sources

        parts: list[_Decoded] = []
        characters: list[OmniglotCharacter] = []
        for name in _SPLITS[split]:
            source = _locate(self.root, name, download=download, sources=sources)
            decoded = _load_archive(source, name, image_size, self.cache_dir)
            parts.append(decoded)
            characters.extend(OmniglotCharacter(a, c, name) for a, c in decoded.characters)

        offsets = np.cumsum([0] + [len(p.characters) for p in parts[:-1]])
        labels = np.concatenate([p.labels + off for p, off in zip(parts, offsets, strict=True)])
        images = parts[0].images if len(parts) == 1 else np.concatenate([p.images for p in parts])
        self.images: Tensor = torch.from_numpy(images)
        self.labels = torch.from_numpy(labels)
        self.characters: tuple[OmniglotCharacter, ...] = tuple(characters)

    @property
    def num_classes(self) -> int:
        """Number of characters (classes) in this split."""
        return len(self.characters)

    def get_input(self, index: int) -> Tensor:
        """Image ``index`` as ``float32 [1, image_size, image_size]`` in ``[0, 1]``."""
        return uint8_to_unit(self.images[index])

    def gather(self, indices: Tensor) -> Tensor:
        """Images at ``indices`` as ``float32 [k, 1, image_size, image_size]`` in ``[0, 1]``."""
        return uint8_to_unit(select_rows(self.images, indices))

    def stored_inputs(self) -> StoredInputs:
        """The ``uint8`` images and their decoding to ``[0, 1]`` (what `gather` does)."""
        return self.images, uint8_to_unit

    def few_shot_split(self, n_source: int = 1200) -> ClassSplit:
        """The standard few-shot split: the first ``n_source`` classes are the source pool,
        the rest the target pool.

        On ``split="all"`` with the default 1200 this is the split of Vinyals et al. (2016),
        "Matching Networks for One Shot Learning", as distributed with ProtoNets (Snell et
        al., 2017, ``splits/vinyals``): its 423 test characters are
        ``Gurmukhi/character42``-``45`` and the 12 evaluation alphabets after Gurmukhi, which
        are exactly the last 423 characters in the canonical order. MAML (Finn et al., 2017)
        uses the same sizes (1200 meta-training / 423 meta-test characters) but draws its
        1200 by shuffling the folder list with Python's ``random.seed(1)``, an order that
        depends on the file system; it is not reproduced here. Vinyals et al. further split
        the 1200 into 1028 training and 172 validation characters, and augment every pool
        with rotations by multiples of 90 degrees (new classes); both are left to the caller.

        Args:
            n_source: number of source classes (the first ones in the canonical order).

        Returns:
            `ClassSplit` with ``source = 0..n_source-1`` and ``target`` the rest.
        """
        if not 0 < n_source < self.num_classes:
            raise ValueError(
                f"n_source must be between 1 and {self.num_classes - 1} (this split has "
                f"{self.num_classes} classes), got {n_source}; the standard 1200/423 split is made over "
                "all 1623 characters: load Omniglot(root, split='all')"
            )
        classes = torch.arange(self.num_classes)
        return ClassSplit(source=classes[:n_source], target=classes[n_source:])

    def background_evaluation_split(self) -> ClassSplit:
        """The official split of Lake et al. (2015): background characters (964) as the
        source pool, evaluation characters (659) as the target pool. Needs ``split="all"``."""
        if self.split != "all":
            raise ValueError(
                f"background_evaluation_split needs both archives, but this dataset is split={self.split!r}; "
                "load Omniglot(root, split='all')"
            )
        archive = [c.archive for c in self.characters]
        ids = torch.arange(self.num_classes)
        background = torch.tensor([a == "images_background" for a in archive])
        return ClassSplit(source=ids[background], target=ids[~background])

    def __repr__(self) -> str:
        return (
            f"Omniglot(root={str(self.root)!r}, split={self.split!r}, image_size={self.image_size}, "
            f"images={len(self)}, classes={self.num_classes})"
        )


# -- finding and downloading the archives ----------------------------------------------------


def _locate(root: Path, name: str, *, download: bool, sources: Mapping[str, RemoteFile]) -> Path:
    """The zip (preferred) or extracted folder of archive ``name`` in ``root``; downloads it if allowed."""
    zip_path, folder = root / f"{name}.zip", root / name
    if zip_path.is_file():
        return zip_path
    if folder.is_dir():
        return folder
    if download:
        if name not in sources:
            raise KeyError(
                f"sources has no entry for {name!r}; give a RemoteFile for each of {_ARCHIVE_NAMES}"
            )
        remote = sources[name]
        return download_file(remote.url, zip_path, checksum=remote.checksum, expected_size=remote.size)
    where = "does not exist" if not root.exists() else f"has no {name}.zip and no {name}/ folder"
    raise FileNotFoundError(
        f"Omniglot: {root} {where}. Put the original {name}.zip (from {_ORIGINALS}) in {root}, "
        "or pass download=True to fetch it"
    )


# -- reading the PNGs ------------------------------------------------------------------------

PngEntries = list[tuple[str, str, str, Callable[[], bytes]]]  # (alphabet, character, file, read)


def _zip_entries(path: Path, name: str, zf: zipfile.ZipFile) -> PngEntries:
    entries: PngEntries = []
    top = f"{name}/"
    other_tops: set[str] = set()
    for info in zf.infolist():
        member = info.filename
        if info.is_dir() or not member.lower().endswith(".png") or member.startswith("__MACOSX/"):
            continue
        if not member.startswith(top):
            other_tops.add(member.split("/", 1)[0] + "/" if "/" in member else member)
            continue
        match = _PNG_PATH.match(member[len(top) :])
        if match is None:
            raise OmniglotFormatError(
                f"{path}: {member!r} is not laid out as {name}/<Alphabet>/characterNN/<ID>_<NN>.png; "
                f"this is not the original Omniglot archive: use {name}.zip from {_ORIGINALS}"
            )
        entries.append((match["alphabet"], match["character"], match["file"], _reader(zf, member)))
    if not entries:
        found = f"its PNGs are under {sorted(other_tops)[:3]}" if other_tops else "it holds no PNG images"
        raise OmniglotFormatError(
            f"{path} is not Omniglot's {name}.zip: expected PNGs under {top}, but {found}. "
            f"Use the original {name}.zip from {_ORIGINALS} (or download=True after removing this file)"
        )
    return entries


def _reader(zf: zipfile.ZipFile, member: str) -> Callable[[], bytes]:
    return lambda: zf.read(member)


def _walk_pngs(folder: Path) -> Iterator[os.DirEntry]:
    """Every ``*.png`` file below ``folder`` (``os.scandir``: far fewer system calls than ``rglob``)."""
    stack = [str(folder)]
    while stack:
        with os.scandir(stack.pop()) as it:
            for entry in it:
                if entry.name.startswith("."):
                    continue  # hidden files, e.g. macOS "._name.png" resource forks
                if entry.is_dir(follow_symlinks=True):
                    stack.append(entry.path)
                elif entry.name.lower().endswith(".png") and entry.is_file():
                    yield entry


def _folder_entries(folder: Path, name: str) -> PngEntries:
    entries: PngEntries = []
    for entry in _walk_pngs(folder):
        path = Path(entry.path)
        relative = path.relative_to(folder).as_posix()
        match = _PNG_PATH.match(relative)
        if match is None:
            raise OmniglotFormatError(
                f"{path} is not laid out as {name}/<Alphabet>/characterNN/<ID>_<NN>.png; "
                f"extract the original {name}.zip from {_ORIGINALS} into {folder.parent}"
            )
        entries.append((match["alphabet"], match["character"], match["file"], path.read_bytes))
    if not entries:
        raise OmniglotFormatError(
            f"{folder} holds no PNG images in Omniglot's layout "
            f"({name}/<Alphabet>/characterNN/<ID>_<NN>.png); "
            f"extract the original {name}.zip from {_ORIGINALS} there, or remove the folder"
        )
    return entries


@contextlib.contextmanager
def _open_entries(source: Path, name: str) -> Iterator[PngEntries]:
    """The PNG entries of a zip or a folder, sorted in the canonical order."""
    if source.is_dir():
        yield sorted(_folder_entries(source, name), key=lambda e: e[:3])
        return
    try:
        zf = zipfile.ZipFile(source)
    except (zipfile.BadZipFile, OSError) as exc:
        raise OmniglotFormatError(
            f"{source} is not a readable zip file ({exc}); it may be truncated or something else. "
            f"Delete it and pass download=True, or put the original {name}.zip from {_ORIGINALS} there"
        ) from exc
    with zf:
        yield sorted(_zip_entries(source, name, zf), key=lambda e: e[:3])


def _pillow():
    try:
        from PIL import Image
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "decoding Omniglot needs Pillow: pip install 'torch-metalearn[vision]' (or pip install Pillow)"
        ) from exc
    return Image


def _refetch_advice(source: Path, name: str) -> str:
    """How to get an intact copy, as a sentence."""
    if source.is_dir():
        return f"Extract the original {name}.zip from {_ORIGINALS} into {source.parent} again"
    return (
        f"Delete {source} and load again with download=True to fetch it afresh (or put the original "
        f"{name}.zip from {_ORIGINALS} there)"
    )


def _read_member(read: Callable[[], bytes], source: Path, name: str, member: str) -> bytes:
    """The bytes of one PNG; a damaged zip member (bad CRC, broken deflate stream) names archive and member."""
    try:
        return read()
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as exc:
        if source.is_dir():
            what = f"file {source / member.split('/', 1)[1]}"
        else:
            what = f"member {member!r} of the archive {source}"
        kind = "zlib.error" if isinstance(exc, zlib.error) else type(exc).__name__
        raise OmniglotFormatError(
            f"{what} is corrupt ({kind}: {exc}); the archive was damaged on disk or in "
            f"transfer. {_refetch_advice(source, name)}"
        ) from exc


def _decode(source: Path, name: str, image_size: int) -> _Decoded:
    Image = _pillow()
    with _open_entries(source, name) as entries:
        images = np.empty((len(entries), 1, image_size, image_size), dtype=np.uint8)
        labels = np.empty(len(entries), dtype=np.int64)
        characters: list[tuple[str, str]] = []
        for i, (alphabet, character, file, read) in enumerate(entries):
            if not characters or characters[-1] != (alphabet, character):
                characters.append((alphabet, character))
            labels[i] = len(characters) - 1
            where = f"{source}: {alphabet}/{character}/{file}"
            data = _read_member(read, source, name, f"{name}/{alphabet}/{character}/{file}")
            try:
                with Image.open(io.BytesIO(data)) as im:
                    gray = im.convert("L")  # before resizing: mode "1" would be resized nearest-neighbour
            except (OSError, ValueError) as exc:
                raise OmniglotFormatError(
                    f"{where} cannot be read as a PNG ({exc}); the archive is damaged. "
                    f"{_refetch_advice(source, name)}"
                ) from exc
            if gray.size != (image_size, image_size):
                gray = gray.resize((image_size, image_size), Image.Resampling.LANCZOS)
            images[i, 0] = 255 - np.asarray(gray, dtype=np.uint8)
    return _Decoded(images=images, labels=labels, characters=characters)


# -- the cache -------------------------------------------------------------------------------


def _fingerprint(source: Path) -> dict:
    """What identifies the source's content cheaply: size and mtime of a zip, or of a folder's PNGs."""
    if source.is_dir():
        n_files = total = latest = 0
        for entry in _walk_pngs(source):
            st = entry.stat()
            n_files, total, latest = n_files + 1, total + st.st_size, max(latest, st.st_mtime_ns)
        return {"kind": "folder", "files": n_files, "bytes": total, "mtime_ns": latest}
    st = source.stat()
    return {"kind": "zip", "bytes": st.st_size, "mtime_ns": st.st_mtime_ns}


def _header(name: str, image_size: int, fingerprint: dict) -> dict:
    return {
        "format_version": CACHE_FORMAT_VERSION,
        "archive": name,
        "image_size": image_size,
        "resample": "gray-then-lanczos",
        "pixels": "ink = 255 - gray",
        "source": fingerprint,
    }


def _load_archive(source: Path, name: str, image_size: int, cache_dir: Path) -> _Decoded:
    """The decoded archive, from the cache when it is valid, else decoded and cached."""
    cache_file = cache_dir / f"{name}-{image_size}px.npz"
    expected = _header(name, image_size, _fingerprint(source))
    if cache_file.exists():
        decoded = read_cache_file(cache_file, expected, _parse_cache, what="Omniglot", source="the archive")
        if decoded is not None:
            return decoded
    decoded = _decode(source, name, image_size)
    header = dict(
        expected,
        images=int(decoded.images.shape[0]),
        characters=[list(c) for c in decoded.characters],
        sha256=arrays_digest(decoded.images, decoded.labels),
    )
    write_cache_file(cache_file, header, decoded.images, decoded.labels, what="Omniglot", source="the archive")
    return decoded


def _parse_cache(header: dict, images: np.ndarray, labels: np.ndarray) -> _Decoded:
    """An Omniglot cache's arrays with the characters of its header (`read_cache_file` checked the rest)."""
    n, size = header["images"], header["image_size"]
    characters = [tuple(c) for c in header["characters"]]
    if (
        images.shape != (n, 1, size, size)
        or not all(len(c) == 2 and all(isinstance(s, str) for s in c) for c in characters)
        or (n and labels.max() >= len(characters))
    ):
        raise ValueError("the arrays do not match the header (shape or characters)")
    return _Decoded(images=images, labels=labels, characters=characters)
