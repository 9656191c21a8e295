"""split_classes / ClassSplit: class-disjoint pools by fractions or explicit lists."""

from __future__ import annotations

import pytest
import torch

from metalearn.tasks import ClassSplit, TensorLabelledDataset, split_classes


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def assert_partition(split: ClassSplit, classes: torch.Tensor) -> None:
    pools = list(split.pools().values())
    for pool in pools:
        assert pool.dtype == torch.int64 and pool.ndim == 1
        assert torch.equal(pool, torch.sort(pool).values)
    joined = torch.cat(pools)
    assert joined.unique().numel() == joined.numel()  # disjoint
    assert torch.equal(torch.sort(joined).values, torch.sort(classes).values)  # covering


def test_two_fractions():
    classes = torch.arange(100, 200)
    split = split_classes(classes, (0.8, 0.2), generator=gen(0))
    assert split.validation is None
    assert (split.source.numel(), split.target.numel()) == (80, 20)
    assert_partition(split, classes)
    assert list(split.pools()) == ["source", "target"]


def test_three_fractions_and_rounding():
    classes = torch.arange(1623)
    split = split_classes(classes, (0.7, 0.1, 0.2), generator=gen(0))
    sizes = (split.source.numel(), split.validation.numel(), split.target.numel())
    assert sum(sizes) == 1623
    for size, f in zip(sizes, (0.7, 0.1, 0.2), strict=True):
        assert abs(size - f * 1623) < 1
    assert_partition(split, classes)
    assert list(split.pools()) == ["source", "validation", "target"]


def test_deterministic_for_a_generator_and_varies_with_it():
    classes = torch.arange(50)
    a = split_classes(classes, (0.5, 0.5), generator=gen(3))
    b = split_classes(classes, (0.5, 0.5), generator=gen(3))
    c = split_classes(classes, (0.5, 0.5), generator=gen(4))
    assert torch.equal(a.source, b.source) and torch.equal(a.target, b.target)
    assert not torch.equal(a.source, c.source)
    # without a generator: still deterministic, and the global RNG plays no part
    torch.manual_seed(0)
    d = split_classes(classes, (0.5, 0.5))
    torch.manual_seed(1)
    e = split_classes(classes, (0.5, 0.5))
    assert torch.equal(d.source, e.source)


def test_split_is_random_not_a_prefix():
    split = split_classes(torch.arange(100), (0.5, 0.5), generator=gen(0))
    assert not torch.equal(split.source, torch.arange(50))


def test_accepts_a_dataset_and_sequences():
    labels = torch.tensor([5, 5, 9, 9, 2, 2, 7, 7])
    ds = TensorLabelledDataset(torch.zeros(8, 1), labels)
    split = split_classes(ds, (0.5, 0.5), generator=gen(1))
    assert_partition(split, torch.tensor([2, 5, 7, 9]))
    assert_partition(split_classes([3, 1, 2, 0], (0.5, 0.5)), torch.arange(4))


def test_explicit_lists():
    split = split_classes(torch.arange(10), source=[0, 1, 2, 3, 4], target=[9, 8], validation=[6])
    assert split.source.tolist() == [0, 1, 2, 3, 4]
    assert split.target.tolist() == [8, 9]
    assert split.validation.tolist() == [6]
    assert split.target.dtype == torch.int64


def test_explicit_source_only_gives_the_rest_as_target():
    split = split_classes(range(10), source=range(6), validation=[9])
    assert split.target.tolist() == [6, 7, 8]
    split = split_classes(range(10), target=torch.tensor([0, 1]))
    assert split.source.tolist() == list(range(2, 10))


# -- errors ------------------------------------------------------------------------------


def test_overlapping_pools():
    with pytest.raises(ValueError, match=r"source and target pools overlap in classes \[3\].*disjoint"):
        split_classes(range(10), source=[1, 2, 3], target=[3, 4])
    with pytest.raises(ValueError, match="source and validation pools overlap"):
        split_classes(range(10), source=[1, 2], target=[3], validation=[2])
    with pytest.raises(ValueError, match="overlap"):
        ClassSplit(source=torch.tensor([1, 2]), target=torch.tensor([2]))


def test_empty_pools():
    with pytest.raises(ValueError, match="target pool is empty"):
        split_classes(range(5), source=range(5))
    with pytest.raises(ValueError, match="source pool is empty"):
        split_classes(range(5), source=[], target=[1])
    with pytest.raises(ValueError, match=r"validation fraction 0\.01 leaves the validation pool empty"):
        split_classes(range(10), (0.79, 0.01, 0.2))
    with pytest.raises(ValueError, match="no classes"):
        split_classes([], (0.5, 0.5))


@pytest.mark.parametrize(
    "fractions,match",
    [
        ((0.8, 0.3), "sum to 1"),
        ((0.5, 0.2, 0.2), "sum to 1"),
        ((1.2, -0.2), "positive"),
        ((1.0, 0.0), "positive"),
        ((1.0,), "got 1 values"),
        ((0.25, 0.25, 0.25, 0.25), "got 4 values"),
    ],
)
def test_bad_fractions(fractions, match):
    with pytest.raises(ValueError, match=match):
        split_classes(range(20), fractions)


def test_classes_not_in_the_dataset():
    ds = TensorLabelledDataset(torch.zeros(4, 1), torch.tensor([0, 1, 2, 3]))
    with pytest.raises(ValueError, match=r"target pool has classes \[7, 8\] that are not in the dataset"):
        split_classes(ds, source=[0, 1], target=[2, 7, 8])


def test_fractions_xor_explicit_and_clean_class_lists():
    with pytest.raises(ValueError, match="not both"):
        split_classes(range(10), (0.5, 0.5), source=[1])
    with pytest.raises(ValueError, match="needs fractions"):
        split_classes(range(10))
    with pytest.raises(ValueError, match="not only validation"):
        split_classes(range(10), validation=[1])
    with pytest.raises(ValueError, match="more than once"):
        split_classes([1, 1, 2], (0.5, 0.5))
    with pytest.raises(TypeError, match="integer"):
        split_classes([0.5, 1.5], (0.5, 0.5))
    with pytest.raises(ValueError, match="1-D"):
        split_classes(torch.zeros(2, 2, dtype=torch.long), (0.5, 0.5))
