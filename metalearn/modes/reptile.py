"""Reptile (Nichol, Achiam & Schulman, 2018, *On First-Order Meta-Learning Algorithms*)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from metalearn.inner import adapt_params
from metalearn.knowledge.meta_knowledge import MetaKnowledge, default_loss
from metalearn.mapping import check_losses, map_tasks, metric
from metalearn.modes.base import MetaGradientMode, add_grad, require_theta0_only
from metalearn.tasks.task import TaskBatch

__all__ = ["Reptile"]


@dataclass(frozen=True)
class Reptile(MetaGradientMode):
    """Reptile: ``θ0.grad = mean over tasks of (θ0 − φ_K)``.

    Adapts K steps without a graph, so any ``torch.optim`` outer optimizer follows it;
    ``InnerSGD(lr=ε)`` is Reptile's θ0 ← θ0 + ε(mean φ − θ0). It is not the gradient of any objective.
    φ_K adapts on each task's train half only (the val half is scored, for the statistics).
    Parameters that do not adapt (ANIL's body) get a zero gradient, as the definition gives.
    Gives a gradient to θ0 only, so ω must have no other meta-parameters (refused otherwise).
    Runs as a loop over tasks.
    """

    name = "reptile"

    def accumulate(
        self,
        omega: MetaKnowledge,
        batch: TaskBatch,
        inner_steps: int,
        batching: str,
        generator: torch.Generator | None,
        *,
        kernels: str = "auto",
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Adds Reptile's update direction to θ0's ``.grad``; see `MetaGradientMode.accumulate`."""
        require_theta0_only(omega, "reptile", allow_static=True)
        theta0 = omega.model_params()
        start = {k: t.detach() for k, t in theta0.items()}
        n = len(batch)

        def one_task(x_tr: Tensor, y_tr: Tensor, x_val: Tensor, y_val: Tensor) -> tuple[Tensor, Tensor, Tensor]:
            phi, losses = adapt_params(omega, start, x_tr, y_tr, inner_steps, first_order=True, kernels=kernels)
            phi = {k: t.detach() for k, t in phi.items()}
            with torch.no_grad():
                out = omega(phi, x_val)
                val_loss = default_loss(out, y_val)
            for k in theta0:
                add_grad(theta0[k], (start[k] - phi[k]) / n)
            return val_loss, metric(out, y_val), losses.detach()

        vals, scores, inners = map_tasks(one_task, (0, 0, 0, 0), *batch.train, *batch.val, batching="loop")
        check_losses(inners, vals, by_task=True)
        return vals, scores, inners
