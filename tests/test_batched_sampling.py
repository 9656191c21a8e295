"""Batched task sampling: a batch is bit for bit the tasks indexing gives, on every path.

Covers the counter-based draws (`TaskDraws`, against a pure-Python SplitMix64), the regression
families, episodes (balanced, unbalanced, rotated, cached on a device), what meta_train's
sources hand out, and the CUDA path (marked ``cuda``, skipped without a GPU).
"""

from __future__ import annotations

import pickle

import pytest
import torch

from metalearn.tasks import (
    CachedDataset,
    ClassAugmentation,
    EpisodicTaskSet,
    Harmonics,
    LabelledDataset,
    Linear,
    Polynomial,
    RegressionFamily,
    Sinusoid,
    Step,
    Task,
    TaskBatch,
    TaskDraws,
    TaskSet,
    TensorLabelledDataset,
    rotations,
    stack_tasks,
    task_seed,
)
from metalearn.tasks.datasets import uint8_to_unit
from metalearn.tasks.draws import splitmix64, task_keys
from metalearn.train.sources import open_source, step_indices

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
FAMILIES = [Sinusoid, Linear, Harmonics, Polynomial, Step]
GAMMA = 0x9E3779B97F4A7C15


def tensors(task: Task | TaskBatch) -> tuple[torch.Tensor, ...]:
    return (*task.train, *task.val)


def assert_same(a: Task | TaskBatch, b: Task | TaskBatch) -> None:
    for x, y in zip(tensors(a), tensors(b), strict=True):
        assert x.dtype == y.dtype and x.shape == y.shape
        assert torch.equal(x.cpu(), y.cpu())


def assert_batch_is_indexing(taskset: TaskSet, indices) -> None:
    batch = taskset.batch(indices)
    assert_same(batch, stack_tasks([taskset[i] for i in indices]))


class Ink(LabelledDataset):
    """Omniglot-like: ``uint8`` images decoded to ``[0, 1]`` (what `Omniglot` stores and gives)."""

    def __init__(self, n_classes: int = 12, per_class: int = 7, side: int = 6) -> None:
        generator = torch.Generator().manual_seed(0)
        shape = (n_classes * per_class, 1, side, side)
        self.images = torch.randint(0, 256, shape, dtype=torch.uint8, generator=generator)
        self.labels = torch.arange(n_classes).repeat_interleave(per_class)

    def get_input(self, index: int) -> torch.Tensor:
        return uint8_to_unit(self.images[index : index + 1])[0]

    def gather(self, indices: torch.Tensor) -> torch.Tensor:
        return uint8_to_unit(self.images.index_select(0, indices))

    def stored_inputs(self):
        return self.images, uint8_to_unit


def unbalanced() -> TensorLabelledDataset:
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate((3, 9, 5, 7, 4))])
    return TensorLabelledDataset(torch.arange(labels.numel(), dtype=torch.float32)[:, None], labels)


# -- the draws ---------------------------------------------------------------------------------


def test_task_keys_are_task_seed_and_words_are_splitmix64_outputs():
    seeds = (0, 1, -3, 2**64 + 5, 123456789)
    indices = torch.tensor([0, 1, 2, 599, 10**6, 2**40])
    for seed in seeds:
        keys = task_keys(seed, indices)
        assert [k % 2**64 for k in keys.tolist()] == [task_seed(seed, i) for i in indices.tolist()]
    draws = TaskDraws.of(7, [3, 0, 11])
    words = draws.words(2, (2, 3))
    for row, index in enumerate((3, 0, 11)):
        key = task_seed(7, index)
        # SplitMix64 seeded with the key: output c is mix(key + (c + 1) * gamma)
        expected = [splitmix64((key + (2 * 2**32 + p) * GAMMA) % 2**64) for p in range(6)]
        assert [w % 2**64 for w in words[row].reshape(-1).tolist()] == expected


def test_numpy_and_torch_arithmetic_give_the_same_draws():
    a, b = TaskDraws.of(5, range(2, 40)), TaskDraws.of(5, range(2, 40), numpy=False)
    assert torch.equal(a.words(1, (4, 5)), b.words(1, (4, 5)))
    assert torch.equal(a.uniform(0, (3,)), b.uniform(0, (3,)))
    ranges = ((0.1, -2.0, 0.0), (5.0, 3.0, 3.14))
    assert torch.equal(a.uniform(0, (1, 3), *ranges), b.uniform(0, (1, 3), *ranges))
    assert torch.equal(a.normal(2, (6, 1)), b.normal(2, (6, 1)))
    high = torch.tensor([10, 9, 8, 7])
    assert torch.equal(a.integers(1, (4,), high), b.integers(1, (4,), high))


@pytest.mark.parametrize(
    "taskset",
    [Sinusoid(3, 4, noise_std=0.2, length=None), Harmonics(2, 3, length=None), Polynomial(2, 2, length=None),
     EpisodicTaskSet(Ink(), 3, 2, 2, length=None), EpisodicTaskSet(unbalanced(), 3, 1, 2, length=None, cache="stored")],
    ids=["sinusoid", "harmonics", "polynomial", "episodes", "unbalanced-episodes"],
)  # fmt: skip
def test_the_device_arithmetic_makes_the_same_tasks(taskset):
    # what a CUDA device runs (torch int64 words), here on the CPU
    by_torch = taskset.sample_batch(TaskDraws.of(taskset.seed, range(5, 30), numpy=False))
    assert_same(by_torch, taskset.batch(range(5, 30)))


def test_draws_are_in_range_and_roughly_distributed():
    draws = TaskDraws.of(0, range(4000))
    u = draws.uniform(0, (1,), -2.0, 3.0)
    assert u.dtype == torch.float32 and u.min() >= -2.0 and u.max() < 3.0
    assert abs(float(u.mean()) - 0.5) < 0.1
    z = draws.normal(1, (1,))
    assert abs(float(z.mean())) < 0.1 and abs(float(z.std()) - 1.0) < 0.1
    r = draws.integers(2, (1,), 7)
    assert set(r.flatten().tolist()) == set(range(7))
    # streams and positions are independent words, not copies
    assert not torch.equal(draws.words(0, (2,)), draws.words(1, (2,)))
    assert not torch.equal(draws.words(0, (2,))[:, 0], draws.words(0, (2,))[:, 1])


def test_a_task_does_not_depend_on_the_tasks_drawn_with_it():
    draws = TaskDraws.of(3, [5, 9, 5])
    alone = TaskDraws.of(3, [9])
    assert torch.equal(draws.words(0, (4,))[1], alone.words(0, (4,))[0])
    assert torch.equal(draws.words(0, (4,))[0], draws.words(0, (4,))[2])


# -- regression families -------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("noise_std", [0.0, 0.3])
def test_regression_batch_is_indexing(family, noise_std):
    ts = family(5, 7, seed=3, noise_std=noise_std, length=None)
    for indices in (range(1), range(17), range(40, 113), [9, 2, 2, 1000]):
        assert_batch_is_indexing(ts, indices)
    assert_same(ts.batch(torch.tensor([4, 1])), ts.batch([4, 1]))
    if not noise_std:  # function_of is task 6's function, exactly
        task = ts[6]
        assert torch.equal(ts.function(ts.function_of(6), task.val[0]), task.val[1])


def test_finite_sets_check_batch_indices_like_indexing():
    ts = Sinusoid(3, 3, length=10)
    assert_same(ts.batch([-1, 0]), stack_tasks([ts[9], ts[0]]))
    assert_same(ts.batch(range(8, 10)), stack_tasks([ts[8], ts[9]]))
    with pytest.raises(IndexError):
        ts.batch(range(8, 11))
    with pytest.raises(ValueError, match="at least one"):
        ts.batch([])


def test_iterating_a_batched_set_gives_the_indexed_tasks():
    ts = Sinusoid(2, 3, seed=1, length=150)  # more than one chunk, and a partial last one
    tasks = list(ts)
    assert len(tasks) == 150
    for i in (0, 63, 64, 149):
        assert_same(tasks[i], ts[i])
    stream = ts.stream(start=140)
    assert_same(next(stream), ts[140])


def test_describe_names_the_draws_and_ignores_the_device():
    ts = Sinusoid(5, 5, seed=2)
    assert ts.describe()["draws"] == "splitmix64-counter-v1"
    assert ts.to("cpu").describe() == ts.describe()


def test_sample_with_a_generator_draws_a_key_from_it():
    ts = Sinusoid(4, 4)
    a = ts.sample(torch.Generator().manual_seed(1))
    b = ts.sample(torch.Generator().manual_seed(1))
    c = ts.sample(torch.Generator().manual_seed(2))
    assert_same(a, b)
    assert not torch.equal(a.train[1], c.train[1])


def test_a_user_family_with_draw_function_is_batched():
    class Quadratic(RegressionFamily):
        x_range = (-1.0, 1.0)

        def draw_function(self, draws):
            return {"a": draws.uniform(0, (1, 1))}

        def function(self, params, x):
            return params["a"] * x**2

    ts = Quadratic(3, 4, length=None)
    assert ts.batched
    assert_batch_is_indexing(ts, range(9))
    task = ts[4]
    torch.testing.assert_close(task.val[1], ts.function_of(4)["a"] * task.val[0] ** 2)


def test_sets_that_define_no_tasks_are_refused():
    class Nothing(TaskSet):
        pass

    with pytest.raises(TypeError, match="sample_batch"):
        Nothing()

    class NoFunction(RegressionFamily):
        def function(self, params, x):
            return x

    with pytest.raises(TypeError, match="draw_function"):
        NoFunction(2, 2)


def test_a_batched_set_pickles_to_the_same_tasks():
    ts = Harmonics(3, 3, seed=4)
    assert_same(pickle.loads(pickle.dumps(ts)).batch(range(5)), ts.batch(range(5)))


# -- episodes ------------------------------------------------------------------------------------


@pytest.mark.parametrize("cache", [None, "stored", "decoded"])
@pytest.mark.parametrize("augment", [False, True])
def test_episode_batch_is_indexing(cache, augment):
    data = Ink()
    if augment:
        data = ClassAugmentation(data, rotations())
    ts = EpisodicTaskSet(data, 4, 2, 3, seed=6, length=None, cache=cache)
    reference = EpisodicTaskSet(data, 4, 2, 3, seed=6, length=None)  # no cache: dataset.gather
    batch = ts.batch(range(30))
    assert_same(batch, stack_tasks([reference[i] for i in range(30)]))
    assert_batch_is_indexing(ts, [7, 3, 7])
    assert batch.train[0].is_contiguous() and batch.val[0].is_contiguous()
    assert ts.describe() == reference.describe()


def test_unbalanced_pool_and_labels():
    ts = EpisodicTaskSet(unbalanced(), 3, 1, 2, classes=[0, 2, 3, 4], length=None)
    batch = ts.batch(range(200))
    assert_same(batch, stack_tasks([ts[i] for i in range(200)]))
    items = torch.cat([batch.train[0], batch.val[0]], 1).long().squeeze(-1)  # [tasks, 9] item indices
    labels = ts.dataset.labels[items]
    assert not torch.isin(labels, torch.tensor([1])).any()  # only pool classes
    for row, task_labels in zip(items, torch.cat([batch.train[1], batch.val[1]], 1), strict=True):
        assert row.unique().numel() == row.numel()  # distinct items
        for j in range(3):  # one class per label
            assert ts.dataset.labels[row[task_labels == j]].unique().numel() == 1


def test_every_ordered_choice_of_classes_is_drawn():
    # 3 of 4 classes in order: 24 ordered choices, each 1/24 of 4800 tasks (about 200 each)
    ts = EpisodicTaskSet(unbalanced(), 3, 1, 1, classes=[0, 1, 2, 3], length=None)
    batch = ts.batch(range(4800))
    classes = ts.dataset.labels[batch.train[0].long().squeeze(-1)]  # [tasks, 3]: the class of label j
    counts = torch.unique(classes, dim=0, return_counts=True)[1]
    assert counts.numel() == 24 and counts.min() > 120 and counts.max() < 290


def test_variable_ways_index_but_only_same_shapes_batch():
    ts = EpisodicTaskSet(unbalanced(), (2, 3), (1, 2), 1, length=None)
    shapes = {tuple(ts[i].train[0].shape) for i in range(40)}
    assert len(shapes) > 1
    with pytest.raises(ValueError, match="one at a time"):
        ts.batch(range(40))
    stream = ts.stream(0)  # one task at a time
    for i in range(5):
        assert_same(next(stream), ts[i])


def test_cached_dataset_is_the_dataset():
    data = ClassAugmentation(Ink(), rotations((0, 90)))
    for decoded in (False, True):
        cached = CachedDataset(data, decoded=decoded)
        indices = torch.tensor([0, 5, 100, 167])
        assert torch.equal(cached.gather(indices), data.gather(indices))
        assert torch.equal(cached.get_input(100), data.get_input(100))
        assert cached.describe() == data.describe()
    assert CachedDataset(data).stored_inputs()[0].dtype == torch.uint8
    assert CachedDataset(data, decoded=True).stored_inputs()[1] is None


def test_an_image_folder_caches_its_uint8_pixels(tmp_path):
    from PIL import Image

    from metalearn.tasks import ImageFolderDataset

    generator = torch.Generator().manual_seed(0)
    for c in range(3):
        (tmp_path / f"class{c}").mkdir()
        for i in range(4):
            pixels = torch.randint(0, 256, (5, 5, 3), dtype=torch.uint8, generator=generator).numpy()
            Image.fromarray(pixels).save(tmp_path / f"class{c}" / f"{i}.png")
    data = ImageFolderDataset(tmp_path)
    cached = CachedDataset(data)
    assert cached.stored_inputs()[0].dtype == torch.uint8
    indices = torch.tensor([0, 7, 11])
    assert torch.equal(cached.gather(indices), data.gather(indices))
    assert_batch_is_indexing(EpisodicTaskSet(data, 2, 1, 2, length=None, cache="stored"), range(6))


def test_errors_of_the_episode_cache():
    with pytest.raises(ValueError, match="cache"):
        EpisodicTaskSet(Ink(), 2, 1, 1, cache="gpu")
    with pytest.raises(TypeError, match="LabelledDataset"):
        CachedDataset(torch.zeros(3))


# -- what meta_train's sources hand out ------------------------------------------------------------


@pytest.mark.parametrize("length", [None, 10])
def test_sources_hand_out_the_indexed_tasks_and_resume_exactly(length):
    ts = EpisodicTaskSet(Ink(), 3, 1, 2, seed=1, length=length)
    source = open_source(ts, 4)
    for step in (0, 2, 5):
        batch, indices = source.batch(step)
        assert indices == step_indices(ts, step, 4)
        assert_same(batch, stack_tasks([ts[i] for i in indices]))
    resumed = open_source(ts, 4)
    resumed.start(5)
    assert_same(resumed.batch(5)[0], source.batch(5)[0])


# -- on a CUDA device ------------------------------------------------------------------------------


@pytest.mark.cuda
@cuda
def test_episodes_on_cuda_are_the_cpu_episodes():
    data = ClassAugmentation(Ink(), rotations())
    cpu = EpisodicTaskSet(data, 5, 1, 3, seed=2, length=None)
    gpu = EpisodicTaskSet(data, 5, 1, 3, seed=2, length=None, device="cuda")
    batch = gpu.batch(range(64))
    assert batch.train[0].device.type == "cuda" and batch.train[1].device.type == "cuda"
    assert_same(batch, cpu.batch(range(64)))
    assert_batch_is_indexing(gpu, range(10))
    assert_same(cpu.to("cuda").batch(range(3)), cpu.batch(range(3)))


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("family", FAMILIES)
def test_regression_on_cuda_batch_is_indexing_and_close_to_the_cpu(family):
    cpu = family(5, 5, seed=1, noise_std=0.1, length=None)
    gpu = cpu.to("cuda")
    batch = gpu.batch(range(50))
    assert batch.train[0].device.type == "cuda"
    assert_batch_is_indexing(gpu, range(7))
    reference = cpu.batch(range(50))
    for x, y in zip(tensors(batch), tensors(reference), strict=True):
        torch.testing.assert_close(x.cpu(), y, rtol=1e-5, atol=1e-5)  # sin/cos of the device: ulps apart
