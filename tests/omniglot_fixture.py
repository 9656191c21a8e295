"""A tiny fake Omniglot in the exact layout of the original archives, for tests.

``images_background.zip`` / ``images_evaluation.zip``, each with its top folder and directory
entries, holding ``<top>/<Alphabet>/characterNN/<ID>_<NN>.png``: 105x105 one-bit PNGs,
IDs numbered on from the background archive into the evaluation one, as in the real data.

Every drawing of global class ``c`` is white with its top ``ink_rows(c)`` rows black (the
strokes), plus one black pixel in row 104 at column ``k`` for drawing ``k``, so that the
drawings of a class differ and the class can be read back from the ink.
"""

from __future__ import annotations

import io
import random
import zipfile
from pathlib import Path

from PIL import Image

SIZE = 105
# (alphabet, number of characters); deliberately not in sorted order
BACKGROUND = (("Latin", 3), ("Braille", 2), ("Anglo-Saxon_Futhorc", 2))
EVALUATION = (("Tengwar", 3), ("Angelic", 2))


def sorted_characters(alphabets) -> list[tuple[str, str]]:
    """(alphabet, characterNN) in the canonical order: sorted alphabets, then characters."""
    return [(a, f"character{j:02d}") for a, n in sorted(alphabets) for j in range(1, n + 1)]


def ink_rows(class_id: int) -> int:
    """Black rows at the top of every drawing of global class ``class_id``."""
    return 5 + 7 * class_id


def drawing(class_id: int, k: int) -> Image.Image:
    """Drawing ``k`` (0-based) of global class ``class_id`` as a mode "1" image."""
    image = Image.new("1", (SIZE, SIZE), 1)
    image.paste(0, (0, 0, SIZE, min(ink_rows(class_id), SIZE)))
    image.putpixel((k, SIZE - 1), 0)
    return image


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def write_archive(
    path: Path,
    top: str,
    alphabets,
    *,
    first_id: int,
    first_class: int,
    images_per_character: int = 20,
    shuffle: bool = False,
) -> int:
    """Writes one archive; returns the number of characters written.

    Characters get IDs ``first_id, first_id + 1, ...`` and global class ids
    ``first_class, ...`` in the canonical order.
    """
    entries: list[tuple[str, bytes | None]] = [(f"{top}/", None)]
    characters = sorted_characters(alphabets)
    for alphabet in sorted({a for a, _ in characters}):
        entries.append((f"{top}/{alphabet}/", None))
    for offset, (alphabet, character) in enumerate(characters):
        folder = f"{top}/{alphabet}/{character}/"
        entries.append((folder, None))
        for k in range(images_per_character):
            name = f"{folder}{first_id + offset:04d}_{k + 1:02d}.png"
            entries.append((name, png_bytes(drawing(first_class + offset, k))))
    if shuffle:
        random.Random(0).shuffle(entries)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, data in entries:
            info = zipfile.ZipInfo(name, date_time=(2015, 10, 21, 0, 0, 0))
            if data is None:
                info.external_attr = 0o40755 << 16 | 0x10
                zf.writestr(info, b"")
            else:
                info.compress_type = zipfile.ZIP_DEFLATED
                zf.writestr(info, data)
    return len(characters)


def write_omniglot(root: Path, *, images_per_character: int = 20, shuffle: bool = False) -> dict[str, Path]:
    """Writes both fake archives into ``root``; returns their paths by archive name."""
    root.mkdir(parents=True, exist_ok=True)
    background = root / "images_background.zip"
    evaluation = root / "images_evaluation.zip"
    n_background = write_archive(
        background,
        "images_background",
        BACKGROUND,
        first_id=1,
        first_class=0,
        images_per_character=images_per_character,
        shuffle=shuffle,
    )
    write_archive(
        evaluation,
        "images_evaluation",
        EVALUATION,
        first_id=n_background + 1,
        first_class=n_background,
        images_per_character=images_per_character,
        shuffle=shuffle,
    )
    return {"images_background": background, "images_evaluation": evaluation}


N_BACKGROUND = sum(n for _, n in BACKGROUND)
N_EVALUATION = sum(n for _, n in EVALUATION)
IMAGES_PER_CHARACTER = 20
