"""EpisodicTaskSet and ClassAugmentation: shapes, labels, disjointness, uniformity, errors."""

from __future__ import annotations

import math

import pytest
import torch

from metalearn.tasks import (
    ClassAugmentation,
    EpisodicTaskSet,
    LabelledDataset,
    Rotate90,
    TensorLabelledDataset,
    rotations,
    split_classes,
)


def index_dataset(n_classes: int, per_class: int, feature_shape=(2, 3)) -> TensorLabelledDataset:
    """Items whose inputs are filled with their own index, so a task reveals what it drew.

    Labels are 10 * class (not 0..C-1) and interleaved, to catch code that assumes either.
    """
    labels = (torch.arange(n_classes * per_class) % n_classes) * 10
    inputs = torch.arange(labels.numel(), dtype=torch.float32).reshape(-1, *[1] * len(feature_shape))
    return TensorLabelledDataset(inputs.expand(-1, *feature_shape).contiguous(), labels)


def drawn_items(x: torch.Tensor) -> torch.Tensor:
    """Item indices encoded in the inputs of `index_dataset`."""
    return x.reshape(x.shape[0], -1)[:, 0].long()


# -- shapes, dtypes, labels ----------------------------------------------------------------


@pytest.mark.parametrize("ways,shots,queries", [(5, 1, 15), (3, 4, 2), (1, 1, 1)])
def test_shapes_and_dtypes(ways, shots, queries):
    ds = index_dataset(8, 20)
    task = EpisodicTaskSet(ds, ways, shots, queries)[0]
    (xt, yt), (xv, yv) = task.train, task.val
    assert xt.shape == (ways * shots, 2, 3) and xv.shape == (ways * queries, 2, 3)
    assert xt.dtype == xv.dtype == torch.float32
    assert yt.dtype == yv.dtype == torch.int64
    assert torch.equal(yt, torch.arange(ways).repeat_interleave(shots))
    assert torch.equal(yv, torch.arange(ways).repeat_interleave(queries))


def test_labels_name_classes_consistently_and_train_val_are_disjoint():
    ds = index_dataset(10, 12)
    ts = EpisodicTaskSet(ds, 4, 3, 5, length=200)
    for task in ts:
        train_items, val_items = drawn_items(task.train[0]), drawn_items(task.val[0])
        items = torch.cat([train_items, val_items])
        assert items.unique().numel() == items.numel()  # no example twice: train and val disjoint
        classes = ds.labels[items]
        labels = torch.cat([task.train[1], task.val[1]])
        assert labels.min() == 0 and labels.max() == 3
        for j in range(4):  # each label is exactly one class, each class exactly one label
            assert classes[labels == j].unique().numel() == 1
        assert classes.unique().numel() == 4


def test_label_order_is_fresh_per_task():
    ds = index_dataset(10, 12)
    ts = EpisodicTaskSet(ds, 5, 1, 1, length=50)
    label0_classes = {int(ds.labels[drawn_items(t.train[0])[0]]) for t in ts}
    assert len(label0_classes) > 5  # label 0 is not tied to one class


def test_pool_restricts_classes():
    ds = index_dataset(10, 12)
    pool = [10, 30, 50, 70, 90]
    ts = EpisodicTaskSet(ds, 3, 2, 2, classes=pool, length=100)
    assert torch.equal(ts.classes, torch.tensor(pool))
    seen = set()
    for task in ts:
        seen |= set(ds.labels[drawn_items(torch.cat([task.train[0], task.val[0]]))].tolist())
    assert seen == set(pool)


def test_source_and_target_tasks_never_share_classes():
    ds = index_dataset(20, 6)
    split = split_classes(ds, (0.6, 0.4), generator=torch.Generator().manual_seed(0))
    source = EpisodicTaskSet(ds, 5, 1, 2, classes=split.source, length=100)
    target = EpisodicTaskSet(ds, 5, 1, 2, classes=split.target, length=100)

    def classes_of(ts):
        return {int(c) for t in ts for c in ds.labels[drawn_items(torch.cat([t.train[0], t.val[0]]))]}

    assert classes_of(source).isdisjoint(classes_of(target))
    assert classes_of(source) == set(split.source.tolist())


def test_attributes_for_trainers():
    ts = EpisodicTaskSet(index_dataset(6, 10), (2, 4), (1, 3), 5)
    assert ts.ways == (2, 4) and ts.shots == (1, 3) and ts.queries == 5
    assert ts.max_ways == 4 and not ts.fixed_shape
    assert EpisodicTaskSet(index_dataset(6, 10), 2, 1, 5).fixed_shape
    assert ts.class_counts.tolist() == [10] * 6


def test_variable_ways_and_shots_cover_their_ranges():
    ts = EpisodicTaskSet(index_dataset(8, 10), (2, 5), (1, 3), 2, length=300)
    ways, shots = set(), set()
    for task in ts:
        n_ways = int(task.val[1].max()) + 1
        assert task.val[0].shape[0] == 2 * n_ways
        n_shots = task.train[0].shape[0] // n_ways
        assert torch.equal(task.train[1], torch.arange(n_ways).repeat_interleave(n_shots))
        ways.add(n_ways)
        shots.add(n_shots)
    assert ways == {2, 3, 4, 5} and shots == {1, 2, 3}


def test_unbalanced_classes_use_all_items_and_only_real_ones():
    labels = torch.cat([torch.zeros(3), torch.ones(9), torch.full((5,), 2)]).long()
    inputs = torch.arange(labels.numel(), dtype=torch.float32)[:, None]
    ds = TensorLabelledDataset(inputs, labels)
    ts = EpisodicTaskSet(ds, 3, 1, 2, length=300)
    seen = set()
    for task in ts:
        items = drawn_items(torch.cat([task.train[0], task.val[0]]))
        assert items.unique().numel() == 9
        seen |= set(items.tolist())
    assert seen == set(range(17))


# -- uniformity ------------------------------------------------------------------------------

# Counts over many tasks are compared with their expectation by Pearson's statistic
# X = sum (O - E)^2 / E. Under a uniform sampler, X (scaled as explained at each use) is
# asymptotically chi-square with k degrees of freedom, and Laurent & Massart (2000, Lemma 1)
# bound its tail: P(chi2_k >= k + 2 sqrt(k t) + 2 t) <= exp(-t). With t = ln(1e6) a correct
# sampler fails at most once in a million seeds; the seeds are fixed, so the test is
# deterministic, and the bound keeps it honest when the sampler's random stream changes.
# The tests also show that the bound is tight enough to catch a 10% bias on one class and a
# 30% bias on one item.
LOG_INV_ALPHA = math.log(1e6)


def chi2_bound(dof: int) -> float:
    return dof + 2 * math.sqrt(dof * LOG_INV_ALPHA) + 2 * LOG_INV_ALPHA


def pearson(observed: torch.Tensor, expected: torch.Tensor) -> float:
    observed, expected = observed.double(), expected.double()
    return float(((observed - expected) ** 2 / expected).sum())


N_CLASSES, PER_CLASS, WAYS, SHOTS, QUERIES, N_TASKS = 10, 8, 5, 1, 2, 10_000


@pytest.fixture(scope="module")
def many_tasks():
    ds = index_dataset(N_CLASSES, PER_CLASS)
    ts = EpisodicTaskSet(ds, WAYS, SHOTS, QUERIES, seed=2024, length=N_TASKS)
    batch = ts.batch(range(N_TASKS))
    train_items = drawn_items(batch.train[0].reshape(-1, 2, 3)).reshape(N_TASKS, -1)
    val_items = drawn_items(batch.val[0].reshape(-1, 2, 3)).reshape(N_TASKS, -1)
    return ds, train_items, val_items


def test_every_class_is_drawn_equally_often(many_tasks):
    ds, train_items, _ = many_tasks
    position = ds.labels[train_items] // 10  # class positions 0..C-1, each task's WAYS classes
    counts = torch.bincount(position.reshape(-1), minlength=N_CLASSES)
    expected = torch.full((N_CLASSES,), N_TASKS * WAYS / N_CLASSES)
    # Each task draws WAYS distinct classes of C (no replacement), so the counts' covariance is
    # (C - WAYS) / (C - 1) times the multinomial one: X * (C-1)/(C-WAYS) ~ chi2(C - 1).
    scale = (N_CLASSES - 1) / (N_CLASSES - WAYS)
    bound = chi2_bound(N_CLASSES - 1)
    assert pearson(counts, expected) * scale < bound
    biased = counts.clone().double()
    biased[0] *= 1.1
    assert pearson(biased, expected) * scale > bound  # the bound would catch a 10% bias


def test_every_item_of_a_class_is_drawn_equally_often(many_tasks):
    ds, train_items, val_items = many_tasks
    items = torch.cat([train_items, val_items], dim=1).reshape(-1)
    counts = torch.bincount(items, minlength=len(ds))
    k = SHOTS + QUERIES
    class_draws = torch.bincount(ds.labels[train_items].reshape(-1) // 10, minlength=N_CLASSES)
    expected = class_draws[ds.labels // 10].double() * k / PER_CLASS
    # Given how often each class was drawn, each draw takes k of its PER_CLASS items without
    # replacement: X * (M-1)/(M-k) ~ chi2(C * (M - 1)).
    scale = (PER_CLASS - 1) / (PER_CLASS - k)
    bound = chi2_bound(N_CLASSES * (PER_CLASS - 1))
    assert pearson(counts, expected) * scale < bound
    biased = counts.clone().double()
    biased[0] *= 1.3
    assert pearson(biased, expected) * scale > bound  # the bound would catch a 30% bias on one item


def test_train_and_val_roles_and_labels_are_uniform(many_tasks):
    ds, train_items, _ = many_tasks
    # which class gets label 0: multinomial over C classes, X ~ chi2(C - 1)
    first = torch.bincount(ds.labels[train_items[:, 0]] // 10, minlength=N_CLASSES)
    assert pearson(first, torch.full((N_CLASSES,), N_TASKS / N_CLASSES)) < chi2_bound(N_CLASSES - 1)
    # how often each item is the train (not val) example when its class is drawn: each item
    # is the train example of its class's draw with probability 1 / PER_CLASS
    as_train = torch.bincount(train_items.reshape(-1), minlength=len(ds))
    class_draws = torch.bincount(ds.labels[train_items].reshape(-1) // 10, minlength=N_CLASSES)
    expected = class_draws[ds.labels // 10].double() / PER_CLASS
    # one train item per class draw: multinomial over the class's M items, X ~ chi2(C (M - 1))
    assert pearson(as_train, expected) < chi2_bound(N_CLASSES * (PER_CLASS - 1))


# -- errors ---------------------------------------------------------------------------------


def test_more_ways_than_classes():
    with pytest.raises(ValueError, match=r"6-way tasks need at least 6 classes, but the pool has 5.*lower ways"):
        EpisodicTaskSet(index_dataset(5, 10), 6, 1, 1)
    with pytest.raises(ValueError, match="lower ways"):
        EpisodicTaskSet(index_dataset(10, 10), (2, 4), 1, 1, classes=[0, 10, 20])


def test_too_few_examples_names_class_and_fix():
    labels = torch.tensor([0] * 10 + [1] * 10 + [2] * 4)
    ds = TensorLabelledDataset(torch.zeros(24, 1), labels)
    with pytest.raises(ValueError, match=r"5 shots \+ 1 queries need 6.*\[2\].*as few as 4.*leave those classes"):
        EpisodicTaskSet(ds, 2, 5, 1)
    with pytest.raises(ValueError, match=r"need 5"):
        EpisodicTaskSet(ds, 2, (1, 4), 1)  # the top of the shots range counts
    EpisodicTaskSet(ds, 2, 5, 1, classes=[0, 1])  # the fix works


def test_empty_pool_and_absent_classes():
    ds = index_dataset(5, 10)
    with pytest.raises(ValueError, match="empty"):
        EpisodicTaskSet(ds, 1, 1, 1, classes=[])
    with pytest.raises(ValueError, match=r"\[7\].*no examples"):
        EpisodicTaskSet(ds, 1, 1, 1, classes=[0, 7])
    with pytest.raises(ValueError, match="more than once"):
        EpisodicTaskSet(ds, 1, 1, 1, classes=[0, 0, 10])


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"ways": 0}, ValueError, "ways must be at least 1"),
        ({"ways": (3, 2)}, ValueError, "low > high"),
        ({"ways": 2.0}, TypeError, "ways must be an int"),
        ({"ways": True}, TypeError, "bool"),
        ({"shots": (1, 2, 3)}, TypeError, "shots must be an int"),
        ({"queries": 0}, ValueError, "queries"),
    ],
)
def test_bad_sizes(kwargs, error, match):
    args = {"ways": 2, "shots": 1, "queries": 1, **kwargs}
    with pytest.raises(error, match=match):
        EpisodicTaskSet(index_dataset(5, 10), **args)


def test_needs_a_labelled_dataset():
    with pytest.raises(TypeError, match="TensorDataset"):
        EpisodicTaskSet(torch.utils.data.TensorDataset(torch.zeros(4, 1)), 2, 1, 1)


def test_labels_are_read_without_decoding_items():
    class NoDecode(LabelledDataset):
        def __init__(self):
            self.labels = torch.arange(40) % 4

        def get_input(self, index):
            raise AssertionError("decoded an item")

    EpisodicTaskSet(NoDecode(), 4, 2, 3)  # construction reads labels only


def test_gather_is_called_once_per_task():
    class Counting(TensorLabelledDataset):
        calls = 0

        def gather(self, indices):
            Counting.calls += 1
            return super().gather(indices)

    ds = Counting(torch.zeros(40, 1), torch.arange(40) % 4)
    ts = EpisodicTaskSet(ds, 4, 2, 3)
    for i in range(5):
        ts[i]
    assert Counting.calls == 5


# -- class augmentation ------------------------------------------------------------------------


def image_dataset() -> TensorLabelledDataset:
    images = torch.arange(3 * 2 * 9, dtype=torch.float32).reshape(6, 1, 3, 3)
    return TensorLabelledDataset(images, torch.tensor([0, 0, 1, 1, 2, 2]))


def test_rotations_make_new_classes():
    base = image_dataset()
    aug = ClassAugmentation(base, rotations((0, 90, 180, 270)))
    assert len(aug) == 24
    assert torch.equal(aug.classes, torch.arange(12))
    for index in range(24):
        t, i = divmod(index, 6)
        assert int(aug.labels[index]) == int(base.labels[i]) * 4 + t
        assert torch.equal(aug.get_input(index), torch.rot90(base.get_input(i), t, dims=(-2, -1)))
    indices = torch.tensor([23, 0, 7, 14, 7])
    assert torch.equal(aug.gather(indices), torch.stack([aug.get_input(int(i)) for i in indices]))


def test_augmentation_is_generic_and_maps_base_classes():
    def negate(x):
        return -x

    aug = ClassAugmentation(image_dataset(), [lambda x: x, negate])
    assert torch.equal(aug.get_input(7), -image_dataset().get_input(1))
    assert torch.equal(aug.classes_of([1, 2]), torch.tensor([2, 3, 4, 5]))
    assert torch.equal(aug.base_class_of(torch.tensor([2, 3, 5])), torch.tensor([1, 1, 2]))


def test_split_then_augment_keeps_pools_disjoint():
    labels = torch.arange(20).repeat_interleave(3)
    base = TensorLabelledDataset(torch.rand(60, 1, 4, 4), labels)
    aug = ClassAugmentation(base, rotations())
    split = split_classes(base, (0.75, 0.25))
    source, target = aug.classes_of(split.source), aug.classes_of(split.target)
    assert not torch.isin(aug.base_class_of(source), aug.base_class_of(target)).any()
    ts = EpisodicTaskSet(aug, 5, 1, 2, classes=source)
    assert ts.classes.numel() == 15 * 4
    assert ts[0].train[0].shape == (5, 1, 4, 4)


def test_rotation_helpers_and_errors():
    assert rotations((0, 90, -90)) == [Rotate90(0), Rotate90(1), Rotate90(3)]
    with pytest.raises(ValueError, match="multiples of 90"):
        rotations((45,))
    with pytest.raises(ValueError, match="at least one transform"):
        ClassAugmentation(image_dataset(), [])
    with pytest.raises(TypeError, match="callable"):
        ClassAugmentation(image_dataset(), [3])


def test_numpy_integers_are_accepted():
    np = pytest.importorskip("numpy")
    ts = EpisodicTaskSet(index_dataset(5, 10), np.int64(3), (np.int32(1), 2), np.int64(2))
    assert ts.max_ways == 3 and ts.queries == 2
    assert ts[0].val[0].shape[0] == 6
