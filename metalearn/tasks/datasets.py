"""Labelled datasets that task sets draw episodes from.

A `LabelledDataset` exposes its label of every item as one integer tensor (``labels``), so
that class pools and episode samplers never decode an item just to read its class, and a
`gather` that returns many inputs at once (an in-memory dataset answers it with one
indexing operation, which is what makes thousands of episodes per second possible).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch
from torch import Tensor

from metalearn.tasks.describe import describe_attributes

__all__ = ["LabelledDataset", "TensorLabelledDataset"]


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
        indices = torch.as_tensor(indices)
        if indices.ndim == 1 and indices.dtype in (torch.int64, torch.int32):  # several times faster
            return self.inputs.index_select(0, indices)
        return self.inputs[indices]
