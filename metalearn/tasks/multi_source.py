"""Multi-source episodes in the style of Meta-Dataset (Triantafillou et al., 2020).

"Meta-Dataset: A Dataset of Datasets for Learning to Learn from Few Examples" draws each
episode from one of several datasets, with a number of ways and a number of shots per class
that vary from episode to episode and a support set whose classes are imbalanced. The sampling
rules (Section 3.2 and Appendix of the paper; ``meta_dataset/data/sampling.py`` of
github.com/google-research/meta-dataset), for one episode:

1. **source**: dataset ``d`` with probability ``weights[d] / sum(weights)``.
2. **ways**: ``N ~ U{min_ways, ..., min(max_ways, C_d)}`` (5 and 50 in the paper), ``C_d``
   the classes of the source's pool; the ``N`` classes uniformly without replacement.
3. **query**: the same ``q = min(max_query, min_c floor(n_c / 2))`` examples for every class
   (``max_query = 10``), ``n_c`` the examples of class ``c``.
4. **support size**: ``β ~ U[0, 1)``, ``|S| = min(max_support_set_size,
   Σ_c (floor(β · min(max_support_per_class, n_c − q)) + 1))`` (500 and 100 in the paper).
5. **shots**: ``R_c = n_c · exp(α_c)`` with ``α_c ~ U[log ½, log 2)``,
   ``k_c = min(floor(R_c / Σ R · (|S| − N)) + 1, n_c − q)``: at least one shot each, roughly
   in proportion to the class sizes, perturbed.

Not reproduced: the class hierarchies the paper uses for ImageNet (classes drawn below one node
of the WordNet DAG) and Omniglot (classes of one alphabet); classes are drawn uniformly here.

Episodes differ in shape, so they do not stack into a `TaskBatch`: meta-train on them one
episode per step (``meta_batch_size=1``, as Meta-Dataset's own training does), and evaluate
them with `metalearn.evaluate`, which adapts tasks of different shapes one by one. A model's
head must have `MultiSourceEpisodes.max_ways` outputs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from metalearn.tasks.datasets import LabelledDataset
from metalearn.tasks.task import Task, TaskBatch
from metalearn.tasks.taskset import TaskSet

__all__ = ["EpisodeSource", "MetaDatasetSampling", "MultiSourceEpisodes"]


@dataclass(frozen=True)
class MetaDatasetSampling:
    """The sampling constants of Meta-Dataset (Triantafillou et al., 2020), its defaults.

    Attributes:
        min_ways: fewest classes per episode.
        max_ways: most classes per episode (fewer if the pool is smaller).
        max_query: most query (val) examples per class.
        max_support_set_size: most support (train) examples per episode.
        max_support_per_class: most a class contributes to the support set's *size*.
        min_log_weight: low end of the log-weight perturbing each class's share of the support set.
        max_log_weight: high end of it.
    """

    min_ways: int = 5
    max_ways: int = 50
    max_query: int = 10
    max_support_set_size: int = 500
    max_support_per_class: int = 100
    min_log_weight: float = math.log(0.5)
    max_log_weight: float = math.log(2.0)

    def __post_init__(self) -> None:
        for name in ("min_ways", "max_ways", "max_query", "max_support_set_size", "max_support_per_class"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"MetaDatasetSampling.{name} must be a positive int, got {value!r}")
        if self.min_ways > self.max_ways:
            raise ValueError(f"min_ways ({self.min_ways}) must not exceed max_ways ({self.max_ways})")
        if self.max_support_set_size < self.max_ways:
            raise ValueError(
                f"max_support_set_size ({self.max_support_set_size}) must be at least max_ways ({self.max_ways}): "
                "every class of an episode gets one support example"
            )
        if not self.min_log_weight <= self.max_log_weight:
            raise ValueError(
                f"min_log_weight ({self.min_log_weight}) must not exceed max_log_weight ({self.max_log_weight})"
            )


@dataclass(frozen=True, eq=False)
class EpisodeSource:
    """One dataset of a `MultiSourceEpisodes` mixture.

    Attributes:
        dataset: where the examples come from (its ``gather`` must give one input shape, the
            same for every source).
        classes: the class pool (e.g. ``split.source``); ``None`` means every class of the dataset.
        weight: relative probability of drawing an episode from this source (positive).
        name: a label for the source (shown by `MultiSourceEpisodes.source_of`).
        transform: applied to each episode's gathered inputs ``[k, ...]`` of this source, e.g. to
            bring every source to one shape (``lambda x: F.interpolate(x, size=84)``, or
            ``lambda x: x.expand(-1, 3, -1, -1)`` for grayscale images among RGB ones).
    """

    dataset: LabelledDataset
    classes: Tensor | Sequence[int] | None = None
    weight: float = 1.0
    name: str = ""
    transform: Callable[[Tensor], Tensor] | None = None

    def gather(self, indices: Tensor) -> Tensor:
        """The inputs at ``indices``, transformed."""
        x = self.dataset.gather(indices)
        return x if self.transform is None else self.transform(x)

    def describe(self) -> dict[str, Any]:
        """What makes this source's episodes (for a run's identity)."""
        from metalearn.tasks.describe import describe_value

        return {
            "dataset": self.dataset.describe(),
            "classes": describe_value(None if self.classes is None else torch.as_tensor(self.classes)),
            "weight": float(self.weight),
            "name": self.name,
            "transform": describe_value(self.transform),
        }


@dataclass
class _Pool:
    """A source's pool, grouped by class once: items sorted by class, per-class offsets and counts."""

    items: Tensor
    offsets: Tensor
    counts: Tensor
    classes: Tensor = field(repr=False)


def _group(name: str, source: EpisodeSource, min_ways: int) -> _Pool:
    dataset = source.dataset
    if not isinstance(dataset, LabelledDataset):
        raise TypeError(
            f"source {name}: dataset must be a LabelledDataset, got {type(dataset).__name__}; wrap in-memory data "
            "in metalearn.tasks.TensorLabelledDataset(inputs, labels)"
        )
    labels = dataset.labels
    pool = dataset.classes if source.classes is None else torch.as_tensor(source.classes)
    if pool.ndim != 1 or pool.numel() == 0 or pool.is_floating_point() or pool.dtype == torch.bool:
        raise ValueError(f"source {name}: classes must be a non-empty 1-D list of integer class ids, got {pool!r}")
    pool = torch.unique(pool.long())
    in_pool = torch.isin(labels, pool)
    items = torch.nonzero(in_pool).flatten()
    items = items[torch.argsort(labels[items], stable=True)]
    counts = torch.bincount(torch.searchsorted(pool, labels[items]), minlength=pool.numel())
    small = pool[counts < 2].tolist()
    if small:
        raise ValueError(
            f"source {name}: classes {small[:8]} have fewer than 2 examples (one support, one query at least); "
            "leave them out of the pool (classes=...)"
        )
    if pool.numel() < min_ways:
        raise ValueError(
            f"source {name}: its pool has {pool.numel()} classes, fewer than min_ways={min_ways}; use a larger pool "
            "or lower MetaDatasetSampling.min_ways"
        )
    return _Pool(items=items, offsets=torch.cumsum(counts, 0) - counts, counts=counts, classes=pool)


class MultiSourceEpisodes(TaskSet):
    """Variable-way, variable-shot episodes from several datasets, as in Meta-Dataset.

    Task ``i`` is a pure function of ``(seed, i)`` (see `TaskSet`), its sampling as in the
    module docstring. Its ``train`` half holds ``k_c`` examples of each of its ``N`` classes,
    grouped by class (labels ``0 .. N-1`` in a fresh random class order); its ``val`` half ``q``
    of each. No example appears twice in a task.

    Args:
        sources: the datasets to mix (`EpisodeSource`, each with its pool and weight).
        sampling: the sampling constants (`MetaDatasetSampling`; the paper's by default).
        seed: seed of the task set.
        length: number of tasks, or ``None`` for an endless set.

    Attributes:
        sources, sampling: as given.
        max_ways: the most classes an episode can have (the head size a model needs).

    Raises:
        ValueError: no sources, a weight that is not positive and finite, a pool with fewer than
            ``min_ways`` classes or a class with fewer than 2 examples, or sources whose inputs
            differ in shape (resize them to one size first).
    """

    def __init__(
        self,
        sources: Sequence[EpisodeSource],
        *,
        sampling: MetaDatasetSampling | None = None,
        seed: int = 0,
        length: int | None = 600,
    ) -> None:
        super().__init__(seed=seed, length=length)
        sources = list(sources)
        if not sources:
            raise ValueError("sources is empty; give at least one EpisodeSource(dataset, classes, weight)")
        bad = next((s for s in sources if not isinstance(s, EpisodeSource)), None)
        if bad is not None:
            raise TypeError(f"sources must be EpisodeSource objects, got a {type(bad).__name__}")
        weights = [float(s.weight) for s in sources]
        if not all(math.isfinite(w) and w > 0 for w in weights):
            raise ValueError(f"every source weight must be positive and finite, got {weights}")
        self.sampling = sampling if sampling is not None else MetaDatasetSampling()
        names = [s.name or f"#{i}" for i, s in enumerate(sources)]
        self._pools = [_group(n, s, self.sampling.min_ways) for n, s in zip(names, sources, strict=True)]
        first_items = [p.items[:1] for p in self._pools]
        shapes = {n: tuple(s.gather(i).shape[1:]) for n, s, i in zip(names, sources, first_items, strict=True)}
        if len(set(shapes.values())) > 1:
            raise ValueError(
                f"the sources give inputs of different shapes ({shapes}), so one model cannot take them all; load "
                "them at one size and channel count (e.g. image_size=84, RGB), or give a source a transform= that "
                "resizes its inputs"
            )
        self.sources = tuple(sources)
        self._names = names
        self._weights = torch.tensor(weights, dtype=torch.float64)
        self.max_ways = max(min(self.sampling.max_ways, int(p.classes.numel())) for p in self._pools)

    @property
    def fixed_shape(self) -> bool:
        """Always ``False``: episodes vary in ways and shots, so they do not stack."""
        return False

    def source_of(self, index: int) -> str:
        """The name of the source task ``index`` is drawn from (its first random draw)."""
        return self._names[self._draw_source(self.generator(self._check_index(index)))]

    def _draw_source(self, generator: torch.Generator) -> int:
        return int(torch.multinomial(self._weights, 1, generator=generator))

    def sample(self, generator: torch.Generator) -> Task:
        d = self._draw_source(generator)
        pool, cfg = self._pools[d], self.sampling
        n_classes = int(pool.classes.numel())
        ways = int(torch.randint(cfg.min_ways, min(cfg.max_ways, n_classes) + 1, (1,), generator=generator))
        chosen = torch.randperm(n_classes, generator=generator)[:ways]
        counts = pool.counts[chosen]
        shots = episode_shots(counts, cfg, generator)
        query = int(min(cfg.max_query, int((counts // 2).min())))

        # a uniform draw without replacement per class: the smallest keys of a row of random keys
        width = int(counts.max())
        keys = torch.rand(ways, width, generator=generator)
        keys.masked_fill_(torch.arange(width) >= counts[:, None], 2.0)
        # row c: class c's items in random order (positions past a class's count are padding, never used)
        positions = torch.minimum(torch.argsort(keys, dim=1), counts[:, None] - 1)
        items = pool.items[pool.offsets[chosen, None] + positions]

        support = torch.cat([items[c, : int(shots[c])] for c in range(ways)])
        queries = torch.cat([items[c, int(shots[c]) : int(shots[c]) + query] for c in range(ways)])
        x = self.sources[d].gather(torch.cat((support, queries)))
        labels = torch.arange(ways)
        n_train = support.numel()
        return Task(
            train=(x[:n_train], labels.repeat_interleave(shots)),
            val=(x[n_train:], labels.repeat_interleave(query)),
        )

    def batch(self, indices) -> TaskBatch:
        """Refused for more than one task: episodes of different shapes do not stack (see the module docstring)."""
        indices = list(indices)
        if len(indices) > 1:
            raise ValueError(
                f"MultiSourceEpisodes gives episodes of different shapes, which do not stack into a batch of "
                f"{len(indices)}; meta-train with meta_batch_size=1 (one episode per step, as Meta-Dataset does), "
                "or adapt the tasks one by one"
            )
        return super().batch(indices)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(sources={self._names}, max_ways={self.max_ways}, seed={self.seed}, "
            f"length={self.length})"
        )


def episode_shots(counts: Tensor, sampling: MetaDatasetSampling, generator: torch.Generator) -> Tensor:
    """The support shots of each class of an episode, by Meta-Dataset's rules (steps 3-5 of the module docstring).

    Args:
        counts: examples of each chosen class (``int64 [N]``, each at least 2).
        sampling: the constants.
        generator: the episode's randomness.

    Returns:
        ``int64 [N]``: each at least 1 and at most ``counts - q``; their sum at most
        ``max_support_set_size``.
    """
    ways = counts.numel()
    query = min(sampling.max_query, int((counts // 2).min()))
    remaining = counts - query
    beta = float(torch.rand((), generator=generator, dtype=torch.float64))
    contributions = torch.clamp(remaining, max=sampling.max_support_per_class).double()
    support_size = int(min(torch.floor(beta * contributions + 1).sum().item(), sampling.max_support_set_size))
    low, high = sampling.min_log_weight, sampling.max_log_weight
    log_weights = low + (high - low) * torch.rand(ways, generator=generator, dtype=torch.float64)
    proportions = counts.double() * torch.exp(log_weights)
    proportions = proportions / proportions.sum()
    desired = torch.floor(proportions * (support_size - ways)).long() + 1
    return torch.minimum(desired, remaining)
