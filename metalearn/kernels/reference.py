r"""Every fused op of `metalearn.kernels` as plain torch: the definition of correct.

The Triton kernels (`metalearn.kernels.triton_update`, `metalearn.kernels.triton_norm`) compute
exactly these functions, and the tests hold them to these (forward, backward, double backward,
under ``torch.func.vmap``). They are also what the kernels' own backward-of-the-backward is
differentiated from, so second- and higher-order meta-gradients through a kernel are those of
these formulas.

**Fused inner updates.** Each works on *flat* tensors: every adapted tensor of θ concatenated into
one vector of N entries, its gradient and optimizer state likewise, and each hyper-parameter either
one value for all entries (a 0-d tensor) or one per entry (``[N]``; a per-tensor value repeated over
its tensor's entries). The formulas, and their order of operations, are those of the rules in
`metalearn.knowledge.rules` they fuse, with derived hyper-parameters (``1 − β``, bias corrections)
passed in as computed by the rule:

* ``sgd``: :math:`\theta' = \theta - \alpha g` (`InnerSGD`, `MetaSGD`, any learned step size);
* ``momentum``: :math:`b' = \mu b + g,\ u = b'` (Nesterov: :math:`g + \mu b'`),
  :math:`\theta' = \theta - \alpha u` (`MomentumSGD`);
* ``adam``: :math:`m' = \beta_1 m + c_1 g,\ v' = \beta_2 v + c_2 g^2,\
  \theta' = \theta - \alpha \frac{m' / (\sqrt{v'} / s_2 + \epsilon)}{s_1}` with
  :math:`c_i = 1 - \beta_i`, :math:`s_1 = 1 - \beta_1^t`, :math:`s_2 = \sqrt{1 - \beta_2^t}` (`InnerAdam`).

Each ``*_vjp`` is the vector-Jacobian product of its update *per entry*: the gradient of every
input but θ (θ's is the incoming gradient itself), with no sum over entries even for a 0-d
hyper-parameter (the caller sums), so that it is an elementwise map like the update.

**Batch norm with batch statistics** (`batch_norm_train`): training-mode batch norm of one task's
``[N, C, ...]`` input, statistics over every dim but the channel dim (biased variance), the
MAML-style norm whose affine parameters adapt; `batch_norm_train_vjp` is its backward.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "UPDATES",
    "adam",
    "adam_vjp",
    "batch_norm_train",
    "batch_norm_train_vjp",
    "momentum",
    "momentum_vjp",
    "safe_sqrt",
    "sgd",
    "sgd_vjp",
    "update",
    "update_vjp",
]

#: the fused updates: name → (number of full-length tensor inputs (θ, g, state...), number of
#: hyper-parameters, number of outputs (θ', new state...))
UPDATES: dict[str, tuple[int, int, int]] = {"sgd": (2, 1, 1), "momentum": (3, 2, 2), "adam": (4, 8, 3)}


def safe_sqrt(v: Tensor) -> Tensor:
    """``sqrt(v)`` for v >= 0 whose derivative at 0 is 0 (`metalearn.knowledge.rules`' Adam square root)."""
    positive = v > 0
    return torch.where(positive, torch.where(positive, v, torch.ones_like(v)).sqrt(), torch.zeros_like(v))


def sgd(theta: Tensor, grad: Tensor, lr: Tensor) -> tuple[Tensor]:
    r""":math:`\theta - \alpha g`."""
    return (theta - lr * grad,)


def sgd_vjp(theta: Tensor, grad: Tensor, lr: Tensor, g_theta: Tensor) -> tuple[Tensor, Tensor]:
    """Per-entry gradients of `sgd` w.r.t. (grad, lr) for the output gradient ``g_theta``."""
    return -(lr * g_theta), -(grad * g_theta)


def momentum(
    theta: Tensor, grad: Tensor, buf: Tensor, lr: Tensor, mu: Tensor, *, nesterov: bool = False
) -> tuple[Tensor, Tensor]:
    r"""Heavy-ball momentum, ``torch.optim.SGD``'s convention: (θ', b')."""
    new_buf = mu * buf + grad
    u = grad + mu * new_buf if nesterov else new_buf
    return theta - lr * u, new_buf


def momentum_vjp(
    theta: Tensor, grad: Tensor, buf: Tensor, lr: Tensor, mu: Tensor, g_theta: Tensor, g_buf: Tensor,
    *, nesterov: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-entry gradients of `momentum` w.r.t. (grad, buf, lr, mu)."""
    new_buf = mu * buf + grad
    u = grad + mu * new_buf if nesterov else new_buf
    du = -(lr * g_theta)
    d_lr = -(u * g_theta)
    if nesterov:
        d_new_buf = mu * du + g_buf
        d_grad = du + d_new_buf
        d_mu = new_buf * du + buf * d_new_buf
    else:
        d_new_buf = du + g_buf
        d_grad = d_new_buf
        d_mu = buf * d_new_buf
    return d_grad, mu * d_new_buf, d_lr, d_mu


def adam(
    theta: Tensor, grad: Tensor, m: Tensor, v: Tensor,
    lr: Tensor, b1: Tensor, c1: Tensor, b2: Tensor, c2: Tensor, eps: Tensor, s1: Tensor, s2: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    """Adam's step with bias corrections given (``s1 = 1 − β1^t``, ``s2 = sqrt(1 − β2^t)``): (θ', m', v')."""
    new_m = b1 * m + c1 * grad
    new_v = b2 * v + c2 * (grad * grad)
    u = (new_m / (safe_sqrt(new_v) / s2 + eps)) / s1
    return theta - lr * u, new_m, new_v


def adam_vjp(
    theta: Tensor, grad: Tensor, m: Tensor, v: Tensor,
    lr: Tensor, b1: Tensor, c1: Tensor, b2: Tensor, c2: Tensor, eps: Tensor, s1: Tensor, s2: Tensor,
    g_theta: Tensor, g_m: Tensor, g_v: Tensor,
) -> tuple[Tensor, ...]:
    """Per-entry gradients of `adam` w.r.t. (grad, m, v, lr, b1, c1, b2, c2, eps, s1, s2)."""
    new_m = b1 * m + c1 * grad
    new_v = b2 * v + c2 * (grad * grad)
    s = safe_sqrt(new_v)
    d = s / s2 + eps
    q = new_m / d
    u = q / s1
    du = -(lr * g_theta)
    d_lr = -(u * g_theta)
    dq = du / s1
    d_s1 = -(u / s1) * du
    d_new_m = dq / d + g_m
    dd = -(q / d) * dq
    positive = new_v > 0
    ds = dd / s2
    d_s2 = -((s / s2) / s2) * dd
    d_new_v = g_v + torch.where(positive, ds * 0.5 / torch.where(positive, s, torch.ones_like(s)), torch.zeros_like(s))
    d_grad = c1 * d_new_m + 2 * grad * (c2 * d_new_v)
    return (
        d_grad, b1 * d_new_m, b2 * d_new_v,
        d_lr, m * d_new_m, grad * d_new_m, v * d_new_v, (grad * grad) * d_new_v, dd, d_s1, d_s2,
    )


def update(kind: str, inputs: tuple[Tensor, ...], nesterov: bool = False) -> tuple[Tensor, ...]:
    """The fused update ``kind`` (a key of `UPDATES`) of flat ``inputs`` (tensors, then hyper-parameters)."""
    if kind == "sgd":
        return sgd(*inputs)
    if kind == "momentum":
        return momentum(*inputs, nesterov=nesterov)
    if kind == "adam":
        return adam(*inputs)
    raise ValueError(f"unknown fused update {kind!r}; one of {sorted(UPDATES)}")


def update_vjp(
    kind: str, inputs: tuple[Tensor, ...], grad_outputs: tuple[Tensor, ...], nesterov: bool = False
) -> tuple[Tensor, ...]:
    """`update`'s per-entry vector-Jacobian product: gradients of every input but θ (see the module docstring)."""
    if kind == "sgd":
        return sgd_vjp(*inputs, *grad_outputs)
    if kind == "momentum":
        return momentum_vjp(*inputs, *grad_outputs, nesterov=nesterov)
    if kind == "adam":
        return adam_vjp(*inputs, *grad_outputs)
    raise ValueError(f"unknown fused update {kind!r}; one of {sorted(UPDATES)}")


# ---------------------------------------------------------------- batch norm with batch statistics


def _stat_dims(x: Tensor) -> list[int]:
    return [0, *range(2, x.ndim)]


def _channel(t: Tensor, ndim: int) -> Tensor:
    return t.reshape([1, -1] + [1] * (ndim - 2))


def batch_norm_train(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float) -> Tensor:
    r"""Training-mode batch norm of one task: :math:`y = \frac{x - \mu_c}{\sqrt{\sigma^2_c + \epsilon}}\, w_c + b_c`.

    μ_c and σ²_c (biased) over every dim of ``x`` (``[N, C, ...]``) but the channel dim 1;
    fp16/bf16 are normalised in float32 and returned in their own dtype. This is the primitive
    formula of `metalearn.exact_norms.batch_norm` (exact under vmap to every order).
    """
    xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    dims = _stat_dims(xf)
    mean = xf.mean(dim=dims, keepdim=True)
    centered = xf - mean
    var = centered.square().mean(dim=dims, keepdim=True)
    y = centered * torch.rsqrt(var + eps)
    if weight is not None:
        y = y * _channel(weight, x.ndim)
    if bias is not None:
        y = y + _channel(bias, x.ndim)
    return y.to(x.dtype)


def batch_norm_train_vjp(
    x: Tensor, weight: Tensor, g_y: Tensor, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    r"""The backward of `batch_norm_train` (weight given, ones for none): (dx, dweight, dbias).

    With :math:`\hat x = (x - \mu) r`, :math:`r = (\sigma^2 + \epsilon)^{-1/2}` and M entries per channel:
    :math:`dx = w r \big(g - \overline{g} - \hat x\, \overline{g \hat x}\big)`, :math:`dw = \sum g \hat x`,
    :math:`db = \sum g` (means and sums per channel).
    """
    low = x.dtype in (torch.float16, torch.bfloat16)
    xf, gf = (x.float(), g_y.float()) if low else (x, g_y)
    wf = weight.to(xf.dtype)
    dims = _stat_dims(xf)
    mean = xf.mean(dim=dims, keepdim=True)
    centered = xf - mean
    rstd = torch.rsqrt(centered.square().mean(dim=dims, keepdim=True) + eps)
    xhat = centered * rstd
    d_bias = gf.sum(dim=dims)
    d_weight = (gf * xhat).sum(dim=dims)
    g_mean = gf.mean(dim=dims, keepdim=True)
    gx_mean = (gf * xhat).mean(dim=dims, keepdim=True)
    dx = (_channel(wf, x.ndim) * rstd) * (gf - g_mean - xhat * gx_mean)
    return dx.to(x.dtype), d_weight.to(weight.dtype), d_bias.to(weight.dtype)
