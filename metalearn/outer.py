r"""The outer loop: the meta-objective over a batch of tasks and one step on ω.

.. math::

    \mathcal{L}_{meta}(\omega) = \frac{1}{B} \sum_{i=1}^{B}
        \mathcal{L}\big(D^{val}_i;\ \theta_K(\omega, D^{train}_i)\big)

A batch of same-shaped tasks runs either as a Python loop over tasks (each task's
meta-gradient is backpropagated as soon as its val loss exists, so only one task's graph is
alive at a time) or as one batched computation under ``torch.func.vmap``. Both give the
same meta-gradient; ``batching="auto"`` picks the faster for the model and device:
measured on 2 CPU cores, vmap is ~6x faster than the loop for a 1-40-40-1 MLP but ~2x
slower, with ~10x the memory, for the Conv-4 (see ``docs/architecture.md``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import vmap

from metalearn.errors import NonFiniteError
from metalearn.inner import adapt_params, check_finite_losses
from metalearn.knowledge.meta_knowledge import MetaKnowledge, default_loss
from metalearn.knowledge.parts import Params
from metalearn.tasks.task import TaskBatch

__all__ = ["BATCHING_MODES", "MetaStats", "choose_batching", "meta_gradient", "meta_loss", "meta_step", "metric"]

BATCHING_MODES = ("auto", "loop", "vmap")
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


def metric(output: Tensor, target: Tensor) -> Tensor:
    """Accuracy for integer class targets, mean squared error otherwise (no gradient)."""
    output = output.detach()
    if target.is_floating_point():
        return (output - target).square().mean()
    return (output.argmax(-1) == target).to(output.dtype).mean()


def choose_batching(omega: MetaKnowledge, device: torch.device, first_order: bool = False) -> str:
    """The faster safe batching for ω's model on ``device``: ``"loop"`` or ``"vmap"``.

    * native norm layers with adapted affine weights: ``"loop"`` unless first order (their
      second-order meta-gradients are wrong under vmap);
    * on CUDA: ``"vmap"`` (one batched kernel per op instead of one per task);
    * on CPU: ``"loop"`` for convolutional models (compute-bound; vmap's batched
      convolutions were ~2x slower with ~10x the memory on the Conv-4), ``"vmap"``
      otherwise (small models are bound by per-op overhead, which batching removes).
    """
    if not first_order and omega.native_norms_adapted():
        return "loop"
    if device.type == "cuda":
        return "vmap"
    if any(isinstance(m, _CONVS) for m in omega.network.modules()):
        return "loop"
    return "vmap"


def _resolve_batching(omega: MetaKnowledge, batching: str, device: torch.device, first_order: bool) -> str:
    if batching not in BATCHING_MODES:
        raise ValueError(f"batching must be one of {BATCHING_MODES}, got {batching!r}")
    if batching == "auto":
        return choose_batching(omega, device, first_order)
    if batching == "vmap" and not first_order and omega.native_norms_adapted():
        raise ValueError(
            f"native norm layers {omega.native_norms_adapted()} adapt in the inner loop: under vmap their "
            "second-order meta-gradients are silently wrong (torch 2.13). Use batching='loop', "
            "metalearn.models.BatchNorm instead of nn.BatchNorm*, or first_order=True"
        )
    return batching


def task_objective(
    omega: MetaKnowledge,
    theta0: Params,
    x_train: Tensor,
    y_train: Tensor,
    x_val: Tensor,
    y_val: Tensor,
    steps: int,
    first_order: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """One task: adapt on train, then (val loss, val metric, inner losses). Pure; vmap-safe."""
    params, losses = adapt_params(omega, theta0, x_train, y_train, steps, first_order)
    output = omega(params, x_val)
    return default_loss(output, y_val), metric(output, y_val), losses


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


def _theta0_task(theta0: Params, i: int) -> Params:
    return {n: t[i] for n, t in theta0.items()}


def _check_grads(omega: MetaKnowledge, task: int | None) -> None:
    for name, p in omega.named_parameters():
        if p.grad is not None and not bool(torch.isfinite(p.grad).all()):
            where = f" (first seen after task {task})" if task is not None else ""
            raise NonFiniteError(
                f"non-finite meta-gradient for ω parameter {name!r}{where}; ω was not updated. "
                "Lower the outer or inner learning rate, or pass clip_grad_norm",
                task=task,
            )


def meta_gradient(
    omega: MetaKnowledge,
    batch: TaskBatch,
    steps: int,
    *,
    first_order: bool = False,
    batching: str = "auto",
    generator: torch.Generator | None = None,
) -> MetaStats:
    """Adds ∇ω of the mean val loss over ``batch`` to the ``.grad`` of ω's parameters.

    Args:
        omega: the meta-knowledge.
        batch: same-shaped tasks with a leading task dimension.
        steps: inner steps per task.
        first_order: first-order meta-gradient (FOMAML).
        batching: ``"loop"``, ``"vmap"`` or ``"auto"`` (`choose_batching`).
        generator: randomness for a stochastic init.

    Raises:
        NonFiniteError: a NaN/Inf inner loss, val loss or meta-gradient (names task and step).
    """
    (x_tr, y_tr), (x_val, y_val) = batch.train, batch.val
    n = len(batch)
    mode = _resolve_batching(omega, batching, x_tr.device, first_order)
    theta0 = omega.initial_params(n, generator)
    if mode == "vmap":
        run = vmap(task_objective, in_dims=(None, 0, 0, 0, 0, 0, None, None))
        val_losses, metrics, inner = run(omega, theta0, x_tr, y_tr, x_val, y_val, steps, first_order)
        check_finite_losses(inner)
        check_finite_losses(val_losses[:, None], what="val loss (after adaptation)")
        val_losses.mean().backward()
        _check_grads(omega, None)
    else:
        # Backpropagate task by task (only one task's graph alive at a time) into detached
        # copies of θ0, then once through the init: exact for any init, shared or sampled.
        leaves = {k: v.detach().requires_grad_(v.requires_grad) for k, v in theta0.items()}
        vals, mets, inners = [], [], []
        for i in range(n):
            val_loss, met, inner_i = task_objective(
                omega, _theta0_task(leaves, i), x_tr[i], y_tr[i], x_val[i], y_val[i], steps, first_order
            )
            check_finite_losses(inner_i, task_offset=i)
            check_finite_losses(val_loss[None], what="val loss (after adaptation)", task_offset=i)
            if val_loss.requires_grad:
                (val_loss / n).backward()
            vals.append(val_loss.detach())
            mets.append(met)
            inners.append(inner_i.detach())
        pairs = [(theta0[k], leaf.grad) for k, leaf in leaves.items() if leaf.grad is not None]
        if pairs:
            torch.autograd.backward([t for t, _ in pairs], [g for _, g in pairs])
        _check_grads(omega, None)
        val_losses, metrics, inner = torch.stack(vals), torch.stack(mets), torch.stack(inners)
    inner = inner.detach()
    return MetaStats(
        meta_loss=float(val_losses.detach().mean()),
        val_metric=float(metrics.mean()),
        inner_loss_first=float(inner[:, 0].mean()) if steps else float("nan"),
        inner_loss_last=float(inner[:, -1].mean()) if steps else float("nan"),
        batching=mode,
    )


def meta_loss(
    omega: MetaKnowledge,
    batch: TaskBatch,
    steps: int,
    *,
    first_order: bool = False,
    batching: str = "auto",
    generator: torch.Generator | None = None,
) -> Tensor:
    """The meta-objective: mean over ``batch`` of the val loss after adaptation, differentiable w.r.t. ω.

    Keeps every task's graph alive until you call ``backward``; `meta_gradient` is the
    memory-lean way to get the same gradient.
    """
    (x_tr, y_tr), (x_val, y_val) = batch.train, batch.val
    n = len(batch)
    mode = _resolve_batching(omega, batching, x_tr.device, first_order)
    theta0 = omega.initial_params(n, generator)
    if mode == "vmap":
        run = vmap(task_objective, in_dims=(None, 0, 0, 0, 0, 0, None, None))
        val_losses, _, inner = run(omega, theta0, x_tr, y_tr, x_val, y_val, steps, first_order)
        check_finite_losses(inner)
        return val_losses.mean()
    total = x_tr.new_zeros(())
    for i in range(n):
        val_loss, _, inner_i = task_objective(
            omega, _theta0_task(theta0, i), x_tr[i], y_tr[i], x_val[i], y_val[i], steps, first_order
        )
        check_finite_losses(inner_i, task_offset=i)
        total = total + val_loss
    return total / n


def meta_step(
    omega: MetaKnowledge,
    outer_optimizer: torch.optim.Optimizer,
    batch: TaskBatch,
    steps: int,
    *,
    first_order: bool = False,
    batching: str = "auto",
    clip_grad_norm: float | None = None,
    generator: torch.Generator | None = None,
) -> dict[str, float | str]:
    """One outer step: zero grads, meta-gradient over ``batch``, optional clipping, optimizer step.

    ω is left untouched if any loss or the meta-gradient is NaN/Inf (`NonFiniteError`).

    Returns:
        ``meta_loss``, ``val_metric``, ``inner_loss_first``, ``inner_loss_last``,
        ``grad_norm`` (before clipping) and ``batching``.
    """
    outer_optimizer.zero_grad(set_to_none=True)
    stats = meta_gradient(
        omega, batch, steps, first_order=first_order, batching=batching, generator=generator
    )
    params = [p for p in omega.parameters() if p.grad is not None]
    max_norm = float("inf") if clip_grad_norm is None else float(clip_grad_norm)
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm) if params else torch.zeros(())
    outer_optimizer.step()
    return {**stats.__dict__, "grad_norm": float(grad_norm)}
