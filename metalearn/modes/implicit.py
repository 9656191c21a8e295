r"""iMAML: the implicit meta-gradient.

iMAML (Rajeswaran, Finn, Kakade & Levine, 2019, *Meta-Learning
with Implicit Gradients*). The inner loop descends the proximal objective

.. math:: G(\phi) = \mathcal{L}^{train}(\phi) + \frac{\lambda}{2}\lVert\phi - \theta_0\rVert^2

without a graph, and the meta-gradient of the val loss at its (approximate) minimiser φ* is

.. math:: \nabla_{\theta_0} = \big(I + \tfrac{1}{\lambda + \delta} H\big)^{-1}
          \nabla_\phi \mathcal{L}^{val}(\phi^*), \qquad H = \nabla^2_\phi \mathcal{L}^{train}(\phi^*),

solved by conjugate gradient with Hessian-vector products. Memory does not grow with K. With
``damping`` δ = 0 it is exact when φ* is the exact minimiser of G and CG has converged. δ > 0
damps the solve (δ is added to the Hessian and the system rescaled so that a flat inner loss
passes ∇L^val through unchanged; δ → ∞ is the first-order gradient at φ*). In practice the inner
loop is short and φ* is not the minimiser, and the exact solve then shrinks the directions of
high curvature that matter most; the paper's reference code damps heavily (its
``(1 + ρ)v + Hv/(λ + 10)`` with ρ = 1 is δ = λ + 20 here, up to a factor 1/2).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar, cast

import torch
from torch import Tensor

from metalearn.inner import InnerProblem, Proximal, inner_loop
from metalearn.knowledge.meta_knowledge import MetaKnowledge, default_loss
from metalearn.knowledge.parts import Params
from metalearn.mapping import check_losses, map_tasks, metric
from metalearn.modes.base import MetaGradientMode, add_grad, require_theta0_only
from metalearn.tasks.task import TaskBatch

__all__ = ["Implicit", "conjugate_gradient"]


@dataclass(frozen=True)
class Implicit(MetaGradientMode):
    r"""iMAML's implicit meta-gradient (Rajeswaran et al., 2019); see the module docstring.

    Gives a gradient to θ0 only (refuses ω with other meta-parameters or parameters that do not
    adapt); runs as a loop over tasks; meta-test solves the proximal problem (`meta_test_problem`).

    Args:
        lam: λ, the strength of the proximal term tying φ to θ0 (larger: φ stays closer).
        cg_steps: conjugate-gradient iterations (fixed; stops early only at a residual
            below ``cg_tol`` times the right-hand side's norm).
        damping: δ, the system is ``(I + H/(λ + δ)) v = ∇L^val``: 0 is exact at the proximal
            minimiser; with a short inner loop (φ far from the minimiser) a large δ such as λ + 20
            (the reference implementation's setting) keeps the solve from amplifying directions
            where that minimiser's curvature is not there (docs/results.md measures both).
        cg_tol: relative residual at which CG stops early (0: only an exactly zero residual).
    """

    lam: float = 1.0
    cg_steps: int = 5
    damping: float = 0.0
    cg_tol: float = 0.0
    name = "implicit"
    #: warn when ‖∇G(φ)‖ exceeds this fraction of ‖∇L_train(φ)‖ + λ‖φ − θ0‖ (φ is then far from G's minimiser)
    unsolved_warning: ClassVar[float] = 0.1

    def __post_init__(self) -> None:
        if not self.lam > 0:
            raise ValueError(f"Implicit(lam=...) must be positive, got {self.lam}")
        if self.cg_steps < 1:
            raise ValueError(f"Implicit(cg_steps=...) must be at least 1, got {self.cg_steps}")
        if self.damping < 0 or self.cg_tol < 0:
            raise ValueError("Implicit(damping=..., cg_tol=...) must be non-negative")

    def meta_test_problem(self) -> InnerProblem:
        """iMAML trains θ0 for the proximal inner problem, so meta-test solves that one too."""
        return InnerProblem(proximal=self.lam)

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
        """Adds the mean implicit meta-gradient over ``batch`` to θ0's ``.grad``.

        Returns:
            (val losses ``[tasks]``, val scores ``[tasks]``, proximal inner objectives ``[tasks, steps]``).
        """
        require_theta0_only(omega, "implicit", allow_static=False)
        theta0 = omega.model_params()
        anchor = {n: theta0[n].detach() for n in omega.adapted_names}
        n = len(batch)

        def one_task(x_tr: Tensor, y_tr: Tensor, x_val: Tensor, y_val: Tensor) -> tuple[Tensor, ...]:
            proximal = Proximal(self.lam, anchor)
            phi, losses = inner_loop(omega, anchor, x_tr, y_tr, inner_steps, graph="none", regulariser=proximal,
                                     kernels=kernels)
            solved = self._implicit_solution(omega, phi, anchor, (x_tr, y_tr), (x_val, y_val))
            solution, val_loss, out, unsolved = solved
            for k, g in zip(omega.adapted_names, solution, strict=True):
                add_grad(theta0[k], g.detach() / n)
            return val_loss.detach(), metric(out, y_val), losses, torch.tensor(unsolved, dtype=torch.float64)

        vals, scores, inners, unsolved = map_tasks(one_task, (0, 0, 0, 0), *batch.train, *batch.val, batching="loop")
        self._warn_if_unsolved(max(unsolved.tolist(), default=0.0))
        check_losses(inners, vals, by_task=True)
        return vals, scores, inners

    def _implicit_solution(
        self,
        omega: MetaKnowledge,
        phi: Params,
        anchor: Params,
        train: tuple[Tensor, Tensor],
        val: tuple[Tensor, Tensor],
    ) -> tuple[list[Tensor], Tensor, Tensor, float]:
        """CG's solution of ``(I + H/(λ + δ)) v = ∇L_val(φ)`` at φ, the val loss and output there,
        and how far φ is from the proximal minimiser (`_unsolved_ratio`)."""
        names = omega.adapted_names
        curvature = self.lam + self.damping  # the system is (I + H/(λ + δ)) v = ∇L_val
        with torch.enable_grad():
            leaves = {k: t.detach().requires_grad_() for k, t in phi.items()}
            out = omega(leaves, val[0])
            val_loss = default_loss(out, val[1])
            flat = [leaves[k] for k in names]
            rhs = list(torch.autograd.grad(val_loss, flat, materialize_grads=True))
            train_loss = omega.inner_loss(leaves, *train)
            train_grads = torch.autograd.grad(train_loss, flat, create_graph=True, materialize_grads=True)
            unsolved = self._unsolved_ratio(train_grads, [leaves[k] - anchor[k] for k in names])

            def matvec(v: list[Tensor]) -> list[Tensor]:
                hv = _hessian_vector_product(train_grads, flat, v)
                return [vi + hvi / curvature for vi, hvi in zip(v, hv, strict=True)]

            solution = conjugate_gradient(matvec, rhs, self.cg_steps, self.cg_tol)
        return solution, val_loss, out, unsolved

    def _unsolved_ratio(self, train_grads: tuple[Tensor, ...], moved: list[Tensor]) -> float:
        """How far φ is from the minimiser of the proximal objective G, where the implicit
        meta-gradient is exact: ``‖∇L(φ) + λ(φ − θ0)‖`` over ``‖∇L(φ)‖ + λ‖φ − θ0‖``."""
        with torch.no_grad():
            # sum() of tensors is a tensor (never its start value 0: there is at least one parameter)
            grad = torch.sqrt(cast(Tensor, sum(g.detach().square().sum() for g in train_grads)))
            step = torch.sqrt(cast(Tensor, sum(m.detach().square().sum() for m in moved)))
            pairs = zip(train_grads, moved, strict=True)
            residual = torch.sqrt(
                cast(Tensor, sum((g.detach() + self.lam * m.detach()).square().sum() for g, m in pairs))
            )
            scale = float(grad + self.lam * step)
        return float(residual) / scale if scale > 0 else 0.0

    def _warn_if_unsolved(self, ratio: float) -> None:
        """One warning per meta-batch whose worst task is above `unsolved_warning`; the ratio is
        rounded to one decimal so that Python's warning filter shows each level once, not every step."""
        if ratio > self.unsolved_warning:
            warnings.warn(
                f"iMAML: the proximal inner problem is far from solved (‖∇G(φ)‖ up to {ratio:.1f} of "
                f"‖∇L(φ)‖ + λ‖φ − θ0‖ in a meta-batch), and the implicit meta-gradient is exact only at its "
                "minimiser. Take more inner steps, a larger stable inner step size or a larger λ, or damp the "
                "solve (Implicit(damping=...), e.g. λ + 20 as the paper's reference code does)",
                RuntimeWarning,
                stacklevel=3,
            )


def _hessian_vector_product(grads: tuple[Tensor, ...], params: list[Tensor], v: list[Tensor]) -> list[Tensor]:
    """H v, from the inner gradients ``grads`` (built with ``create_graph``) of ``params``; a
    gradient with no graph (the loss is linear in that parameter's direction) contributes nothing."""
    live = [i for i, g in enumerate(grads) if g.requires_grad]
    if not live:
        return [torch.zeros_like(p) for p in params]
    return list(
        torch.autograd.grad(
            [grads[i] for i in live],
            params,
            grad_outputs=[v[i] for i in live],
            retain_graph=True,
            materialize_grads=True,
        )
    )


def _dot(a: list[Tensor], b: list[Tensor]) -> Tensor:
    return sum((ai * bi).sum() for ai, bi in zip(a, b, strict=True))  # type: ignore[return-value]


def conjugate_gradient(
    matvec: Callable[[list[Tensor]], list[Tensor]], rhs: list[Tensor], iterations: int, tol: float = 0.0
) -> list[Tensor]:
    """Solves ``A x = rhs`` for symmetric positive definite ``A`` (given by ``matvec``), from x = 0.

    Runs ``iterations`` steps, or fewer once the residual norm is at most ``tol * ||rhs||``
    (or exactly zero). Vectors are lists of tensors (one per parameter).

    ``A`` built from a Hessian away from a minimum can be indefinite. CG then meets a direction
    ``p`` with ``pᵀAp ≤ 0``, where its step is undefined or goes the wrong way; it stops there and
    returns the iterate so far (truncated CG, as in Hessian-free optimisation), or ``rhs`` itself
    if that happens on the first step (the solution for ``A = I``).
    """
    x = [torch.zeros_like(b) for b in rhs]
    r = [b.clone() for b in rhs]
    p = [b.clone() for b in rhs]
    rs = _dot(r, r)
    stop = float(rs) * tol * tol
    for step in range(iterations):
        if float(rs) <= stop:
            break
        ap = matvec(p)
        curvature = _dot(p, ap)
        if float(curvature) <= 0:  # negative or zero curvature: truncate (NaN goes on, and is caught downstream)
            return x if step else [b.clone() for b in rhs]
        alpha = rs / curvature
        x = [xi + alpha * pi for xi, pi in zip(x, p, strict=True)]
        r = [ri - alpha * api for ri, api in zip(r, ap, strict=True)]
        rs_new = _dot(r, r)
        p = [ri + (rs_new / rs) * pi for ri, pi in zip(r, p, strict=True)]
        rs = rs_new
    return x
