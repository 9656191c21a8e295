"""TaskSet: seeding by index, streams, batches, pickling and DataLoader workers."""

from __future__ import annotations

import ast
import pickle
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from metalearn.tasks import (
    EpisodicTaskSet,
    Sinusoid,
    Task,
    TaskBatch,
    TaskSet,
    TensorLabelledDataset,
    stack_tasks,
    task_seed,
)


class CountingTaskSet(TaskSet):
    """A minimal user subclass: one random number per task, plus how often `sample` ran."""

    def __init__(self, seed: int = 0, length: int | None = 600) -> None:
        super().__init__(seed=seed, length=length)
        self.calls = 0

    def sample(self, generator: torch.Generator) -> Task:
        self.calls += 1
        x = torch.rand(3, 1, generator=generator)
        return Task(train=(x, x.sum(1)), val=(x, x.sum(1)))


def make_episodes(seed: int = 0, length: int | None = 50) -> EpisodicTaskSet:
    labels = torch.arange(12).repeat_interleave(6)
    inputs = torch.arange(labels.numel(), dtype=torch.float32)[:, None].expand(-1, 4).contiguous()
    return EpisodicTaskSet(TensorLabelledDataset(inputs, labels), ways=3, shots=2, queries=2, seed=seed, length=length)


def assert_same_task(a: Task, b: Task) -> None:
    for ta, tb in zip((*a.train, *a.val), (*b.train, *b.val), strict=True):
        assert ta.dtype == tb.dtype
        assert torch.equal(ta, tb)


def same_task(a: Task, b: Task) -> bool:
    return all(torch.equal(ta, tb) for ta, tb in zip((*a.train, *a.val), (*b.train, *b.val), strict=True))


def assert_same_batch(a: TaskBatch, b: TaskBatch) -> None:
    for ta, tb in zip((*a.train, *a.val), (*b.train, *b.val), strict=True):
        assert torch.equal(ta, tb)


# -- seeds ---------------------------------------------------------------------------------


def test_task_seed_is_well_mixed_across_neighbouring_seeds():
    seeds = {task_seed(s, i) for s in range(-5, 20) for i in range(200)}
    assert len(seeds) == 25 * 200  # no (seed, index) pair shares a generator seed
    assert all(0 <= s < 2**64 for s in seeds)
    # the naive seed + index would make these two equal
    assert task_seed(0, 1) != task_seed(1, 0)


def test_neighbouring_seeds_do_not_share_tasks():
    a, b = make_episodes(seed=0), make_episodes(seed=1)
    shifted = [same_task(a[i + 1], b[i]) for i in range(20)]
    assert not any(shifted)


def test_same_index_same_task_regardless_of_order_and_instance():
    ts = make_episodes(seed=7)
    forward = [ts[i] for i in range(10)]
    backward = [ts[i] for i in reversed(range(10))][::-1]
    fresh = make_episodes(seed=7)
    for i in range(10):
        assert_same_task(forward[i], backward[i])
        assert_same_task(forward[i], fresh[i])


def test_different_seeds_give_different_tasks():
    a, b = make_episodes(seed=0), make_episodes(seed=123)
    assert sum(same_task(a[i], b[i]) for i in range(20)) <= 1


def test_global_rng_does_not_affect_tasks():
    ts = make_episodes()
    torch.manual_seed(1)
    first = ts[3]
    torch.manual_seed(2)
    torch.rand(100)
    assert_same_task(first, ts[3])


# -- length, indexing, streams -----------------------------------------------------------


def test_finite_length_and_indexing():
    ts = CountingTaskSet(length=5)
    assert len(ts) == 5 and not ts.endless
    assert_same_task(ts[-1], ts[4])
    with pytest.raises(IndexError):
        ts[5]
    with pytest.raises(IndexError):
        ts[-6]
    with pytest.raises(TypeError, match="integers"):
        ts[1.5]
    assert_same_task(ts[torch.tensor(2)], ts[2])
    assert len(list(ts)) == 5


def test_endless_set_has_no_len_and_says_how_to_iterate():
    ts = CountingTaskSet(length=None)
    assert ts.endless
    with pytest.raises(TypeError, match=r"stream\(\)"):
        len(ts)
    with pytest.raises(TypeError, match=r"stream\(\)"):
        iter(ts)
    with pytest.raises(IndexError, match="negative"):
        ts[-1]
    assert_same_task(ts[10**9], ts[10**9])  # any index is a task


def test_stream_is_index_order_and_endless():
    ts = CountingTaskSet(length=None)
    stream = ts.stream(start=4)
    for i in range(4, 30):
        assert_same_task(next(stream), ts[i])
    assert next(stream) is not None  # still going


def test_stream_of_finite_set_stops_at_end():
    ts = CountingTaskSet(length=6)
    assert len(list(ts.stream(start=2))) == 4


@pytest.mark.parametrize("length", [0, -3, 2.5])
def test_bad_length(length):
    with pytest.raises(ValueError, match="length"):
        CountingTaskSet(length=length)


def test_bad_seed():
    with pytest.raises(TypeError, match="seed"):
        CountingTaskSet(seed=1.0)


# -- batches ------------------------------------------------------------------------------


def test_batch_b_holds_tasks_b_times_bs_onwards():
    ts = make_episodes(length=None)
    batches = ts.batches(4)
    for b in range(3):
        batch = next(batches)
        assert len(batch) == 4
        for j in range(4):
            assert_same_task(batch[j], ts[b * 4 + j])


def test_resumed_batches_equal_uninterrupted_ones():
    ts = make_episodes(length=None)
    uninterrupted = ts.batches(3)
    run = [next(uninterrupted) for _ in range(6)]
    resumed = make_episodes(length=None).batches(3, start=4)
    assert_same_batch(next(resumed), run[4])
    assert_same_batch(next(resumed), run[5])


def test_finite_batches_end_with_a_partial_batch():
    ts = make_episodes(length=10)
    sizes = [len(b) for b in ts.batches(4)]
    assert sizes == [4, 4, 2]
    with pytest.raises(ValueError, match="batch_size"):
        next(ts.batches(0))


def test_batch_of_indices():
    ts = make_episodes()
    batch = ts.batch([5, 1, 3])
    assert batch.train[0].shape == (3, 6, 4)
    assert_same_task(batch[1], ts[1])


# -- pickling and DataLoader workers --------------------------------------------------------


def test_pickled_task_set_gives_same_tasks():
    for ts in (make_episodes(seed=3), Sinusoid(5, 10, seed=3)):
        clone = pickle.loads(pickle.dumps(ts))
        for i in (0, 17, 49):
            assert_same_task(clone[i], ts[i])


def test_map_style_dataloader_with_two_workers_gives_same_tasks():
    ts = make_episodes(seed=11, length=13)
    loader = DataLoader(ts, batch_size=4, num_workers=2, collate_fn=stack_tasks)
    got = list(loader)
    assert [len(b) for b in got] == [4, 4, 4, 1]
    for b, batch in enumerate(got):
        assert_same_batch(batch, ts.batch(range(b * 4, min(b * 4 + 4, 13))))


def test_iterable_view_with_two_workers_equals_single_process_order():
    ts = make_episodes(seed=5, length=None)
    loader = DataLoader(ts.as_iterable(start=3), batch_size=None, num_workers=2)
    got = []
    for task in loader:
        got.append(task)
        if len(got) == 9:
            break
    for j, task in enumerate(got):
        assert_same_task(task, ts[3 + j])


def test_iterable_view_of_batches_with_two_workers_and_finite_set():
    ts = make_episodes(seed=5, length=11)
    view = ts.as_iterable(start=1, batch_size=3)  # batches 1, 2, 3 (the last one partial)
    got = list(DataLoader(view, batch_size=None, num_workers=2))
    want = list(ts.batches(3, start=1))
    assert len(got) == len(want) == 3
    for a, b in zip(got, want, strict=True):
        assert_same_batch(a, b)
    # and without workers, the same
    for a, b in zip(list(view), want, strict=True):
        assert_same_batch(a, b)


def test_iterable_view_rejects_bad_batch_size():
    with pytest.raises(ValueError, match="batch_size"):
        make_episodes().as_iterable(batch_size=0)


def test_tasks_layer_imports_nothing_of_omega_or_training():
    # read the sources (importing would also run metalearn/__init__.py, which re-exports every layer)
    package = Path(__file__).resolve().parents[1] / "metalearn" / "tasks"
    offenders = []
    for source in sorted(package.glob("*.py")):
        for node in ast.walk(ast.parse(source.read_text(), filename=str(source))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [("." * node.level) + (node.module or "")]
            else:
                continue
            for name in names:
                inside = name.startswith("metalearn.tasks") or (name.startswith(".") and not name.startswith(".."))
                inside = inside or name == "metalearn.deprecated"  # old-name aliases; imports nothing of the package
                if (name.startswith("metalearn") or name.startswith("..")) and not inside:
                    offenders.append(f"{source.name}: {name}")
    assert not offenders, offenders
