"""Memory layout of image activations: when the library's convolutional models run channels-last.

On the CPU, oneDNN's bfloat16 convolutions compute in channels-last (NHWC) order: an NCHW input
makes every convolution reorder its output back to NCHW (a copy of the whole activation), and
torch's CPU max-pool kernel is vectorised over channels only for channels-last inputs (in NCHW it
scans each window in a scalar loop). So under CPU bf16 autocast (``precision="bf16"``) `Conv4`
lays its input out channels-last, and every convolution, batch norm, ReLU and max-pool after it
keeps that layout. The values are the same function either way (float64 meta-gradients agree to
~1e-14); the layout changes only the order of floating-point accumulations.

Float32 stays NCHW on purpose: there torch's channels-last batch norm accumulates less accurately
and a second-order meta-gradient amplifies it (``benchmarks/channels_last.py``: 100x the float32
error of NCHW and more after 5 inner steps, docs/results.md), while under bf16 the error is bf16's own
(the same benchmark reports both layouts in bf16). Inside ``torch.func.vmap`` (and while
``torch.compile`` traces) and on other devices nothing changes.
"""

from __future__ import annotations

import torch
from torch import Tensor

from metalearn.exact_norms import inside_vmap

__all__ = ["channels_last", "is_channels_last", "runs_channels_last"]


def runs_channels_last(x: Tensor) -> bool:
    """Whether a library model lays ``x`` out channels-last: a 4-D CPU tensor under CPU bfloat16
    autocast, outside ``vmap`` (see the module docstring)."""
    return (
        x.ndim == 4
        and x.device.type == "cpu"
        and torch.is_autocast_enabled("cpu")
        and torch.get_autocast_dtype("cpu") == torch.bfloat16
        and not inside_vmap()
    )


def channels_last(x: Tensor) -> Tensor:
    """``x`` ``[N, C, H, W]`` with channels-last strides (the same values).

    A one-channel NCHW tensor is already NHWC in memory: it becomes a view with NHWC strides
    (``.contiguous(memory_format=torch.channels_last)`` would keep its NCHW strides, and torch
    would keep convolving in NCHW). Otherwise a channels-last copy, or ``x`` itself if it is one.

    Example:
        >>> x = torch.rand(2, 1, 4, 4)
        >>> y = channels_last(x)
        >>> y.stride(), torch.equal(x, y), y.data_ptr() == x.data_ptr()
        ((16, 1, 4, 1), True, True)
    """
    if x.ndim != 4:
        raise ValueError(f"channels_last takes [N, C, H, W], got shape {tuple(x.shape)}")
    n, c, h, w = x.shape
    if c == 1 and x.is_contiguous():
        return x.view(n, h, w, 1).permute(0, 3, 1, 2)
    return x.contiguous(memory_format=torch.channels_last)


def is_channels_last(x: Tensor) -> bool:
    """Whether the 4-D ``x`` is laid out channels-last and not NCHW (a one-channel tensor counts
    by its channel stride, as torch's kernels choose their layout)."""
    return x.ndim == 4 and x.stride(1) == 1 and x.is_contiguous(memory_format=torch.channels_last)
