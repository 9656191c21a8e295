"""Triton kernels of the fused inner updates (`metalearn.kernels.reference` defines what they compute).

Imported lazily, by `metalearn.kernels.update` at the first Triton launch, because Triton decides
when a kernel is *defined* whether it runs compiled (CUDA) or in its interpreter
(``TRITON_INTERPRET=1``, CPU tensors). Every kernel is elementwise over N flat entries: one program
per ``BLOCK`` entries (a power of 2), every load and store masked; a hyper-parameter flagged
``*_SCALAR`` is one value broadcast over every entry, otherwise it has one value per entry.
fp16/bf16 are computed in float32 (``UPCAST``) and stored in their own dtype.
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
def _load(ptr, offs, mask, SCALAR: tl.constexpr, UPCAST: tl.constexpr):
    if SCALAR:
        x = tl.load(ptr)
    else:
        x = tl.load(ptr + offs, mask=mask, other=1.0)  # 1 in masked lanes: no 0/0 there
    if UPCAST:
        x = x.to(tl.float32)
    return x


@triton.jit
def _offsets(n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    return offs, offs < n


@triton.jit
def sgd_forward(theta, grad, lr, out, n, LR_S: tl.constexpr, UPCAST: tl.constexpr, BLOCK: tl.constexpr):
    offs, mask = _offsets(n, BLOCK)
    t = _load(theta, offs, mask, False, UPCAST)
    g = _load(grad, offs, mask, False, UPCAST)
    a = _load(lr, offs, mask, LR_S, UPCAST)
    tl.store(out + offs, t - a * g, mask=mask)


@triton.jit
def sgd_backward(
    grad, lr, g_theta, d_grad, d_lr, n,
    LR_S: tl.constexpr, HYPER: tl.constexpr, UPCAST: tl.constexpr, BLOCK: tl.constexpr,
):
    offs, mask = _offsets(n, BLOCK)
    g = _load(grad, offs, mask, False, UPCAST)
    a = _load(lr, offs, mask, LR_S, UPCAST)
    go = _load(g_theta, offs, mask, False, UPCAST)
    tl.store(d_grad + offs, -(a * go), mask=mask)
    if HYPER:
        tl.store(d_lr + offs, -(g * go), mask=mask)


@triton.jit
def momentum_forward(
    theta, grad, buf, lr, mu, out_theta, out_buf, n,
    LR_S: tl.constexpr, MU_S: tl.constexpr, NESTEROV: tl.constexpr, UPCAST: tl.constexpr, BLOCK: tl.constexpr,
):
    offs, mask = _offsets(n, BLOCK)
    t = _load(theta, offs, mask, False, UPCAST)
    g = _load(grad, offs, mask, False, UPCAST)
    b = _load(buf, offs, mask, False, UPCAST)
    a = _load(lr, offs, mask, LR_S, UPCAST)
    m = _load(mu, offs, mask, MU_S, UPCAST)
    nb = m * b + g
    if NESTEROV:
        u = g + m * nb
    else:
        u = nb
    tl.store(out_theta + offs, t - a * u, mask=mask)
    tl.store(out_buf + offs, nb, mask=mask)


@triton.jit
def momentum_backward(
    grad, buf, lr, mu, g_theta, g_buf, d_grad, d_buf, d_lr, d_mu, n,
    LR_S: tl.constexpr, MU_S: tl.constexpr, NESTEROV: tl.constexpr, HYPER: tl.constexpr,
    UPCAST: tl.constexpr, BLOCK: tl.constexpr,
):
    offs, mask = _offsets(n, BLOCK)
    g = _load(grad, offs, mask, False, UPCAST)
    b = _load(buf, offs, mask, False, UPCAST)
    a = _load(lr, offs, mask, LR_S, UPCAST)
    m = _load(mu, offs, mask, MU_S, UPCAST)
    got = _load(g_theta, offs, mask, False, UPCAST)
    gob = _load(g_buf, offs, mask, False, UPCAST)
    nb = m * b + g
    du = -(a * got)
    if NESTEROV:
        u = g + m * nb
        dnb = m * du + gob
        dg = du + dnb
        dm = nb * du + b * dnb
    else:
        u = nb
        dnb = du + gob
        dg = dnb
        dm = b * dnb
    tl.store(d_grad + offs, dg, mask=mask)
    tl.store(d_buf + offs, m * dnb, mask=mask)
    if HYPER:
        tl.store(d_lr + offs, -(u * got), mask=mask)
        tl.store(d_mu + offs, dm, mask=mask)


@triton.jit
def _safe_sqrt(v):
    positive = v > 0
    return tl.where(positive, _sqrt(tl.where(positive, v, 1.0)), 0.0)


@triton.jit
def adam_forward(
    theta, grad, m, v, lr, b1, c1, b2, c2, eps, s1, s2, out_theta, out_m, out_v, n,
    LR_S: tl.constexpr, B1_S: tl.constexpr, C1_S: tl.constexpr, B2_S: tl.constexpr, C2_S: tl.constexpr,
    EPS_S: tl.constexpr, S1_S: tl.constexpr, S2_S: tl.constexpr, UPCAST: tl.constexpr, BLOCK: tl.constexpr,
):
    offs, mask = _offsets(n, BLOCK)
    t = _load(theta, offs, mask, False, UPCAST)
    g = _load(grad, offs, mask, False, UPCAST)
    mm = _load(m, offs, mask, False, UPCAST)
    vv = _load(v, offs, mask, False, UPCAST)
    nm = _load(b1, offs, mask, B1_S, UPCAST) * mm + _load(c1, offs, mask, C1_S, UPCAST) * g
    nv = _load(b2, offs, mask, B2_S, UPCAST) * vv + _load(c2, offs, mask, C2_S, UPCAST) * (g * g)
    d = _safe_sqrt(nv) / _load(s2, offs, mask, S2_S, UPCAST) + _load(eps, offs, mask, EPS_S, UPCAST)
    u = (nm / d) / _load(s1, offs, mask, S1_S, UPCAST)
    tl.store(out_theta + offs, t - _load(lr, offs, mask, LR_S, UPCAST) * u, mask=mask)
    tl.store(out_m + offs, nm, mask=mask)
    tl.store(out_v + offs, nv, mask=mask)


@triton.jit
def adam_backward(
    grad, m, v, lr, b1, c1, b2, c2, eps, s1, s2, g_theta, g_m, g_v,
    d_grad, d_m, d_v, d_lr, d_b1, d_c1, d_b2, d_c2, d_eps, d_s1, d_s2, n,
    LR_S: tl.constexpr, B1_S: tl.constexpr, C1_S: tl.constexpr, B2_S: tl.constexpr, C2_S: tl.constexpr,
    EPS_S: tl.constexpr, S1_S: tl.constexpr, S2_S: tl.constexpr, HYPER: tl.constexpr,
    UPCAST: tl.constexpr, BLOCK: tl.constexpr,
):
    offs, mask = _offsets(n, BLOCK)
    g = _load(grad, offs, mask, False, UPCAST)
    mm = _load(m, offs, mask, False, UPCAST)
    vv = _load(v, offs, mask, False, UPCAST)
    beta1 = _load(b1, offs, mask, B1_S, UPCAST)
    beta2 = _load(b2, offs, mask, B2_S, UPCAST)
    k1 = _load(c1, offs, mask, C1_S, UPCAST)
    k2 = _load(c2, offs, mask, C2_S, UPCAST)
    bc1 = _load(s1, offs, mask, S1_S, UPCAST)
    bc2 = _load(s2, offs, mask, S2_S, UPCAST)
    a = _load(lr, offs, mask, LR_S, UPCAST)
    got = _load(g_theta, offs, mask, False, UPCAST)
    nm = beta1 * mm + k1 * g
    nv = beta2 * vv + k2 * (g * g)
    s = _safe_sqrt(nv)
    d = s / bc2 + _load(eps, offs, mask, EPS_S, UPCAST)
    q = nm / d
    u = q / bc1
    du = -(a * got)
    dq = du / bc1
    dnm = dq / d + _load(g_m, offs, mask, False, UPCAST)
    dd = -(q / d) * dq
    positive = nv > 0
    ds = dd / bc2
    dnv = _load(g_v, offs, mask, False, UPCAST) + tl.where(positive, ds * 0.5 / tl.where(positive, s, 1.0), 0.0)
    tl.store(d_grad + offs, k1 * dnm + 2 * g * (k2 * dnv), mask=mask)
    tl.store(d_m + offs, beta1 * dnm, mask=mask)
    tl.store(d_v + offs, beta2 * dnv, mask=mask)
    if HYPER:
        tl.store(d_lr + offs, -(u * got), mask=mask)
        tl.store(d_b1 + offs, mm * dnm, mask=mask)
        tl.store(d_c1 + offs, g * dnm, mask=mask)
        tl.store(d_b2 + offs, vv * dnv, mask=mask)
        tl.store(d_c2 + offs, (g * g) * dnv, mask=mask)
        tl.store(d_eps + offs, dd, mask=mask)
        tl.store(d_s1 + offs, -(u / bc1) * du, mask=mask)
        tl.store(d_s2 + offs, -((s / bc2) / bc2) * dd, mask=mask)
