"""Class-level augmentation: every transform of a class becomes a class of its own.

Omniglot is usually enlarged this way with rotations by 0, 90, 180 and 270 degrees
(Santoro et al., 2016; Finn et al., 2017): a character rotated by 90 degrees is treated as
a new character. `ClassAugmentation` does this for any dataset and any list of
transforms; `rotations` builds the Omniglot ones.

Split classes *before* augmenting, so that the rotations of one character never land in
both the source and the target pool: ``aug.classes_of(split.source)`` gives the augmented
ids of a pool of base classes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from metalearn.tasks.datasets import LabelledDataset, StoredInputs

__all__ = ["ClassAugmentation", "Rotate90", "rotations"]

Transform = Callable[[Tensor], Tensor]


class Rotate90:
    """Rotates images ``[..., H, W]`` by ``k`` quarter turns counter-clockwise (`torch.rot90`).

    A plain class rather than a lambda, so that datasets holding it pickle (for DataLoader
    workers). Square images keep their shape; a quarter turn (odd ``k``) of non-square images
    would swap ``H`` and ``W``, so its classes could not share episodes with the others: it
    raises `ValueError` instead (resize the images to a square first).
    """

    def __init__(self, k: int) -> None:
        self.k = int(k) % 4

    def __call__(self, x: Tensor) -> Tensor:
        if self.k == 0:
            return x
        if self.k % 2 and x.shape[-2] != x.shape[-1]:
            raise ValueError(
                f"Rotate90(k={self.k}) turns non-square images of shape {tuple(x.shape)} (H x W = "
                f"{x.shape[-2]} x {x.shape[-1]}) into {x.shape[-1]} x {x.shape[-2]}, so the rotated classes "
                "could not share episodes with the others. Resize the images to a square first (e.g. "
                "ImageFolderDataset(..., image_size=(S, S))), or rotate by 180 degrees only"
            )
        return torch.rot90(x, self.k, dims=(-2, -1))

    def __repr__(self) -> str:
        return f"Rotate90(k={self.k})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Rotate90) and other.k == self.k

    def __hash__(self) -> int:
        return hash((Rotate90, self.k))


def rotations(degrees: Sequence[int] = (0, 90, 180, 270)) -> list[Rotate90]:
    """Rotation transforms for `ClassAugmentation`, by multiples of 90 degrees.

    Args:
        degrees: the angles, counter-clockwise; each a multiple of 90.

    Returns:
        One `Rotate90` per angle, in the given order.
    """
    out = []
    for d in degrees:
        if int(d) != d or int(d) % 90:
            raise ValueError(f"rotations are by multiples of 90 degrees, got {d}; use 0, 90, 180 or 270")
        out.append(Rotate90(int(d) // 90))
    return out


def _item_name(base: LabelledDataset, index: int) -> str:
    paths = getattr(base, "paths", None)
    return f"item {index}" + (f" ({paths[index]})" if isinstance(paths, list) and index < len(paths) else "")


def _check_shape_kept(base: LabelledDataset, transforms: Sequence[Transform]) -> None:
    """Raises `ValueError` if a transform changes the shape of the base's first item (then its
    classes could not stack with the others in an episode). Costs one decode per transform."""
    if len(base) == 0:
        return
    x = base.gather(torch.zeros(1, dtype=torch.int64))
    for t in transforms:
        try:
            shape = tuple(t(x).shape)
        except ValueError as err:
            raise ValueError(
                f"transform {t!r} cannot augment {_item_name(base, 0)} of the base dataset: {err}"
            ) from err
        if shape != tuple(x.shape):
            raise ValueError(
                f"transform {t!r} changes {_item_name(base, 0)} of the base dataset from shape {tuple(x.shape)[1:]} "
                f"to {shape[1:]}, so its classes could not share episodes with the others; use transforms that "
                "keep the input's shape (resize non-square images to a square before rotating them)"
            )


class ClassAugmentation(LabelledDataset):
    """Wraps a dataset so that each class ``c`` becomes ``len(transforms)`` classes.

    Item ``t * n + i`` (``n = len(base)``) is base item ``i`` under transform ``t``; its class
    id is ``c * T + t`` where ``c`` is the base class and ``T = len(transforms)``, so the
    variants of one base class have adjacent ids and base classes ``0 .. C-1`` become
    ``0 .. C*T-1``.

    Each transform maps a batch of inputs ``[n, ...]`` to a batch of the same shape (it is
    called on a batch of one in `get_input`); it must be a picklable callable (a class like
    `Rotate90`, or a module-level function, not a lambda) for DataLoader workers.

    Args:
        base: the dataset to augment.
        transforms: the transforms; the identity (e.g. ``Rotate90(0)``) is usually among them.

    Example::

        rotated = ClassAugmentation(omniglot, rotations((0, 90, 180, 270)))
        split = split_classes(omniglot, (0.8, 0.2))
        train_set = EpisodicTaskSet(rotated, 5, 1, 15, classes=rotated.classes_of(split.source))
    """

    def __init__(self, base: LabelledDataset, transforms: Sequence[Transform]) -> None:
        if not isinstance(base, LabelledDataset):
            raise TypeError(f"base must be a LabelledDataset, got {type(base).__name__}")
        transforms = list(transforms)
        if not transforms:
            raise ValueError("give at least one transform (include the identity to keep the original classes)")
        for t in transforms:
            if not callable(t):
                raise TypeError(f"each transform must be a callable tensor -> tensor, got {t!r}")
        _check_shape_kept(base, transforms)
        self.base = base
        self.transforms = transforms
        n_transforms = len(transforms)
        self.labels = torch.cat([base.labels.long() * n_transforms + t for t in range(n_transforms)])

    @property
    def n_base(self) -> int:
        """Number of items of the base dataset."""
        return int(self.base.labels.shape[0])

    def classes_of(self, base_classes: Tensor | Sequence[int]) -> Tensor:
        """The augmented class ids of the given base classes (sorted ``int64``)."""
        base_classes = torch.as_tensor(base_classes).long().reshape(-1)
        ids = base_classes[:, None] * len(self.transforms) + torch.arange(len(self.transforms))
        return torch.sort(ids.reshape(-1)).values

    def base_class_of(self, classes: Tensor | Sequence[int]) -> Tensor:
        """The base class of each augmented class id."""
        return torch.div(torch.as_tensor(classes).long(), len(self.transforms), rounding_mode="floor")

    def get_input(self, index: int) -> Tensor:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for a dataset of {len(self)} items")
        t, i = divmod(index, self.n_base)
        return self.transforms[t](self.base.get_input(i).unsqueeze(0))[0]

    def gather(self, indices: Tensor) -> Tensor:
        indices = torch.as_tensor(indices, dtype=torch.int64)
        which = torch.div(indices, self.n_base, rounding_mode="floor")
        base_index = indices - which * self.n_base
        sizes = torch.bincount(which, minlength=len(self.transforms)).tolist()
        present = [t for t, size in enumerate(sizes) if size]
        if len(present) <= 1:  # one transform (or no items): no reordering needed
            if not present:
                return self.base.gather(base_index)
            return self.transforms[present[0]](self.base.gather(base_index))
        # Gather in transform order, so each transform runs once on one contiguous block,
        # then put the items back in the order asked for.
        order = torch.argsort(which, stable=True)
        x = self.base.gather(base_index.index_select(0, order))
        blocks = x.split(sizes)
        transformed = torch.cat([self.transforms[t](blocks[t]) for t in present])
        return transformed.index_select(0, torch.argsort(order))

    def stored_inputs(self) -> StoredInputs | None:
        """The base's stored inputs under each transform, when every transform is a `Rotate90`
        (a rotation moves pixels, so it commutes with decoding them); otherwise ``None``."""
        stored = self.base.stored_inputs()
        if stored is None or not all(isinstance(t, Rotate90) for t in self.transforms):
            return None
        inputs, decode = stored
        return torch.cat([t(inputs) for t in self.transforms]), decode

    def __repr__(self) -> str:
        return f"{type(self).__name__}({type(self.base).__name__}, transforms={self.transforms})"
