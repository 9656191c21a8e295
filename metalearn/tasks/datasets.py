"""Labelled datasets that task sets draw episodes from.

A `LabelledDataset` exposes its label of every item as one integer tensor (``labels``), so
that class pools and episode samplers never decode an item just to read its class, and a
`gather` that returns many inputs at once (an in-memory dataset answers it with one
indexing operation, which is what makes thousands of episodes per second possible).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import Tensor

from metalearn.tasks.describe import describe_attributes

__all__ = ["CachedDataset", "LabelledDataset", "StoredInputs", "TensorLabelledDataset"]

#: a dataset's inputs in the form it keeps them, and how to turn a batch of them into what
#: ``gather`` returns (``None``: they already are); see `LabelledDataset.stored_inputs`.
StoredInputs = tuple[Tensor, Callable[[Tensor], Tensor] | None]


class LabelledDataset(ABC):
    """Base class of datasets with one integer class label per item.

    Subclasses set ``labels`` (``int64`` tensor of shape ``[len(self)]``) and implement
    `get_input`; they may override `gather` with a faster batched version.
    """

    labels: Tensor
    #: public attributes that do not change the items (e.g. a cache switch), left out of `describe`.
    describe_skip: ClassVar[tuple[str, ...]] = ()

    def describe(self) -> dict[str, Any]:
        """What the items are, as plain JSON: the class and every public attribute (tensors as a
        digest of their contents), so two datasets with other data or settings differ."""
        return describe_attributes(self, skip=self.describe_skip)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @abstractmethod
    def get_input(self, index: int) -> Tensor:
        """Returns the input of item ``index`` (decoded, as a float tensor)."""

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        return self.get_input(int(index)), int(self.labels[index])

    def gather(self, indices: Tensor) -> Tensor:
        """Returns the inputs of ``indices`` stacked along a new leading dimension."""
        return torch.stack([self.get_input(int(i)) for i in indices])

    def stored_inputs(self) -> StoredInputs | None:
        """All inputs in the compact form the dataset keeps them (e.g. ``uint8`` images
        ``[n, ...]``) and the function ``decode`` with ``decode(stored[indices]) ==
        gather(indices)``; ``None`` (the default) if it keeps none (it decodes files, say).
        `CachedDataset` caches this form on a device."""
        return None

    @property
    def classes(self) -> Tensor:
        """The sorted distinct class labels present in the dataset."""
        return torch.unique(self.labels)


class TensorLabelledDataset(LabelledDataset):
    """An in-memory dataset: ``inputs[i]`` has class ``labels[i]``.

    Args:
        inputs: tensor ``[n, ...]`` of inputs.
        labels: integer tensor ``[n]`` of class labels.
    """

    def __init__(self, inputs: Tensor, labels: Tensor) -> None:
        labels = torch.as_tensor(labels)
        if labels.ndim != 1:
            raise ValueError(f"labels must be a 1-D tensor of class ids, got shape {tuple(labels.shape)}")
        if labels.is_floating_point() or labels.is_complex():
            raise TypeError("labels must be integer class ids; convert them with labels.long()")
        if inputs.shape[0] != labels.shape[0]:
            raise ValueError(
                f"inputs has {inputs.shape[0]} items but labels has {labels.shape[0]}: they must match"
            )
        self.inputs = inputs
        self.labels = labels.long()

    def get_input(self, index: int) -> Tensor:
        return self.inputs[index]

    def gather(self, indices: Tensor) -> Tensor:
        return select_rows(self.inputs, indices)

    def stored_inputs(self) -> StoredInputs:
        return self.inputs, None


def select_rows(stored: Tensor, indices: Tensor) -> Tensor:
    """``stored[indices]``: by ``index_select`` when ``indices`` is a 1-D integer tensor (about five
    times faster than advanced indexing), by indexing otherwise (any shape, a list, a mask)."""
    indices = torch.as_tensor(indices)
    if indices.ndim == 1 and indices.dtype in (torch.int64, torch.int32):
        return stored.index_select(0, indices)
    return stored[indices]


def uint8_to_unit(images: Tensor) -> Tensor:
    """``uint8`` pixels ``0..255`` as float32 in ``[0, 1]`` (``x / 255``: how `Omniglot`, `BenchmarkImages` and
    `ImageFolderDataset` decode theirs)."""
    return images.to(torch.float32).div_(255.0)


def _decode_with(decode: Callable[[Tensor], Tensor] | None, x: Tensor) -> Tensor:
    return x if decode is None else decode(x)


class CachedDataset(LabelledDataset):
    """Every input of a dataset in one tensor on one device, so that ``gather`` is one
    ``index_select`` there (plus the decoding of the selected items).

    The inputs are held in the dataset's stored form (`LabelledDataset.stored_inputs`, e.g.
    Omniglot's ``uint8`` images: 25 MB) and decoded per gather, or decoded once
    (``decoded=True``: float32, four times the memory of ``uint8``, no conversion per gather).
    A dataset without a stored form is decoded once. The items are the dataset's, bit for bit:
    `describe` is the dataset's.

    Args:
        dataset: the dataset to cache.
        device: where to hold the inputs (default the CPU).
        decoded: hold decoded inputs rather than the stored form.

    Attributes:
        base: the cached dataset.
        labels: its labels (on the CPU, like every dataset's).
    """

    def __init__(self, dataset: LabelledDataset, device: torch.device | str | None = None, decoded: bool = False):
        if not isinstance(dataset, LabelledDataset):
            raise TypeError(f"dataset must be a LabelledDataset, got {type(dataset).__name__}")
        device = torch.device("cpu") if device is None else torch.device(device)
        stored = dataset.stored_inputs()
        if stored is None:
            inputs, decode = dataset.gather(torch.arange(len(dataset))), None
        else:
            inputs, decode = stored
            if decoded and decode is not None:
                inputs, decode = decode(inputs), None
        self.base = dataset
        self.labels = dataset.labels
        self._inputs = inputs.to(device)
        self._decode = decode

    @property
    def device(self) -> torch.device:
        """Where the inputs are held."""
        return self._inputs.device

    def describe(self) -> dict[str, Any]:
        """The cached dataset's description: the items are the same."""
        return self.base.describe()

    def get_input(self, index: int) -> Tensor:
        return _decode_with(self._decode, self._inputs[index : index + 1])[0]

    def gather(self, indices: Tensor) -> Tensor:
        indices = torch.as_tensor(indices).to(self._inputs.device)
        return _decode_with(self._decode, self._inputs.index_select(0, indices.reshape(-1).long()))

    def stored_inputs(self) -> StoredInputs | None:
        return self._inputs, self._decode
