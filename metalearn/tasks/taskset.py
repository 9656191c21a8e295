"""Seeded, indexable sources of tasks.

Task ``i`` of a `TaskSet` is a pure function of ``(seed, i)``, so it is the same in every run,
in every process and in every DataLoader worker, whatever was sampled before it: a meta-test
set of 600 tasks is fixed and comparable across runs, and a meta-training loop resumed at step
``s`` sees exactly the batches it would have seen without the interruption.

A set defines its tasks one of two ways:

- **batched** (the built-in families and episodes): `TaskSet.sample_batch` makes a whole
  `TaskBatch` from `TaskDraws`, counter-based random words keyed by ``task_seed(seed, i)``
  (`metalearn.tasks.draws`). `TaskSet.batch` is then a few tensor operations for any number of
  tasks, and ``taskset[i]`` is the batch of task ``i`` alone: the same task bit for bit.
- **one at a time** (the simplest subclass): `TaskSet.sample` draws one task from a fresh
  `torch.Generator` seeded with ``task_seed(seed, i)``; `TaskSet.batch` stacks them.
"""

from __future__ import annotations

import copy
from abc import ABC
from collections.abc import Iterable, Iterator
from typing import Any, ClassVar

import torch
from torch.utils.data import IterableDataset, get_worker_info

from metalearn.tasks.describe import describe_attributes
from metalearn.tasks.draws import TaskDraws, splitmix64
from metalearn.tasks.task import Task, TaskBatch, stack_tasks

__all__ = ["TaskSet", "TaskStream", "task_seed"]

_MASK64 = (1 << 64) - 1
#: the `describe` entry of a batched set: which counter-based definition its tasks follow.
DRAWS_VERSION = "splitmix64-counter-v1"
#: how many tasks a batched set makes at a time when iterated (`TaskSet.stream`)
ITER_CHUNK = 64


def task_seed(seed: int, index: int) -> int:
    """The 64-bit seed (key) of task ``index`` in a task set seeded with ``seed``.

    The derivation is ``mix(mix(seed) + index)`` with SplitMix64 as ``mix``: each step is a
    bijection of 64-bit integers that scatters neighbouring inputs across the whole range,
    so tasks of neighbouring seeds do not coincide (unlike ``seed + index``, where task 1 of
    seed 0 would be task 0 of seed 1). A batched set keys its `TaskDraws` with it, a set that
    samples one task at a time seeds its `torch.Generator` with it.

    Args:
        seed: the task set's seed (any Python int; taken modulo 2**64).
        index: the task's index (non-negative).

    Returns:
        An integer in ``[0, 2**64)``.
    """
    return splitmix64((splitmix64(seed & _MASK64) + index) & _MASK64)


class TaskSet(ABC):  # noqa: B024  (no abstract method: one of sample / sample_batch is; subclasses add theirs)
    """A map-style, seeded source of tasks: ``taskset[i]`` is always the same task.

    Subclasses implement either `sample_batch`, which makes a batch of tasks from their
    `TaskDraws` in a few tensor operations (batched), or `sample`, which draws one task using
    only the generator it is given. Everything else (indexing, streams, batches, DataLoader
    views) is built on it.

    Args:
        seed: seed of the whole set; task ``i`` is keyed by ``task_seed(seed, i)``.
        length: number of tasks (e.g. 600 for a meta-test set), or ``None`` for an endless
            set (meta-training), which has no ``len`` and is read with `stream` or `batches`.

    Raises:
        TypeError: if the subclass implements neither `sample` nor `sample_batch`.
    """

    #: public attributes that do not change the tasks, left out of `describe`.
    describe_skip: ClassVar[tuple[str, ...]] = ()

    def __init__(self, seed: int = 0, length: int | None = 600) -> None:
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int, got {seed!r} ({type(seed).__name__}); pass e.g. seed=0")
        if length is not None and (not isinstance(length, int) or length < 1):
            raise ValueError(f"length must be a positive int or None (endless), got {length!r}")
        if not self.batched and type(self).sample is TaskSet.sample:
            raise TypeError(
                f"{type(self).__name__} defines no tasks: implement sample(generator) -> Task (one task at a "
                "time) or sample_batch(draws) -> TaskBatch (a batch in tensor operations)"
            )
        self.seed = seed
        self.length = length
        # where batched tasks are made; not part of `describe` (the tasks are the same on every device)
        self._device = torch.device("cpu")

    @property
    def batched(self) -> bool:
        """Whether the tasks come from `sample_batch` (a batch in a few tensor operations)."""
        return type(self).sample_batch is not TaskSet.sample_batch

    def sample_batch(self, draws: TaskDraws) -> TaskBatch:
        """Makes the tasks whose random words are ``draws`` (one task per key), as a `TaskBatch`.

        Task ``j`` of the batch must depend on ``draws`` only through its own row (its key), so
        that a task is the same whichever tasks it is drawn with. Not implemented by sets that
        define their tasks one at a time (`sample`).
        """
        raise NotImplementedError(f"{type(self).__name__} samples one task at a time (sample(generator))")

    def sample(self, generator: torch.Generator) -> Task:
        """Draws one task, taking all its randomness from ``generator``.

        A batched set draws a random 63-bit key from ``generator`` and makes the task of that key.
        """
        if not self.batched:
            raise NotImplementedError(f"{type(self).__name__} implements neither sample nor sample_batch")
        key = torch.empty((), dtype=torch.int64).random_(generator=generator)
        return self.sample_batch(TaskDraws(key.reshape(1).to(self._device)))[0]

    @property
    def device(self) -> torch.device:
        """Where a batched set makes its tasks (`to`); tasks of other sets are made on the CPU."""
        return self._device

    def to(self, device: torch.device | str) -> TaskSet:
        """A copy of this set that makes its tasks on ``device`` (same tasks, same `describe`).

        A batched set then draws, indexes and builds every batch there, without a host round trip;
        a set that samples one task at a time samples on the CPU and moves each batch.
        """
        moved = copy.copy(self)
        moved._device = torch.device(device)
        return moved

    def draws(self, indices: Iterable[int]) -> TaskDraws:
        """The `TaskDraws` of tasks ``indices`` (already checked), on `device`."""
        return TaskDraws.of(self.seed, indices, self._device)

    def describe(self) -> dict[str, Any]:
        """Every setting that changes this set's tasks, as plain JSON (part of a training run's identity).

        By default the class and every public attribute (seed, length, sizes, ranges, the
        dataset's own description, the class pool's contents, ...); tensors and long lists
        enter as a digest of their contents. A subclass whose tasks depend on a private
        attribute or on a class attribute overrides it (and calls ``super().describe()``);
        one with a public attribute that does not change the tasks lists it in ``describe_skip``.
        """
        out = describe_attributes(self, skip=self.describe_skip)
        if self.batched:
            out["draws"] = DRAWS_VERSION
        return out

    # -- indexing -------------------------------------------------------------------------

    @property
    def endless(self) -> bool:
        """Whether the set has no length (``length=None``)."""
        return self.length is None

    def generator(self, index: int) -> torch.Generator:
        """A fresh CPU generator seeded for task ``index`` (what `__getitem__` samples with)."""
        return torch.Generator().manual_seed(task_seed(self.seed, index))

    def _check_index(self, index: int) -> int:
        if not isinstance(index, int):
            try:
                index = int(index.__index__())
            except AttributeError:
                raise TypeError(f"task indices must be integers, got {type(index).__name__}") from None
        if self.length is None:
            if index < 0:
                raise IndexError(f"task index {index} is negative, but an endless task set has no end")
            return index
        if index < 0:
            index += self.length
        if not 0 <= index < self.length:
            raise IndexError(f"task index out of range for a task set of length {self.length}")
        return index

    def __getitem__(self, index: int) -> Task:
        index = self._check_index(index)
        if self.batched:
            return self.sample_batch(self.draws([index]))[0]
        return self.sample(self.generator(index))

    def __len__(self) -> int:
        if self.length is None:
            raise TypeError(
                f"{type(self).__name__} is endless (length=None) and has no len(); iterate it with "
                ".stream() or .batches(batch_size), or give it a length"
            )
        return self.length

    def __iter__(self) -> Iterator[Task]:
        if self.length is None:
            raise TypeError(
                f"{type(self).__name__} is endless (length=None): iterate it with .stream() or "
                ".batches(batch_size) so the endlessness is explicit"
            )
        return self.stream()

    # -- streams and batches ---------------------------------------------------------------

    def stream(self, start: int = 0) -> Iterator[Task]:
        """Yields tasks ``start, start + 1, ...`` in index order.

        Endless for an endless set; a finite set stops after its last task. A batched set of
        same-shaped tasks makes them `ITER_CHUNK` at a time (`batch`: the same tasks, faster).
        """
        index = start
        while self.length is None or index < self.length:
            stop = index + ITER_CHUNK if self.length is None else min(index + ITER_CHUNK, self.length)
            if self.batched and self.same_shaped:
                yield from self.batch(range(index, stop))
            else:
                yield from (self[i] for i in range(index, stop))
            index = stop

    @property
    def same_shaped(self) -> bool:
        """Whether every task has the same shapes, so any tasks stack into a batch (by default true)."""
        return True

    def batch(self, indices: Iterable[int]) -> TaskBatch:
        """The tasks at ``indices`` as one `TaskBatch`, exactly the tasks ``self[i]`` gives.

        A batched set makes them in a few tensor operations on `device` (``indices`` may be a
        range, a list or an int64 tensor); another set stacks them one by one.

        Raises:
            IndexError: if an index is out of range.
            ValueError: if there are no indices, or the tasks differ in shape (variable ways/shots).
        """
        if not self.batched:
            batch = stack_tasks([self[i] for i in indices])
            return batch if self._device.type == "cpu" else batch.to(self._device)
        checked = self._check_indices(indices)
        return self.sample_batch(self.draws(checked))

    def _check_indices(self, indices: Iterable[int]) -> range | list[int] | torch.Tensor:
        """``indices`` checked like `__getitem__` does (negative ones counted from the end)."""
        if isinstance(indices, torch.Tensor):
            if indices.ndim != 1 or indices.is_floating_point() or indices.dtype == torch.bool:
                raise TypeError(
                    f"task indices must be a 1-D integer tensor, got {indices.dtype} of shape {tuple(indices.shape)}"
                )
            if indices.numel() == 0:
                raise ValueError("batch needs at least one task index")
            return indices  # checked on the device would cost a host round trip; the caller owns them
        if isinstance(indices, range) and indices.step == 1 and len(indices):
            first, last = self._check_index(indices.start), self._check_index(indices.stop - 1)
            if last - first == len(indices) - 1:
                return range(first, last + 1)
        checked = [self._check_index(i) for i in indices]
        if not checked:
            raise ValueError("batch needs at least one task index")
        return checked

    def batches(self, batch_size: int, start: int = 0) -> Iterator[TaskBatch]:
        """Yields batches ``start, start + 1, ...``; batch ``b`` holds tasks
        ``b * batch_size`` to ``b * batch_size + batch_size - 1``.

        ``start`` counts batches, not tasks, so a training loop resumed at step ``s`` calls
        ``batches(batch_size, start=s)`` and gets exactly the batches it would have had.
        Endless for an endless set; for a finite set the last batch may be smaller.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        b = start
        while True:
            first = b * batch_size
            stop = first + batch_size
            if self.length is not None:
                if first >= self.length:
                    return
                stop = min(stop, self.length)
            yield self.batch(range(first, stop))
            b += 1

    def as_iterable(self, start: int = 0, batch_size: int | None = None) -> TaskStream:
        """An `IterableDataset` view for `torch.utils.data.DataLoader` with worker processes.

        Items are sharded round-robin across workers (worker ``w`` of ``W`` makes items
        ``w, w + W, ...``), which is the order a DataLoader collects them in, so the
        output equals the single-process order. Use it with ``DataLoader(..., batch_size=None)``;
        to get batches of tasks (`TaskBatch`), pass ``batch_size`` here (each batch is then made whole by one
        worker, and batch ``b`` holds the same tasks as in `batches`).

        Args:
            start: first task index, or first batch index when ``batch_size`` is given.
            batch_size: ``None`` to yield tasks, or the number of tasks per yielded batch.
        """
        return TaskStream(self, start=start, batch_size=batch_size)


class TaskStream(IterableDataset):
    """Iterable view of a `TaskSet` that shards items across DataLoader workers in order.

    See `TaskSet.as_iterable`.
    """

    def __init__(self, taskset: TaskSet, start: int = 0, batch_size: int | None = None) -> None:
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size must be at least 1 or None, got {batch_size}")
        self.taskset = taskset
        self.start = start
        self.batch_size = batch_size

    def _item(self, position: int) -> Task | TaskBatch | None:
        """Item ``position`` of the view, or ``None`` past the end of a finite set."""
        length = self.taskset.length
        if self.batch_size is None:
            if length is not None and position >= length:
                return None
            return self.taskset[position]
        first = position * self.batch_size
        if length is not None and first >= length:
            return None
        stop = first + self.batch_size if length is None else min(first + self.batch_size, length)
        return self.taskset.batch(range(first, stop))

    def __iter__(self) -> Iterator[Task | TaskBatch]:
        info = get_worker_info()
        worker, n_workers = (0, 1) if info is None else (info.id, info.num_workers)
        position = self.start + worker
        while True:
            item = self._item(position)
            if item is None:
                return
            yield item
            position += n_workers
