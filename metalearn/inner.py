r"""The inner loop: θ0 ~ ω, then K update steps on a task's train half.

One loop, `inner_loop`, serves meta-training and meta-testing alike; `adapt_params` (the
differentiable loop), `adapt` (one task) and `InnerProblem.solve` (meta-test) call it, and
every meta-gradient mode in `metalearn.modes` picks its options:

.. math::

    \theta_{k+1} = \mathrm{step}_\omega\big(\theta_k,\ \nabla_\theta \big[\mathcal{L}(D^{train}; \theta_k)
        + R(\theta_k)\big],\ s_k\big)

* ``graph`` — how gradients flow through the loop: ``"full"`` differentiates through every step,
  so the meta-gradient sees how θK depends on ω (Finn et al., 2017); ``"first_order"`` treats
  each inner gradient as a constant (FOMAML: θ_k is detached before its gradient is taken, so no
  graph of the inner gradient is built, but θK still depends on θ0 and ω's step sizes through the
  updates); ``"none"`` keeps no graph at all (φ detached: iMAML's inner loop, Reptile, meta-test).
  ``first_order_steps`` makes the first steps of a ``"full"`` loop first order (truncated backprop).
* ``regulariser`` — an optional R(θ) added to the inner loss, e.g. `Proximal` (iMAML's
  λ/2 ‖θ − θ0‖²).
* ``segment`` — with ``"full"``, wrap every ``segment`` steps in ``torch.utils.checkpoint``: the
  same θK and meta-gradient, with each segment's graph recomputed in the backward.
* ``after_step`` — called as ``after_step(k, θ_{k+1})`` (every parameter) after each step k, e.g. to
  score every intermediate θ on the val half (MAML++'s multi-step loss, `metalearn.modes.MultiStepLoss`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial

import torch
from torch import Tensor
from torch.func import grad_and_value
from torch.utils.checkpoint import checkpoint

from metalearn.checks import check_labels, check_steps, explain_label_error, inner_steps_keyword
from metalearn.errors import NonFiniteError
from metalearn.kernels import check_kernels
from metalearn.knowledge.meta_knowledge import MetaKnowledge
from metalearn.knowledge.parts import Params, State
from metalearn.knowledge.rules import fused_step

__all__ = [
    "GRAPHS",
    "Adapted",
    "InnerProblem",
    "Proximal",
    "adapt",
    "adapt_params",
    "check_finite_losses",
    "check_finite_task_losses",
    "inner_loop",
    "plain_autograd_applies",
]


@dataclass(frozen=True)
class Adapted:
    """Result of the inner loop: θ* and the model it belongs to, callable as the fine-tuned model.

    `adapt` (meta-training, differentiable w.r.t. ω) and `metalearn.evaluate.fine_tune` (meta-test,
    no graph) both return one; call it to run ω's model with θ* bound:

    >>> import torch
    >>> from metalearn import InnerSGD, MetaKnowledge, fine_tune
    >>> from metalearn.models import MLP
    >>> omega = MetaKnowledge(MLP((1, 8, 1)), InnerSGD(lr=0.1))
    >>> x, y = torch.randn(5, 1), torch.randn(5, 1)
    >>> adapted = fine_tune(omega, (x, y), inner_steps=3)
    >>> adapted(x).shape, adapted.losses.shape, sorted(adapted.params)[0]
    (torch.Size([5, 1]), torch.Size([3]), 'layers.0.bias')

    Attributes:
        params: θ*, every parameter of the model (adapted and static), by name.
        losses: the inner (train) loss before each step, shape ``[inner_steps]`` (or ``[tasks, inner_steps]``).
        omega: the meta-knowledge whose model ``params`` belong to (None: not callable).
        differentiable: whether calling it may build a graph (`adapt`: True; `fine_tune`: False,
            the call runs under ``torch.no_grad``).
    """

    params: Params
    losses: Tensor
    omega: MetaKnowledge | None = field(default=None, repr=False, compare=False)
    differentiable: bool = True

    def __call__(self, x: Tensor) -> Tensor:
        """ω's model with θ* bound, on inputs ``x`` (on θ*'s device)."""
        if self.omega is None:
            raise TypeError(
                "this Adapted holds no ω, so it cannot run the model; build it with Adapted(params, losses, omega) "
                "or call omega(adapted.params, x)"
            )
        if self.differentiable:
            return self.omega(self.params, x)
        with torch.no_grad():
            return self.omega(self.params, x)


GRAPHS = ("full", "first_order", "none")
#: a term added to the inner loss of the adapted parameters, e.g. `Proximal`
Regulariser = Callable[[Params], Tensor]
#: called after inner step k with θ_{k+1} (every parameter), e.g. to score it on the val half
AfterStep = Callable[[int, Params], None]


@dataclass(frozen=True)
class Proximal:
    r"""iMAML's proximal term :math:`\frac{\lambda}{2}\lVert\phi - \theta_0\rVert^2` over the adapted parameters.

    Attributes:
        lam: λ > 0.
        anchor: θ0 of the adapted parameters (detached), by name.
    """

    lam: float
    anchor: Mapping[str, Tensor]

    def __call__(self, fast: Params) -> Tensor:
        prox = sum((fast[n] - self.anchor[n]).square().sum() for n in fast)
        return 0.5 * self.lam * prox  # type: ignore[return-value]


@dataclass(frozen=True)
class InnerProblem:
    r"""The inner problem meta-test solves (what a meta-gradient mode trained θ0 for).

    ``proximal=None`` is the plain inner loop; ``proximal=λ`` descends iMAML's
    :math:`L^{train}(\phi) + \frac{\lambda}{2}\lVert\phi - \theta_0\rVert^2` (Rajeswaran et al., 2019).
    Read by `metalearn.evaluate.fine_tune`, `metalearn.evaluate.evaluate` and `meta_train`'s
    validation from ``mode.meta_test_problem()``.
    """

    proximal: float | None = None

    def __post_init__(self) -> None:
        if self.proximal is not None and not self.proximal > 0:
            raise ValueError(f"proximal=λ must be positive (or None for the plain inner loop), got {self.proximal}")

    @property
    def vmappable(self) -> bool:
        """Whether `solve` may run under ``torch.func.vmap`` (the proximal loop takes plain autograd gradients)."""
        return self.proximal is None

    def solve(
        self, omega: MetaKnowledge, theta0: Mapping[str, Tensor], x: Tensor, y: Tensor, inner_steps: int,
        first_order: bool = True, *, kernels: str = "auto",
    ) -> tuple[Params, Tensor]:
        """θ* of one task from ``theta0`` (every parameter), no graph to ω kept by the caller's ``no_grad``.

        Same signature as `adapt_params` (``first_order`` is accepted and ignored: meta-test never
        differentiates through the loop), so it can stand in for it in `metalearn.mapping.task_objective`.
        """
        if self.proximal is None:
            return adapt_params(omega, theta0, x, y, inner_steps, first_order=True, kernels=kernels)
        anchor = {n: theta0[n].detach() for n in omega.adapted_names}
        return inner_loop(
            omega, theta0, x, y, inner_steps, graph="none", regulariser=Proximal(self.proximal, anchor), kernels=kernels
        )


@inner_steps_keyword
def adapt_params(
    omega: MetaKnowledge,
    theta0: Mapping[str, Tensor],
    x: Tensor,
    y: Tensor,
    inner_steps: int,
    first_order: bool = False,
    *,
    kernels: str = "auto",
) -> tuple[Params, Tensor]:
    """The differentiable inner loop for one task, as a pure function (safe under ``torch.func.vmap``).

    `inner_loop` with ``graph="full"`` (or ``"first_order"``).

    Args:
        omega: the meta-knowledge (its optimizer, adapted names and inner loss are used).
        theta0: θ0 of this task (no task dimension).
        x: train inputs of the task.
        y: train targets of the task.
        inner_steps: number of inner steps K (0 returns θ0).
        first_order: stop gradients through the inner gradients (FOMAML).
        kernels: how updates are applied (`inner_loop`).

    Returns:
        θK as a dict of every parameter, and the inner losses before each step ``[inner_steps]``.

    Raises:
        TypeError, ValueError: ``inner_steps`` is not an int of at least 0.
    """
    check_steps("inner_steps", inner_steps)
    return inner_loop(omega, theta0, x, y, inner_steps, graph="first_order" if first_order else "full", kernels=kernels)


@inner_steps_keyword
def inner_loop(
    omega: MetaKnowledge,
    theta0: Mapping[str, Tensor],
    x: Tensor,
    y: Tensor,
    inner_steps: int,
    *,
    graph: str = "full",
    regulariser: Regulariser | None = None,
    segment: int | None = None,
    first_order_steps: int = 0,
    after_step: AfterStep | None = None,
    kernels: str = "auto",
) -> tuple[Params, Tensor]:
    """The one inner loop: ``inner_steps`` updates of ω's optimizer on the inner loss (+ ``regulariser``).

    Args:
        omega: the meta-knowledge.
        theta0: θ0 of this task, every parameter of the model (no task dimension).
        x: the inputs of the task's train half.
        y: the targets of the task's train half.
        inner_steps: inner steps K.
        graph: ``"full"``, ``"first_order"`` or ``"none"`` (see the module docstring).
        regulariser: R(θ_adapted) added to the inner loss (its value is in the returned losses).
        segment: with ``graph="full"``, checkpoint every ``segment`` steps (not under ``torch.func``).
        first_order_steps: with ``graph="full"``, steps ``k < first_order_steps`` are first order.
        after_step: ``after_step(k, θ_{k+1})`` after each step k (every parameter; detached for
            ``"none"``); not with ``segment``, whose steps run inside a checkpoint.
        kernels: how ω's updates are applied (`metalearn.knowledge.rules.fused_step`): ``"auto"`` (the
            fused Triton kernel for CUDA tensors when Triton imports), ``"triton"`` or ``"reference"``
            (the rule's own code); see `metalearn.kernels`.

    Returns:
        θK (every parameter: static ones as given, detached for ``"none"``) and the inner objective
        before each step ``[inner_steps]``.
    """
    if graph not in GRAPHS:
        raise ValueError(f"graph must be one of {GRAPHS}, got {graph!r}")
    if after_step is not None and segment is not None:
        raise ValueError("after_step cannot see the steps inside a checkpointed segment; pass segment=None")
    check_kernels(kernels, x.device)
    static = {n: theta0[n] for n in omega.static_names}
    fast = {n: theta0[n] for n in omega.adapted_names}
    objective = _inner_objective(omega, x, y, regulariser)
    if graph == "none":
        detached = {n: t.detach() for n, t in static.items()}
        return _detached_loop(omega, detached, fast, objective, inner_steps, x, after_step, kernels)
    if graph == "first_order":
        first_order_steps = inner_steps
    plain = _use_plain_autograd(omega, theta0, first_order_steps >= inner_steps)
    if segment is not None and first_order_steps < inner_steps and plain:
        return _segmented_loop(omega, static, fast, objective, inner_steps, x, segment, first_order_steps, kernels)
    state = omega.optimizer.init_state(fast)
    losses = []
    for k in range(inner_steps):
        fo = k < first_order_steps
        fast, state, loss = _step(omega, static, fast, state, objective, k, fo, plain and not fo, kernels)
        losses.append(loss)
        if after_step is not None:
            after_step(k, {**static, **fast})
    losses_t = torch.stack(losses) if losses else x.new_zeros(0)
    return {**static, **fast}, losses_t


def _inner_objective(
    omega: MetaKnowledge, x: Tensor, y: Tensor, regulariser: Regulariser | None
) -> Callable[[Params, Params], Tensor]:
    """The function of (static, adapted) parameters the loop descends: ω's inner loss (+ R of the adapted)."""

    def objective(static: Params, fast: Params) -> Tensor:
        loss = omega.inner_loss({**static, **fast}, x, y)
        return loss if regulariser is None else loss + regulariser(fast)

    return objective


def _use_plain_autograd(omega: MetaKnowledge, theta0: Mapping[str, Tensor], first_order: bool) -> bool:
    """Whether the inner gradients can come from ``torch.autograd.grad`` instead of ``torch.func``.

    Only second order, where `plain_autograd_applies`: then ``autograd.grad(..., create_graph=True)``
    gives the same gradients with the same graph as ``grad_and_value``, and skips functorch's
    per-op wrapping (the loop path's per-task overhead). First order keeps ``torch.func``:
    its inner gradients of detached θ_k still depend on static meta-parameters (ANIL's body,
    a learned loss), which plain autograd would only keep at the cost of a graph to θ_k too.
    """
    return not first_order and plain_autograd_applies(omega, theta0)


def plain_autograd_applies(omega: MetaKnowledge, theta0: Mapping[str, Tensor]) -> bool:
    """Whether ``torch.autograd.grad`` can differentiate ω's inner loss here: outside every ``torch.func``
    transform and ``torch.compile`` tracing (where double backward through ``autograd.grad`` is
    unsupported), with grad mode on and every adapted tensor of θ0 requiring grad."""
    if not torch.is_grad_enabled() or torch.compiler.is_compiling():
        return False
    peek = getattr(torch._C._functorch, "peek_interpreter_stack", None)
    if peek is None or peek() is not None:
        return False
    return all(theta0[n].requires_grad for n in omega.adapted_names)


def _step(
    omega: MetaKnowledge,
    static: Params,
    fast: Params,
    state: State,
    objective: Callable[[Params, Params], Tensor],
    k: int,
    first_order: bool,
    plain_autograd: bool,
    kernels: str = "auto",
) -> tuple[Params, State, Tensor]:
    """One differentiable inner step k: the objective at θ_k, its gradient, ω's update.

    ``plain_autograd`` takes the gradient with ``torch.autograd.grad(create_graph=True)`` (second
    order, outside torch.func transforms); otherwise ``torch.func.grad_and_value`` (first order
    detaches θ_k first). Returns θ_{k+1}, the new optimizer state and the objective at θ_k.
    """
    if plain_autograd:
        loss = objective(static, fast)
        if loss.requires_grad:
            grad_list = torch.autograd.grad(loss, list(fast.values()), create_graph=True, materialize_grads=True)
            grads = dict(zip(fast, grad_list, strict=True))
        else:  # the loss does not depend on the adapted parameters
            grads = {n: torch.zeros_like(t) for n, t in fast.items()}
    else:
        at = {n: t.detach() for n, t in fast.items()} if first_order else fast
        grads, loss = grad_and_value(partial(objective, static))(at)
    fast, state = fused_step(omega.optimizer, fast, grads, state, k, kernels)
    return fast, state, loss


def _detached_loop(
    omega: MetaKnowledge,
    static: Params,
    fast: Params,
    objective: Callable[[Params, Params], Tensor],
    steps: int,
    x: Tensor,
    after_step: AfterStep | None = None,
    kernels: str = "auto",
) -> tuple[Params, Tensor]:
    """``graph="none"``: each step's gradient from fresh detached leaves, the update under ``no_grad``;
    no graph outlives a step (memory independent of ``steps``)."""
    state = omega.optimizer.init_state(fast)
    losses = []
    for k in range(steps):
        with torch.enable_grad():
            leaves = {n: t.detach().requires_grad_() for n, t in fast.items()}
            loss = objective(static, leaves)
            grads = torch.autograd.grad(loss, list(leaves.values()), materialize_grads=True)
        with torch.no_grad():
            fast, state = fused_step(
                omega.optimizer, {n: t.detach() for n, t in leaves.items()}, dict(zip(leaves, grads, strict=True)),
                state, k, kernels,
            )
        losses.append(loss.detach())
        if after_step is not None:
            after_step(k, {**static, **{n: t.detach() for n, t in fast.items()}})
    losses_t = torch.stack(losses) if losses else x.new_zeros(0)
    return {**static, **{n: t.detach() for n, t in fast.items()}}, losses_t


def _segmented_loop(
    omega: MetaKnowledge,
    static: Params,
    fast: Params,
    objective: Callable[[Params, Params], Tensor],
    steps: int,
    x: Tensor,
    segment: int,
    first_order_steps: int,
    kernels: str = "auto",
) -> tuple[Params, Tensor]:
    """``graph="full"`` with every ``segment`` steps under ``torch.utils.checkpoint`` (non-reentrant):
    only θ_k and the optimizer state at segment boundaries are kept between forward and backward."""
    names = list(fast)
    state = omega.optimizer.init_state(fast)
    state_keys = list(state)

    def run_segment(k0: int, k1: int, *tensors: Tensor) -> tuple[Tensor, ...]:
        f = dict(zip(names, tensors[: len(names)], strict=True))
        s = dict(zip(state_keys, tensors[len(names) :], strict=True))
        seg_losses = []
        for k in range(k0, k1):
            fo = k < first_order_steps
            f, s, loss = _step(omega, static, f, s, objective, k, fo, not fo, kernels)
            seg_losses.append(loss)
        return (*(f[n] for n in names), *(s[k] for k in state_keys), torch.stack(seg_losses))

    losses = []
    flat = (*fast.values(), *state.values())
    for k0 in range(0, steps, segment):
        out = checkpoint(run_segment, k0, min(k0 + segment, steps), *flat, use_reentrant=False)
        flat, seg = out[:-1], out[-1]
        losses.append(seg)
    fast = dict(zip(names, flat[: len(names)], strict=True))
    losses_t = torch.cat(losses) if losses else x.new_zeros(0)
    return {**static, **fast}, losses_t


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


@inner_steps_keyword
def adapt(
    omega: MetaKnowledge,
    train: tuple[Tensor, Tensor],
    inner_steps: int,
    *,
    first_order: bool = False,
    generator: torch.Generator | None = None,
    kernels: str = "auto",
) -> Adapted:
    """Adapts θ to one task's train half: θ0 from ω, then ``inner_steps`` updates.

    The result stays differentiable w.r.t. ω (unless ``first_order``), so a loss of
    ``Adapted.params`` on the task's val half can be backpropagated into ω.

    Args:
        omega: the meta-knowledge.
        train: the task's ``(x, y)`` train half (no task dimension).
        inner_steps: number of inner steps.
        first_order: first-order approximation (FOMAML).
        generator: randomness for a stochastic init.
        kernels: how updates are applied: ``"auto"``, ``"triton"`` or ``"reference"`` (`inner_loop`).

    Raises:
        NonFiniteError: the inner loss became NaN or Inf (names the step).
        TypeError, ValueError: ``inner_steps`` is not an int of at least 0; targets that do not fit
            the model's output, or class labels outside ``0 .. head size - 1``.
    """
    check_steps("inner_steps", inner_steps)
    x, y = train
    check_labels(omega, x, (("train", y),), batched=False)
    theta0 = {n: t[0] for n, t in omega.initial_params(1, generator, train=(x[None], y[None])).items()}
    try:
        params, losses = adapt_params(omega, theta0, x, y, inner_steps, first_order, kernels=kernels)
    except (IndexError, RuntimeError) as err:
        explained = explain_label_error(err, omega, x, (("train", y),), batched=False)
        if explained is err:
            raise
        raise explained from err
    check_finite_losses(losses)
    return Adapted(params, losses, omega)
