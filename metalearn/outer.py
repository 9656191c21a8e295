r"""The outer loop: the meta-objective over a batch of tasks and one step on ω.

.. math::

    \mathcal{L}_{meta}(\omega) = \frac{1}{B} \sum_{i=1}^{B}
        \mathcal{L}\big(D^{val}_i;\ \theta_K(\omega, D^{train}_i)\big)

How the meta-gradient is obtained is the mode's job (`metalearn.modes`: ``mode.accumulate``);
this module checks the inputs, calls the mode, checks the gradient and steps the outer optimizer.
A batch of same-shaped tasks runs, through `metalearn.mapping.map_tasks`, either as a Python loop
over tasks (each task's meta-gradient is backpropagated as soon as its val loss exists, so only
one task's graph is alive at a time) or as one batched computation under ``torch.func.vmap``
(`run_vmapped`, which computes every norm from primitives there: `metalearn.exact_norms`). Both give the
same meta-gradient, for any model; ``batching="auto"`` picks the faster for the model and device:
measured on 2 CPU cores, vmap is ~6x faster than the loop for a 1-40-40-1 MLP but ~2x
slower, with ~10x the memory, for the Conv-4 (see ``docs/architecture.md``).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import Tensor

from metalearn.checks import (
    check_clip_grad_norm,
    check_grad_mode,
    check_labels,
    check_outer_optimizer,
    check_steps,
    explain_label_error,
    inner_steps_keyword,
)
from metalearn.errors import NonFiniteError
from metalearn.inner import adapt_params
from metalearn.kernels import check_kernels
from metalearn.knowledge.meta_knowledge import MetaKnowledge
from metalearn.mapping import (
    Chunking,
    check_losses,
    map_tasks,
    resolve_batching,
    task_in_dims,
    task_objective,
    vmap_theta0,
)
from metalearn.modes import MetaGradientMode, resolve_mode
from metalearn.modes.base import with_kernels
from metalearn.tasks.task import TaskBatch

__all__ = [
    "MetaStats",
    "meta_gradient",
    "meta_loss",
    "meta_step",
]


@dataclass(frozen=True)
class MetaStats:
    """What one meta-batch gave (plain floats, detached).

    Attributes:
        meta_loss: mean val loss of the adapted θ over the tasks.
        val_metric: mean val accuracy (classification) or MSE (regression).
        inner_loss_first: mean train loss before the first inner step.
        inner_loss_last: mean train loss before the last inner step.
        batching: the path that ran, ``"loop"`` or ``"vmap"``.
    """

    meta_loss: float
    val_metric: float
    inner_loss_first: float
    inner_loss_last: float
    batching: str


def _grad_norm(grads: list[Tensor]) -> Tensor:
    """The 2-norm of all ``grads`` as one vector, computed as ``clip_grad_norm_`` does."""
    if not grads:
        return torch.zeros(())
    get_total_norm = getattr(torch.nn.utils, "get_total_norm", None)  # torch >= 2.6
    if get_total_norm is not None:
        return get_total_norm(grads, 2.0)
    norms = [torch.linalg.vector_norm(g) for g in grads]
    return torch.linalg.vector_norm(torch.stack([n.to(norms[0].device) for n in norms]))


def _check_grads(omega: MetaKnowledge, grad_norm: Tensor) -> None:
    """Raises `NonFiniteError` naming a parameter with a NaN/Inf meta-gradient.

    ``grad_norm`` (the norm of every ω gradient) is NaN/Inf whenever one entry is, so it is
    the only check on the common path; the per-parameter scan runs only when it is not finite
    (it may be Inf by overflow alone, with every entry finite: then nothing is raised).
    """
    if bool(torch.isfinite(grad_norm)):
        return
    for name, p in omega.named_parameters():
        if p.grad is not None and not bool(torch.isfinite(p.grad).all()):
            raise NonFiniteError(
                f"non-finite meta-gradient for ω parameter {name!r}; ω was not updated. "
                "Lower the outer or inner learning rate, or pass clip_grad_norm",
                task=None,
            )


@inner_steps_keyword
def meta_gradient(
    omega: MetaKnowledge,
    batch: TaskBatch,
    inner_steps: int,
    *,
    first_order: bool = False,
    batching: str = "auto",
    generator: torch.Generator | None = None,
    mode: str | MetaGradientMode = "unrolled",
    chunk_size: int | str | None = None,
    memory_budget: int | None = None,
    kernels: str = "auto",
) -> MetaStats:
    """Adds ∇ω of the mean val loss over ``batch`` to the ``.grad`` of ω's parameters.

    Args:
        omega: the meta-knowledge.
        batch: same-shaped tasks with a leading task dimension.
        inner_steps: inner steps per task.
        first_order: first-order meta-gradient (FOMAML); same as ``mode="first_order"``.
        batching: ``"loop"``, ``"vmap"`` or ``"auto"`` (`metalearn.mapping.choose_batching`), among the mode's
            ``batchings`` (``"checkpointed"``, ``"implicit"`` and ``"reptile"`` run only the loop).
        generator: randomness for a stochastic init.
        mode: how the meta-gradient is obtained: ``"unrolled"`` (default), ``"first_order"``,
            ``"truncated"``, ``"checkpointed"``, ``"implicit"`` (iMAML), ``"reptile"``, or a
            `metalearn.modes.MetaGradientMode` (e.g. ``Implicit(lam=2.0, cg_steps=10)``,
            ``Truncated(k=2)`` or one of your own); its ``accumulate`` does the work.
        chunk_size: under vmap, run the tasks this many at a time, each chunk's share of the
            meta-gradient backpropagated before the next chunk runs, so memory is bounded by the
            chunk instead of the batch; the same meta-gradient up to rounding. ``"auto"``: as many
            as ``memory_budget`` holds (`metalearn.mapping.Chunking`); ``None``: the whole batch at
            once. The loop holds one task's graph at a time already and ignores it.
        memory_budget: bytes one chunk's graph may hold, for ``chunk_size="auto"`` (default: half
            the free memory of a CUDA device; no chunking on the CPU).
        kernels: how inner updates are applied: ``"auto"`` (fused Triton kernels for CUDA tensors when
            Triton imports), ``"triton"`` or ``"reference"``; see `metalearn.kernels`.

    Raises:
        NonFiniteError: a NaN/Inf inner loss, val loss or meta-gradient (names task and step).
        RuntimeError: called under ``torch.no_grad()`` or ``torch.inference_mode()``.
        ValueError: a negative ``inner_steps``, an empty batch, targets that do not fit the model's
            output or class labels outside ``0 .. head size - 1`` (names the task), an unknown
            ``batching``, a bad ``chunk_size`` / ``memory_budget``, or chunks asked of a mode whose
            vmap path does not run in chunks.
    """
    check_batch("meta_gradient", omega, batch, inner_steps)
    check_kernels(kernels, batch.train[0].device)
    chunking = Chunking(chunk_size, memory_budget)
    stats, _ = _explained_meta_gradient(
        omega, batch, inner_steps, first_order, batching, generator, mode, chunking, kernels
    )
    return stats


def check_batch(caller: str, omega: MetaKnowledge, batch: TaskBatch, inner_steps: int, need_grad: bool = True) -> None:
    """The entry checks of a meta-gradient over ``batch``: grad mode on (if ``need_grad``), a step
    count, a non-empty `TaskBatch` and class labels within the head (`check_labels`); before any work."""
    if need_grad:
        check_grad_mode(caller)
    check_steps("inner_steps", inner_steps)
    if not isinstance(omega, MetaKnowledge):
        raise TypeError(
            f"omega must be a MetaKnowledge, got {type(omega).__name__}; "
            "wrap the model: MetaKnowledge(model, InnerSGD(lr))"
        )
    if not isinstance(batch, TaskBatch):
        raise TypeError(
            f"batch must be a TaskBatch (same-shaped tasks stacked), got {type(batch).__name__}; "
            "build one with stack_tasks(tasks) or taskset.batch(indices)"
        )
    if len(batch) == 0:
        raise ValueError("the task batch is empty (0 tasks); give at least one task")
    check_labels(omega, batch.train[0], (("train", batch.train[1]), ("val", batch.val[1])))


def _explained_meta_gradient(
    omega: MetaKnowledge,
    batch: TaskBatch,
    inner_steps: int,
    first_order: bool,
    batching: str,
    generator: torch.Generator | None,
    mode: str | MetaGradientMode,
    chunking: Chunking,
    kernels: str = "auto",
) -> tuple[MetaStats, Tensor]:
    """`_meta_gradient`, turning torch's raw "target out of bounds" into an error that names the task,
    the label and the head size (the labels' upper bound needs the head size, known only from a
    forward, so it is checked on the error path; `check_batch` checked the lower bound)."""
    try:
        return _meta_gradient(omega, batch, inner_steps, first_order, batching, generator, mode, chunking, kernels)
    except (IndexError, RuntimeError) as err:
        explained = explain_label_error(err, omega, batch.train[0], (("train", batch.train[1]), ("val", batch.val[1])))
        if explained is err:
            raise
        raise explained from err


def _meta_gradient(
    omega: MetaKnowledge,
    batch: TaskBatch,
    inner_steps: int,
    first_order: bool,
    batching: str,
    generator: torch.Generator | None,
    gradient_mode: str | MetaGradientMode = "unrolled",
    chunking: Chunking | None = None,
    kernels: str = "auto",
) -> tuple[MetaStats, Tensor]:
    """`meta_gradient`, also returning the norm of ω's gradients (computed once, for the
    finiteness check and for `meta_step`'s report and clipping)."""
    how = resolve_mode(gradient_mode, first_order)
    batching = how.resolve_batching(omega, batching, batch.train[0].device)
    chunks: dict[str, Any] = {}  # passed only to a mode that takes it (a user's mode may not)
    if chunking is not None and chunking.active and batching == "vmap":
        if not how.chunked_vmap:
            raise ValueError(
                f"mode={how.name or type(how).__name__!r} runs its vmap path in one piece (it does not set "
                f"chunked_vmap), so chunk_size={chunking.size!r} cannot apply; pass chunk_size=None, or "
                "batching='loop' (one task's graph at a time)"
            )
        chunks["chunking"] = chunking
    accumulate = with_kernels(how.accumulate, kernels, f"{type(how).__name__}.accumulate")
    val_losses, metrics, inner = accumulate(omega, batch, inner_steps, batching, generator, **chunks)
    grad_norm = _grad_norm([p.grad for p in omega.parameters() if p.grad is not None])
    _check_grads(omega, grad_norm)
    inner = inner.detach()
    summary = [val_losses.detach().mean(), metrics.mean()]
    if inner_steps:
        first = inner[:, 0].mean()
        summary += [first, first if inner_steps == 1 else inner[:, -1].mean()]
    values = torch.stack(summary).tolist() + ([] if inner_steps else [float("nan")] * 2)
    return (
        MetaStats(
            meta_loss=values[0],
            val_metric=values[1],
            inner_loss_first=values[2],
            inner_loss_last=values[3],
            batching=batching,
        ),
        grad_norm,
    )


@inner_steps_keyword
def meta_loss(
    omega: MetaKnowledge,
    batch: TaskBatch,
    inner_steps: int,
    *,
    first_order: bool = False,
    batching: str = "auto",
    generator: torch.Generator | None = None,
    kernels: str = "auto",
) -> Tensor:
    """The meta-objective: mean over ``batch`` of the val loss after adaptation, differentiable w.r.t. ω.

    Keeps every task's graph alive until you call ``backward``; `meta_gradient` is the
    memory-lean way to get the same gradient. Raises as `meta_gradient` does for bad inputs.
    """
    check_batch("meta_loss", omega, batch, inner_steps, need_grad=False)  # its value alone may be wanted
    check_kernels(kernels, batch.train[0].device)
    (x_tr, y_tr), (x_val, y_val) = batch.train, batch.val
    n = len(batch)
    mode = resolve_batching(omega, batching, x_tr.device)
    if mode == "vmap":
        theta0, dims = vmap_theta0(omega, n, generator, batch.train)
    else:
        theta0 = omega.initial_params(n, generator, train=batch.train)
        dims = dict.fromkeys(theta0, 0)
    objective = partial(task_objective, adapt_fn=partial(adapt_params, kernels=kernels))
    val_losses, _, inner = map_tasks(
        objective, task_in_dims(dims), omega, theta0, x_tr, y_tr, x_val, y_val, inner_steps, first_order,
        batching=mode, kernels=kernels,
    )
    check_losses(inner.detach(), val_losses.detach(), by_task=mode == "loop")
    return val_losses.mean()


@inner_steps_keyword
def meta_step(
    omega: MetaKnowledge,
    outer_optimizer: torch.optim.Optimizer,
    batch: TaskBatch,
    inner_steps: int,
    *,
    first_order: bool = False,
    batching: str = "auto",
    clip_grad_norm: float | None = None,
    generator: torch.Generator | None = None,
    mode: str | MetaGradientMode = "unrolled",
    chunk_size: int | str | None = None,
    memory_budget: int | None = None,
    kernels: str = "auto",
) -> dict[str, float | str]:
    """One outer step: zero grads, meta-gradient over ``batch``, optional clipping, optimizer step.

    ``mode``, ``chunk_size``, ``memory_budget`` and ``kernels`` are as in `meta_gradient` (``"reptile"``
    with ``torch.optim.SGD(lr=ε)`` is Reptile's θ0 ← θ0 + ε(mean φ − θ0)).

    ω is left untouched if any loss or the meta-gradient is NaN/Inf (`NonFiniteError`).

    Returns:
        ``meta_loss``, ``val_metric``, ``inner_loss_first``, ``inner_loss_last``,
        ``grad_norm`` (before clipping) and ``batching``.

    Raises:
        ValueError: ``clip_grad_norm`` not a positive finite number, an outer optimizer that holds
            none of ω's parameters or tensors that are not ω's, and the bad inputs `meta_gradient`
            refuses; all before ω or its gradients change.
        RuntimeError: called under ``torch.no_grad()`` or ``torch.inference_mode()``.

    Warns:
        UserWarning: the outer optimizer lacks some trainable ω parameters (named).
    """
    check_batch("meta_step", omega, batch, inner_steps)
    clip_grad_norm = check_clip_grad_norm(clip_grad_norm)
    check_outer_optimizer(omega, outer_optimizer)
    check_kernels(kernels, batch.train[0].device)
    chunking = Chunking(chunk_size, memory_budget)
    outer_optimizer.zero_grad(set_to_none=True)
    stats, grad_norm = _explained_meta_gradient(
        omega, batch, inner_steps, first_order, batching, generator, mode, chunking, kernels
    )
    clip_meta_gradient(omega, clip_grad_norm, grad_norm)
    outer_optimizer.step()
    return {**stats.__dict__, "grad_norm": float(grad_norm)}


def clip_meta_gradient(omega: MetaKnowledge, clip_grad_norm: float | None, grad_norm: Tensor) -> None:
    """Scales ω's ``.grad`` to total norm ``clip_grad_norm`` (if given) from its already computed norm."""
    if clip_grad_norm is None:
        return
    params = [p for p in omega.parameters() if p.grad is not None]
    clip_with_norm = getattr(torch.nn.utils, "clip_grads_with_norm_", None)  # torch >= 2.6
    if clip_with_norm is not None:
        clip_with_norm(params, float(clip_grad_norm), grad_norm)
    elif params:
        torch.nn.utils.clip_grad_norm_(params, float(clip_grad_norm))
