r"""Meta-gradient modes: how ∇ω of the meta-objective is obtained (or replaced).

`metalearn.outer.meta_gradient` takes ``mode=`` one of these (or its name):

* `Unrolled` (``"unrolled"``; ``"first_order"`` is ``Unrolled(first_order=True)``):
  backpropagation through the K inner steps (MAML; Finn et al., 2017). Memory grows with K.
* `Checkpointed` (``"checkpointed"``): the same exact second-order meta-gradient, with
  ``torch.utils.checkpoint`` (non-reentrant) around every ``segment`` inner steps. Only the
  θ_k at segment boundaries are kept; the graph inside a segment (activations and the
  double-backward graph of the inner gradient) is recomputed during the backward, so peak
  memory is one segment's graph plus K copies of θ, at the cost of about one more forward
  pass per inner step.
* `Implicit` (``"implicit"``): iMAML (Rajeswaran, Finn, Kakade & Levine, 2019, *Meta-Learning
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
* `Reptile` (``"reptile"``): Nichol, Achiam & Schulman (2018), *On First-Order Meta-Learning
  Algorithms*. Adapts K steps without a graph and sets ``θ0.grad = mean_i(θ0 − φ_K^{(i)})``, so
  any ``torch.optim`` outer optimizer follows it; ``SGD(lr=ε)`` is Reptile's
  θ0 ← θ0 + ε(mean φ − θ0). It is not the gradient of any objective.

`Implicit` and `Reptile` give a gradient to θ0 only, so they accept only an ω whose meta-parameters
are the model's own parameters (`PointInit`, no Meta-SGD step sizes, no learned loss, no
architecture parameters): any other meta-parameter would silently get no gradient, so it is
refused with an error. Both run as a loop over tasks.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from metalearn.inner import adapt_params, inner_step
from metalearn.knowledge.builtins import PointInit
from metalearn.knowledge.meta_knowledge import MetaKnowledge, default_loss
from metalearn.knowledge.parts import Params
from metalearn.tasks.task import TaskBatch

__all__ = [
    "MODE_NAMES",
    "Checkpointed",
    "Implicit",
    "MetaGradientMode",
    "Reptile",
    "Unrolled",
    "checkpointed_adapt_params",
    "conjugate_gradient",
    "proximal_adapt",
    "resolve_mode",
]

MODE_NAMES = ("unrolled", "first_order", "checkpointed", "implicit", "reptile")
Score = Callable[[Tensor, Tensor], Tensor]


class MetaGradientMode:
    """Base of the modes; ``config()`` is the JSON-serialisable identity stored with a run."""

    name: str = ""

    def config(self) -> dict[str, Any]:
        return {"name": self.name, **asdict(self)}  # type: ignore[call-overload]


@dataclass(frozen=True)
class Unrolled(MetaGradientMode):
    """Backpropagation through the unrolled inner loop (MAML); ``first_order`` is FOMAML."""

    first_order: bool = False
    name = "unrolled"


@dataclass(frozen=True)
class Checkpointed(MetaGradientMode):
    """Exact second-order meta-gradient with gradient checkpointing of every ``segment`` inner steps.

    Args:
        segment: inner steps per checkpointed segment (1: keep only θ_k between steps).
    """

    segment: int = 1
    name = "checkpointed"

    def __post_init__(self) -> None:
        if self.segment < 1:
            raise ValueError(f"Checkpointed(segment=...) must be at least 1, got {self.segment}")


@dataclass(frozen=True)
class Implicit(MetaGradientMode):
    r"""iMAML's implicit meta-gradient (Rajeswaran et al., 2019); see the module docstring.

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

    def accumulate(
        self, omega: MetaKnowledge, batch: TaskBatch, steps: int, score: Score
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Adds the mean implicit meta-gradient over ``batch`` to θ0's ``.grad``.

        Returns:
            (val losses ``[tasks]``, val scores ``[tasks]``, proximal inner objectives ``[tasks, steps]``).
        """
        _require_theta0_only(omega, "implicit", allow_static=False)
        theta0 = omega.model_params()
        names = omega.adapted_names
        anchor = {n: theta0[n].detach() for n in names}
        (x_tr, y_tr), (x_val, y_val) = batch.train, batch.val
        n = len(batch)
        curvature = self.lam + self.damping  # the system is (I + H/(λ + δ)) v = ∇L_val
        vals, scores, inners, unsolved = [], [], [], []
        for i in range(n):
            phi, losses = proximal_adapt(omega, anchor, x_tr[i], y_tr[i], steps, self.lam)
            with torch.enable_grad():
                leaves = {k: t.detach().requires_grad_() for k, t in phi.items()}
                out = omega(leaves, x_val[i])
                val_loss = default_loss(out, y_val[i])
                flat = [leaves[k] for k in names]
                rhs = list(torch.autograd.grad(val_loss, flat, materialize_grads=True))
                train_loss = omega.inner_loss(leaves, x_tr[i], y_tr[i])
                train_grads = torch.autograd.grad(train_loss, flat, create_graph=True, materialize_grads=True)
                unsolved.append(self._unsolved_ratio(train_grads, [leaves[k] - anchor[k] for k in names]))

                def matvec(v: list[Tensor], flat=flat, train_grads=train_grads) -> list[Tensor]:
                    hv = _hessian_vector_product(train_grads, flat, v)
                    return [vi + hvi / curvature for vi, hvi in zip(v, hv, strict=True)]

                solution = conjugate_gradient(matvec, rhs, self.cg_steps, self.cg_tol)
            for k, g in zip(names, solution, strict=True):
                _add_grad(theta0[k], g.detach() / n)
            vals.append(val_loss.detach())
            scores.append(score(out, y_val[i]))
            inners.append(losses)
            del leaves, train_grads, out, val_loss
        self._warn_if_unsolved(max(unsolved, default=0.0))
        return torch.stack(vals), torch.stack(scores), torch.stack(inners)

    def _unsolved_ratio(self, train_grads: tuple[Tensor, ...], moved: list[Tensor]) -> float:
        """How far φ is from the minimiser of the proximal objective G, where the implicit
        meta-gradient is exact: ``‖∇L(φ) + λ(φ − θ0)‖`` over ``‖∇L(φ)‖ + λ‖φ − θ0‖``."""
        with torch.no_grad():
            grad = torch.sqrt(sum(g.detach().square().sum() for g in train_grads))
            step = torch.sqrt(sum(m.detach().square().sum() for m in moved))
            pairs = zip(train_grads, moved, strict=True)
            residual = torch.sqrt(sum((g.detach() + self.lam * m.detach()).square().sum() for g, m in pairs))
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


@dataclass(frozen=True)
class Reptile(MetaGradientMode):
    """Reptile (Nichol et al., 2018): ``θ0.grad = mean over tasks of (θ0 − φ_K)``; see the module docstring.

    φ_K adapts on each task's train half only (the val half is scored, for the statistics).
    Parameters that do not adapt (ANIL's body) get a zero gradient, as the definition gives.
    """

    name = "reptile"

    def accumulate(
        self, omega: MetaKnowledge, batch: TaskBatch, steps: int, score: Score
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Adds Reptile's update direction to θ0's ``.grad``; returns what `Implicit.accumulate` does."""
        _require_theta0_only(omega, "reptile", allow_static=True)
        theta0 = omega.model_params()
        start = {k: t.detach() for k, t in theta0.items()}
        (x_tr, y_tr), (x_val, y_val) = batch.train, batch.val
        n = len(batch)
        vals, scores, inners = [], [], []
        for i in range(n):
            phi, losses = adapt_params(omega, start, x_tr[i], y_tr[i], steps, first_order=True)
            phi = {k: t.detach() for k, t in phi.items()}
            with torch.no_grad():
                out = omega(phi, x_val[i])
                vals.append(default_loss(out, y_val[i]))
            scores.append(score(out, y_val[i]))
            inners.append(losses.detach())
            for k in theta0:
                _add_grad(theta0[k], (start[k] - phi[k]) / n)
        return torch.stack(vals), torch.stack(scores), torch.stack(inners)


def resolve_mode(mode: str | MetaGradientMode, first_order: bool = False) -> MetaGradientMode:
    """The mode object for ``mode`` (a name in `MODE_NAMES` or a mode), checked against ``first_order``.

    ``first_order=True`` (the older keyword) means ``Unrolled(first_order=True)``; it may be
    combined only with ``mode="unrolled"`` or ``"first_order"``.
    """
    if isinstance(mode, str):
        if mode not in MODE_NAMES:
            raise ValueError(f"mode must be one of {MODE_NAMES} or a metalearn.gradients mode object, got {mode!r}")
        mode = {
            "unrolled": Unrolled(),
            "first_order": Unrolled(first_order=True),
            "checkpointed": Checkpointed(),
            "implicit": Implicit(),
            "reptile": Reptile(),
        }[mode]
    if not isinstance(mode, (Unrolled, Checkpointed, Implicit, Reptile)):
        raise TypeError(
            f"mode must be a name in {MODE_NAMES} or one of Unrolled, Checkpointed, Implicit, Reptile; "
            f"got {type(mode).__name__}"
        )
    if first_order:
        if not isinstance(mode, Unrolled):
            raise ValueError(
                f"first_order=True means mode='first_order' (FOMAML) and cannot be combined with mode={mode.name!r}; "
                "pass only one of them"
            )
        return Unrolled(first_order=True)
    return mode


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


def _add_grad(p: Tensor, g: Tensor) -> None:
    if p.grad is None:
        p.grad = g.clone()
    else:
        p.grad.add_(g)


def _require_theta0_only(omega: MetaKnowledge, mode: str, allow_static: bool) -> None:
    """Refuses an ω with meta-parameters other than θ0 (they would silently get no gradient)."""
    if type(omega.init) is not PointInit:
        raise ValueError(
            f"mode={mode!r} gives a gradient to θ0 = the model's parameters only, so it needs ω built with "
            f"PointInit (MAML's init), not {type(omega.init).__name__}; use mode='unrolled' for other inits"
        )
    model = {id(p) for p in omega.model_params().values()}
    others = [name for name, p in omega.named_parameters() if id(p) not in model]
    if others:
        raise ValueError(
            f"mode={mode!r} gives a gradient to θ0 only, but ω has other meta-parameters that would get none: "
            f"{others[:5]}{' ...' if len(others) > 5 else ''} (e.g. Meta-SGD step sizes, a learned loss). "
            "Use a parameter-free inner optimizer such as SGD(lr), or mode='unrolled'"
        )
    if not allow_static and omega.static_names:
        raise ValueError(
            f"mode={mode!r} differentiates only the adapted parameters, but {omega.static_names[:5]} do not adapt "
            "(AdaptOnly) and would get no meta-gradient; adapt every parameter (AdaptAll) or use mode='unrolled'"
        )


def proximal_adapt(
    omega: MetaKnowledge,
    theta0: Mapping[str, Tensor],
    x: Tensor,
    y: Tensor,
    steps: int,
    lam: float,
    static: Mapping[str, Tensor] | None = None,
) -> tuple[Params, Tensor]:
    r"""K steps of ω's inner optimizer on iMAML's proximal objective
    :math:`G(\phi) = L^{train}(\phi) + \frac{\lambda}{2}\lVert\phi-\theta_0\rVert^2`.

    No graph is kept (memory independent of ``steps``). ``theta0`` holds the adapted
    parameters only (detached); the returned φ holds every parameter of the model: the static
    ones from ``static`` (detached), or from ω's model when ``static`` is None. Returns φ and G
    before each step ``[steps]``.
    """
    if static is None:
        static = {n: p for n, p in omega.model_params().items() if n not in theta0}
    static = {n: p.detach() for n, p in static.items()}
    fast = dict(theta0)
    state = omega.optimizer.init_state(fast)
    losses = []
    for k in range(steps):
        with torch.enable_grad():
            leaves = {n: t.detach().requires_grad_() for n, t in fast.items()}
            loss = omega.inner_loss({**static, **leaves}, x, y)
            prox = sum((leaves[n] - theta0[n]).square().sum() for n in leaves)
            objective = loss + 0.5 * lam * prox
            grads = torch.autograd.grad(objective, list(leaves.values()), materialize_grads=True)
        with torch.no_grad():
            fast, state = omega.optimizer.step(
                {n: t.detach() for n, t in leaves.items()}, dict(zip(leaves, grads, strict=True)), state, k
            )
        losses.append(objective.detach())
    losses_t = torch.stack(losses) if losses else x.new_zeros(0)
    return {**static, **{n: t.detach() for n, t in fast.items()}}, losses_t


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


def checkpointed_adapt_params(
    omega: MetaKnowledge,
    theta0: Mapping[str, Tensor],
    x: Tensor,
    y: Tensor,
    steps: int,
    first_order: bool = False,
    *,
    segment: int = 1,
) -> tuple[Params, Tensor]:
    """`metalearn.inner.adapt_params` (second order) with every ``segment`` steps checkpointed.

    Same θK and, after backward, the same meta-gradient; the segment's graph is recomputed in
    the backward instead of being stored. First order, grad mode off, or θ0 not requiring grad:
    plain `adapt_params` (nothing to checkpoint). Not for use under ``torch.func`` transforms.
    """
    fast = {n: theta0[n] for n in omega.adapted_names}
    if first_order or not torch.is_grad_enabled() or not all(t.requires_grad for t in fast.values()):
        return adapt_params(omega, theta0, x, y, steps, first_order)
    static = {n: theta0[n] for n in omega.static_names}
    names = list(fast)
    state = omega.optimizer.init_state(fast)
    state_keys = list(state)

    def run_segment(k0: int, k1: int, *tensors: Tensor) -> tuple[Tensor, ...]:
        f = dict(zip(names, tensors[: len(names)], strict=True))
        s = dict(zip(state_keys, tensors[len(names) :], strict=True))
        seg_losses = []
        for k in range(k0, k1):
            f, s, loss = inner_step(omega, static, f, s, x, y, k, plain_autograd=True)
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
