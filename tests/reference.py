r"""Hand-written references for the meta-learning tests: plain torch, no metalearn code.

Everything here is written out the long way on purpose — forward passes from
``torch.nn.functional``, inner SGD steps as ``θ - α g`` with ``g`` from
``torch.autograd.grad(create_graph=True)`` — so that the library's meta-gradients can be
compared with a computation that shares none of its code (Finn et al., 2017, Alg. 2):

.. math::

    \theta_{k+1} = \theta_k - \alpha \odot \nabla_\theta \mathcal{L}(D^{train}; \theta_k), \qquad
    \mathcal{L}_{meta} = \frac{1}{B}\sum_i \mathcal{L}(D^{val}_i; \theta_K^{(i)})

The forwards read parameters by the names `metalearn.models` gives them (``layers.0.weight``
for the MLP, ``features.0.weight`` / ``head.weight`` for the Conv-4), so a library model's
``named_parameters()`` plugs straight in.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Params = dict[str, Tensor]
Forward = Callable[[Mapping[str, Tensor], Tensor], Tensor]


# ---------------------------------------------------------------- losses and forwards


def task_loss(output: Tensor, target: Tensor) -> Tensor:
    """Cross-entropy for integer targets, mean squared error for floating targets."""
    if target.is_floating_point():
        return ((output - target) ** 2).mean()
    return F.cross_entropy(output, target)


def mlp_forward(n_layers: int, activation: Callable[[Tensor], Tensor] = torch.relu) -> Forward:
    """Forward of ``metalearn.models.MLP`` with ``n_layers`` linear layers (names ``layers.{2i}.*``)."""

    def forward(params: Mapping[str, Tensor], x: Tensor) -> Tensor:
        h = x
        for i in range(n_layers):
            h = h @ params[f"layers.{2 * i}.weight"].T + params[f"layers.{2 * i}.bias"]
            if i < n_layers - 1:
                h = activation(h)
        return h

    return forward


def batch_norm(x: Tensor, weight: Tensor, bias: Tensor, eps: float = 1e-5) -> Tensor:
    """torch's own batch norm in training mode: batch statistics, no running statistics."""
    return F.batch_norm(x, None, None, weight, bias, training=True, eps=eps)


def conv4_forward(eps: float = 1e-5) -> Forward:
    """Forward of ``metalearn.models.Conv4``: 4 x [conv3x3, batch norm, ReLU, max-pool 2], flatten, linear."""

    def forward(params: Mapping[str, Tensor], x: Tensor) -> Tensor:
        h = x
        for block in range(4):
            conv, norm = f"features.{4 * block}", f"features.{4 * block + 1}"
            h = F.conv2d(h, params[f"{conv}.weight"], params[f"{conv}.bias"], padding=1)
            h = batch_norm(h, params[f"{norm}.weight"], params[f"{norm}.bias"], eps)
            h = F.max_pool2d(torch.relu(h), 2)
        h = h.flatten(1)
        return h @ params["head.weight"].T + params["head.bias"]

    return forward


def module_forward(module: nn.Module) -> Forward:
    """Any module run with given parameters (torch.func.functional_call, plain torch)."""

    def forward(params: Mapping[str, Tensor], x: Tensor) -> Tensor:
        return torch.func.functional_call(module, dict(params), (x,))

    return forward


# ---------------------------------------------------------------- the inner and outer loops


def _step_size(lr: float | Mapping[str, Tensor], name: str) -> float | Tensor:
    return lr[name] if isinstance(lr, Mapping) else lr


def adapt(
    forward: Forward,
    theta0: Mapping[str, Tensor],
    x: Tensor,
    y: Tensor,
    steps: int,
    lr: float | Mapping[str, Tensor],
    adapted: Sequence[str] | None = None,
    first_order: bool = False,
) -> tuple[Params, list[Tensor]]:
    """Unrolled inner SGD on one task.

    Args:
        forward: ``forward(params, x)``.
        theta0: θ0 of the task by name.
        x: train inputs.
        y: train targets.
        steps: number of inner steps K.
        lr: one step size, or a tensor per adapted parameter (Meta-SGD).
        adapted: names that adapt (default: all); the others stay at θ0 (ANIL).
        first_order: use the inner gradient as a constant (FOMAML).

    Returns:
        θK and the train losses before each step.
    """
    names = list(theta0) if adapted is None else list(adapted)
    fast = dict(theta0)
    losses = []
    for _ in range(steps):
        if first_order:
            at = {n: fast[n].detach().requires_grad_(True) for n in names}
            loss = task_loss(forward({**fast, **at}, x), y)
            grads = torch.autograd.grad(loss, [at[n] for n in names])
        else:
            loss = task_loss(forward(fast, x), y)
            grads = torch.autograd.grad(loss, [fast[n] for n in names], create_graph=True)
        fast = {**fast, **{n: fast[n] - _step_size(lr, n) * g for n, g in zip(names, grads, strict=True)}}
        losses.append(loss.detach())
    return fast, losses


def meta_loss(
    forward: Forward,
    theta0: Mapping[str, Tensor],
    batch: tuple[Tensor, Tensor, Tensor, Tensor],
    steps: int,
    lr: float | Mapping[str, Tensor],
    adapted: Sequence[str] | None = None,
    first_order: bool = False,
) -> Tensor:
    """Mean over tasks of the val loss after adaptation; ``batch = (x_train, y_train, x_val, y_val)``."""
    x_tr, y_tr, x_val, y_val = batch
    total = x_tr.new_zeros(())
    for i in range(x_tr.shape[0]):
        theta_k, _ = adapt(forward, theta0, x_tr[i], y_tr[i], steps, lr, adapted, first_order)
        total = total + task_loss(forward(theta_k, x_val[i]), y_val[i])
    return total / x_tr.shape[0]


def meta_gradient(
    forward: Forward,
    theta0: Mapping[str, Tensor],
    batch: tuple[Tensor, Tensor, Tensor, Tensor],
    steps: int,
    lr: float | Mapping[str, Tensor],
    adapted: Sequence[str] | None = None,
    first_order: bool = False,
) -> tuple[Params, Params]:
    """∇ of `meta_loss` w.r.t. θ0 and (for Meta-SGD) the step sizes, by name.

    ``theta0`` and tensor step sizes are taken as given values: fresh leaves are made here.
    """
    leaves = {n: t.detach().clone().requires_grad_(True) for n, t in theta0.items()}
    lr_leaves = (
        {n: t.detach().clone().requires_grad_(True) for n, t in lr.items()} if isinstance(lr, Mapping) else {}
    )
    loss = meta_loss(forward, leaves, batch, steps, lr_leaves or lr, adapted, first_order)
    inputs = [*leaves.values(), *lr_leaves.values()]
    grads = torch.autograd.grad(loss, inputs, allow_unused=True)
    dense = [g if g is not None else torch.zeros_like(t) for g, t in zip(grads, inputs, strict=True)]
    return dict(zip(leaves, dense[: len(leaves)], strict=True)), dict(zip(lr_leaves, dense[len(leaves):], strict=True))


def _constant(value: float | Tensor) -> float | Tensor:
    return value.detach() if isinstance(value, Tensor) else value


def first_order_definition(
    forward: Forward,
    theta0: Mapping[str, Tensor],
    batch: tuple[Tensor, Tensor, Tensor, Tensor],
    steps: int,
    lr: float | Mapping[str, Tensor],
) -> tuple[Params, Params]:
    r"""First-order meta-gradient from its definition, every parameter adapted.

    With constant inner gradients :math:`g_k`, :math:`\theta_K = \theta_0 - \sum_k \alpha \odot g_k`, so

    .. math::

        \frac{\partial \mathcal{L}_{meta}}{\partial \theta_0} = \frac{1}{B}\sum_i \nabla_\theta
        \mathcal{L}(D^{val}_i; \theta_K^{(i)}), \qquad
        \frac{\partial \mathcal{L}_{meta}}{\partial \alpha} = -\frac{1}{B}\sum_i \Big(\sum_k g_k^{(i)}\Big)
        \odot \nabla_\theta \mathcal{L}(D^{val}_i; \theta_K^{(i)}).

    Every gradient here is of a detached θ: no graph runs through the inner loop.
    """
    x_tr, y_tr, x_val, y_val = batch
    n_tasks = x_tr.shape[0]
    names = list(theta0)
    d_theta = {n: torch.zeros_like(theta0[n]) for n in names}
    d_lr = {n: torch.zeros_like(theta0[n]) for n in names} if isinstance(lr, Mapping) else {}
    for i in range(n_tasks):
        theta = {n: t.detach() for n, t in theta0.items()}
        summed = {n: torch.zeros_like(t) for n, t in theta.items()}
        for _ in range(steps):
            at = {n: t.clone().requires_grad_(True) for n, t in theta.items()}
            grads = torch.autograd.grad(task_loss(forward(at, x_tr[i]), y_tr[i]), list(at.values()))
            theta = {n: theta[n] - _constant(_step_size(lr, n)) * g for n, g in zip(names, grads, strict=True)}
            summed = {n: summed[n] + g for n, g in zip(names, grads, strict=True)}
        at = {n: t.clone().requires_grad_(True) for n, t in theta.items()}
        val_grads = torch.autograd.grad(task_loss(forward(at, x_val[i]), y_val[i]), list(at.values()))
        for n, g in zip(names, val_grads, strict=True):
            d_theta[n] += g / n_tasks
            if d_lr:
                d_lr[n] -= summed[n] * g / n_tasks
    return d_theta, d_lr


def first_nonfinite_step(
    forward: Forward, theta0: Mapping[str, Tensor], x: Tensor, y: Tensor, steps: int, lr: float
) -> int | None:
    """The first inner step whose train loss (before the step) is NaN or Inf, with plain SGD; None if none."""
    theta = {n: t.detach() for n, t in theta0.items()}
    for k in range(steps):
        at = {n: t.clone().requires_grad_(True) for n, t in theta.items()}
        loss = task_loss(forward(at, x), y)
        if not torch.isfinite(loss):
            return k
        grads = torch.autograd.grad(loss, list(at.values()))
        theta = {n: theta[n] - lr * g for n, g in zip(theta, grads, strict=True)}
    return None


# ---------------------------------------------------------------- tiny data


def regression_batch(
    n_tasks: int, n_train: int, n_val: int, in_features: int, seed: int, dtype: torch.dtype = torch.float64
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Random regression tasks: each a random linear map plus a sine, ``y`` of shape ``[n, 1]``."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n_tasks, in_features, 1, generator=g, dtype=dtype)
    x_tr = torch.randn(n_tasks, n_train, in_features, generator=g, dtype=dtype)
    x_val = torch.randn(n_tasks, n_val, in_features, generator=g, dtype=dtype)
    return x_tr, torch.sin(x_tr @ w), x_val, torch.sin(x_val @ w)


def image_batch(
    n_tasks: int, ways: int, shots: int, queries: int, channels: int, size: int, seed: int,
    dtype: torch.dtype = torch.float64,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Random N-way classification tasks of ``channels x size x size`` images, labels ``0..ways-1``."""
    g = torch.Generator().manual_seed(seed)
    y_tr = torch.arange(ways).repeat(shots).expand(n_tasks, -1).contiguous()
    y_val = torch.arange(ways).repeat(queries).expand(n_tasks, -1).contiguous()
    x_tr = torch.randn(n_tasks, ways * shots, channels, size, size, generator=g, dtype=dtype)
    x_val = torch.randn(n_tasks, ways * queries, channels, size, size, generator=g, dtype=dtype)
    return x_tr, y_tr, x_val, y_val


def sine_task_batch(n_tasks: int = 3, n: int = 6, seed: int = 1):
    """A float64 `TaskBatch` of noisy ``sin(2x)`` regression tasks, ``n`` points per half."""
    from metalearn.tasks.task import TaskBatch

    g = torch.Generator().manual_seed(seed)

    def half():
        x = torch.randn(n_tasks, n, 1, generator=g, dtype=torch.float64)
        return x, torch.sin(2 * x) + 0.1 * torch.randn(n_tasks, n, 1, generator=g, dtype=torch.float64)

    return TaskBatch(train=half(), val=half())


def image_task_batch(n_tasks: int = 2, ways: int = 3, shots: int = 2, size: int = 16, seed: int = 1):
    """A float64 `TaskBatch` of random 1-channel ``ways``-way tasks, ``shots`` images per class and half."""
    from metalearn.tasks.task import TaskBatch

    g = torch.Generator().manual_seed(seed)

    def half():
        x = torch.randn(n_tasks, ways * shots, 1, size, size, generator=g, dtype=torch.float64)
        return x, torch.arange(ways).repeat_interleave(shots).expand(n_tasks, -1).clone()

    return TaskBatch(train=half(), val=half())


def rule_trajectory(part, params, loss, steps=4):
    """θ after each of ``steps`` applications of an inner-optimizer part to the gradient of ``loss``."""
    part.bind(params)
    state, out = part.init_state(params), []
    for k in range(steps):
        params, state = part.step(params, torch.func.grad(loss)(params), state, k)
        out.append(params)
    return out


def max_param_diff(a, b):
    """The largest entry-wise difference between two trajectories of parameter dicts."""
    return max((x[n] - y[n]).abs().max().item() for x, y in zip(a, b, strict=True) for n in x)
