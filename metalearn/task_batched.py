r"""The vmap batching without ``torch.func.vmap``: a model's own forward over a stack of tasks.

``batching="vmap"`` runs every task of a batch in one computation. For a small model that is
bound by per-operation overhead (the sinusoid MLP: 25 tasks of 10 points), ``torch.func.vmap``
spends much of a meta-step wrapping and unwrapping every operation, forward and backward. Where
the model can run a whole stack of tasks itself (``forward_batched``: θ with a leading task
dimension, inputs ``[tasks, N, ...]``, e.g. `metalearn.models.MLP` with ``torch.baddbmm``), the
unrolled inner loop runs on plain tensors instead:

.. math::

    \theta^{(t)}_0 = \theta_0 \ \text{(an expand over tasks)}, \qquad
    g^{(t)}_k = \nabla_{\theta^{(t)}_k} \sum_s L^{train}_s\big(\theta^{(s)}_k\big)
             = \nabla L^{train}_t\big(\theta^{(t)}_k\big),

one ``torch.autograd.grad`` of the sum of the per-task losses gives every task its own gradient,
because task s's loss does not depend on task t's parameters. ω's update rule is applied to the
stacks at once, which is the same only for a rule that updates each entry from that entry alone
(`elementwise`), and the mean val loss is backpropagated once, as under vmap. The meta-gradient
equals the torch.func vmap path's up to rounding (tested in float64, with the loop's too). A model
whose stack is too big to run fast at once (`metalearn.models.Conv4`, grouped convolutions) may ask
for its val pass task by task and its inner steps on stacks of a few tasks (`task_batched_backward`).

`runs_task_batched` says when this runs (every condition is needed for the same function;
otherwise torch.func's vmap runs, as before): the `metalearn.modes.Unrolled` mode on CPU tensors,
a plain `MetaKnowledge` with `PointInit` and the default inner loss, an `elementwise` rule, every
adapted parameter requiring grad (first order: none static), a model whose class defines
``forward_batched`` and ``task_batched_ready()`` in its own body and is ready, inputs with a task
and an example dimension, grad mode on, and no ``torch.func`` transform or ``torch.compile``
trace around it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metalearn.inner import plain_autograd_applies
from metalearn.kernels import check_kernels
from metalearn.knowledge.builtins import PointInit
from metalearn.knowledge.meta_knowledge import MetaKnowledge, check_target_shape
from metalearn.knowledge.parts import Params
from metalearn.knowledge.rules import fused_step
from metalearn.mapping import check_losses
from metalearn.precision import scale_for_backward
from metalearn.tasks.task import TaskBatch

__all__ = ["batched_task_objective", "elementwise", "runs_task_batched", "task_batched_backward"]

_CONTAINERS = (nn.ModuleList, nn.ModuleDict, nn.ParameterDict, nn.ParameterList)


def elementwise(part: nn.Module) -> bool:
    """Whether every module of the update rule ``part`` is of a class that declares ``elementwise = True``
    in its own body (or is a torch container): its update of each entry reads only that entry of θ, of
    the gradient and of the state, and hyper-parameters that broadcast against θ, so it is the same on
    a ``[tasks, ...]`` stack of θ as on each task's θ. A subclass that does not re-declare it is not
    trusted (its update may differ). The library's SGD, Meta-SGD, per-step (LSLR), momentum and Adam
    rules and their chains declare it; a rule that reduces over a tensor (a norm, a mean) must not.
    """
    return all(type(m).__dict__.get("elementwise", False) is True or type(m) in _CONTAINERS for m in part.modules())


def runs_task_batched(
    omega: MetaKnowledge, theta0: Params, x_train: Tensor, first_order: bool, kernels: str = "auto"
) -> bool:
    """Whether the unrolled mode's vmap batching runs as `batched_task_objective` (the module docstring
    lists the conditions), with ``theta0`` = ``omega.model_params()``. Cheap: it runs at every step."""
    model = omega.model
    cls = type(model)
    if type(omega) is not MetaKnowledge or type(omega.init) is not PointInit or omega.init.uses_train_data:
        return False
    if omega.loss is not None or kernels == "triton" or x_train.device.type != "cpu" or x_train.ndim < 3:
        return False
    if "forward_batched" not in cls.__dict__ or "task_batched_ready" not in cls.__dict__:
        return False
    if not omega.adapted_names or (first_order and omega.static_names):
        return False
    if not plain_autograd_applies(omega, theta0):  # inside vmap/grad their own batching applies
        return False
    return elementwise(omega.optimizer) and bool(cls.__dict__["task_batched_ready"](model))


def _per_task_loss(output: Tensor, target: Tensor) -> Tensor:
    """`metalearn.knowledge.meta_knowledge.default_loss` of each task of a ``[tasks, ...]`` stack: ``[tasks]``."""
    check_target_shape(output[0], target[0])  # shapes of one task, as the per-task call checks them
    if target.is_floating_point():
        return (output - target).square().flatten(1).mean(1)
    tasks, classes = output.shape[0], output.shape[-1]
    per_example = F.cross_entropy(output.reshape(-1, classes), target.reshape(-1), reduction="none")
    return per_example.view(tasks, -1).mean(1)


def _per_task_accuracy(output: Tensor, target: Tensor) -> Tensor:
    """`metalearn.mapping.metric` of each task for class targets: the accuracy, ``[tasks]`` (a regression
    task's metric is its val loss, read off it as `metalearn.mapping.task_objective` does)."""
    return (output.detach().argmax(-1) == target).to(output.dtype).flatten(1).mean(1)


def batched_task_objective(
    omega: MetaKnowledge,
    theta0: Params,
    x_train: Tensor,
    y_train: Tensor,
    x_val: Tensor,
    y_val: Tensor,
    inner_steps: int,
    first_order: bool,
    kernels: str = "auto",
) -> tuple[Tensor, Tensor, Tensor]:
    """Every task of the stack adapted from ω's θ0 and scored: ``(val losses [tasks], val metrics
    [tasks], inner losses [tasks, inner_steps])``, what ``vmap(task_objective)`` returns; ``theta0`` is
    ``omega.model_params()`` (`PointInit`'s θ0, shared by every task).

    Only where `runs_task_batched` says so. The inner gradients are taken with
    ``torch.autograd.grad`` of the summed per-task losses (``create_graph=True``; first order:
    of detached θ_k, so the gradients are constants and θ_K still depends on θ0 and the rule's
    meta-parameters through the updates).
    """
    theta, inner = _adapted_stack(omega, theta0, x_train, y_train, inner_steps, first_order, kernels)
    output = _forward(omega, theta, x_val)
    val_losses = _per_task_loss(output, y_val)
    return scale_for_backward(val_losses), _per_task_metric(output, y_val, val_losses), inner


def task_batched_backward(
    omega: MetaKnowledge, theta0: Params, batch: TaskBatch, inner_steps: int, first_order: bool, kernels: str = "auto"
) -> tuple[Tensor, Tensor, Tensor]:
    r"""Backpropagates the mean val loss of ``batch`` into ω's ``.grad`` through the task-batched inner
    loop (where `runs_task_batched` says so); returns ``(val losses, val metrics, inner losses)``,
    checked finite (`metalearn.mapping.check_losses`) before they are backpropagated.

    The val pass runs on the whole stack, and one backward follows. A model whose class sets
    ``batched_val_pass = False`` (`metalearn.models.Conv4`: a stack of every task's val images is
    bound by memory bandwidth on the CPU) gets its val pass task by task instead: task t's val loss
    / T is differentiated with respect to a detached copy of its adapted θ_K (that graph freed at
    once), and the stacked gradients
    :math:`G_t = \partial (L^{val}_t / T) / \partial \theta^{(t)}_K` are carried through the batched
    inner loop by one backward,
    :math:`\nabla_\omega \mathrel{+}= \sum_t G_t \, \partial \theta^{(t)}_K / \partial \omega`
    (the chain rule: the same meta-gradient). Its class may also set ``task_stack_size``: the inner
    loop then runs on stacks of that many tasks, each stack's losses checked and its share
    backpropagated before the next stack runs (as the loop path does task by task), so one stack's
    inner graph and one task's val graph are alive at a time.
    """
    (x_tr, y_tr), (x_val, y_val) = batch.train, batch.val
    if getattr(type(omega.model), "batched_val_pass", True):
        val_losses, metrics, inner = batched_task_objective(
            omega, theta0, x_tr, y_tr, x_val, y_val, inner_steps, first_order, kernels
        )
        check_losses(inner.detach(), val_losses.detach(), by_task=False)
        val_losses.mean().backward()
        return val_losses, metrics, inner
    n = x_tr.shape[0]
    size = max(1, int(getattr(type(omega.model), "task_stack_size", None) or n))
    parts = [
        _stack_backward(omega, theta0, x_tr[part], y_tr[part], x_val[part], y_val[part], inner_steps, first_order,
                        kernels, n, part.start)
        for part in (slice(start, min(n, start + size)) for start in range(0, n, size))
    ]  # fmt: skip
    return tuple(torch.cat(column) for column in zip(*parts, strict=True))  # type: ignore[return-value]


def _stack_backward(
    omega: MetaKnowledge,
    theta0: Params,
    x_tr: Tensor,
    y_tr: Tensor,
    x_val: Tensor,
    y_val: Tensor,
    inner_steps: int,
    first_order: bool,
    kernels: str,
    n: int,
    offset: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """`task_batched_backward`'s val pass task by task, for the stack of tasks ``offset ...`` of a batch
    of ``n``: its share of the mean val loss backpropagated, once its losses are checked finite."""
    theta, inner = _adapted_stack(omega, theta0, x_tr, y_tr, inner_steps, first_order, kernels)
    losses, metrics, grads = [], [], []
    for t in range(x_tr.shape[0]):
        at = {k: v[t : t + 1].detach().requires_grad_() for k, v in theta.items()}
        output = _forward(omega, at, x_val[t : t + 1])
        loss = _per_task_loss(output, y_val[t : t + 1])
        grads.append(torch.autograd.grad(scale_for_backward(loss).sum() / n, list(at.values()), materialize_grads=True))
        losses.append(loss.detach())
        metrics.append(_per_task_metric(output, y_val[t : t + 1], loss))
    val_losses = torch.cat(losses)
    check_losses(inner.detach(), val_losses, by_task=False, task_offset=offset)  # before this stack's backward
    stacked = [torch.cat(column) for column in zip(*grads, strict=True)]
    pairs = [(v, g) for v, g in zip(theta.values(), stacked, strict=True) if v.requires_grad]  # not a frozen θ0
    if pairs:
        torch.autograd.backward([v for v, _ in pairs], [g for _, g in pairs])
    return val_losses, torch.cat(metrics), inner.detach()


def _forward(omega: MetaKnowledge, params: dict[str, Tensor], x: Tensor) -> Tensor:
    return type(omega.model).__dict__["forward_batched"](omega.model, params, x)  # the class's own


def _per_task_metric(output: Tensor, target: Tensor, losses: Tensor) -> Tensor:
    return losses.detach() if target.is_floating_point() else _per_task_accuracy(output, target)


def _adapted_stack(
    omega: MetaKnowledge,
    theta0: Params,
    x_train: Tensor,
    y_train: Tensor,
    inner_steps: int,
    first_order: bool,
    kernels: str,
) -> tuple[dict[str, Tensor], Tensor]:
    """θ_K of every task as ``[tasks, ...]`` stacks (the static θ0 expanded, the adapted θ after ω's
    rule), and the inner losses ``[tasks, inner_steps]``."""
    check_kernels(kernels, x_train.device)
    n = x_train.shape[0]
    theta = {k: p.expand(n, *p.shape) for k, p in theta0.items()}
    static = {k: theta[k] for k in omega.static_names}
    fast = {k: theta[k] for k in omega.adapted_names}
    state = omega.optimizer.init_state(fast)
    losses = []
    for k in range(inner_steps):
        at = {name: t.detach().requires_grad_() for name, t in fast.items()} if first_order else fast
        per_task = _per_task_loss(_forward(omega, {**static, **at}, x_train), y_train)
        grad_list = torch.autograd.grad(
            per_task.sum(), list(at.values()), create_graph=not first_order, materialize_grads=True
        )
        fast, state = fused_step(omega.optimizer, fast, dict(zip(at, grad_list, strict=True)), state, k, kernels)
        losses.append(per_task)
    inner = torch.stack(losses, dim=1) if losses else x_train.new_zeros(n, 0)
    return {**static, **fast}, inner
