"""N-way K-shot episodes drawn from any labelled dataset.

An episode (Vinyals et al., 2016, "Matching Networks for One Shot Learning") picks ``N``
classes from a pool, then ``K`` train ("support") and ``Q`` val ("query") examples of each,
all distinct. Its labels are ``0 .. N-1`` in a fresh random class order, so a learner cannot
memorise a class-to-label mapping across tasks. Ways and shots may also be drawn per task
from a range, for variable-way variable-shot episodes in the spirit of Meta-Dataset
(Triantafillou et al., 2020).
"""

from __future__ import annotations

import operator
from collections.abc import Sequence

import torch
from torch import Tensor

from metalearn.tasks.datasets import LabelledDataset
from metalearn.tasks.task import Task
from metalearn.tasks.taskset import TaskSet

__all__ = ["EpisodicTaskSet"]

SizeSpec = int | tuple[int, int]


def _as_int(value: object) -> int | None:
    """``value`` as a Python int if it is an integer (not a bool), else ``None``."""
    if isinstance(value, bool):
        return None
    try:
        return operator.index(value)  # type: ignore[arg-type]  # anything with __index__; others: TypeError
    except TypeError:
        return None


def _size_range(name: str, value: SizeSpec) -> tuple[int, int]:
    """Parses an int or an inclusive ``(low, high)`` range into ``(low, high)``."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int or a (low, high) pair of ints, got a bool")
    single = _as_int(value)
    if single is not None:
        low = high = single
    elif isinstance(value, Sequence) and len(value) == 2 and all(_as_int(v) is not None for v in value):
        low, high = (int(v) for v in value)  # integers, checked just above
        if low > high:
            raise ValueError(f"{name} range ({low}, {high}) has low > high; write it as ({high}, {low})")
    else:
        raise TypeError(f"{name} must be an int or an inclusive (low, high) pair of ints, got {value!r}")
    if low < 1:
        raise ValueError(f"{name} must be at least 1, got {value!r}")
    return low, high


def _preview(values: list[int], limit: int = 8) -> str:
    text = ", ".join(str(v) for v in values[:limit])
    return f"[{text}{', ...' if len(values) > limit else ''}]"


class EpisodicTaskSet(TaskSet):
    """N-way K-shot classification tasks from a class pool of a `LabelledDataset`.

    Task ``i`` holds ``train = (x, y)`` with ``x`` of shape ``[ways * shots, ...]`` and
    ``val = (x, y)`` with ``x`` of shape ``[ways * queries, ...]``; inputs come from
    ``dataset.gather`` (float for the built-in image datasets), labels are ``int64`` in
    ``0 .. ways-1``, grouped by class (``y = [0]*shots + [1]*shots + ...``). Label ``j`` is
    the ``j``-th class of a fresh random permutation, and no example appears twice in a
    task, so train and val are disjoint.

    Items are grouped by class once, at construction (a sorted index and per-class offsets),
    and each task costs a few vectorised tensor operations and one ``dataset.gather``.

    Args:
        dataset: where examples come from; only its ``labels`` are read at construction.
        ways: classes per task, an int or an inclusive ``(low, high)`` range drawn
            uniformly per task.
        shots: train examples per class, an int or an inclusive ``(low, high)`` range drawn
            uniformly per task (all classes of a task get the same number).
        queries: val examples per class.
        classes: the class pool (e.g. ``split.source``); defaults to every class of the
            dataset.
        seed: seed of the task set (see `TaskSet`).
        length: number of tasks, or ``None`` for an endless set.

    Attributes:
        dataset, ways, shots, queries: as given.
        classes: the pool as a sorted ``int64`` tensor.
        class_counts: number of examples of each pool class, aligned with ``classes``.

    Raises:
        ValueError: at construction, if a task could not be drawn: more ways than pool
            classes, or a pool class with fewer than ``shots + queries`` examples (the
            message names the classes and the fix), an empty pool, or pool classes that
            the dataset does not have.
    """

    def __init__(
        self,
        dataset: LabelledDataset,
        ways: SizeSpec,
        shots: SizeSpec,
        queries: int,
        *,
        classes: Tensor | Sequence[int] | None = None,
        seed: int = 0,
        length: int | None = 600,
    ) -> None:
        super().__init__(seed=seed, length=length)
        if not isinstance(dataset, LabelledDataset):
            raise TypeError(
                f"dataset must be a LabelledDataset (with a labels tensor), got {type(dataset).__name__}; "
                "wrap in-memory data in metalearn.tasks.TensorLabelledDataset(inputs, labels)"
            )
        self.dataset = dataset
        self.ways = ways
        self.shots = shots
        self._ways = _size_range("ways", ways)
        self._shots = _size_range("shots", shots)
        n_queries = _as_int(queries)
        if n_queries is None or n_queries < 1:
            raise ValueError(f"queries (val examples per class) must be an int of at least 1, got {queries!r}")
        self.queries = n_queries

        labels = dataset.labels
        pool = dataset.classes if classes is None else torch.as_tensor(classes)
        if pool.numel() == 0:
            raise ValueError("the class pool is empty; give at least `ways` classes")
        if pool.ndim != 1 or pool.is_floating_point() or pool.dtype == torch.bool:
            raise ValueError(f"classes must be a 1-D list of integer class ids, got {pool!r}")
        pool = pool.long()
        unique_pool = torch.unique(pool)
        if unique_pool.numel() != pool.numel():
            raise ValueError("classes lists some class ids more than once; give each class once")
        self.classes = unique_pool

        # Group the pool's items by class once: items sorted by class, plus offsets.
        in_pool = torch.isin(labels, self.classes)
        items = torch.nonzero(in_pool).flatten()
        order = torch.argsort(labels[items], stable=True)
        self._items = items[order]
        class_position = torch.searchsorted(self.classes, labels[self._items])
        counts = torch.bincount(class_position, minlength=self.classes.numel())
        self.class_counts = counts
        self._offsets = torch.cumsum(counts, 0) - counts

        absent = self.classes[counts == 0].tolist()
        if absent:
            raise ValueError(
                f"classes {_preview(absent)} of the pool have no examples in the dataset; "
                "use only classes the dataset has (see dataset.classes)"
            )
        n_pool = self.classes.numel()
        if self._ways[1] > n_pool:
            raise ValueError(
                f"{self._ways[1]}-way tasks need at least {self._ways[1]} classes, but the pool has {n_pool}; "
                "lower ways or use a larger class pool"
            )
        need = self._shots[1] + queries
        short = self.classes[counts < need].tolist()
        if short:
            fewest = int(counts.min())
            raise ValueError(
                f"{self._shots[1]} shots + {queries} queries need {need} examples per class, but pool classes "
                f"{_preview(short)} have fewer (as few as {fewest}); lower shots or queries to at most "
                f"{fewest} in total, or leave those classes out of the pool (classes=...)"
            )
        self._balanced = bool((counts == counts[0]).all())
        self._max_count = int(counts.max())

    @property
    def fixed_shape(self) -> bool:
        """Whether every task has the same shape (fixed ways and shots), so tasks stack."""
        return self._ways[0] == self._ways[1] and self._shots[0] == self._shots[1]

    @property
    def max_ways(self) -> int:
        """The largest number of ways a task can have."""
        return self._ways[1]

    def _draw_size(self, bounds: tuple[int, int], generator: torch.Generator) -> int:
        low, high = bounds
        if low == high:
            return low
        return int(torch.randint(low, high + 1, (1,), generator=generator))

    def sample(self, generator: torch.Generator) -> Task:
        ways = self._draw_size(self._ways, generator)
        shots = self._draw_size(self._shots, generator)
        per_class = shots + self.queries

        chosen = torch.randperm(self.classes.numel(), generator=generator)[:ways]
        if self._balanced:
            width = self._max_count
            keys = torch.rand(ways, width, generator=generator)
        else:
            counts = self.class_counts[chosen]
            width = int(counts.max())
            keys = torch.rand(ways, width, generator=generator)
            keys.masked_fill_(torch.arange(width) >= counts[:, None], 2.0)  # never among the smallest
        # the `per_class` smallest keys of a row: a uniform draw without replacement
        positions = torch.argsort(keys, dim=1)[:, :per_class]
        items = self._items[self._offsets[chosen, None] + positions]

        n_train = ways * shots
        indices = torch.cat((items[:, :shots].reshape(-1), items[:, shots:].reshape(-1)))
        x = self.dataset.gather(indices)
        labels = torch.arange(ways)
        return Task(
            train=(x[:n_train], labels.repeat_interleave(shots)),
            val=(x[n_train:], labels.repeat_interleave(self.queries)),
        )

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(ways={self.ways}, shots={self.shots}, queries={self.queries}, "
            f"classes={self.classes.numel()}, seed={self.seed}, length={self.length})"
        )
