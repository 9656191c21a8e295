"""Old public names kept importable for one release, with a `DeprecationWarning` naming the new one.

The names of the inner optimizers ``SGD`` and ``Adam`` shadowed ``torch.optim``'s in a user's
namespace, and ``TensorDataset`` shadowed ``torch.utils.data``'s; they are now `InnerSGD`,
`InnerAdam` and `TensorLabelledDataset`. A package's module-level ``__getattr__`` calls
`renamed_attribute`, so ``from metalearn import SGD`` still works (and warns) while no old name
is in any ``__all__`` (``from metalearn import *`` brings only the new ones). Remove after the
next release.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping

__all__ = ["RENAMED", "renamed_attribute"]

#: old name -> new name, for every public name renamed
RENAMED = {"SGD": "InnerSGD", "Adam": "InnerAdam", "TensorDataset": "TensorLabelledDataset"}


def renamed_attribute(module: str, name: str, namespace: Mapping[str, object]) -> object:
    """The new object for an old ``name`` of ``module`` (warning `DeprecationWarning`); `AttributeError` otherwise.

    Args:
        module: the package's ``__name__``, for the messages.
        name: the attribute looked up.
        namespace: the package's ``globals()``, where the new name lives.
    """
    new = RENAMED.get(name)
    if new is None or new not in namespace:
        raise AttributeError(f"module {module!r} has no attribute {name!r}")
    warnings.warn(
        f"{module}.{name} is deprecated (its name shadowed torch's) and will be removed in the next release; "
        f"use {module}.{new}",
        DeprecationWarning,
        stacklevel=3,
    )
    return namespace[new]
