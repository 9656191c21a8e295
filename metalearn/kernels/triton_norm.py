"""Triton kernels of batch norm with batch statistics, per group (`metalearn.kernels.norm`).

The input is viewed as ``[G, N, C, L]``: G groups (tasks under vmap), N examples, C channels, L
spatial entries. One program normalises one (group, channel) pair over its M = N·L entries,
``BLOCK`` (a power of 2) at a time, every load and store masked: the mean, then the biased variance
of the centred values (two passes, as the reference computes them), then the output. The backward
recomputes the statistics the same way, then the two per-channel sums, then dx. fp16/bf16 are
computed in float32 (``UPCAST``); float64 in float64. Imported lazily, at the first launch (see
`metalearn.kernels.triton_update`).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _sqrt(v):
    # correctly rounded, as torch's: tl.sqrt is the fast approximation for float32 (sqrt_rn is float32 only)
    if tl.constexpr(v.dtype.is_fp64()):
        r = tl.sqrt(v)
    else:
        r = tl.sqrt_rn(v)
    return r


@triton.jit
def _stats(x, base, N, C, L, eps_ptr, F64: tl.constexpr, BLOCK: tl.constexpr):
    M = N * L
    if F64:
        acc = tl.zeros([BLOCK], dtype=tl.float64)
    else:
        acc = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, M, BLOCK):
        m = start + tl.arange(0, BLOCK)
        mask = m < M
        acc += tl.load(x + base + (m // L) * (C * L) + m % L, mask=mask, other=0.0).to(acc.dtype)
    mean = tl.sum(acc, axis=0) / M
    acc = acc * 0
    for start in range(0, M, BLOCK):
        m = start + tl.arange(0, BLOCK)
        mask = m < M
        d = tl.load(x + base + (m // L) * (C * L) + m % L, mask=mask, other=0.0).to(acc.dtype) - mean
        d = tl.where(mask, d, 0.0)
        acc += d * d
    var = tl.sum(acc, axis=0) / M
    rstd = 1.0 / _sqrt(var + tl.load(eps_ptr))
    return mean, rstd


@triton.jit
def batch_norm_forward(x, w, b, y, N, C, L, eps, F64: tl.constexpr, BLOCK: tl.constexpr):
    g = tl.program_id(0)  # group * C + channel: also the index of its weight and bias
    base = (g // C) * (N * C * L) + (g % C) * L
    mean, rstd = _stats(x, base, N, C, L, eps, F64, BLOCK)
    wv = tl.load(w + g).to(mean.dtype)
    bv = tl.load(b + g).to(mean.dtype)
    M = N * L
    for start in range(0, M, BLOCK):
        m = start + tl.arange(0, BLOCK)
        mask = m < M
        off = base + (m // L) * (C * L) + m % L
        xv = tl.load(x + off, mask=mask, other=0.0).to(mean.dtype)
        tl.store(y + off, ((xv - mean) * rstd) * wv + bv, mask=mask)


@triton.jit
def batch_norm_backward(x, w, gy, dx, dw, db, N, C, L, eps, F64: tl.constexpr, BLOCK: tl.constexpr):
    g = tl.program_id(0)
    base = (g // C) * (N * C * L) + (g % C) * L
    mean, rstd = _stats(x, base, N, C, L, eps, F64, BLOCK)
    M = N * L
    if F64:
        sum_g = tl.zeros([BLOCK], dtype=tl.float64)
    else:
        sum_g = tl.zeros([BLOCK], dtype=tl.float32)
    sum_gx = sum_g * 0
    for start in range(0, M, BLOCK):
        m = start + tl.arange(0, BLOCK)
        mask = m < M
        off = base + (m // L) * (C * L) + m % L
        xhat = (tl.load(x + off, mask=mask, other=0.0).to(mean.dtype) - mean) * rstd
        gv = tl.load(gy + off, mask=mask, other=0.0).to(mean.dtype)
        sum_g += gv
        sum_gx += tl.where(mask, gv * xhat, 0.0)
    total_g = tl.sum(sum_g, axis=0)
    total_gx = tl.sum(sum_gx, axis=0)
    tl.store(db + g, total_g)
    tl.store(dw + g, total_gx)
    mean_g = total_g / M
    mean_gx = total_gx / M
    scale = tl.load(w + g).to(mean.dtype) * rstd
    for start in range(0, M, BLOCK):
        m = start + tl.arange(0, BLOCK)
        mask = m < M
        off = base + (m // L) * (C * L) + m % L
        xhat = (tl.load(x + off, mask=mask, other=0.0).to(mean.dtype) - mean) * rstd
        gv = tl.load(gy + off, mask=mask, other=0.0).to(mean.dtype)
        tl.store(dx + off, scale * (gv - mean_g - xhat * mean_gx), mask=mask)
