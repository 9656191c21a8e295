"""Backpropagation through the inner loop (MAML; Finn et al., 2017), and the machinery that the
modes differentiating through it share (`ThroughInnerLoop`): checkpointed and truncated
backprop only change how the inner loop of one task runs."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import ClassVar

import torch
from torch import Tensor

from metalearn.inner import adapt_params
from metalearn.knowledge.builtins import PointInit
from metalearn.knowledge.meta_knowledge import MetaKnowledge
from metalearn.knowledge.parts import Params
from metalearn.mapping import (
    Chunking,
    check_losses,
    map_chunks,
    map_tasks,
    needs_norm_routing,
    task_in_dims,
    task_objective,
    vmap_theta0,
)
from metalearn.modes.base import MetaGradientMode, with_kernels
from metalearn.task_batched import runs_task_batched, task_batched_backward
from metalearn.tasks.task import TaskBatch

__all__ = ["ThroughInnerLoop", "Unrolled"]


class ThroughInnerLoop(MetaGradientMode):
    """A mode whose meta-gradient is the backward of the mean val loss through the inner loop.

    Subclasses set `adapt_task` (how one task's inner loop runs, with `metalearn.inner.inner_loop`'s
    options) and ``batchings``; `accumulate` maps it over the batch, by vmap (one backward over
    the mean, or one per chunk of tasks with ``chunking``) or by the loop (a backward per task,
    so one task's graph is alive at a time).
    """

    batchings: ClassVar[tuple[str, ...]] = ("loop", "vmap")
    chunked_vmap: ClassVar[bool] = True

    def adapt_task(
        self, omega: MetaKnowledge, theta0: Params, x: Tensor, y: Tensor, inner_steps: int, first_order: bool,
        *, kernels: str = "auto",
    ) -> tuple[Params, Tensor]:
        """The inner loop of one task (signature of `metalearn.inner.adapt_params`); vmap-safe if
        ``"vmap"`` is in ``batchings``."""
        return adapt_params(omega, theta0, x, y, inner_steps, first_order, kernels=kernels)

    def accumulate(
        self,
        omega: MetaKnowledge,
        batch: TaskBatch,
        inner_steps: int,
        batching: str,
        generator: torch.Generator | None,
        *,
        chunking: Chunking | None = None,
        kernels: str = "auto",
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Backpropagates the mean val loss of ``batch`` into ω's ``.grad``; see `MetaGradientMode.accumulate`.

        ``chunking`` (vmap only): run the tasks chunk by chunk, each chunk's share backpropagated
        before the next runs (`metalearn.mapping.map_chunks`); the same meta-gradient up to rounding.
        """
        first_order = self.meta_first_order()
        if batching == "vmap" and self.task_batched_for(omega, batch, chunking, kernels):
            return task_batched_backward(omega, omega.model_params(), batch, inner_steps, first_order, kernels)
        objective = self.objective_for(inner_steps, kernels)
        route = batching == "vmap" and needs_norm_routing(omega, self)  # self: a user's subclass keeps the mode
        if batching == "vmap" and chunking is not None and chunking.active:
            return _chunked_vmap_backward(
                omega, batch, inner_steps, first_order, generator, objective, chunking, kernels, route
            )
        if batching == "vmap":
            return _vmap_backward(omega, batch, inner_steps, first_order, generator, objective, kernels, route)
        return _loop_backward(omega, batch, inner_steps, first_order, generator, objective)

    def task_batched_for(
        self, omega: MetaKnowledge, batch: TaskBatch, chunking: Chunking | None = None, kernels: str = "auto"
    ) -> bool:
        """Whether `accumulate` with ``batching="vmap"`` runs ``batch`` task-batched
        (`metalearn.task_batched`): the plain `Unrolled` mode only (a subclass may adapt otherwise),
        without chunks, and where `metalearn.task_batched.runs_task_batched` accepts ω and the batch."""
        if type(self) is not Unrolled or (chunking is not None and chunking.active):
            return False
        return runs_task_batched(omega, omega.model_params(), batch.train[0], self.meta_first_order(), kernels)

    def objective_for(self, inner_steps: int, kernels: str) -> Callable[..., tuple[Tensor, Tensor, Tensor]]:
        """One task's (val loss, val metric, inner losses) as `accumulate` maps it: `task_objective`
        over `adapt_task` (a subclass may score the task otherwise, e.g. `MultiStepLoss`)."""
        adapt_fn = with_kernels(self.adapt_task, kernels, f"{type(self).__name__}.adapt_task")
        return partial(task_objective, adapt_fn=adapt_fn)

    def meta_first_order(self) -> bool:
        """Whether the meta-gradient is first order (``self.first_order``; a schedule may say otherwise)."""
        return bool(getattr(self, "first_order", False))


@dataclass(frozen=True)
class Unrolled(ThroughInnerLoop):
    """Backpropagation through the unrolled inner loop (MAML); ``first_order`` is FOMAML."""

    first_order: bool = False
    name = "unrolled"

    def run_identity(self) -> None:
        """Nothing: the default mode keeps the run identity runs had before modes existed (first
        order is a training setting of its own there), so their checkpoints still resume."""
        return None


def _vmap_backward(
    omega: MetaKnowledge, batch: TaskBatch, inner_steps: int, first_order: bool, generator, objective,
    kernels: str = "auto", route_norms: bool = True,
) -> tuple[Tensor, Tensor, Tensor]:
    """The vmap path: every task in one batched computation, one backward over the mean val loss."""
    (x_tr, y_tr), (x_val, y_val) = batch.train, batch.val
    theta0, dims = vmap_theta0(omega, len(batch), generator, batch.train)
    val_losses, metrics, inner = map_tasks(
        objective, task_in_dims(dims), omega, theta0, x_tr, y_tr, x_val, y_val, inner_steps, first_order,
        batching="vmap", kernels=kernels, route_norms=route_norms,
    )
    check_losses(inner, val_losses, by_task=False)  # isfinite records no graph: nothing to detach
    val_losses.mean().backward()
    return val_losses, metrics, inner


def _chunked_vmap_backward(
    omega: MetaKnowledge,
    batch: TaskBatch,
    inner_steps: int,
    first_order: bool,
    generator,
    objective,
    chunking: Chunking,
    kernels: str = "auto",
    route_norms: bool = True,
) -> tuple[Tensor, Tensor, Tensor]:
    """The vmap path over chunks of tasks: each chunk's share of the mean val loss is backpropagated
    before the next chunk runs, so one chunk's graph is alive at a time.

    Every chunk's backward ends at the same leaves: ω's own parameters where θ0 is them (`PointInit`),
    and otherwise a detached copy of θ0 (the init's output) whose gradient gathers over the chunks
    and is carried through the init by one backward at the end, as the loop path does: the init's
    graph is used once, not once per chunk.
    """
    (x_tr, y_tr), (x_val, y_val) = batch.train, batch.val
    n = len(batch)
    theta0, dims = vmap_theta0(omega, n, generator, batch.train)
    leaves = {k: t if t.is_leaf else t.detach().requires_grad_() for k, t in theta0.items()}

    def backward_share(outputs: tuple[Tensor, ...], start: int) -> tuple[Tensor, ...]:
        val_losses, metrics, inner = outputs
        check_losses(inner.detach(), val_losses.detach(), by_task=False, task_offset=start)
        if val_losses.requires_grad:
            (val_losses.sum() / n).backward()
        return val_losses.detach(), metrics.detach(), inner.detach()

    val_losses, metrics, inner = map_chunks(
        objective, task_in_dims(dims), omega, leaves, x_tr, y_tr, x_val, y_val, inner_steps, first_order,
        chunking=chunking, after_chunk=backward_share, kernels=kernels, route_norms=route_norms,
    )
    carried = [k for k, t in theta0.items() if t is not leaves[k] and leaves[k].grad is not None]
    if carried:
        torch.autograd.backward([theta0[k] for k in carried], [leaves[k].grad for k in carried])
    return val_losses, metrics, inner


def _loop_backward(
    omega: MetaKnowledge, batch: TaskBatch, inner_steps: int, first_order: bool, generator, objective
) -> tuple[Tensor, Tensor, Tensor]:
    """The loop path: backpropagates task by task, so only one task's graph is alive at a time.

    With `PointInit`, θ0 of every task is the model's parameters themselves, and each task's
    backward accumulates straight into their ``.grad`` (no extra memory). Any other init is
    sampled once for the batch; each task starts from its own detached leaf copy of its θ0,
    whose gradient is stored in a ``[tasks, ...]`` cotangent, and one final backward carries
    all of them through the init: exact for any init, shared or sampled. The cotangents are
    allocated before the first task, so these long-lived buffers do not land between the
    short-lived graph tensors of a task (which fragments the heap and raises the peak RSS).
    """
    (x_tr, y_tr), (x_val, y_val) = batch.train, batch.val
    n = len(batch)
    point = type(omega.init) is PointInit and not omega.init.uses_train_data
    theta0 = omega.model_params() if point else omega.initial_params(n, generator, train=batch.train)
    cotangents = {} if point else {k: v.new_zeros(v.shape) for k, v in theta0.items() if v.requires_grad}
    got_grad: set[str] = set()

    def one_task(i: int, theta0_i: Params, *task: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        leaves = theta0_i if point else {k: v.detach().requires_grad_(v.requires_grad) for k, v in theta0_i.items()}
        val_loss, met, inner_i = objective(omega, leaves, *task, inner_steps, first_order)
        if val_loss.requires_grad:
            (val_loss / n).backward()
        for k, leaf in ({} if point else leaves).items():
            if leaf.grad is not None:
                cotangents[k][i] = leaf.grad
                got_grad.add(k)
        return val_loss.detach(), met, inner_i.detach()  # this task's graph goes before the next one's forward

    dims = dict.fromkeys(theta0) if point else dict.fromkeys(theta0, 0)
    val_losses, metrics, inner = map_tasks(
        one_task, (0, dims, 0, 0, 0, 0), range(n), theta0, x_tr, y_tr, x_val, y_val, batching="loop"
    )
    # checked once after the loop (not once per task): reports the same first task and step
    check_losses(inner, val_losses, by_task=True)
    keys = [k for k in cotangents if k in got_grad]
    if keys:
        torch.autograd.backward([theta0[k] for k in keys], [cotangents[k] for k in keys])
    return val_losses, metrics, inner
