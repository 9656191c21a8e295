"""Batch norm with each task's batch statistics as a differentiable, vmap-able op on the Triton kernels.

`batch_norm_train(x, weight, bias, eps)` computes `metalearn.kernels.reference.batch_norm_train`
for one task's ``[N, C, ...]`` input with one kernel launch forward (`BatchNormGroups`) and one
backward (`BatchNormGroupsVJP`); the backward's own backward is the plain-torch VJP of the
reference backward (``torch.func.vjp``), so second- and higher-order meta-gradients are exact.
Under ``torch.func.vmap`` over tasks the explicit vmap rules fold the task dimension into the
kernels' group dimension: every task's statistics are its own, and one launch normalises all of
them. This is what `metalearn.exact_norms.batch_norm` runs for batch statistics when the dispatch
(`metalearn.kernels.use_triton`) picks Triton, i.e. on CUDA by default.
"""

from __future__ import annotations

import functools
import importlib
import math
from types import ModuleType
from typing import Any

import torch
from torch import Tensor

from metalearn.kernels.dispatch import MAX_ENTRIES
from metalearn.kernels.update import launch_groups

__all__ = ["BatchNormGroups", "BatchNormGroupsVJP", "batch_norm_train", "grouped_reference", "grouped_reference_vjp"]


@functools.cache
def _kernels() -> ModuleType:
    return importlib.import_module("metalearn.kernels.triton_norm")


def grouped_reference(x: Tensor, w: Tensor, b: Tensor, eps: float) -> Tensor:
    """Plain torch of `BatchNormGroups`: ``x`` ``[G, N, C, L]``, ``w``/``b`` ``[G, C]``; statistics over N and L."""
    xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    mean = xf.mean(dim=(1, 3), keepdim=True)
    centered = xf - mean
    rstd = torch.rsqrt(centered.square().mean(dim=(1, 3), keepdim=True) + eps)
    return ((centered * rstd) * w[:, None, :, None] + b[:, None, :, None]).to(x.dtype)


def grouped_reference_vjp(x: Tensor, w: Tensor, gy: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """Plain torch of `BatchNormGroupsVJP`: (dx ``[G, N, C, L]``, dw ``[G, C]``, db ``[G, C]``)."""
    low = x.dtype in (torch.float16, torch.bfloat16)
    xf, gf = (x.float(), gy.float()) if low else (x, gy)
    mean = xf.mean(dim=(1, 3), keepdim=True)
    centered = xf - mean
    rstd = torch.rsqrt(centered.square().mean(dim=(1, 3), keepdim=True) + eps)
    xhat = centered * rstd
    db = gf.sum(dim=(1, 3))
    dw = (gf * xhat).sum(dim=(1, 3))
    mean_g = gf.mean(dim=(1, 3), keepdim=True)
    mean_gx = (gf * xhat).mean(dim=(1, 3), keepdim=True)
    dx = (w.to(xf.dtype)[:, None, :, None] * rstd) * (gf - mean_g - xhat * mean_gx)
    return dx.to(x.dtype), dw.to(w.dtype), db.to(w.dtype)


def _run(name: str, x: Tensor, *tensors: Tensor, outs: tuple[Tensor, ...], eps: float) -> None:
    groups, n, c, spatial = x.shape
    if x.numel():
        # ε as a tensor of the computation dtype: a Python float argument would reach the kernel as float32
        eps_t = torch.full((), eps, dtype=torch.float64 if x.dtype == torch.float64 else torch.float32, device=x.device)
        launch_groups(getattr(_kernels(), name), groups * c, n * spatial, x.device, x, *tensors, *outs,
                      n, c, spatial, eps_t, F64=x.dtype == torch.float64)


def _fold(batch_size: int, tensor: Tensor, dim: int | None) -> Tensor:
    """A ``[G, ...]`` input batched over tasks as ``[V*G, ...]`` (tasks first; an unbatched one repeated)."""
    t = tensor.movedim(dim, 0) if dim is not None else tensor.expand(batch_size, *tensor.shape)
    return t.reshape(batch_size * t.shape[1], *t.shape[2:])


def _unfold(batch_size: int, t: Tensor) -> Tensor:
    return t.reshape(batch_size, t.shape[0] // batch_size, *t.shape[1:])


class BatchNormGroups(torch.autograd.Function):
    """`grouped_reference` by one Triton launch; differentiable to every order; vmap rule."""

    @staticmethod
    def forward(x: Tensor, w: Tensor, b: Tensor, eps: float) -> Tensor:  # type: ignore[override]
        x, w, b = x.contiguous(), w.contiguous(), b.contiguous()
        y = torch.empty_like(x)
        _run("batch_norm_forward", x, w, b, outs=(y,), eps=eps)
        return y

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: Any) -> None:
        x, w, _, eps = inputs
        ctx.eps = eps
        ctx.save_for_backward(x, w)

    @staticmethod
    def backward(ctx: Any, gy: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        x, w = ctx.saved_tensors
        dx, dw, db = BatchNormGroupsVJP.apply(x, w, gy, ctx.eps)
        return dx, dw, db, None

    @staticmethod
    def vmap(info: Any, in_dims: tuple, x: Tensor, w: Tensor, b: Tensor, eps: float) -> tuple:
        v = info.batch_size
        folded = (_fold(v, x, in_dims[0]), _fold(v, w, in_dims[1]), _fold(v, b, in_dims[2]))
        norm = grouped_reference if folded[0].numel() > MAX_ENTRIES else BatchNormGroups.apply  # 32-bit offsets
        return _unfold(v, norm(*folded, eps)), 0


class BatchNormGroupsVJP(torch.autograd.Function):
    """`grouped_reference_vjp` by one Triton launch; its backward is plain torch (``torch.func.vjp``)."""

    @staticmethod
    def forward(x: Tensor, w: Tensor, gy: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor]:  # type: ignore[override]
        x, w, gy = x.contiguous(), w.contiguous(), gy.contiguous()
        dx = torch.empty_like(x)
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        dw = torch.empty(w.shape, dtype=acc, device=w.device)
        db = torch.empty(w.shape, dtype=acc, device=w.device)
        _run("batch_norm_backward", x, w, gy, outs=(dx, dw, db), eps=eps)
        return dx, dw.to(w.dtype), db.to(w.dtype)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: Any) -> None:
        x, w, gy, eps = inputs
        ctx.eps = eps
        ctx.save_for_backward(x, w, gy)

    @staticmethod
    def backward(ctx: Any, g_dx: Tensor, g_dw: Tensor, g_db: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        pullback = torch.func.vjp(functools.partial(grouped_reference_vjp, eps=ctx.eps), *ctx.saved_tensors)[1]
        return (*pullback((g_dx, g_dw, g_db)), None)

    @staticmethod
    def vmap(info: Any, in_dims: tuple, x: Tensor, w: Tensor, gy: Tensor, eps: float) -> tuple:
        v = info.batch_size
        folded = (_fold(v, x, in_dims[0]), _fold(v, w, in_dims[1]), _fold(v, gy, in_dims[2]))
        vjp = grouped_reference_vjp if folded[0].numel() > MAX_ENTRIES else BatchNormGroupsVJP.apply
        return tuple(_unfold(v, o) for o in vjp(*folded, eps)), (0, 0, 0)


def batch_norm_train(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float) -> Tensor:
    """`metalearn.kernels.reference.batch_norm_train` of one task's ``[N, C, ...]`` input, on the Triton kernels.

    ``weight``/``bias`` ``[C]`` or None; the caller has checked the input (`metalearn.exact_norms`) and
    that the kernels serve it (`metalearn.kernels.use_triton`).
    """
    n, c = x.shape[0], x.shape[1]
    spatial = math.prod(x.shape[2:])
    dtype = weight.dtype if weight is not None else bias.dtype if bias is not None else x.dtype
    w = weight.reshape(1, c) if weight is not None else x.new_ones((1, c), dtype=dtype)
    b = bias.reshape(1, c) if bias is not None else x.new_zeros((1, c), dtype=dtype)
    y = BatchNormGroups.apply(x.reshape(1, n, c, spatial), w, b, float(eps))
    return y.reshape(x.shape)
