"""Tiny fakes of the few-shot benchmarks, each in the exact on-disk form the loaders read.

Every image encodes where it comes from, so a test can read its class back from the pixels:
channel 0 holds a per-class value, channel 1 the image's number within its class.
"""

from __future__ import annotations

import csv
import io
import json
import pickle
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

from metalearn.tasks.benchmark import published_split

# -- CIFAR-100 (python version) ----------------------------------------------------------------

COARSE_OF: dict[str, str] = published_split("cifar100_coarse")["coarse_of"]
FINE_NAMES = sorted(COARSE_OF)  # the official meta lists the fine classes in alphabetical order
COARSE_NAMES = sorted(set(COARSE_OF.values()))  # likewise the superclasses


def cifar_value(fine_id: int) -> int:
    """Channel-0 value of every image of fine class ``fine_id``."""
    return 2 * fine_id + 1


def _cifar_part(per_class: int, offset: int) -> dict[bytes, object]:
    """A ``train`` or ``test`` pickle's dict, with bytes keys as Python 2's cPickle wrote them."""
    rows, fine, coarse = [], [], []
    # interleave the classes, as the real files do (images are not grouped by class there)
    for k in range(per_class):
        for fid, name in enumerate(FINE_NAMES):
            image = np.zeros((3, 32, 32), dtype=np.uint8)
            image[0] = cifar_value(fid)
            image[1] = offset + k
            image[2, 0, 0] = 7
            rows.append(image.reshape(-1))
            fine.append(fid)
            coarse.append(COARSE_NAMES.index(COARSE_OF[name]))
    return {b"data": np.stack(rows), b"fine_labels": fine, b"coarse_labels": coarse, b"batch_label": b"fake"}


def cifar_members(train_per_class: int = 2, test_per_class: int = 1) -> dict[str, bytes]:
    """The pickled ``train``, ``test`` and ``meta`` files (protocol 2, as the real archive's)."""
    meta = {
        b"fine_label_names": [n.encode() for n in FINE_NAMES],
        b"coarse_label_names": [n.encode() for n in COARSE_NAMES],
    }
    parts = {
        "train": _cifar_part(train_per_class, 0),
        "test": _cifar_part(test_per_class, train_per_class),
        "meta": meta,
    }
    return {name: pickle.dumps(obj, protocol=2) for name, obj in parts.items()}


def write_cifar_archive(root: Path, **kwargs) -> Path:
    """``root/cifar-100-python.tar.gz`` holding ``cifar-100-python/{train,test,meta}``."""
    root.mkdir(parents=True, exist_ok=True)
    path = root / "cifar-100-python.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        for name, data in cifar_members(**kwargs).items():
            info = tarfile.TarInfo(f"cifar-100-python/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def write_cifar_folder(root: Path, **kwargs) -> Path:
    """The folder the archive extracts to: ``root/cifar-100-python/{train,test,meta}``."""
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    for name, data in cifar_members(**kwargs).items():
        (folder / name).write_bytes(data)
    return folder


# -- mini-ImageNet -----------------------------------------------------------------------------


def image_value(class_index: int) -> int:
    """Channel-0 value of the images of class ``class_index`` (channel 2 is ``128 + class_index // 256``)."""
    return class_index % 256


def rgb_image(class_index: int, k: int, size: tuple[int, int] = (84, 84)) -> np.ndarray:
    """``uint8 [H, W, 3]``: channel 0 = ``image_value(class_index)``, 1 = ``k``, 2 = ``128 + class_index // 256``."""
    image = np.empty((*size, 3), dtype=np.uint8)
    image[..., 0], image[..., 1], image[..., 2] = image_value(class_index), k, 128 + class_index // 256
    return image


def write_mini_pickle(root: Path, pool: str, per_class: int = 2, *, classes: list[str] | None = None) -> Path:
    """``mini-imagenet-cache-<pool>.pkl``: {'image_data': [N, 84, 84, 3] uint8, 'class_dict': {wnid: [i]}}."""
    classes = list(published_split("mini_imagenet")[pool]) if classes is None else classes
    n = len(classes) * per_class
    images = np.empty((n, 84, 84, 3), dtype=np.uint8)
    class_dict: dict[str, list[int]] = {}
    for k in range(per_class):  # interleaved, so class_dict is what groups them
        for c, wnid in enumerate(classes):
            i = k * len(classes) + c
            images[i] = rgb_image(c, k)
            class_dict.setdefault(wnid, []).append(i)
    root.mkdir(parents=True, exist_ok=True)
    path = root / f"mini-imagenet-cache-{pool}.pkl"
    with open(path, "wb") as f:
        pickle.dump({"image_data": images, "class_dict": class_dict}, f, protocol=4)
    return path


def write_mini_csv(root: Path, pool: str, per_class: int = 2, *, nested: bool = False, size=(84, 84)) -> Path:
    """``<pool>.csv`` (``filename,label``) and ``images/<file>`` PNGs (``images/<wnid>/<file>`` if nested)."""
    classes = published_split("mini_imagenet")[pool]
    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    rows = []
    for c, wnid in enumerate(classes):
        for k in range(per_class):
            name = f"{wnid}{k + 1:08d}.png"
            folder = images / wnid if nested else images
            folder.mkdir(exist_ok=True)
            Image.fromarray(rgb_image(c, k, size)).save(folder / name)
            rows.append((name, wnid))
    path = root / f"{pool}.csv"
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["filename", "label"])
        writer.writerows(rows[::-1])  # not grouped in list order: the loader groups them
    return path


# -- tiered-ImageNet ---------------------------------------------------------------------------


def png_array(image: np.ndarray) -> np.ndarray:
    """The PNG of ``image`` as a 1-D uint8 array, as ``cv2.imencode`` gives it."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return np.frombuffer(buffer.getvalue(), dtype=np.uint8).copy()


def write_tiered(root: Path, pool: str, per_class: int = 2, *, py2_keys: bool = False, names=None) -> None:
    """``<pool>_images_png.pkl`` (list of PNG arrays) and ``<pool>_labels.pkl`` (the label dict).

    Classes are numbered in reverse of the published list, and the categories are made up (two
    per split), so nothing depends on the published order.
    """
    names = list(published_split("tiered_imagenet")[pool])[::-1] if names is None else names
    categories = [f"{pool}-category-{j}" for j in range(2)]
    encoded, specific, general = [], [], []
    for k in range(per_class):
        for c, _ in enumerate(names):
            encoded.append(png_array(rgb_image(c, k)))
            specific.append(c)
            general.append(c % 2)
    labels = {
        "label_specific": np.asarray(specific, dtype=np.int32),
        "label_general": np.asarray(general, dtype=np.int32),
        "label_specific_str": names,
        "label_general_str": categories,
    }
    if py2_keys:
        labels = {k.encode(): v for k, v in labels.items()}
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f"{pool}_images_png.pkl", "wb") as f:
        pickle.dump(encoded, f, protocol=2)
    with open(root / f"{pool}_labels.pkl", "wb") as f:
        pickle.dump(labels, f, protocol=2)


# -- CUB-200-2011 ------------------------------------------------------------------------------


def cub_classes() -> list[str]:
    split = published_split("cub")
    return sorted(split["train"] + split["val"] + split["test"])


def _jpeg(value: int, k: int, size: tuple[int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rgb_image(value, k, size)).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def cub_value(class_name: str) -> int:
    """Channel-0 value of the images of a CUB class: its number (``"042.X"`` -> 42)."""
    return int(class_name.split(".")[0])


def cub_files(per_class: int = 2) -> dict[str, bytes]:
    """``CUB_200_2011/images/<class>/<file>.jpg`` -> JPEG bytes; sizes differ, as in the real data.

    Channel 0 of class ``"NNN.Name"`` is ``NNN`` (`cub_value`), channel 2 is 128."""
    files = {}
    for name in cub_classes():
        for k in range(per_class):
            size = (40 + 3 * k, 50 + (cub_value(name) % 7))
            species = name.split(".", 1)[1]
            path = f"CUB_200_2011/images/{name}/{species}_{k:04d}_{cub_value(name)}.jpg"
            files[path] = _jpeg(cub_value(name), k, size)
    return files


def write_cub_archive(root: Path, per_class: int = 2) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    path = root / "CUB_200_2011.tgz"
    with tarfile.open(path, "w:gz") as tar:
        for name in ("CUB_200_2011", "CUB_200_2011/images"):
            info = tarfile.TarInfo(name)
            info.type = tarfile.DIRTYPE
            tar.addfile(info)
        for name, data in cub_files(per_class).items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        readme = json.dumps({"fake": True}).encode()
        info = tarfile.TarInfo("CUB_200_2011/README")
        info.size = len(readme)
        tar.addfile(info, io.BytesIO(readme))
    return path


def write_cub_folder(root: Path, per_class: int = 2) -> Path:
    for name, data in cub_files(per_class).items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return root / "CUB_200_2011"
