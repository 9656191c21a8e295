"""Class-disjoint pools: source classes for meta-training, target classes for meta-testing.

Meta-learning is scored on classes never seen while learning ω, so the split is made over
classes, not over examples. An optional third pool (validation) serves for model selection
during meta-training without touching the target classes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from metalearn.tasks.datasets import LabelledDataset

__all__ = ["ClassSplit", "split_classes"]

ClassesLike = Tensor | Sequence[int] | LabelledDataset


def _as_class_tensor(name: str, classes: Tensor | Sequence[int]) -> Tensor:
    t = torch.as_tensor(classes)
    if t.numel() == 0:
        return t.reshape(0).long()
    if t.ndim != 1:
        raise ValueError(f"{name} must be a 1-D list of class ids, got shape {tuple(t.shape)}")
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"{name} must hold integer class ids, got dtype {t.dtype}")
    t = t.long()
    unique = torch.unique(t)
    if unique.numel() != t.numel():
        raise ValueError(f"{name} lists some class ids more than once; give each class once")
    return unique  # sorted


@dataclass(frozen=True, eq=False)
class ClassSplit:
    """Disjoint class pools, each a sorted ``int64`` tensor of class ids.

    Attributes:
        source: classes for meta-training.
        target: classes for meta-testing.
        validation: classes for meta-validation, or ``None`` if no such pool was asked for.
    """

    source: Tensor
    target: Tensor
    validation: Tensor | None = None

    def __post_init__(self) -> None:
        pools = {"source": self.source, "target": self.target}
        if self.validation is not None:
            pools["validation"] = self.validation
        for name, pool in pools.items():
            pool = _as_class_tensor(name, pool)
            if pool.numel() == 0:
                raise ValueError(f"the {name} pool is empty; every pool needs at least one class")
            object.__setattr__(self, name, pool)
        names = list(pools)
        for i, a in enumerate(names):
            for b in names[i + 1 :]:
                common = _intersection(getattr(self, a), getattr(self, b))
                if common.numel():
                    raise ValueError(
                        f"the {a} and {b} pools overlap in classes {_preview(common)}; "
                        "pools must be disjoint, so remove those classes from one of them"
                    )

    def pools(self) -> dict[str, Tensor]:
        """The pools by name (``validation`` only if present)."""
        out = {"source": self.source}
        if self.validation is not None:
            out["validation"] = self.validation
        out["target"] = self.target
        return out


def _intersection(a: Tensor, b: Tensor) -> Tensor:
    return a[torch.isin(a, b)]


def _preview(t: Tensor, limit: int = 8) -> str:
    values = t.tolist()
    text = ", ".join(str(v) for v in values[:limit])
    return f"[{text}{', ...' if len(values) > limit else ''}]"


def _fraction_sizes(n: int, fractions: Sequence[float], names: Sequence[str]) -> list[int]:
    """Pool sizes by largest remainder, so they sum to ``n`` and follow ``fractions``."""
    exact = [f * n for f in fractions]
    sizes = [math.floor(e) for e in exact]
    order = sorted(range(len(exact)), key=lambda i: (sizes[i] - exact[i], i))
    for i in order[: n - sum(sizes)]:
        sizes[i] += 1
    for name, f, size in zip(names, fractions, sizes, strict=True):
        if size == 0:
            raise ValueError(
                f"with {n} classes, the {name} fraction {f} leaves the {name} pool empty; "
                "raise that fraction or use more classes"
            )
    return sizes


def split_classes(
    classes: ClassesLike,
    fractions: Sequence[float] | None = None,
    *,
    source: Tensor | Sequence[int] | None = None,
    target: Tensor | Sequence[int] | None = None,
    validation: Tensor | Sequence[int] | None = None,
    generator: torch.Generator | None = None,
) -> ClassSplit:
    """Splits classes into disjoint source / (validation) / target pools.

    Either by ``fractions`` of a random permutation of the classes, or by explicit lists.

    Examples::

        split = split_classes(dataset, (0.8, 0.2))            # source, target
        split = split_classes(dataset, (0.7, 0.1, 0.2))       # source, validation, target
        split = split_classes(dataset, source=range(1200))    # target = all other classes

    Args:
        classes: the class ids to split (a 1-D tensor or sequence), or a `LabelledDataset`,
            whose ``classes`` are used.
        fractions: ``(source, target)`` or ``(source, validation, target)`` fractions, each
            positive, summing to 1. Pool sizes are rounded by largest remainder.
        source: explicit source classes. If only one of ``source`` / ``target`` is given,
            the other is every remaining class (not in ``validation``).
        target: explicit target classes.
        validation: explicit validation classes (optional).
        generator: randomness of the permutation for ``fractions``; ``None`` means a
            generator seeded with 0, so the split is always deterministic.

    Returns:
        A `ClassSplit` with sorted ``int64`` pools.

    Raises:
        ValueError: for fractions that do not sum to 1 or leave a pool empty, for both or
            neither of ``fractions`` and explicit lists, for overlapping or empty pools, and
            for classes that are not among ``classes``.
    """
    if isinstance(classes, LabelledDataset):
        classes = classes.classes
    all_classes = _as_class_tensor("classes", classes)
    if all_classes.numel() == 0:
        raise ValueError("there are no classes to split; the dataset or class list is empty")
    explicit = any(p is not None for p in (source, target, validation))

    if fractions is not None:
        if explicit:
            raise ValueError("give either fractions or explicit source/target/validation classes, not both")
        return _split_by_fractions(all_classes, fractions, generator)
    if not explicit:
        raise ValueError(
            "split_classes needs fractions, e.g. (0.8, 0.2) or (0.7, 0.1, 0.2), or explicit source=/target= class lists"
        )
    if source is None and target is None:
        raise ValueError("with explicit pools, give source= or target= (or both), not only validation=")

    given = {
        name: _as_class_tensor(name, pool)
        for name, pool in (("source", source), ("target", target), ("validation", validation))
        if pool is not None
    }
    for name, pool in given.items():
        missing = pool[~torch.isin(pool, all_classes)]
        if missing.numel():
            raise ValueError(
                f"the {name} pool has classes {_preview(missing)} that are not in the dataset; "
                "use only classes the dataset has (see dataset.classes)"
            )
    if "source" not in given or "target" not in given:
        taken = torch.cat(list(given.values()))
        rest = all_classes[~torch.isin(all_classes, taken)]
        given["target" if "source" in given else "source"] = rest
    return ClassSplit(source=given["source"], target=given["target"], validation=given.get("validation"))


def _split_by_fractions(
    all_classes: Tensor, fractions: Sequence[float], generator: torch.Generator | None
) -> ClassSplit:
    fractions = [float(f) for f in fractions]
    if len(fractions) == 2:
        names = ["source", "target"]
    elif len(fractions) == 3:
        names = ["source", "validation", "target"]
    else:
        raise ValueError(
            f"fractions must be (source, target) or (source, validation, target), got {len(fractions)} values"
        )
    if any(not f > 0 for f in fractions):
        raise ValueError(f"every fraction must be positive (an empty pool is useless), got {fractions}")
    if abs(sum(fractions) - 1.0) > 1e-6:
        raise ValueError(f"fractions must sum to 1, got {fractions} (sum {sum(fractions):.6g})")
    n = all_classes.numel()
    sizes = _fraction_sizes(n, fractions, names)
    if generator is None:
        generator = torch.Generator().manual_seed(0)
    shuffled = all_classes[torch.randperm(n, generator=generator)]
    pools = dict(zip(names, torch.split(shuffled, sizes), strict=True))
    return ClassSplit(source=pools["source"], target=pools["target"], validation=pools.get("validation"))
