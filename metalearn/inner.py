r"""The inner loop: θ0 ~ ω, then K update steps on a task's train half.

One function, `adapt_params`, is the inner loop for meta-training and meta-testing alike;
`adapt` applies it to one task, and `metalearn.outer` runs it over a batch of tasks either
as a Python loop or under ``torch.func.vmap``.

.. math::

    \theta_{k+1} = \mathrm{step}_\omega\big(\theta_k,\ \nabla_\theta \mathcal{L}(D^{train}; \theta_k),\ s_k\big)

Second order (default) differentiates through every step, so the meta-gradient sees how
θK depends on ω (Finn et al., 2017). First order treats each inner gradient as a constant
(FOMAML): θ_k is detached before its gradient is taken, so no graph of the inner gradient
is built at all.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.func import grad_and_value

from metalearn.checks import check_labels, check_steps, explain_label_error
from metalearn.errors import NonFiniteError
from metalearn.knowledge.meta_knowledge import MetaKnowledge
from metalearn.knowledge.parts import Params, State

__all__ = ["Adapted", "adapt", "adapt_params", "check_finite_losses", "check_finite_task_losses"]


@dataclass(frozen=True)
class Adapted:
    """Result of the inner loop.

    Attributes:
        params: θK, every parameter of the model (adapted and static).
        losses: the inner (train) loss before each step, shape ``[steps]`` (or ``[tasks, steps]``).
    """

    params: Params
    losses: Tensor


def adapt_params(
    omega: MetaKnowledge,
    theta0: Mapping[str, Tensor],
    x: Tensor,
    y: Tensor,
    steps: int,
    first_order: bool = False,
) -> tuple[Params, Tensor]:
    """The inner loop for one task, as a pure function (safe under ``torch.func.vmap``).

    Args:
        omega: the meta-knowledge (its optimizer, adapted names and inner loss are used).
        theta0: θ0 of this task (no task dimension).
        x: train inputs of the task.
        y: train targets of the task.
        steps: number of inner steps K (0 returns θ0).
        first_order: stop gradients through the inner gradients (FOMAML).

    Returns:
        θK as a dict of every parameter, and the inner losses before each step ``[steps]``.

    Raises:
        TypeError, ValueError: ``steps`` is not an int of at least 0.
    """
    check_steps("steps (inner steps)", steps)
    return _adapt_params(omega, theta0, x, y, steps, first_order, _use_plain_autograd(omega, theta0, first_order))


def _use_plain_autograd(omega: MetaKnowledge, theta0: Mapping[str, Tensor], first_order: bool) -> bool:
    """Whether the inner gradients can come from ``torch.autograd.grad`` instead of ``torch.func``.

    Only second order, outside every ``torch.func`` transform and ``torch.compile`` tracing
    (where double backward through ``autograd.grad`` is unsupported), with grad mode on and every
    adapted tensor of θ0 requiring grad: then ``autograd.grad(..., create_graph=True)`` gives
    the same gradients with the same graph as ``grad_and_value``, and skips functorch's
    per-op wrapping (the loop path's per-task overhead). First order keeps ``torch.func``:
    its inner gradients of detached θ_k still depend on static meta-parameters (ANIL's body,
    a learned loss), which plain autograd would only keep at the cost of a graph to θ_k too.
    """
    if first_order or not torch.is_grad_enabled() or torch.compiler.is_compiling():
        return False
    peek = getattr(torch._C._functorch, "peek_interpreter_stack", None)
    if peek is None or peek() is not None:
        return False
    return all(theta0[n].requires_grad for n in omega.adapted_names)


def _adapt_params(
    omega: MetaKnowledge,
    theta0: Mapping[str, Tensor],
    x: Tensor,
    y: Tensor,
    steps: int,
    first_order: bool,
    plain_autograd: bool,
) -> tuple[Params, Tensor]:
    static = {n: theta0[n] for n in omega.static_names}
    fast = {n: theta0[n] for n in omega.adapted_names}
    state = omega.optimizer.init_state(fast)
    losses = []
    for k in range(steps):
        fast, state, loss = inner_step(omega, static, fast, state, x, y, k, first_order, plain_autograd)
        losses.append(loss)
    losses_t = torch.stack(losses) if losses else x.new_zeros(0)
    return {**static, **fast}, losses_t


def inner_step(
    omega: MetaKnowledge,
    static: Params,
    fast: Params,
    state: State,
    x: Tensor,
    y: Tensor,
    k: int,
    first_order: bool = False,
    plain_autograd: bool = False,
) -> tuple[Params, State, Tensor]:
    """One inner step k: the inner loss at θ_k (``fast`` adapted, ``static`` fixed), its gradient, ω's update.

    ``plain_autograd`` takes the gradient with ``torch.autograd.grad(create_graph=True)`` (second
    order, outside torch.func transforms); otherwise ``torch.func.grad_and_value`` (first order
    detaches θ_k first). Returns θ_{k+1}, the new optimizer state and the loss at θ_k.
    """

    def inner_loss(fast_params: Params) -> Tensor:
        return omega.inner_loss({**static, **fast_params}, x, y)

    if plain_autograd:
        loss = inner_loss(fast)
        if loss.requires_grad:
            grad_list = torch.autograd.grad(loss, list(fast.values()), create_graph=True, materialize_grads=True)
            grads = dict(zip(fast, grad_list, strict=True))
        else:  # the loss does not depend on the adapted parameters
            grads = {n: torch.zeros_like(t) for n, t in fast.items()}
    else:
        at = {n: t.detach() for n, t in fast.items()} if first_order else fast
        grads, loss = grad_and_value(inner_loss)(at)
    fast, state = omega.optimizer.step(fast, grads, state, k)
    return fast, state, loss


def check_finite_losses(losses: Tensor, what: str = "inner loss", task_offset: int = 0) -> None:
    """Raises `NonFiniteError` naming the first task and step whose loss is NaN or Inf.

    Args:
        losses: ``[steps]`` or ``[tasks, steps]``.
        what: what the values are, for the message.
        task_offset: index of the first task of ``losses`` in the meta-batch.
    """
    finite = torch.isfinite(losses.detach())
    if bool(finite.all()):
        return
    bad = (~finite).nonzero()[0].tolist()
    task, step = (bad[0], bad[1]) if losses.ndim == 2 else (0, bad[0])
    raise NonFiniteError(
        f"non-finite {what} at inner step {step} of task {task + task_offset} "
        f"(value {losses.detach().reshape(-1)[(~finite).reshape(-1).nonzero()[0]].item()}); "
        "lower the inner step size, check the task's data for NaN/Inf, or clip gradients",
        task=task + task_offset,
        step=step,
    )


def check_finite_task_losses(losses: Tensor, what: str = "val loss", task_offset: int = 0) -> None:
    """Raises `NonFiniteError` naming the first task whose loss (one per task, ``[tasks]``) is NaN or Inf.

    For losses that belong to no inner step, e.g. the val loss after adaptation (``step`` is None).
    """
    finite = torch.isfinite(losses.detach())
    if bool(finite.all()):
        return
    task = int((~finite).nonzero()[0, 0])
    raise NonFiniteError(
        f"non-finite {what} of task {task + task_offset} (value {losses.detach()[task].item()}); "
        "check the task's val data for NaN/Inf, or lower the inner step size",
        task=task + task_offset,
        step=None,
    )


def adapt(
    omega: MetaKnowledge,
    train: tuple[Tensor, Tensor],
    steps: int,
    *,
    first_order: bool = False,
    generator: torch.Generator | None = None,
) -> Adapted:
    """Adapts θ to one task's train half: θ0 from ω, then ``steps`` updates.

    The result stays differentiable w.r.t. ω (unless ``first_order``), so a loss of
    ``Adapted.params`` on the task's val half can be backpropagated into ω.

    Args:
        omega: the meta-knowledge.
        train: the task's ``(x, y)`` train half (no task dimension).
        steps: number of inner steps.
        first_order: first-order approximation (FOMAML).
        generator: randomness for a stochastic init.

    Raises:
        NonFiniteError: the inner loss became NaN or Inf (names the step).
        TypeError, ValueError: ``steps`` is not an int of at least 0; targets that do not fit
            the model's output, or class labels outside ``0 .. head size - 1``.
    """
    check_steps("steps (inner steps)", steps)
    x, y = train
    check_labels(omega, x, (("train", y),), batched=False)
    theta0 = {n: t[0] for n, t in omega.initial_params(1, generator, train=(x[None], y[None])).items()}
    try:
        params, losses = adapt_params(omega, theta0, x, y, steps, first_order)
    except (IndexError, RuntimeError) as err:
        explained = explain_label_error(err, omega, x, (("train", y),), batched=False)
        if explained is err:
            raise
        raise explained from err
    check_finite_losses(losses)
    return Adapted(params, losses)
