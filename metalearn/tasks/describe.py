"""JSON descriptions of task sets and datasets: every setting that changes the tasks they give.

A training run stores its task set's description in its identity (see `metalearn.train`), so a
checkpoint is resumed only with the same tasks. `describe_attributes` builds one from an object's
public attributes; values become plain JSON: numbers and strings as they are, tensors, long lists
and arrays as a shape, dtype and SHA-256 digest of their contents (so two datasets with the same
shape and different data differ), objects with a ``describe()`` (datasets, task sets) by it, and
any other object by its ``repr`` without memory addresses (which differ from run to run).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Iterable, Mapping
from pathlib import PurePath
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = ["describe_attributes", "describe_value", "digest"]

#: lists longer than this are stored as a digest, so a description stays small.
MAX_LISTED = 32
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


def digest(data: bytes | Tensor | np.ndarray) -> str:
    """SHA-256 hex digest of raw bytes, or of a tensor's / array's contents (C order)."""
    if isinstance(data, Tensor):
        data = data.detach().cpu().contiguous()
        if data.dtype == torch.bfloat16:  # numpy has no bfloat16: hash its bits
            data = data.view(torch.int16)
        data = data.numpy()
    if isinstance(data, np.ndarray):
        data = np.ascontiguousarray(data).tobytes()
    return hashlib.sha256(data).hexdigest()


def _describe_array(shape: Iterable[int], dtype: object, contents: bytes | Tensor | np.ndarray) -> dict[str, Any]:
    return {"shape": list(shape), "dtype": str(dtype), "sha256": digest(contents)}


def describe_value(value: Any) -> Any:
    """``value`` as plain JSON that changes whenever ``value`` does (see the module docstring)."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else repr(value)
    if isinstance(value, Tensor):
        return _describe_array(value.shape, value.dtype, value)
    if isinstance(value, np.ndarray):
        return _describe_array(value.shape, value.dtype, value)
    if isinstance(value, PurePath):
        return str(value)
    describe = getattr(value, "describe", None)
    if callable(describe) and not isinstance(value, type):
        return describe()
    if isinstance(value, Mapping):
        return {str(k): describe_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        items = [describe_value(v) for v in value]
        if len(items) <= MAX_LISTED:
            return items
        text = json.dumps(items, sort_keys=True).encode()
        return {"items": len(items), "sha256": digest(text)}
    if callable(value) and hasattr(value, "__qualname__"):  # a function or class
        return f"{getattr(value, '__module__', '')}.{value.__qualname__}"
    return _ADDRESS.sub("", repr(value))


def describe_attributes(obj: object, skip: Iterable[str] = ()) -> dict[str, Any]:
    """``{"class": ..., <public attribute>: description, ...}`` of ``obj``.

    Attributes starting with ``_`` are left out (by convention they are derived from the
    public ones, or caches), and so are those named in ``skip``.
    """
    skip = set(skip)
    out: dict[str, Any] = {"class": f"{type(obj).__module__}.{type(obj).__qualname__}"}
    for name, value in sorted(vars(obj).items()):
        if not name.startswith("_") and name not in skip:
            out[name] = describe_value(value)
    return out
