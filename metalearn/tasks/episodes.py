"""N-way K-shot episodes drawn from any labelled dataset.

An episode (Vinyals et al., 2016, "Matching Networks for One Shot Learning") picks ``N``
classes from a pool, then ``K`` train ("support") and ``Q`` val ("query") examples of each,
all distinct. Its labels are ``0 .. N-1`` in a fresh random class order, so a learner cannot
memorise a class-to-label mapping across tasks. Ways and shots may also be drawn per task
from a range, for variable-way variable-shot episodes in the spirit of Meta-Dataset
(Triantafillou et al., 2020).
"""

from __future__ import annotations

import copy
import operator
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from metalearn.tasks.datasets import CachedDataset, LabelledDataset
from metalearn.tasks.draws import TaskDraws
from metalearn.tasks.task import TaskBatch
from metalearn.tasks.taskset import TaskSet

__all__ = ["EpisodicTaskSet"]

SizeSpec = int | tuple[int, int]

#: the streams of `TaskDraws` an episode draws from: its sizes, its classes, its items
SIZE_STREAM, CLASS_STREAM, ITEM_STREAM = 0, 1, 2
#: sorts after every real item's key (an int64 word)
_LAST = (1 << 63) - 1
#: the low 63 bits of a word (`TaskDraws.integers`)
_MASK63 = np.uint64((1 << 63) - 1)


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

    Items are grouped by class once, at construction (a sorted index and per-class offsets).
    A whole batch of tasks (`TaskSet.batch`) is a few tensor operations on counter-based draws
    (`TaskDraws`) and one ``dataset.gather``, and gives bit for bit the tasks indexing gives:

    - the classes: ``r_j`` uniform on ``[0, P - j)`` (word ``j`` of stream 1, ``P`` pool
      classes), and class ``j`` is the ``r_j``-th pool class not yet drawn, so ``ways`` distinct
      classes in a uniformly random order (label ``j`` is class ``j``);
    - the items: one random word per item of each drawn class (stream 2, a row of
      ``max(class_counts)`` words per class), and the ``shots + queries`` items with the
      smallest words, in that order, are the class's train then val items;
    - variable ways and shots: words 0 and 1 of stream 0.

    With ``device``, the dataset's inputs are held on that device in one tensor (their stored
    form, e.g. Omniglot's ``uint8`` images: `CachedDataset`) and every batch is drawn, indexed
    and built there, with no host round trip; ``cache="decoded"`` holds them decoded (float32:
    four times the memory of ``uint8``, but no conversion per batch, the fastest on a CPU).

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
        device: where tasks are made (the inputs are cached there); ``None`` for the CPU,
            reading inputs through ``dataset.gather`` unless ``cache`` is given.
        cache: ``None`` (no cache on the CPU; the stored form on another device), ``"stored"``
            (inputs in their stored dtype, decoded per batch) or ``"decoded"`` (float32 inputs).
            The cache never changes the tasks.

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
        device: torch.device | str | None = None,
        cache: str | None = None,
    ) -> None:
        super().__init__(seed=seed, length=length)
        if cache not in (None, "stored", "decoded"):
            raise ValueError(f"cache must be None, 'stored' or 'decoded', got {cache!r}")
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
        self._cache = cache
        self._store: LabelledDataset = dataset
        self._place(torch.device("cpu") if device is None else torch.device(device))

    def _place(self, device: torch.device) -> None:
        """Makes tasks on ``device``: the index tensors there, and the inputs cached there if asked."""
        self._device = device
        self._items_on = self._items.to(device)
        self._offsets_on = self._offsets.to(device)
        self._counts_on = self.class_counts.to(device)
        self._ranks_on = torch.arange(max(self._ways[1], self._max_count), device=device)
        self._items_np, self._offsets_np = self._items.numpy(), self._offsets.numpy()  # the host path's
        self._counts_np = self.class_counts.numpy()
        self._label_rows: dict[tuple[int, int, torch.device], Tensor] = {}
        cache = self._cache if self._cache is not None or device.type == "cpu" else "stored"
        dataset = self.dataset.base if isinstance(self.dataset, CachedDataset) else self.dataset
        self._store = dataset if cache is None else CachedDataset(dataset, device, decoded=cache == "decoded")

    def to(self, device: torch.device | str) -> EpisodicTaskSet:
        """A copy of this set that makes its tasks on ``device``, its inputs cached there (see ``cache``)."""
        moved = copy.copy(self)
        moved._place(torch.device(device))
        return moved

    @property
    def fixed_shape(self) -> bool:
        """Whether every task has the same shape (fixed ways and shots), so tasks stack."""
        return self._ways[0] == self._ways[1] and self._shots[0] == self._shots[1]

    @property
    def same_shaped(self) -> bool:
        """`fixed_shape`: tasks of variable ways or shots do not stack."""
        return self.fixed_shape

    @property
    def max_ways(self) -> int:
        """The largest number of ways a task can have."""
        return self._ways[1]

    def _sizes(self, draws: TaskDraws) -> tuple[Tensor, Tensor]:
        """Ways and shots of each task ``[B]`` (words 0 and 1 of stream 0)."""
        (ways_low, ways_high), (shots_low, shots_high) = self._ways, self._shots
        spans = torch.tensor([ways_high - ways_low + 1, shots_high - shots_low + 1], device=draws.device)
        r = draws.integers(SIZE_STREAM, (2,), spans)
        return r[:, 0] + ways_low, r[:, 1] + shots_low

    def sample_batch(self, draws: TaskDraws) -> TaskBatch:
        if self.fixed_shape:
            return self._episodes(draws, self._ways[0], self._shots[0])
        ways, shots = self._sizes(draws)
        sizes = set(zip(ways.tolist(), shots.tolist(), strict=True))  # variable shapes: a host round trip
        if len(sizes) > 1:
            raise ValueError(
                f"the tasks have different ways and shots {sorted(sizes)}: only same-shaped tasks stack. "
                "With variable ways/shots, take the tasks one at a time (taskset[i]) instead of as a batch"
            )
        ((n_ways, n_shots),) = sizes
        return self._episodes(draws, n_ways, n_shots)

    def _classes(self, draws: TaskDraws, ways: int) -> Tensor:
        """Pool positions ``[B, ways]`` of each task's classes, distinct, in a uniformly random order."""
        n_pool = self.classes.numel()
        ranks = self._ranks_on
        r = draws.integers(CLASS_STREAM, (ways,), n_pool - ranks[:ways])
        chosen = r[:, :1]
        for j in range(1, ways):
            # the r-th class not yet drawn is r + #{k : s_k - k <= r}, s the drawn ones sorted
            # (s_k - k counts the undrawn classes below s_k)
            drawn = torch.sort(chosen, dim=1).values - ranks[:j]
            rj = r[:, j : j + 1]
            chosen = torch.cat((chosen, rj + (drawn <= rj).sum(1, keepdim=True)), dim=1)
        return chosen

    def _classes_numpy(self, draws: TaskDraws, ways: int) -> np.ndarray:
        """`_classes` in numpy's int64 arithmetic (CPU draws): the same positions, a few times
        cheaper per operation on these small arrays than torch."""
        n_pool = self.classes.numel()
        ranks = np.arange(ways, dtype=np.int64)
        r = (draws.numpy_words(CLASS_STREAM, (ways,)) & _MASK63).view(np.int64) % (n_pool - ranks)
        chosen = r[:, :1]
        for j in range(1, ways):
            drawn = np.sort(chosen, axis=1) - ranks[:j]
            rj = r[:, j : j + 1]
            chosen = np.concatenate((chosen, rj + (drawn <= rj).sum(1, keepdims=True)), axis=1)
        return chosen

    def _episode_indices(self, draws: TaskDraws, ways: int, shots: int) -> Tensor:
        """Dataset indices of the batch's items, flat: every task's train items, then every task's
        val items, each task class by class. A drawn class gives its ``shots + queries`` items of
        smallest key (stream 2), in key order: the first ``shots`` train, the rest val."""
        width, per_class = self._max_count, shots + self.queries
        if draws.uses_numpy and self._device.type == "cpu":  # the same integers, computed on the host
            chosen_np = self._classes_numpy(draws, ways)
            keys_np = draws.numpy_words(ITEM_STREAM, (ways, width)).view(np.int64)
            if not self._balanced:
                keys_np = np.where(np.arange(width) >= self._counts_np[chosen_np][..., None], _LAST, keys_np)
            positions_np = np.argsort(keys_np, axis=2, kind="stable")[..., :per_class]
            items_np = self._items_np[self._offsets_np[chosen_np][..., None] + positions_np]
            flat = (items_np[..., :shots].reshape(-1), items_np[..., shots:].reshape(-1))
            return torch.from_numpy(np.concatenate(flat))
        chosen = self._classes(draws, ways)
        keys = draws.words(ITEM_STREAM, (ways, width))
        if not self._balanced:  # positions past a class's count sort last
            past = self._ranks_on[:width] >= self._counts_on[chosen][..., None]
            keys = keys.masked_fill(past, _LAST)
        positions = torch.sort(keys, dim=2, stable=True).indices[..., :per_class]  # the per_class smallest
        items = self._items_on[self._offsets_on[chosen][..., None] + positions]  # [B, ways, per_class]
        return torch.cat((items[..., :shots].reshape(-1), items[..., shots:].reshape(-1)))

    def _labels(self, ways: int, per_class: int, device: torch.device) -> Tensor:
        """``[0]*per_class + [1]*per_class + ...`` (``ways`` classes), made once per shape and device."""
        key = (ways, per_class, device)
        labels = self._label_rows.get(key)
        if labels is None:
            labels = self._label_rows[key] = torch.arange(ways, device=device).repeat_interleave(per_class)
        return labels

    def _episodes(self, draws: TaskDraws, ways: int, shots: int) -> TaskBatch:
        n_tasks = len(draws)
        n_train, n_val = ways * shots, ways * self.queries
        x = self._store.gather(self._episode_indices(draws, ways, shots))
        # every batch gets its own label tensors (a copy of the cached row), so writing to them is harmless
        train_y = self._labels(ways, shots, x.device).expand(n_tasks, -1).contiguous()
        val_y = self._labels(ways, self.queries, x.device).expand(n_tasks, -1).contiguous()
        item_shape = tuple(x.shape[1:])
        return TaskBatch(
            train=(x[: n_tasks * n_train].view(n_tasks, n_train, *item_shape), train_y),
            val=(x[n_tasks * n_train :].view(n_tasks, n_val, *item_shape), val_y),
        )

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(ways={self.ways}, shots={self.shots}, queries={self.queries}, "
            f"classes={self.classes.numel()}, seed={self.seed}, length={self.length})"
        )
