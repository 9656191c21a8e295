r"""Batch norm with batch statistics and a closed-form double backward.

`closed_form_batch_norm` normalises each channel (dim 1) of ``x`` ``[N, C, ...]`` with the statistics of
its ``M = N·H·W·...`` values, as ``F.batch_norm`` does with batch statistics, and has the same values and
first derivatives bit for bit (torch's fused kernels, ``native_batch_norm`` and its backward). What
differs is the derivative of the backward, which MAML's second-order meta-gradient runs once per inner
step and layer: torch's composite (``NativeBatchNormBackwardBackward0``) makes about 45 passes over
``x``'s size; the closed form below about 15 (most of them one fused ``addcmul``).

Per channel, with :math:`\hat x = (x - \mu) r`, :math:`r = (\sigma^2 + \epsilon)^{-1/2}` and the
symmetric operator :math:`P(h) = h - \overline{h} - \hat x\, \overline{h \hat x}` (bars are means over
the channel's values), the backward of :math:`y = w \hat x + b` for an incoming gradient :math:`g` is

.. math:: \hat g = P(g), \quad dx = w r \hat g, \quad dw = \textstyle\sum g \hat x, \quad db = \sum g.

Its derivative, for cotangents :math:`a, \alpha, \beta` of :math:`dx, dw, db`, with
:math:`m = \overline{g \hat x}`, :math:`s = \overline{a \hat x}` and :math:`S = \sum P(a)\, g`:

.. math::

    \partial g &= w r P(a) + \alpha \hat x + \beta, \qquad \partial w = r S, \\
    \partial x &= (\alpha r - w r^2 s)\, \hat g - \frac{w r^2 S}{M} \hat x - w r^2 m\, P(a),

from :math:`\delta \hat x = r P(\delta x)` and :math:`\delta r = -r^2\, \overline{\hat x\, \delta x}`
(the statistics' dependence on :math:`x` included). Per-channel sums and factors are float32 for a
bf16 input (float64 for float64); the passes over ``x``'s size stay in the input's dtype.

The double backward is differentiable in turn: when its own derivative will be taken (grad mode on,
``create_graph=True``), it recomputes the statistics from ``x`` by differentiable operations, so third
and higher derivatives are exact too (at the cost of those passes, only then). `BatchNorm` uses this
function outside ``torch.func.vmap`` for inputs of at least `CLOSED_FORM_MIN_NUMEL` elements; under
vmap it has no batching rule, and `BatchNorm` takes `metalearn.exact_norms` there.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["CLOSED_FORM_MIN_NUMEL", "closed_form_batch_norm"]

#: below this many elements torch's composite is as fast or faster (the autograd.Function's Python
#: overhead, ~0.15 ms a call, outweighs the passes saved). `benchmarks/batch_norm_double_backward.py`, one
#: forward, backward and double backward, one thread: the closed form 0.91x / 0.88x torch's speed at 15,680
#: elements (float32 5x64x7x7, bf16 245x64), 1.27-2.65x from 62,720 up (docs/results.md)
CLOSED_FORM_MIN_NUMEL = 32_768


def closed_form_batch_norm(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float) -> Tensor:
    """``F.batch_norm(x, None, None, weight, bias, training=True, eps=eps)`` for ``x`` ``[N, C, ...]``, with
    the closed-form double backward of the module docstring (``weight``/``bias`` ``[C]`` or ``None``)."""
    if x.ndim < 2:
        raise ValueError(f"closed_form_batch_norm expects [N, C, ...], got shape {tuple(x.shape)}")
    if x.numel() // max(x.shape[1], 1) < 2:  # as F.batch_norm refuses it: one value per channel has no variance
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {tuple(x.shape)}")
    return _BatchNorm.apply(x, weight, bias, eps)[0]


class _BatchNorm(torch.autograd.Function):
    @staticmethod
    def forward(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float) -> tuple[Tensor, Tensor, Tensor]:  # type: ignore[override]
        return torch.native_batch_norm(x, weight, bias, None, None, True, 0.0, eps)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
        x, weight, _, eps = inputs
        _, mean, invstd = output
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.eps = eps
        ctx.mark_non_differentiable(mean, invstd)

    @staticmethod
    def backward(ctx: Any, g: Tensor, _mean: Tensor | None, _invstd: Tensor | None):  # type: ignore[override]
        x, weight, mean, invstd = ctx.saved_tensors
        dx, dw, db = _BatchNormBackward.apply(g, x, weight, mean, invstd, ctx.eps)
        needs = ctx.needs_input_grad
        return (dx if needs[0] else None), (dw if needs[1] else None), (db if needs[2] else None), None


class _BatchNormBackward(torch.autograd.Function):
    """``(g, x, w) -> (dx, dw, db)`` by torch's fused backward; its own backward in closed form."""

    @staticmethod
    def forward(  # type: ignore[override]
        g: Tensor, x: Tensor, weight: Tensor | None, mean: Tensor, invstd: Tensor, eps: float
    ) -> tuple[Tensor, Tensor, Tensor]:
        return torch.ops.aten.native_batch_norm_backward(
            g, x, weight, None, None, mean, invstd, True, eps, [True, True, True]
        )

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
        g, x, weight, mean, invstd, _ = inputs
        _, dw, db = output
        ctx.save_for_backward(g, x, weight, mean, invstd, dw, db)
        ctx.eps = inputs[5]

    @staticmethod
    def backward(ctx: Any, a: Tensor | None, alpha: Tensor | None, beta: Tensor | None):  # type: ignore[override]
        g, x, weight, mean, invstd, dw, db = ctx.saved_tensors
        differentiable = torch.is_grad_enabled()  # a derivative of this one will be taken
        if differentiable:  # every input of the formulas differentiable
            mean, invstd, dw, db = _statistics(g, x, ctx.eps)
        grads = _double_backward(
            g, x, weight, mean, invstd, dw, db, a, alpha, beta, ctx.needs_input_grad[:3], differentiable
        )
        return (*grads, None, None, None)


def _statistics(g: Tensor, x: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``mean, invstd, dw, db`` recomputed from ``x`` and ``g`` by differentiable operations (the saved
    ones are not: ``native_batch_norm``'s statistics carry no graph), for third and higher derivatives."""
    stat = torch.float64 if x.dtype == torch.float64 else torch.float32
    dims, shape = _channel_layout(x)
    xs = x.to(stat)
    mean = xs.mean(dims)
    invstd = (xs.var(dims, unbiased=False) + eps).rsqrt()
    x_hat = (xs - mean.view(shape)) * invstd.view(shape)
    return mean, invstd, (g.to(stat) * x_hat).sum(dims), g.to(stat).sum(dims)


def _channel_layout(x: Tensor) -> tuple[list[int], tuple[int, ...]]:
    """The dimensions a channel's statistics reduce over, and the shape a per-channel vector broadcasts as."""
    return [0, *range(2, x.ndim)], (1, x.shape[1], *([1] * (x.ndim - 2)))


def _double_backward(
    g: Tensor, x: Tensor, weight: Tensor | None, mean: Tensor, invstd: Tensor, dw: Tensor, db: Tensor,
    a: Tensor | None, alpha: Tensor | None, beta: Tensor | None, needs: tuple[bool, ...], differentiable: bool,
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """The gradients w.r.t. ``(g, x, weight)`` of the module docstring's formulas. Per-channel values are
    float32 (float64 for float64); the tensors of x's size stay in the input's dtype (bf16 under bf16:
    half the bytes of each pass, and no hidden casting copy of a mixed-dtype operation).

    Unless ``differentiable``, x̂ and the per-channel sums come from torch's batch-norm kernels (`_normalized`,
    `_channel_sums`): one pass each, accumulated in the statistics' dtype, where torch's ``sum(dtype=float32)``
    of a bf16 tensor first copies it whole to float32 on the CPU. Their derivatives treat the statistics as
    the input's own, so a double backward whose derivative will be taken runs on torch's plain operations."""
    need_g, need_x, need_w = needs
    dims, shape = _channel_layout(x)
    n_rows, work = x.numel() // x.shape[1], x.dtype
    stat = torch.float64 if work == torch.float64 else torch.float32
    r = invstd.to(stat)
    w = torch.ones_like(r) if weight is None else weight.to(stat)
    alpha_ = torch.zeros_like(r) if alpha is None else alpha.to(stat)
    beta_ = torch.zeros_like(r) if beta is None else beta.to(stat)
    m = dw.to(stat) / n_rows

    def big(v: Tensor) -> Tensor:  # a per-channel factor for the passes over x's size
        return v.to(work).view(shape)

    mean_ = mean.to(stat)
    x_hat = _normalized(x, mean_, r, shape, differentiable)
    def project(h: Tensor, h_mean: Tensor, h_x_hat_mean: Tensor) -> Tensor:  # P(h) = h - mean(h) - x̂ mean(h x̂)
        return torch.addcmul(h, x_hat, big(-h_x_hat_mean)).sub_(big(h_mean))

    grad_g = torch.addcmul(big(beta_), x_hat, big(alpha_)) if need_g else None
    grad_x = grad_w = big_s = None
    if a is not None:  # None: only dw and db are used downstream, P(a) = 0
        if differentiable:
            a_x_hat_sum, a_sum = (a * x_hat).sum(dims, dtype=stat), a.sum(dims, dtype=stat)
        else:
            a_x_hat_sum, a_sum = _channel_sums(a, x, mean_, r)
        s = a_x_hat_sum / n_rows
        p_a = project(a, a_sum / n_rows, s)
        wr = w * r
        if grad_g is not None:
            grad_g.addcmul_(p_a, big(wr))
        if need_x or need_w:
            # Σ P(a) g = Σ a P(g)
            big_s = (p_a * g).sum(dims, dtype=stat) if differentiable else _channel_sums(g, p_a, None, None)[0]
    if need_w and big_s is not None:
        grad_w = r * big_s
    if need_x:
        g_hat = project(g, db.to(stat) / n_rows, m)  # P(g)
        if a is None:
            grad_x = g_hat.mul_(big(alpha_ * r))
        else:
            assert big_s is not None  # computed above whenever a is given and x needs its gradient
            wr2 = wr * r
            grad_x = g_hat.mul_(big(alpha_ * r - wr2 * s))
            grad_x.addcmul_(x_hat, big(-wr2 * big_s / n_rows)).addcmul_(p_a, big(-wr2 * m))
    return grad_g, grad_x, grad_w


def _normalized(x: Tensor, mean: Tensor, invstd: Tensor, shape: tuple[int, ...], differentiable: bool) -> Tensor:
    """x̂ = (x − μ) r in x's dtype, computed in the statistics' dtype (in bf16, x·r − μ·r would cancel where
    |μ| >> σ): torch's batch-norm kernel in eval mode (weight r, running mean μ, running variance 1, eps 0:
    ``x·r − μ·r`` in float32, stored as bf16, one pass), or the same by torch's operations when
    ``differentiable`` (the kernel's eval-mode derivative ignores μ)."""
    if differentiable:
        return torch.addcmul((-mean * invstd).view(shape), x, invstd.view(shape)).to(x.dtype)
    return torch.native_batch_norm(x, invstd, None, mean, torch.ones_like(invstd), False, 0.0, 0.0)[0]


def _channel_sums(u: Tensor, v: Tensor, mean: Tensor | None, invstd: Tensor | None) -> tuple[Tensor, Tensor]:
    """``(Σ u (v − μ) r, Σ u)`` per channel (``μ = 0``, ``r = 1`` when ``None``) in the statistics' dtype, by
    torch's batch-norm backward kernel with a unit weight: its ``dw`` and ``db``, one pass over ``u`` and
    ``v``, no tensor of their size made. Not differentiable as such: the kernel's own derivative takes μ and
    r for ``v``'s statistics."""
    stat = torch.float64 if v.dtype == torch.float64 else torch.float32
    ones = torch.ones(v.shape[1], dtype=stat, device=v.device)
    mean = torch.zeros_like(ones) if mean is None else mean
    invstd = ones if invstd is None else invstd
    _, dot, total = torch.ops.aten.native_batch_norm_backward(
        u, v, ones, None, None, mean, invstd, True, 0.0, [False, True, True]
    )
    return dot, total
