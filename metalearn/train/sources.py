"""Where each outer step's meta-batch comes from, and what of the source goes into the run identity.

Two kinds of source, and when a resume is exact:

- **indexable** (a `TaskSet` or a list of `Task`): step ``s`` uses tasks ``s*B ... s*B + B - 1``
  (modulo the length of a finite one). A resume computes the batch of its first step directly:
  exact and free.
- **any other iterable** (a ``torch.utils.data.DataLoader``, with workers or not, a
  `TaskSet.as_iterable` stream, a generator): consumed in order, one item per step (an item
  is a `TaskBatch`, a list of `Task`, or a single `Task`, B of which make a batch). On
  resume the items of the completed steps are drawn again and dropped (the cost: loading
  them once more). The resume is exact when the iterable yields the same items when started
  again: a DataLoader over a `TaskSet` without shuffling, or with shuffling and its own
  ``generator=torch.Generator().manual_seed(...)`` (the DataLoader then seeds its workers from
  it too). A re-iterable source that runs out starts again (warned once); a one-shot
  iterator that runs out stops the run with an error (its last checkpoint is intact).

Under torch.distributed (`metalearn.distributed`) each rank takes its contiguous slice of the
same meta-batch (``shard_batch``): an indexable source builds only the rank's own tasks, an
iterable one is read whole by every rank and sliced.
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from metalearn.distributed import Shard, slice_for_rank
from metalearn.tasks.task import Task, TaskBatch, stack_tasks
from metalearn.tasks.taskset import TaskSet, task_seed

__all__ = [
    "TaskSetWrapWarning",
    "batch_for_step",
    "check_task_collection",
    "describe_tasks",
    "open_source",
    "step_generator",
    "to_device",
]


@dataclass(frozen=True)
class RankBatch:
    """One rank's share of a step's meta-batch (`metalearn.distributed`).

    Attributes:
        batch: the rank's tasks ``lo .. lo+len(batch)-1`` (possibly none).
        indices: task-set indices of the whole meta-batch (``None`` for an iterable source).
        lo: the position of the rank's first task in the meta-batch.
        total: the size of the whole meta-batch.
    """

    batch: TaskBatch
    indices: list[int] | None
    lo: int
    total: int


class TaskSetWrapWarning(UserWarning):
    """A finite source task set is used more than once by a run (its tasks repeat)."""


def step_generator(seed: int, step: int) -> torch.Generator:
    """The generator of outer step ``step``: a fresh CPU generator seeded from ``(seed, step)``."""
    return torch.Generator().manual_seed(task_seed(seed, step))


def to_device(batch: TaskBatch, device: torch.device) -> TaskBatch:
    """``batch`` on ``device``. From the CPU to a CUDA device, each tensor goes through pinned
    (page-locked) memory and is copied with ``non_blocking=True``: the copy is queued on the
    current stream and the host goes on (to sample the next batch) while the device waits for
    it; kernels queued after it on the same stream see the data. Otherwise ``batch.to(device)``.
    """
    if device.type != "cuda" or not all(t.device.type == "cpu" for t in (*batch.train, *batch.val)):
        return batch.to(device)

    def pinned_copy(pair: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        # torch's pinned allocator keeps the host buffer until the queued copy has read it
        x, y = (t.pin_memory().to(device, non_blocking=True) for t in pair)
        return x, y

    return TaskBatch(pinned_copy(batch.train), pinned_copy(batch.val))


def step_indices(tasks: TaskSet | Sequence[Task], step: int, batch_size: int) -> list[int]:
    """Task indices of step ``step``: ``step*B ... step*B + B - 1``, modulo a finite length."""
    first = step * batch_size
    if isinstance(tasks, TaskSet) and tasks.endless:
        return list(range(first, first + batch_size))
    n = len(tasks)
    return [(first + j) % n for j in range(batch_size)]


def batch_for_step(tasks: TaskSet | Sequence[Task], step: int, batch_size: int) -> TaskBatch:
    """The meta-batch of outer step ``step``: tasks ``step*B ... step*B + B - 1`` (modulo a finite length)."""
    return _tasks_at(tasks, step_indices(tasks, step, batch_size))


def _tasks_at(tasks: TaskSet | Sequence[Task], indices: list[int]) -> TaskBatch:
    """The tasks at ``indices`` as one batch: a task set's own `TaskSet.batch`, a list's tasks stacked."""
    if isinstance(tasks, TaskSet):
        return tasks.batch(indices)
    return stack_tasks([tasks[i] for i in indices])


def _is_indexable(tasks: object) -> bool:
    return isinstance(tasks, TaskSet) or (isinstance(tasks, Sequence) and not isinstance(tasks, TaskBatch))


def _digest(tasks: Sequence[Task]) -> str:
    sha = hashlib.sha256()
    for task in tasks:
        for t in (*task.train, *task.val):
            t = t.detach().cpu().contiguous()
            sha.update(f"{tuple(t.shape)}{t.dtype};".encode())
            sha.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return sha.hexdigest()


def _describe_loader(loader: Any) -> dict[str, Any]:
    """A DataLoader: its dataset's description (when it has one) and the settings that order it."""
    dataset = loader.dataset
    describe = getattr(dataset, "describe", None)
    sampler = getattr(loader, "batch_sampler", None) or getattr(loader, "sampler", None)
    return {
        "class": type(loader).__qualname__,
        "dataset": describe() if callable(describe) else type(dataset).__qualname__,
        "batch_size": loader.batch_size,
        "sampler": type(sampler).__qualname__ if sampler is not None else None,
        "drop_last": bool(loader.drop_last),
    }


def describe_tasks(tasks: object) -> dict[str, Any]:
    """The run identity's part for the source tasks: every setting that changes them.

    A `TaskSet` describes itself (`TaskSet.describe`: its class, sizes, seed, length, dataset,
    class pool, augmentation...); a list of tasks is its contents (a digest of every tensor); a
    DataLoader its dataset's description and batching; another iterable only its class (its
    contents cannot be known without consuming it).
    """
    describe = getattr(tasks, "describe", None)
    if callable(describe):
        return {"describe": describe()}
    if isinstance(tasks, torch.utils.data.DataLoader):
        return {"loader": _describe_loader(tasks)}
    if _is_indexable(tasks):
        assert isinstance(tasks, Sequence)
        return {"class": type(tasks).__qualname__, "length": len(tasks), "sha256": _digest(tasks)}
    return {"iterable": type(tasks).__qualname__}


def check_task_collection(name: str, tasks: object, optional: bool = False, iterable: bool = False) -> None:
    """Raises `TypeError` / `ValueError` for ``tasks`` that are not a usable source of tasks.

    A `TaskSet` or a non-empty sequence of `Task` (an empty one would divide by zero in
    `batch_for_step`); with ``iterable=True`` also any other iterable (checked as it is consumed).
    """
    if (optional and tasks is None) or isinstance(tasks, TaskSet):
        return
    if iterable and not isinstance(tasks, (Sequence, TaskBatch)) and isinstance(tasks, Iterable):
        return
    if isinstance(tasks, TaskBatch) or not isinstance(tasks, Sequence):
        kinds = (
            "a TaskSet, a list of Task or an iterable of task batches" if iterable else "a TaskSet or a list of Task"
        )
        raise TypeError(
            f"{name} must be {kinds}, got {type(tasks).__name__}"
            + ("; pass list(batch) for a TaskBatch" if isinstance(tasks, TaskBatch) else "")
        )
    if len(tasks) == 0:
        raise ValueError(f"{name} is empty (0 tasks); give at least one task")
    bad = next((i for i, t in enumerate(tasks) if not isinstance(t, Task)), None)
    if bad is not None:
        raise TypeError(f"{name}[{bad}] is a {type(tasks[bad]).__name__}, not a Task; build each with Task(train, val)")


def warn_if_wrapping(tasks: object, steps: int, batch_size: int) -> None:
    """Warns once (`TaskSetWrapWarning`) when a finite `TaskSet` runs out before ``steps`` and repeats."""
    if not isinstance(tasks, TaskSet) or tasks.endless or steps * batch_size <= len(tasks):
        return
    n = len(tasks)
    warnings.warn(
        f"the source task set {type(tasks).__name__} has length={n}, but {steps} steps x {batch_size} tasks need "
        f"{steps * batch_size}: it wraps around after step {n // batch_size} and each task is used about "
        f"{steps * batch_size / n:.1f} times. Build it with length=None for a new task at every step, or give it "
        "a length of at least steps * meta_batch_size (repeating is fine if you meant it)",
        TaskSetWrapWarning,
        stacklevel=3,
    )


#: an indexable source of small same-shaped batches draws the batches of up to `PREFETCH_STEPS` steps in one
#: call, holding at most `PREFETCH_BYTES` of them. Drawn between two steps, a batch of 25 sinusoid tasks
#: costs the step after it ~0.1 ms on top of its own ~0.05 ms (what the drawing leaves in the caches), ~8% of a
#: 1.9 ms MAML step; drawn 16 steps at a time, both are paid once per 16 steps (docs/results.md)
PREFETCH_STEPS = 16
PREFETCH_BYTES = 1 << 20


def _batch_bytes(batch: TaskBatch) -> int:
    return sum(t.numel() * t.element_size() for t in (*batch.train, *batch.val))


def _rows(batch: TaskBatch, lo: int, hi: int) -> TaskBatch:
    """Tasks ``lo .. hi - 1`` of ``batch``: views, no copy."""
    (x, y), (xv, yv) = batch.train, batch.val
    return TaskBatch((x[lo:hi], y[lo:hi]), (xv[lo:hi], yv[lo:hi]))


class IndexedSource:
    """Batches of an indexable source: step ``s`` is computed directly (exact, free resume).

    A batched `TaskSet` of same-shaped tasks whose batches are small (`PREFETCH_BYTES`) is drawn
    `PREFETCH_STEPS` steps at a time: one `TaskSet.batch` of those steps' indices, each step's batch a
    view of its rows. The tasks are the same (a batched set's task depends on its index alone), so runs
    and resumes are unchanged; only the drawing is amortised.
    """

    def __init__(self, tasks: TaskSet | Sequence[Task], batch_size: int) -> None:
        self.tasks, self.batch_size = tasks, batch_size
        # steps drawn per call: decided by the size of the first batch (1: every step on its own)
        self._steps_per_draw: int | None = None
        if not (isinstance(tasks, TaskSet) and tasks.batched and tasks.same_shaped):
            self._steps_per_draw = 1
        self._drawn: tuple[int, TaskBatch] | None = None  # (first step, the batches of it and the next ones)

    def start(self, step: int) -> None:
        """Nothing to skip: every step's batch is a function of the step."""

    def batch(self, step: int) -> tuple[TaskBatch, list[int] | None]:
        """The batch of step ``step`` and its task-set indices."""
        indices = step_indices(self.tasks, step, self.batch_size)
        if self._steps_per_draw is None:
            batch = _tasks_at(self.tasks, indices)
            self._steps_per_draw = max(1, min(PREFETCH_STEPS, PREFETCH_BYTES // max(1, _batch_bytes(batch))))
            return batch, indices
        if self._steps_per_draw == 1:
            return _tasks_at(self.tasks, indices), indices
        steps = self._steps_per_draw
        if self._drawn is None or not self._drawn[0] <= step < self._drawn[0] + steps:
            every = [i for s in range(step, step + steps) for i in step_indices(self.tasks, s, self.batch_size)]
            self._drawn = (step, _tasks_at(self.tasks, every))
        first, drawn = self._drawn
        lo = (step - first) * self.batch_size
        return _rows(drawn, lo, lo + self.batch_size), indices

    def shard_batch(self, step: int, shard: Shard) -> RankBatch:
        """This rank's slice of the batch of step ``step``: only its own tasks are built."""
        indices = step_indices(self.tasks, step, self.batch_size)
        lo, hi = shard.bounds(len(indices))
        mine = indices[lo:hi] or indices[:1]  # a rank without tasks slices one task's batch to zero
        built = _tasks_at(self.tasks, mine)
        return RankBatch(built if hi > lo else slice_for_rank(built, shard), indices, lo, len(indices))


_END = object()


class IterableSource:
    """Batches of any iterable, consumed in order; a resume draws (and drops) the completed steps' items."""

    def __init__(self, tasks: Iterable[Any], batch_size: int) -> None:
        self.tasks, self.batch_size = tasks, batch_size
        self._items: Iterator[Any] | None = None
        self._passes = 0

    def start(self, step: int) -> None:
        """Starts iterating and skips the items of steps ``0 .. step - 1``."""
        self._items = self._new_pass()
        for skipped in range(step):
            self.batch(skipped)

    def _new_pass(self) -> Iterator[Any]:
        self._passes += 1
        return iter(self.tasks)

    def _next(self, step: int) -> Any:
        assert self._items is not None, "start() first"
        try:
            return next(self._items)
        except StopIteration:
            pass
        if isinstance(self.tasks, Iterator):
            raise ValueError(
                f"the source iterator ran out at outer step {step}: a one-shot iterator cannot be started again. "
                "Pass a re-iterable source (a DataLoader, a TaskSet, a list), an endless one, or fewer steps; "
                "the last checkpoint is intact"
            )
        if self._passes == 1:
            warnings.warn(
                f"the source {type(self.tasks).__name__} ran out at outer step {step} and starts again: its "
                "tasks repeat. Use an endless source (e.g. a TaskSet with length=None) for new tasks at every step",
                TaskSetWrapWarning,
                stacklevel=4,
            )
        self._items = self._new_pass()
        item = next(self._items, _END)
        if item is _END:
            raise ValueError(f"the source {type(self.tasks).__name__} yields nothing; give it at least one task")
        return item

    def batch(self, step: int) -> tuple[TaskBatch, list[int] | None]:
        """The next batch (a `TaskBatch` item, a list of tasks stacked, or B single tasks stacked)."""
        item = self._next(step)
        if isinstance(item, TaskBatch):
            return item, None
        if isinstance(item, Task):
            tasks = [item] + [self._next(step) for _ in range(self.batch_size - 1)]
        elif isinstance(item, (list, tuple)):
            tasks = list(item)
        else:
            tasks = [item]
        bad = next((t for t in tasks if not isinstance(t, Task)), None)
        if bad is not None:
            raise TypeError(
                f"outer step {step}: the source yielded a {type(bad).__name__}; it must yield TaskBatch, Task or "
                "lists of Task (for a DataLoader over a TaskSet pass collate_fn=metalearn.stack_tasks)"
            )
        return stack_tasks(tasks), None

    def shard_batch(self, step: int, shard: Shard) -> RankBatch:
        """This rank's slice of the next batch: every rank consumes the whole item (the source is
        the same on every rank) and keeps its own tasks."""
        batch, _ = self.batch(step)
        lo, _hi = shard.bounds(len(batch))
        return RankBatch(slice_for_rank(batch, shard), None, lo, len(batch))


def open_source(tasks: Any, batch_size: int) -> IndexedSource | IterableSource:
    """The source object for ``tasks`` (indexable or consumed in order)."""
    if _is_indexable(tasks):
        return IndexedSource(tasks, batch_size)
    return IterableSource(tasks, batch_size)
