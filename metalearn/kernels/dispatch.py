"""Which implementation serves a fused op: ``kernels="auto" | "triton" | "reference"``.

* ``"reference"`` — plain torch (`metalearn.kernels.reference`, or the rule's own code);
* ``"triton"`` — the Triton kernels, for CUDA tensors, or CPU tensors in Triton's interpreter
  (``TRITON_INTERPRET=1`` set before the kernels are first used); without Triton, or on CPU without
  the interpreter, an error says so;
* ``"auto"`` (default) — Triton for CUDA tensors when Triton imports, the reference otherwise.

A set of tensors a kernel cannot serve — mixed devices or dtypes, a dtype the kernels lack
(bf16 in the interpreter, which computes it wrongly; integers), more entries than 32-bit indexing
reaches — is served by the reference under every choice, so a choice never gives a wrong answer.
The choice is an argument, never a global: it travels from the public call to the op.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from collections.abc import Iterable

import torch
from torch import Tensor

__all__ = ["KERNELS", "check_kernels", "interpreter_enabled", "kernel_unsupported", "triton_available", "use_triton"]

#: the values of every ``kernels=`` argument
KERNELS = ("auto", "triton", "reference")
#: dtypes the kernels compute (bf16 only compiled on CUDA: the interpreter gets it wrong)
_DTYPES = (torch.float16, torch.float32, torch.float64)
#: the kernels index with 32-bit offsets: more entries than this (also all tasks of a vmap together) run the reference
MAX_ENTRIES = 2**31 - 1


def check_kernels(kernels: str, device: torch.device | None = None) -> str:
    """``kernels`` itself if it can run (on ``device``, when given); raised before any work otherwise.

    Raises:
        ValueError: ``kernels`` not one of `KERNELS`.
        ImportError: ``kernels="triton"`` without Triton installed.
        RuntimeError: ``kernels="triton"`` for CPU tensors without ``TRITON_INTERPRET=1``.
    """
    if not isinstance(kernels, str) or kernels not in KERNELS:
        raise ValueError(f"kernels must be one of {KERNELS}, got {kernels!r}")
    if kernels != "triton":
        return kernels
    if not triton_available():
        raise ImportError(
            "kernels='triton' needs Triton: pip install 'torch-metalearn[kernels]' (triton==3.7.1), "
            "or use kernels='auto' or 'reference'"
        )
    if device is not None and device.type == "cpu" and not interpreter_enabled():
        raise RuntimeError(
            "kernels='triton' on CPU tensors runs only in Triton's interpreter: set TRITON_INTERPRET=1 in the "
            "environment before the first kernel launch (or use kernels='auto' or 'reference' on CPU)"
        )
    return kernels


@functools.cache
def triton_available() -> bool:
    """Whether ``import triton`` works (cached: the answer cannot change within a process)."""
    if importlib.util.find_spec("triton") is None:
        return False
    try:
        import triton  # noqa: F401
    except Exception:  # a broken install is no Triton
        return False
    return True


def interpreter_enabled() -> bool:
    """Whether Triton's interpreter is on (``TRITON_INTERPRET=1``), which runs the kernels on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def kernel_unsupported(tensors: Iterable[Tensor]) -> str | None:
    """Why the kernels cannot serve ``tensors`` together (one device, one supported dtype), or None."""
    devices, dtypes, entries = set(), set(), 0
    for t in tensors:
        devices.add(t.device)
        dtypes.add(t.dtype)
        entries += t.numel()
    if len(devices) > 1:
        return f"tensors on several devices {sorted(map(str, devices))}"
    if len(dtypes) > 1:
        return f"tensors of several dtypes {sorted(map(str, dtypes))}"
    if not devices:
        return "no tensors"
    (device,), (dtype,) = devices, dtypes
    ok = _DTYPES + ((torch.bfloat16,) if device.type == "cuda" and not interpreter_enabled() else ())
    if dtype not in ok:
        return f"dtype {dtype} (the kernels compute {[str(d) for d in ok]} on {device.type})"
    if device.type not in ("cuda", "cpu"):
        return f"device {device}"
    if entries > MAX_ENTRIES:
        return f"{entries} entries (more than 32-bit offsets reach)"
    return None


def use_triton(kernels: str, tensors: Iterable[Tensor]) -> bool:
    """Whether the op over ``tensors`` runs the Triton kernels under choice ``kernels``.

    Raises:
        ValueError: ``kernels`` not one of `KERNELS`.
        ImportError: ``kernels="triton"`` without Triton installed.
        RuntimeError: ``kernels="triton"`` for CPU tensors without ``TRITON_INTERPRET=1``.
    """
    if kernels == "reference" or torch.compiler.is_compiling():
        return False
    tensors = list(tensors)
    if kernels == "auto" or kernels not in KERNELS:
        check_kernels(kernels)
        if not all(t.device.type == "cuda" for t in tensors) or not triton_available():
            return False
        return kernel_unsupported(tensors) is None
    for device in {t.device for t in tensors}:
        check_kernels(kernels, device)
    return kernel_unsupported(tensors) is None
