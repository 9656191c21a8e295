"""A task is one (train, val) pair; tasks of the same shape stack into a `TaskBatch`.

The words follow the design: a task's ``train`` half is what θ is fitted on in the inner
loop, its ``val`` half is what the fitted θ is scored on (the meta-objective during
meta-training, the reported metric during meta-testing).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["Task", "TaskBatch", "stack_tasks"]

Pair = tuple[Tensor, Tensor]


def _check_pair(name: str, pair: Pair) -> None:
    if not (isinstance(pair, tuple) and len(pair) == 2):
        raise TypeError(f"Task.{name} must be a pair (x, y) of tensors, got {type(pair).__name__}")
    x, y = pair
    if not (isinstance(x, Tensor) and isinstance(y, Tensor)):
        raise TypeError(f"Task.{name} must hold tensors, got ({type(x).__name__}, {type(y).__name__})")
    if x.shape[0] != y.shape[0]:
        raise ValueError(
            f"Task.{name}: x has {x.shape[0]} examples but y has {y.shape[0]}; "
            "the first dimension of x and y must both be the number of examples"
        )


@dataclass(frozen=True)
class Task:
    """One task: ``train = (x, y)`` to adapt on and ``val = (x, y)`` to score on.

    Attributes:
        train: inputs ``[n_train, ...]`` and targets ``[n_train, ...]``.
        val: inputs ``[n_val, ...]`` and targets ``[n_val, ...]``.
    """

    train: Pair
    val: Pair

    def __post_init__(self) -> None:
        _check_pair("train", self.train)
        _check_pair("val", self.val)

    def to(self, *args, **kwargs) -> Task:
        """Returns the task with every tensor moved/cast as by ``Tensor.to``; integer
        targets keep their dtype when a floating dtype is given."""
        return Task(_pair_to(self.train, args, kwargs), _pair_to(self.val, args, kwargs))


def _tensor_to(t: Tensor, args, kwargs) -> Tensor:
    if t.is_floating_point():
        return t.to(*args, **kwargs)
    # keep integer labels integer: only move them
    device = kwargs.get("device")
    for a in args:
        if isinstance(a, (str, torch.device)):
            device = a
    return t.to(device) if device is not None else t


def _pair_to(pair: Pair, args, kwargs) -> Pair:
    return (_tensor_to(pair[0], args, kwargs), _tensor_to(pair[1], args, kwargs))


@dataclass(frozen=True)
class TaskBatch:
    """Same-shaped tasks stacked along a leading task dimension.

    ``train = (x, y)`` with ``x`` of shape ``[n_tasks, n_train, ...]``; likewise ``val``.
    Indexing returns the i-th `Task`; iterating yields the tasks in order.
    """

    train: Pair
    val: Pair

    def __post_init__(self) -> None:
        sizes = {t.shape[0] for t in (*self.train, *self.val)}
        if len(sizes) != 1:
            raise ValueError(f"TaskBatch tensors disagree on the number of tasks (leading dimension): {sizes}")

    def __len__(self) -> int:
        return self.train[0].shape[0]

    def __getitem__(self, i: int) -> Task:
        return Task((self.train[0][i], self.train[1][i]), (self.val[0][i], self.val[1][i]))

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def to(self, *args, **kwargs) -> TaskBatch:
        """Like `Task.to`, for the whole batch."""
        return TaskBatch(_pair_to(self.train, args, kwargs), _pair_to(self.val, args, kwargs))


def stack_tasks(tasks: Sequence[Task]) -> TaskBatch:
    """Stacks same-shaped tasks into a `TaskBatch` (also usable as a DataLoader ``collate_fn``).

    Raises:
        ValueError: if there are no tasks, or the tasks differ in shape (e.g. a variable-way
            task set): batch those one by one, or fix ways and shots.
    """
    tasks = list(tasks)
    if not tasks:
        raise ValueError("stack_tasks needs at least one task")
    first = tasks[0]
    shapes = [tuple(t.shape) for t in (*first.train, *first.val)]
    for i, task in enumerate(tasks[1:], start=1):
        other = [tuple(t.shape) for t in (*task.train, *task.val)]
        if other != shapes:
            raise ValueError(
                f"task {i} has shapes {other} but task 0 has {shapes}: only same-shaped tasks stack. "
                "With variable ways/shots, adapt the tasks one at a time instead of as a batch."
            )
    return TaskBatch(
        train=(torch.stack([t.train[0] for t in tasks]), torch.stack([t.train[1] for t in tasks])),
        val=(torch.stack([t.val[0] for t in tasks]), torch.stack([t.val[1] for t in tasks])),
    )
