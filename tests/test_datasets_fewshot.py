"""The few-shot benchmarks: published splits, each on-disk form, the cache, and the errors.

Every fixture is built here, in the exact form the loaders read (tests/fewshot_fixtures.py);
nothing is downloaded except from a loopback server.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import warnings

import numpy as np
import pytest
import torch
from fewshot_fixtures import (
    COARSE_OF,
    FINE_NAMES,
    cifar_value,
    cub_value,
    image_value,
    write_cifar_archive,
    write_cifar_folder,
    write_cub_archive,
    write_cub_folder,
    write_mini_csv,
    write_mini_pickle,
    write_tiered,
)
from PIL import Image
from test_download import LoopbackServer

import metalearn
from metalearn.tasks import (
    CIFAR100_ARCHIVE,
    CIFARFS,
    CUB,
    FC100,
    BenchmarkFormatError,
    EpisodicTaskSet,
    MiniImageNet,
    RemoteFile,
    TieredImageNet,
    published_split,
)
from metalearn.tasks.benchmark import arrays_digest, safe_unpickle
from metalearn.tasks.download import ChecksumMismatchError

# -- the published lists -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "sizes"),
    [
        ("mini_imagenet", (64, 16, 20)),
        ("tiered_imagenet", (351, 97, 160)),
        ("cifar_fs", (64, 16, 20)),
        ("fc100", (12, 4, 4)),
        ("cub", (100, 50, 50)),
    ],
)
def test_published_lists_have_the_papers_sizes_and_are_disjoint(name, sizes):
    split = published_split(name)
    pools = [split[p] for p in ("train", "val", "test")]
    assert tuple(len(p) for p in pools) == sizes
    assert len(set().union(*pools)) == sum(sizes)  # no class in two pools, none twice
    assert "github.com/" in split["source"]  # each names where it was copied from


def test_published_lists_hold_the_known_classes():
    mini = published_split("mini_imagenet")
    assert "n01532829" in mini["train"] and "n01855672" in mini["val"] and "n01930112" in mini["test"]
    tiered = published_split("tiered_imagenet")
    assert "Yorkshire terrier" in tiered["train"] and "golden retriever" in tiered["val"]
    assert "Siberian husky" in tiered["test"] and "lemon" in tiered["test"]
    cfs = published_split("cifar_fs")
    assert {"dolphin", "tank"} <= set(cfs["train"]) and "beaver" in cfs["val"] and "whale" in cfs["test"]
    fc = published_split("fc100")
    assert set(fc["test"]) == {"aquatic_mammals", "insects", "medium_mammals", "people"}
    cub = published_split("cub")
    assert cub["train"][0] == "001.Black_footed_Albatross" and cub["val"][0] == "002.Laysan_Albatross"
    assert cub["test"][-1] == "200.Common_Yellowthroat"
    # Chen et al.'s rule: class i (1-based) is train if i is odd, val if i % 4 == 2, test if i % 4 == 0
    for pool, rule in (("train", lambda i: i % 2 == 1), ("val", lambda i: i % 4 == 2), ("test", lambda i: i % 4 == 0)):
        assert all(rule(int(c.split(".")[0])) for c in cub[pool])


def test_cifar100_lists_cover_every_class_once():
    assert len(COARSE_OF) == 100 and len(set(COARSE_OF.values())) == 20
    fc = published_split("fc100")
    for pool, n in (("train", 60), ("val", 20), ("test", 20)):
        assert sum(COARSE_OF[f] in fc[pool] for f in COARSE_OF) == n  # 5 fine classes per superclass


def test_cifar100_checksum_is_the_published_one():
    remote = CIFAR100_ARCHIVE["cifar-100-python.tar.gz"]
    assert remote.checksum == ("md5", "eb9058c3a382ffc7106e4002c42a8d85")  # torchvision's CIFAR100.tgz_md5
    assert remote.url.startswith("https://www.cs.toronto.edu/~kriz/")


def test_benchmarks_are_exported():
    for name in ("MiniImageNet", "TieredImageNet", "CIFARFS", "FC100", "CUB"):
        assert getattr(metalearn, name) is getattr(metalearn.tasks, name)


# -- CIFAR-FS and FC100 ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar")
    write_cifar_archive(root)
    return root


def _check_cifar_images(data, names):
    # every image of class c carries its fine class in channel 0; 2 train + 1 test image each
    assert data.images.dtype == torch.uint8 and tuple(data.images.shape[1:]) == (3, 32, 32)
    assert torch.bincount(data.labels).tolist() == [3] * len(names)
    for c, name in enumerate(names):
        mine = data.images[data.labels == c]
        assert (mine[:, 0] == cifar_value(FINE_NAMES.index(name))).all()
        assert sorted(mine[:, 1, 0, 0].tolist()) == [0, 1, 2]  # the archive's train images, then its test image
    assert (data.images[:, 2, 0, 0] == 7).all()  # channel order kept (R, G, B planes of each row)


@pytest.mark.parametrize(("split", "n"), [("train", 64), ("val", 16), ("test", 20)])
def test_cifar_fs_splits(cifar_root, tmp_path, split, n):
    data = CIFARFS(cifar_root, split=split, cache_dir=tmp_path)
    assert data.num_classes == n and list(data.class_names) == published_split("cifar_fs")[split]
    _check_cifar_images(data, data.class_names)
    x = data.gather(torch.tensor([0, 1]))
    assert x.dtype == torch.float32 and x.shape == (2, 3, 32, 32) and 0 <= x.min() and x.max() <= 1


def test_cifar_fs_all_gives_the_three_pools(cifar_root, tmp_path):
    data = CIFARFS(cifar_root, split="all", cache_dir=tmp_path)
    split = data.few_shot_split()
    assert (split.source.numel(), split.validation.numel(), split.target.numel()) == (64, 16, 20)
    assert [data.class_names[i] for i in split.target.tolist()] == published_split("cifar_fs")["test"]
    tasks = EpisodicTaskSet(data, ways=5, shots=1, queries=2, classes=split.target, seed=0, length=3)
    assert tasks[0].train[0].shape == (5, 3, 32, 32)


@pytest.mark.parametrize(("split", "n", "supers"), [("train", 60, 12), ("val", 20, 4), ("test", 20, 4)])
def test_fc100_splits_by_superclass(cifar_root, tmp_path, split, n, supers):
    data = FC100(cifar_root, split=split, cache_dir=tmp_path)
    assert data.num_classes == n
    assert set(data.superclasses) == set(published_split("fc100")[split]) and len(set(data.superclasses)) == supers
    assert all(COARSE_OF[name] == s for name, s in zip(data.class_names, data.superclasses, strict=True))
    _check_cifar_images(data, data.class_names)


def test_fc100_all(cifar_root, tmp_path):
    split = FC100(cifar_root, split="all", cache_dir=tmp_path).few_shot_split()
    assert (split.source.numel(), split.validation.numel(), split.target.numel()) == (60, 20, 20)


def test_cifar_extracted_folder_reads_the_same(cifar_root, tmp_path):
    write_cifar_folder(tmp_path / "root")
    folder = CIFARFS(tmp_path / "root", split="test")
    archive = CIFARFS(cifar_root, split="test", cache_dir=tmp_path / "cache")
    assert torch.equal(folder.images, archive.images) and torch.equal(folder.labels, archive.labels)
    assert folder.describe()["arrays_sha256"] == archive.describe()["arrays_sha256"]


def test_cifar_download_verifies_the_md5(tmp_path):
    archive = write_cifar_archive(tmp_path / "served")
    body = archive.read_bytes()
    server = LoopbackServer()
    server.thread.start()
    try:
        server.routes["/c.tgz"] = (body, "ok")
        good = {"cifar-100-python.tar.gz": RemoteFile(server.url("/c.tgz"), ("md5", hashlib.md5(body).hexdigest()))}
        data = CIFARFS(tmp_path / "a", split="val", download=True, sources=good)
        assert data.num_classes == 16 and (tmp_path / "a" / "cifar-100-python.tar.gz").read_bytes() == body
        bad = {"cifar-100-python.tar.gz": RemoteFile(server.url("/c.tgz"), ("md5", "0" * 32))}
        with pytest.raises(ChecksumMismatchError):
            CIFARFS(tmp_path / "b", split="val", download=True, sources=bad)
        assert not (tmp_path / "b" / "cifar-100-python.tar.gz").exists()
    finally:
        server.httpd.shutdown()
        server.httpd.server_close()
        server.thread.join(timeout=5)


def test_cifar_missing_archive_names_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"cifar-100-python\.tar\.gz.*kriz/cifar\.html.*download=True"):
        CIFARFS(tmp_path)


def test_cifar_not_an_archive(tmp_path):
    (tmp_path / "cifar-100-python.tar.gz").write_bytes(b"not a tar")
    with pytest.raises(BenchmarkFormatError, match="not a readable tar.gz"):
        FC100(tmp_path)


# -- the cache ---------------------------------------------------------------------------------


def test_cache_is_used_and_a_corrupt_one_is_rebuilt(cifar_root, tmp_path):
    first = CIFARFS(cifar_root, split="val", cache_dir=tmp_path)
    cache = tmp_path / "cifar_fs-val.npz"
    assert cache.is_file()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = CIFARFS(cifar_root, split="val", cache_dir=tmp_path)  # from the cache, silently
    assert torch.equal(first.images, again.images)
    cache.write_bytes(cache.read_bytes()[:-100])  # truncated
    with pytest.warns(RuntimeWarning, match="corrupt.*rebuilding"):
        rebuilt = CIFARFS(cifar_root, split="val", cache_dir=tmp_path)
    assert torch.equal(first.images, rebuilt.images)


def test_a_cache_whose_labels_outnumber_its_classes_is_rebuilt_at_the_callers_line(tmp_path):
    """Consistent arrays and checksum, but a label beyond the header's class names: not trusted."""
    root = tmp_path / "root"
    write_mini_pickle(root, "val", per_class=1)
    first = MiniImageNet(root, split="val")
    cache = root / ".metalearn_cache" / "mini_imagenet-val-84px.npz"
    with np.load(cache, allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in npz.files}
    header = json.loads(arrays["header"].tobytes())
    arrays["labels"] = arrays["labels"].copy()
    arrays["labels"][-1] = len(header["class_names"])
    header["sha256"] = arrays_digest(arrays["images"], arrays["labels"])
    arrays["header"] = np.frombuffer(json.dumps(header).encode(), dtype=np.uint8)
    with open(cache, "wb") as f:
        np.savez(f, **arrays)
    with pytest.warns(RuntimeWarning, match="benchmark cache .* is corrupt.*rebuilding it from the source files") as w:
        rebuilt = MiniImageNet(root, split="val")
    assert [x.filename for x in w] == [__file__]
    assert torch.equal(rebuilt.labels, first.labels) and torch.equal(rebuilt.images, first.images)


def test_cache_follows_the_source(tmp_path):
    root = tmp_path / "root"
    write_mini_pickle(root, "val", per_class=1)
    first = MiniImageNet(root, split="val")
    write_mini_pickle(root, "val", per_class=2)  # the source changed: the cache must not be used
    assert len(MiniImageNet(root, split="val")) == 2 * len(first)


def test_cache_sees_an_image_replaced_in_place(tmp_path):
    write_mini_csv(tmp_path, "val", per_class=1)
    first = MiniImageNet(tmp_path, split="val")
    path = next((tmp_path / "images").iterdir())
    Image.fromarray(np.zeros((84, 84, 3), dtype=np.uint8)).save(path)  # same name, new content
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    again = MiniImageNet(tmp_path, split="val")
    assert not torch.equal(first.images, again.images) and int(again.images.sum()) < int(first.images.sum())


# -- safe pickles ------------------------------------------------------------------------------


class _Evil:
    def __reduce__(self):
        return (print, ("this must not run",))


def test_unpickler_refuses_code(tmp_path):
    path = tmp_path / "mini-imagenet-cache-val.pkl"
    path.write_bytes(pickle.dumps({"image_data": _Evil(), "class_dict": {}}))
    with pytest.raises(BenchmarkFormatError, match="builtins.print is not allowed"):
        MiniImageNet(tmp_path, split="val")


def test_unpickler_reads_arrays_and_python2_keys(tmp_path):
    path = tmp_path / "p.pkl"
    path.write_bytes(pickle.dumps({b"a": np.arange(3, dtype=np.int32), "b": [b"x", 1.5]}, protocol=2))
    with open(path, "rb") as f:
        obj = safe_unpickle(f, str(path))
    assert set(obj) == {"a", "b"} and obj["a"].tolist() == [0, 1, 2]


def test_unpickler_reads_arrays_pickled_by_numpy_1(tmp_path):
    # the distributed pickles were written by numpy 1.x, whose arrays name numpy.core.multiarray
    data = pickle.dumps(np.arange(4, dtype=np.uint8), protocol=2)
    data = data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    assert b"numpy.core.multiarray" in data
    path = tmp_path / "old.pkl"
    path.write_bytes(data)
    with open(path, "rb") as f, warnings.catch_warnings():
        warnings.simplefilter("error")
        assert safe_unpickle(f, str(path)).tolist() == [0, 1, 2, 3]


# -- mini-ImageNet -----------------------------------------------------------------------------


@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_mini_imagenet_pickle(tmp_path, split):
    write_mini_pickle(tmp_path, split)
    data = MiniImageNet(tmp_path, split=split)
    classes = published_split("mini_imagenet")[split]
    assert list(data.class_names) == classes and data.num_classes == {"train": 64, "val": 16, "test": 20}[split]
    assert tuple(data.images.shape[1:]) == (3, 84, 84)
    for c in range(data.num_classes):
        mine = data.images[data.labels == c]
        assert mine.shape[0] == 2 and (mine[:, 0] == image_value(c)).all() and (mine[:, 2] == 128).all()
    assert torch.equal(data.labels, data.labels.sort().values)  # grouped by class


def test_mini_imagenet_val_pickle_under_learn2learns_name(tmp_path):
    write_mini_pickle(tmp_path, "val", per_class=1).rename(tmp_path / "mini-imagenet-cache-validation.pkl")
    assert MiniImageNet(tmp_path, split="val").num_classes == 16


def test_mini_imagenet_all_and_split(tmp_path):
    for pool in ("train", "val", "test"):
        write_mini_pickle(tmp_path, pool, per_class=1)
    data = MiniImageNet(tmp_path, split="all")
    split = data.few_shot_split()
    assert (split.source.numel(), split.validation.numel(), split.target.numel()) == (64, 16, 20)
    assert data.class_names[int(split.validation[0])] == published_split("mini_imagenet")["val"][0]


@pytest.mark.parametrize("nested", [False, True])
def test_mini_imagenet_csv_and_images(tmp_path, nested):
    write_mini_csv(tmp_path, "val", nested=nested)
    data = MiniImageNet(tmp_path, split="val")
    assert data.num_classes == 16 and len(data) == 32
    for c in range(16):
        mine = data.images[data.labels == c]
        assert (mine[:, 0] == image_value(c)).all()
        assert sorted(mine[:, 1, 0, 0].tolist()) == [0, 1]


def test_mini_imagenet_csv_images_are_resized(tmp_path):
    write_mini_csv(tmp_path, "test", per_class=1, size=(100, 120))
    data = MiniImageNet(tmp_path, split="test")
    assert tuple(data.images.shape[1:]) == (3, 84, 84) and (data.images[:, 0] == data.images[:, 0, :1, :1]).all()


def test_mini_imagenet_csv_and_pickle_agree(tmp_path):
    write_mini_csv(tmp_path / "csv", "val")
    write_mini_pickle(tmp_path / "pkl", "val")
    a, b = MiniImageNet(tmp_path / "csv", split="val"), MiniImageNet(tmp_path / "pkl", split="val")
    assert torch.equal(a.labels, b.labels) and torch.equal(a.images[:, 0], b.images[:, 0])


def test_mini_imagenet_missing_files_say_where_to_get_them(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"mini-imagenet-cache-\{train,val,test\}\.pkl.*meta-learning-lstm"):
        MiniImageNet(tmp_path, split="train")
    write_mini_pickle(tmp_path, "train", per_class=1)
    with pytest.raises(FileNotFoundError, match="neither mini-imagenet-cache-val.pkl nor val.csv"):
        MiniImageNet(tmp_path, split="all")  # checked before any split is decoded
    assert not (tmp_path / ".metalearn_cache").exists()


def test_mini_imagenet_wrong_classes(tmp_path):
    classes = list(published_split("mini_imagenet")["val"])
    write_mini_pickle(tmp_path, "val", classes=classes[:-1] + ["n99999999"])
    with pytest.raises(BenchmarkFormatError, match=r"1 published classes are missing.*n99999999"):
        MiniImageNet(tmp_path, split="val")


def test_mini_imagenet_csv_missing_image(tmp_path):
    write_mini_csv(tmp_path, "val", per_class=1)
    next((tmp_path / "images").iterdir()).unlink()
    with pytest.raises(BenchmarkFormatError, match="lists .* but neither"):
        MiniImageNet(tmp_path, split="val")


# -- tiered-ImageNet ---------------------------------------------------------------------------


@pytest.mark.parametrize("py2_keys", [False, True])
def test_tiered_imagenet_pickles(tmp_path, py2_keys):
    write_tiered(tmp_path / "tiered-imagenet", "val", py2_keys=py2_keys)
    data = TieredImageNet(tmp_path, split="val")
    names = list(published_split("tiered_imagenet")["val"])[::-1]  # the pickle's own order
    assert list(data.class_names) == names and data.num_classes == 97 and len(data) == 194
    assert data.categories[:2] == ("val-category-0", "val-category-1")
    for c in (0, 50, 96):
        mine = data.images[data.labels == c]
        assert (mine[:, 0] == image_value(c)).all() and sorted(mine[:, 1, 0, 0].tolist()) == [0, 1]
    again = TieredImageNet(tmp_path, split="val")  # from the cache: the categories too
    assert again.categories == data.categories and torch.equal(again.images, data.images)


def test_tiered_imagenet_other_classes_are_refused(tmp_path):
    names = list(published_split("tiered_imagenet")["test"])
    write_tiered(tmp_path, "test", per_class=1, names=names[1:] + ["not a class"])
    with pytest.raises(BenchmarkFormatError, match="not in the published list"):
        TieredImageNet(tmp_path, split="test")


def test_tiered_imagenet_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"train_images_png\.pkl.*renmengye/few-shot-ssl-public"):
        TieredImageNet(tmp_path)


# -- CUB ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cub_archive_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("cub")
    write_cub_archive(root)
    return root


@pytest.mark.parametrize(("split", "n"), [("train", 100), ("val", 50), ("test", 50)])
def test_cub_archive(cub_archive_root, tmp_path, split, n):
    data = CUB(cub_archive_root, split=split, image_size=16, cache_dir=tmp_path)
    assert list(data.class_names) == published_split("cub")[split] and data.num_classes == n
    assert tuple(data.images.shape[1:]) == (3, 16, 16) and len(data) == 2 * n
    for c, name in enumerate(data.class_names[:5]):
        mine = data.images[data.labels == c].int()
        assert (mine[:, 0] - cub_value(name)).abs().max() <= 3  # JPEG, resized: nearly the written value


def test_cub_folder_matches_the_archive(cub_archive_root, tmp_path):
    write_cub_folder(tmp_path / "root")
    folder = CUB(tmp_path / "root", split="val", image_size=16)
    archive = CUB(cub_archive_root, split="val", image_size=16, cache_dir=tmp_path / "cache")
    assert torch.equal(folder.images, archive.images) and torch.equal(folder.labels, archive.labels)


def test_cub_all(cub_archive_root, tmp_path):
    split = CUB(cub_archive_root, split="all", image_size=8, cache_dir=tmp_path).few_shot_split()
    assert (split.source.numel(), split.validation.numel(), split.target.numel()) == (100, 50, 50)


def test_cub_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"CUB_200_2011\.tgz.*caltech"):
        CUB(tmp_path)


# -- arguments ---------------------------------------------------------------------------------


@pytest.mark.parametrize("make", [CIFARFS, FC100, MiniImageNet, TieredImageNet, CUB])
def test_unknown_split_is_refused_before_reading(tmp_path, make):
    with pytest.raises(ValueError, match=r"split must be one of \['train', 'val', 'test', 'all'\]"):
        make(tmp_path / "nowhere", split="validation")


@pytest.mark.parametrize(("make", "where"), [(MiniImageNet, "docs/datasets.md"), (TieredImageNet, "renmengye"),
                                             (CUB, "caltech")])
def test_download_is_refused_where_no_checksum_is_published(tmp_path, make, where):
    with pytest.raises(ValueError, match=f"cannot be downloaded.*{where}.*download=False"):
        make(tmp_path, download=True)
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_few_shot_split_needs_all(cifar_root, tmp_path):
    with pytest.raises(ValueError, match="split='all'"):
        CIFARFS(cifar_root, split="val", cache_dir=tmp_path).few_shot_split()
