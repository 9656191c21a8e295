"""Seeded, indexable sources of tasks.

A `TaskSet` maps an index ``i`` to a task by seeding a fresh `torch.Generator` from
``(seed, i)`` and handing it to `TaskSet.sample`. Task ``i`` is therefore the same in every
run, in every process and in every DataLoader worker, whatever was sampled before it: a
meta-test set of 600 tasks is fixed and comparable across runs, and a meta-training loop
resumed at step ``s`` sees exactly the batches it would have seen without the interruption.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from typing import Any, ClassVar

import torch
from torch.utils.data import IterableDataset, get_worker_info

from metalearn.tasks.describe import describe_attributes
from metalearn.tasks.task import Task, TaskBatch, stack_tasks

__all__ = ["TaskSet", "TaskStream", "task_seed"]

_MASK64 = (1 << 64) - 1


def _splitmix64(z: int) -> int:
    """One round of SplitMix64 (Steele, Lea & Flood, 2014): a bijective 64-bit mixer."""
    z = (z + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def task_seed(seed: int, index: int) -> int:
    """The 64-bit generator seed of task ``index`` in a task set seeded with ``seed``.

    The derivation is ``mix(mix(seed) + index)`` with SplitMix64 as ``mix``: each step is a
    bijection of 64-bit integers that scatters neighbouring inputs across the whole range,
    so tasks of neighbouring seeds do not coincide (unlike ``seed + index``, where task 1 of
    seed 0 would be task 0 of seed 1).

    Args:
        seed: the task set's seed (any Python int; taken modulo 2**64).
        index: the task's index (non-negative).

    Returns:
        An integer in ``[0, 2**64)`` for `torch.Generator.manual_seed`.
    """
    return _splitmix64((_splitmix64(seed & _MASK64) + index) & _MASK64)


class TaskSet(ABC):
    """A map-style, seeded source of tasks: ``taskset[i]`` is always the same task.

    Subclasses implement `sample`, which draws one task using only the generator it is
    given. Everything else (indexing, streams, batches, DataLoader views) is built on it.

    Args:
        seed: seed of the whole set; task ``i`` uses a generator seeded with
            ``task_seed(seed, i)``.
        length: number of tasks (e.g. 600 for a meta-test set), or ``None`` for an endless
            set (meta-training), which has no ``len`` and is read with `stream` or `batches`.
    """

    #: public attributes that do not change the tasks, left out of `describe`.
    describe_skip: ClassVar[tuple[str, ...]] = ()

    def __init__(self, seed: int = 0, length: int | None = 600) -> None:
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int, got {seed!r} ({type(seed).__name__}); pass e.g. seed=0")
        if length is not None and (not isinstance(length, int) or length < 1):
            raise ValueError(f"length must be a positive int or None (endless), got {length!r}")
        self.seed = seed
        self.length = length

    @abstractmethod
    def sample(self, generator: torch.Generator) -> Task:
        """Draws one task, taking all its randomness from ``generator``."""

    def describe(self) -> dict[str, Any]:
        """Every setting that changes this set's tasks, as plain JSON (part of a training run's identity).

        By default the class and every public attribute (seed, length, sizes, ranges, the
        dataset's own description, the class pool's contents, ...); tensors and long lists
        enter as a digest of their contents. A subclass whose tasks depend on a private
        attribute or on a class attribute overrides it (and calls ``super().describe()``);
        one with a public attribute that does not change the tasks lists it in ``describe_skip``.
        """
        return describe_attributes(self, skip=self.describe_skip)

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
        return self.sample(self.generator(self._check_index(index)))

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
        return (self[i] for i in range(self.length))

    # -- streams and batches ---------------------------------------------------------------

    def stream(self, start: int = 0) -> Iterator[Task]:
        """Yields tasks ``start, start + 1, ...`` in index order.

        Endless for an endless set; a finite set stops after its last task.
        """
        index = start
        while self.length is None or index < self.length:
            yield self[index]
            index += 1

    def batch(self, indices: Iterable[int]) -> TaskBatch:
        """The tasks at ``indices`` stacked into a `TaskBatch`.

        Raises:
            ValueError: if the tasks differ in shape (variable ways/shots).
        """
        return stack_tasks([self[i] for i in indices])

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
