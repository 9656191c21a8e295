r"""`MaxPool2x2`: 2x2 max-pooling with stride 2, the function of ``nn.MaxPool2d(2)``, faster on the CPU.

torch's CPU kernel for ``max_pool2d`` (``max_pool2d_with_indices``) scans each window of an NCHW input
in a scalar loop and does not get faster in bfloat16: by profile it is about a third of a bf16 Conv-4
meta-step (docs/results.md). Here, for NCHW inputs, the forward is three elementwise maxima of the
window's four strided views,

.. math:: y = \max\big(\max(x_{00}, x_{01}),\ \max(x_{10}, x_{11})\big),

which torch vectorises, and the position of each maximum is found with a few elementwise comparisons,
in the form torch's kernel gives it: the first of equal values in the window (row-major), as a flat
index ``row * W + col`` into the input's plane. The backward is torch's own max-pool backward with
those indices, whose own backward (a gather) gives the double backward of second-order
meta-gradients; ``torch.func.vmap`` batches the whole thing from the rules of the operations inside
(``generate_vmap_rule``). Values, indices and gradients equal ``F.max_pool2d(x, 2)``'s bit for bit,
ties included (tested); an odd last row or column is dropped, as there. A window holding a NaN
gives NaN, as there, though its gradient may go to another entry of the window.

A channels-last input (`metalearn.models.layout`: the Conv-4 under CPU bf16) goes to torch's own
kernel (``max_pool2d_with_indices``), vectorised over channels in that layout (1.6 ms on a
``[75, 64, 28, 28]`` bf16 input, one thread, against 11 ms for the views above on its NCHW form).

Both forwards share one backward, torch's max-pool backward, whose own backward (the double backward) is
written here: the gather at the maxima in the input's layout, and no zero tensor for the input's share
(see `_MaxPoolBackward`); values and derivatives equal torch's bit for bit.

``benchmarks/max_pool.py`` times a Conv-4 meta-step with it against ``nn.MaxPool2d(2)``, float32 and
bf16 (figures in docs/results.md).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from metalearn.exact_norms import inside_vmap
from metalearn.models.layout import is_channels_last

__all__ = ["MaxPool2x2", "max_pool_2x2"]


class _MaxPoolFunction(torch.autograd.Function):
    """What both 2x2 max-pool forwards share: the indices (not differentiable) kept, gradients not
    materialised (autograd would otherwise hand the backward a zero int64 tensor of the indices' shape),
    and `_MaxPoolBackward` as the backward.

    ``x`` itself is not kept: torch's max-pool backward reads only its sizes and layout, so the backward
    hands it an uninitialised tensor of that shape and layout (`_stand_in`). Keeping ``x`` would keep
    the layer below's output alive until the backward: in the Conv-4 (conv, batch norm, pool, ReLU) that
    is the batch norm's output, the largest activation of each block, which nothing else holds. Inside
    ``torch.func.vmap`` (and while ``torch.compile`` traces) ``x`` is kept, as the generated vmap rule
    batches it."""

    @staticmethod
    def setup_context(ctx, inputs: tuple[Tensor], output: tuple[Tensor, Tensor]) -> None:
        x, indices = inputs[0], output[1]
        ctx.mark_non_differentiable(indices)
        ctx.set_materialize_grads(False)
        ctx.keeps_input = inside_vmap()
        if ctx.keeps_input:
            ctx.save_for_backward(x, indices)
        else:
            ctx.save_for_backward(indices)
            ctx.input_meta = (x.shape, x.dtype, x.device, is_channels_last(x))

    @staticmethod
    def backward(ctx, grad_y: Tensor | None, _grad_indices: None) -> Tensor | None:
        if grad_y is None:  # y not used downstream
            return None
        if ctx.keeps_input:
            x, indices = ctx.saved_tensors
        else:
            (indices,) = ctx.saved_tensors
            x = _stand_in(*ctx.input_meta)
        return _MaxPoolBackward.apply(grad_y, x, indices)


def _stand_in(shape: torch.Size, dtype: torch.dtype, device: torch.device, channels_last: bool) -> Tensor:
    """An uninitialised tensor with the pooled input's shape, dtype and layout: all torch's max-pool backward
    reads of its ``self`` argument (the gradient is laid out as it); never read as values."""
    layout = torch.channels_last if channels_last else torch.contiguous_format
    return torch.empty(shape, dtype=dtype, device=device, memory_format=layout)


class _MaxPool2x2(_MaxPoolFunction):
    """``(y, indices)`` of the 2x2 windows of ``x[..., :2h, :2w]``; ``indices`` (not differentiable) as
    torch's max-pool gives them."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor) -> tuple[Tensor, Tensor]:
        H, W = x.shape[-2], x.shape[-1]
        h, w = H // 2, W // 2
        a, b = x[..., 0 : 2 * h : 2, 0 : 2 * w : 2], x[..., 0 : 2 * h : 2, 1 : 2 * w : 2]
        c, d = x[..., 1 : 2 * h : 2, 0 : 2 * w : 2], x[..., 1 : 2 * h : 2, 1 : 2 * w : 2]
        top, bottom = torch.maximum(a, b), torch.maximum(c, d)
        y = torch.maximum(top, bottom)
        # the first maximum, row-major: the right entry only if strictly greater, the bottom row likewise.
        # Written with bool logic and int32: torch.where on bools and int64 + bool take slow paths on the CPU.
        down, right_top, right_bottom = bottom > top, b > a, d > c
        right = right_top ^ (down & (right_top ^ right_bottom))
        offset = torch.add(right.to(torch.int32), down.to(torch.int32), alpha=W)
        return y, offset.to(torch.int64).add_(_window_corners(h, w, W, x.device))


class _TorchMaxPool2x2(_MaxPoolFunction):
    """``(y, indices)`` by torch's own 2x2 max-pool kernel (for a channels-last input, where it is vectorised
    over channels), with `_MaxPoolBackward` as its backward."""

    @staticmethod
    def forward(x: Tensor) -> tuple[Tensor, Tensor]:
        return torch.ops.aten.max_pool2d_with_indices(x, [2, 2], [2, 2], [0, 0], [1, 1], False)


class _MaxPoolBackward(torch.autograd.Function):
    """``(grad_y, x, indices) -> dx``: torch's max-pool backward (each window's gradient to its maximum).

    Its own backward, what second-order meta-gradients run once per inner step and pooling layer, is the
    incoming gradient gathered at the maxima (`_at_maxima`), laid out as ``indices``, and nothing for
    ``x``. torch's formula for it returns an NCHW gather for a channels-last input (so the gradients it
    is added to, channels-last, take a strided add several times slower than a contiguous one) and a
    zero tensor of ``x``'s size as ``x``'s share (dx is piecewise constant in x), filled and added into
    ``x``'s gradient for nothing."""

    generate_vmap_rule = True

    @staticmethod
    def forward(grad_y: Tensor, x: Tensor, indices: Tensor) -> Tensor:  # type: ignore[override]
        return torch.ops.aten.max_pool2d_with_indices_backward(
            grad_y, x, [2, 2], [2, 2], [0, 0], [1, 1], False, indices
        )

    @staticmethod
    def setup_context(ctx, inputs: tuple[Tensor, Tensor, Tensor], output: Tensor) -> None:
        ctx.save_for_backward(inputs[2])

    @staticmethod
    def backward(ctx, grad_dx: Tensor) -> tuple[Tensor, None, None]:  # type: ignore[override]
        (indices,) = ctx.saved_tensors
        return _at_maxima(grad_dx, indices), None, None


def _at_maxima(g: Tensor, indices: Tensor) -> Tensor:
    """``g`` (shaped as the pooled input) at each window's maximum, ``indices`` giving their flat positions in
    each plane: a gather, differentiable in turn. A channels-last ``indices`` (torch's kernel on a
    channels-last input) gathers along the ``[N, H·W, C]`` rows its memory is, giving a channels-last result."""
    if not inside_vmap() and is_channels_last(indices):
        n, c, h, w = indices.shape
        rows = g.contiguous(memory_format=torch.channels_last).permute(0, 2, 3, 1).reshape(n, -1, c)
        picked = rows.gather(1, indices.permute(0, 2, 3, 1).reshape(n, h * w, c))
        return picked.view(n, h, w, c).permute(0, 3, 1, 2)
    lead = indices.shape[:-2]
    return g.reshape(*lead, -1).gather(-1, indices.reshape(*lead, -1)).view(indices.shape)


def _window_corners(h: int, w: int, W: int, device: torch.device) -> Tensor:
    """``[h, w]`` int64: the flat position ``2i * W + 2j`` of each window's top-left entry."""
    return (torch.arange(h, device=device) * (2 * W))[:, None] + torch.arange(w, device=device) * 2


def max_pool_2x2(x: Tensor) -> Tensor:
    """``F.max_pool2d(x, 2)`` for ``x`` of shape ``[C, H, W]`` or ``[N, C, H, W]``, computed as described in
    the module docstring (the same values and gradients, to every order).

    Raises:
        ValueError: ``x`` is not 3-D or 4-D, or smaller than 2x2 in its last two dimensions.

    Example:
        >>> import torch.nn.functional as F
        >>> x = torch.randn(2, 3, 7, 7)
        >>> torch.equal(max_pool_2x2(x), F.max_pool2d(x, 2))
        True
    """
    if x.ndim not in (3, 4) or x.shape[-2] < 2 or x.shape[-1] < 2:
        raise ValueError(
            f"max_pool_2x2 takes [C, H, W] or [N, C, H, W] inputs of at least 2x2, got shape {tuple(x.shape)}"
        )
    if is_channels_last(x) and not inside_vmap():
        # torch's own kernel is vectorised over channels in this layout (several times faster than the
        # views below; the same values, indices and gradients)
        y, _ = _TorchMaxPool2x2.apply(x)
        return y
    y, _ = _MaxPool2x2.apply(x)
    return y


class MaxPool2x2(nn.Module):
    """``nn.MaxPool2d(2)`` (kernel 2, stride 2, no padding) computed by `max_pool_2x2`: the same values and
    gradients to every order, with a vectorised forward (see the module docstring). What the library's
    `Conv4` and `ResNet12` pool with."""

    native_norm_free = True  # calls no fused norm itself: `metalearn.exact_norms.norm_free`

    def forward(self, x: Tensor) -> Tensor:
        return max_pool_2x2(x)
