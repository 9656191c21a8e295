"""Omniglot on a generated fixture in the real layout: decoding, order, splits, cache, bad input."""

from __future__ import annotations

import json
import shutil
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from omniglot_fixture import (
    BACKGROUND,
    EVALUATION,
    IMAGES_PER_CHARACTER,
    N_BACKGROUND,
    N_EVALUATION,
    drawing,
    ink_rows,
    png_bytes,
    sorted_characters,
    write_omniglot,
)

from metalearn.tasks import omniglot as omniglot_module
from metalearn.tasks.omniglot import Omniglot, OmniglotCharacter, OmniglotFormatError

N_CLASSES = N_BACKGROUND + N_EVALUATION


@pytest.fixture(scope="module")
def archives(tmp_path_factory) -> Path:
    """A folder with both fixture zips (shared, read-only: copy it before changing anything)."""
    root = tmp_path_factory.mktemp("omniglot_zips")
    write_omniglot(root)
    return root


@pytest.fixture
def root(archives, tmp_path) -> Path:
    """A private copy of the fixture zips."""
    target = tmp_path / "omniglot"
    target.mkdir()
    for name in ("images_background.zip", "images_evaluation.zip"):
        shutil.copy2(archives / name, target / name)
    return target


@pytest.fixture(scope="module")
def reference(archives, tmp_path_factory) -> Omniglot:
    """The dataset decoded from the zips (split="all"), without a cache shared with other tests."""
    return Omniglot(archives, split="all", cache_dir=tmp_path_factory.mktemp("cache"))


def no_decoding(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("the archive was decoded, but the cache should have been used")

    monkeypatch.setattr(omniglot_module, "_decode", fail)


def assert_same(a: Omniglot, b: Omniglot) -> None:
    assert torch.equal(a.images, b.images)
    assert torch.equal(a.labels, b.labels)
    assert a.characters == b.characters


# -- decoding and order ---------------------------------------------------------------------


def test_shapes_dtypes_and_canonical_order(reference):
    data = reference
    assert len(data) == N_CLASSES * IMAGES_PER_CHARACTER
    assert data.images.dtype == torch.uint8 and data.images.shape == (len(data), 1, 28, 28)
    assert data.labels.dtype == torch.int64
    expected = [OmniglotCharacter(a, c, "images_background") for a, c in sorted_characters(BACKGROUND)]
    expected += [OmniglotCharacter(a, c, "images_evaluation") for a, c in sorted_characters(EVALUATION)]
    assert list(data.characters) == expected
    assert data.characters[0].alphabet == "Anglo-Saxon_Futhorc"  # sorted, not the order written
    assert torch.equal(data.labels, torch.arange(N_CLASSES).repeat_interleave(IMAGES_PER_CHARACTER))
    assert data.num_classes == N_CLASSES
    assert torch.equal(data.classes, torch.arange(N_CLASSES))


def test_pixels_are_ink_in_unit_range_and_follow_the_class(reference):
    x = reference.gather(torch.arange(len(reference)))
    assert x.dtype == torch.float32 and x.shape == (len(reference), 1, 28, 28)
    assert x.min() >= 0 and x.max() <= 1
    for c in range(N_CLASSES):
        mean_ink = x[reference.labels == c].mean().item()
        assert mean_ink == pytest.approx(ink_rows(c) / 105, abs=0.02), c
    # strokes (black in the PNG) are 1: the top row is ink in every drawing
    assert torch.all(x[:, 0, 0, :] > 0.9)


def test_resizing_converts_to_gray_before_lanczos(reference):
    # class 1 has 12 black rows of 105: the boundary falls inside a 28px row (105/28 = 3.75 px),
    # which a gray-level filter renders as an intermediate value; nearest-neighbour would not.
    values = torch.unique(reference.images[reference.labels == 1])
    assert ((values > 20) & (values < 235)).any()


def test_gather_get_input_and_getitem_agree(reference):
    indices = torch.tensor([0, 17, 45, len(reference) - 1])
    batch = reference.gather(indices)
    for row, i in zip(batch, indices.tolist(), strict=True):
        assert torch.equal(reference.get_input(i), row)
        x, y = reference[i]
        assert torch.equal(x, row) and y == int(reference.labels[i])
    assert torch.equal(batch, reference.images[indices].float() / 255)


def test_full_resolution_keeps_the_drawings_exactly(archives, tmp_path):
    data = Omniglot(archives, split="background", image_size=105, cache_dir=tmp_path)
    assert data.images.shape[1:] == (1, 105, 105)
    for i in (0, 21, 59):  # class i // 20, drawing i % 20
        drawn = np.asarray(drawing(i // 20, i % 20).convert("L"))
        assert np.array_equal(data.images[i, 0].numpy(), 255 - drawn)


def test_extracted_folders_and_shuffled_zips_give_the_same_dataset(reference, archives, tmp_path):
    extracted = tmp_path / "extracted"
    for name in ("images_background.zip", "images_evaluation.zip"):
        with zipfile.ZipFile(archives / name) as zf:
            zf.extractall(extracted)
    assert_same(Omniglot(extracted, cache_dir=tmp_path / "c1"), reference)
    shuffled = tmp_path / "shuffled"
    write_omniglot(shuffled, shuffle=True)
    assert_same(Omniglot(shuffled, cache_dir=tmp_path / "c2"), reference)


# -- splits -----------------------------------------------------------------------------------


def test_archive_splits_number_classes_from_zero(reference, archives, tmp_path):
    background = Omniglot(archives, split="background", cache_dir=tmp_path)
    evaluation = Omniglot(archives, split="evaluation", cache_dir=tmp_path)
    n_bg = N_BACKGROUND * IMAGES_PER_CHARACTER
    assert torch.equal(background.images, reference.images[:n_bg])
    assert torch.equal(evaluation.images, reference.images[n_bg:])
    assert torch.equal(evaluation.labels, reference.labels[n_bg:] - N_BACKGROUND)
    assert evaluation.characters == reference.characters[N_BACKGROUND:]
    assert {c.archive for c in evaluation.characters} == {"images_evaluation"}


def test_few_shot_split_takes_the_first_classes_in_canonical_order(reference):
    split = reference.few_shot_split(n_source=10)
    assert torch.equal(split.source, torch.arange(10))
    assert torch.equal(split.target, torch.arange(10, N_CLASSES))
    # the cut falls inside the second evaluation alphabet, as 1200 falls inside Gurmukhi
    assert [(c.alphabet, c.character) for c in reference.characters[9:11]] == [
        ("Tengwar", "character01"),
        ("Tengwar", "character02"),
    ]
    with pytest.raises(ValueError, match="split='all'"):
        reference.few_shot_split()  # 1200 of 12 classes


def test_background_evaluation_split(reference, archives, tmp_path):
    split = reference.background_evaluation_split()
    assert torch.equal(split.source, torch.arange(N_BACKGROUND))
    assert torch.equal(split.target, torch.arange(N_BACKGROUND, N_CLASSES))
    with pytest.raises(ValueError, match="split='all'"):
        Omniglot(archives, split="evaluation", cache_dir=tmp_path).background_evaluation_split()


def test_bad_arguments(archives, tmp_path):
    with pytest.raises(ValueError, match="split must be one of"):
        Omniglot(archives, split="train", cache_dir=tmp_path)
    with pytest.raises(ValueError, match="image_size"):
        Omniglot(archives, image_size=0, cache_dir=tmp_path)


# -- cache ------------------------------------------------------------------------------------


def cache_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_cache_is_written_atomically_in_root_and_used(root, reference, monkeypatch):
    first = Omniglot(root)
    assert cache_files(root / ".metalearn_cache") == ["images_background-28px.npz", "images_evaluation-28px.npz"]
    no_decoding(monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        second = Omniglot(root)
    assert_same(first, reference)
    assert_same(second, reference)


def test_cache_is_per_image_size(root, monkeypatch):
    Omniglot(root, split="background")
    no_decoding(monkeypatch)
    with pytest.raises(AssertionError, match="decoded"):
        Omniglot(root, split="background", image_size=14)


def test_changed_source_rebuilds_the_cache(root, tmp_path):
    Omniglot(root, split="evaluation")
    # replace the evaluation zip with one whose drawings differ (the background's, renamed)
    other = tmp_path / "other"
    other.mkdir()
    with zipfile.ZipFile(root / "images_background.zip") as src, zipfile.ZipFile(
        other / "images_evaluation.zip", "w"
    ) as dst:
        for info in src.infolist():
            dst.writestr(info.filename.replace("images_background", "images_evaluation", 1), src.read(info))
    shutil.copy(other / "images_evaluation.zip", root / "images_evaluation.zip")
    reloaded = Omniglot(root, split="evaluation")
    assert reloaded.num_classes == N_BACKGROUND
    assert reloaded.characters[0].alphabet == "Anglo-Saxon_Futhorc"


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _garbage(path: Path) -> None:
    path.write_bytes(b"not a cache at all" * 100)


def _flip_byte_in_images(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # inside the images array, the largest member
    path.write_bytes(bytes(data))


def _consistent_zip_with_wrong_content(path: Path) -> None:
    """A well-formed npz whose images were changed but whose header was kept."""
    with np.load(path, allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in npz.files}
    arrays["images"] = arrays["images"].copy()
    arrays["images"][0, 0, 0, 0] ^= 1
    with open(path, "wb") as f:
        np.savez(f, **arrays)


def _header_claims_more_images(path: Path) -> None:
    with np.load(path, allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in npz.files}
    header = json.loads(arrays["header"].tobytes())
    header["images"] += 1
    arrays["header"] = np.frombuffer(json.dumps(header).encode(), dtype=np.uint8)
    with open(path, "wb") as f:
        np.savez(f, **arrays)


@pytest.mark.parametrize(
    "damage",
    [_truncate, _garbage, _flip_byte_in_images, _consistent_zip_with_wrong_content, _header_claims_more_images],
)
def test_corrupt_cache_is_rebuilt_with_a_warning(root, reference, damage, monkeypatch):
    Omniglot(root)
    cache = root / ".metalearn_cache" / "images_evaluation-28px.npz"
    damage(cache)
    with pytest.warns(RuntimeWarning, match="corrupt.*rebuilding"):
        rebuilt = Omniglot(root)
    assert_same(rebuilt, reference)
    assert cache_files(root / ".metalearn_cache") == ["images_background-28px.npz", "images_evaluation-28px.npz"]
    no_decoding(monkeypatch)  # the rebuilt cache is whole again
    assert_same(Omniglot(root), reference)


def test_cache_warnings_point_at_the_caller(root, archives, tmp_path):
    """The shared cache reader and writer warn at the line that made the dataset, not inside metalearn."""
    Omniglot(root)
    _garbage(root / ".metalearn_cache" / "images_evaluation-28px.npz")
    with pytest.warns(RuntimeWarning, match="Omniglot cache .* is corrupt.*rebuilding it from the archive") as read:
        Omniglot(root)
    blocker = tmp_path / "a_file"
    blocker.write_text("cache_dir cannot be created below a file")
    with pytest.warns(RuntimeWarning, match="could not write the Omniglot cache") as write:
        Omniglot(archives, split="background", cache_dir=blocker / "cache")
    assert [w.filename for w in read] == [__file__]
    assert [w.filename for w in write] == [__file__]


def test_unwritable_cache_warns_and_still_loads(archives, reference, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("cache_dir cannot be created below a file")
    with pytest.warns(RuntimeWarning, match="could not write the Omniglot cache"):
        data = Omniglot(archives, cache_dir=blocker / "cache")
    assert_same(data, reference)


# -- bad input --------------------------------------------------------------------------------


def test_missing_root_names_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"does not exist.*images_background\.zip.*download=True"):
        Omniglot(tmp_path / "nowhere")
    assert not (tmp_path / "nowhere").exists()


def test_missing_archive_names_the_fix(root):
    (root / "images_evaluation.zip").unlink()
    Omniglot(root, split="background")  # the other archive is not needed for this split
    with pytest.raises(FileNotFoundError, match=r"no images_evaluation\.zip.*download=True"):
        Omniglot(root, split="evaluation")


def write_zip(path: Path, members: dict[str, bytes]) -> None:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)


def png() -> bytes:
    return png_bytes(drawing(0, 0))


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: p.write_text("this is not a zip"), r"not a readable zip.*download=True"),
        (lambda p: p.write_bytes(Path(p.with_name("good.zip")).read_bytes()[:3000]), "not a readable zip"),
        (
            lambda p: write_zip(p, {"omniglot/images_background/Latin/character01/0001_01.png": png()}),
            r"expected PNGs under images_background/.*\['omniglot/'\].*original",
        ),
        (lambda p: write_zip(p, {"images_background/readme.txt": b"hello"}), "holds no PNG images"),
        (
            lambda p: write_zip(p, {"images_background/Latin/0001_01.png": png()}),
            r"not laid out as images_background/<Alphabet>/characterNN",
        ),
        (
            lambda p: write_zip(p, {"images_background/Latin/character01/0001_01.png": b"\x89PNG garbage"}),
            r"cannot be read as a PNG.*original",
        ),
    ],
    ids=["text-file", "truncated-zip", "wrong-top-folder", "no-pngs", "wrong-depth", "bad-png"],
)
def test_archive_that_is_not_omniglot_names_the_fix(root, make, message):
    path = root / "images_background.zip"
    shutil.copy(path, root / "good.zip")
    make(path)
    with pytest.raises(OmniglotFormatError, match=message):
        Omniglot(root, split="background")
    assert cache_files(root / ".metalearn_cache") == []  # nothing half-written


def test_empty_extracted_folder_names_the_fix(tmp_path):
    (tmp_path / "images_background" / "Latin").mkdir(parents=True)
    with pytest.raises(OmniglotFormatError, match="holds no PNG images"):
        Omniglot(tmp_path, split="background")


def _damage_member(path: Path, member: str, how: str) -> None:
    """Damages one member of a zip in place: its deflate stream ("deflate") or its recorded CRC ("crc")."""
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo(member)
    if how == "deflate":
        # the local header is 30 bytes plus the name and extra field; the compressed bytes follow
        name_len = int.from_bytes(data[info.header_offset + 26 : info.header_offset + 28], "little")
        extra_len = int.from_bytes(data[info.header_offset + 28 : info.header_offset + 30], "little")
        start = info.header_offset + 30 + name_len + extra_len
        data[start : start + 8] = b"\xff" * 8  # block type 3 does not exist: zlib fails
    else:
        # the central directory's CRC of this member (zipfile checks the bytes against it)
        name_at = data.rindex(member.encode())  # the last copy of the name is the central directory's
        crc_at = name_at - 46 + 16
        assert data[crc_at - 16 : crc_at - 12] == b"PK\x01\x02"
        data[crc_at : crc_at + 4] = bytes(b ^ 0xFF for b in data[crc_at : crc_at + 4])
    path.write_bytes(data)


@pytest.mark.parametrize("how", ["deflate", "crc"])
def test_a_corrupted_member_names_the_archive_and_member_and_how_to_refetch(root, how):
    archive = root / "images_background.zip"
    member = "images_background/Braille/character02/0004_03.png"
    _damage_member(archive, member, how)
    damaged = archive.read_bytes()
    with pytest.raises(OmniglotFormatError) as info:
        Omniglot(root, split="background")
    message = str(info.value)
    assert f"member {member!r} of the archive {archive}" in message and "is corrupt" in message
    assert {"deflate": "zlib", "crc": "CRC"}[how].lower() in message.lower()
    assert f"Delete {archive} and load again with download=True" in message
    assert archive.read_bytes() == damaged and cache_files(root / ".metalearn_cache") == []


def test_the_cache_gets_the_process_default_mode(root):
    import os
    import stat

    old = os.umask(0o027)
    try:
        Omniglot(root, split="background")
    finally:
        os.umask(old)
    cache = root / ".metalearn_cache" / "images_background-28px.npz"
    assert stat.S_IMODE(cache.stat().st_mode) == 0o640
