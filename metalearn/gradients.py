"""Meta-gradient modes — kept as a re-export of `metalearn.modes` for compatibility.

The modes live one per file in `metalearn.modes` (see its docstring); the inner loops that
used to live here (`proximal_adapt`, `checkpointed_adapt_params`) are options of the one loop,
`metalearn.inner.inner_loop`, and stay here as thin wrappers of it.
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor

from metalearn.inner import Proximal, adapt_params, inner_loop
from metalearn.knowledge.meta_knowledge import MetaKnowledge
from metalearn.knowledge.parts import Params
from metalearn.modes import (
    MODE_NAMES,
    Checkpointed,
    Implicit,
    MetaGradientMode,
    Reptile,
    ThroughInnerLoop,
    Truncated,
    Unrolled,
    conjugate_gradient,
    resolve_mode,
)

__all__ = [
    "MODE_NAMES",
    "Checkpointed",
    "Implicit",
    "MetaGradientMode",
    "Reptile",
    "ThroughInnerLoop",
    "Truncated",
    "Unrolled",
    "checkpointed_adapt_params",
    "conjugate_gradient",
    "proximal_adapt",
    "resolve_mode",
]


def proximal_adapt(
    omega: MetaKnowledge,
    theta0: Mapping[str, Tensor],
    x: Tensor,
    y: Tensor,
    steps: int,
    lam: float,
    static: Mapping[str, Tensor] | None = None,
) -> tuple[Params, Tensor]:
    r"""`inner_loop` with no graph on iMAML's proximal objective
    :math:`L^{train}(\phi) + \frac{\lambda}{2}\lVert\phi-\theta_0\rVert^2`.

    ``theta0`` holds the adapted parameters only; the static ones come from ``static``, or from
    ω's model when ``static`` is None. Returns φ (every parameter, detached) and the objective
    before each step ``[steps]``.
    """
    if static is None:
        static = {n: p for n, p in omega.model_params().items() if n not in theta0}
    anchor = {n: t.detach() for n, t in theta0.items()}
    start = {**static, **anchor}
    return inner_loop(omega, start, x, y, steps, graph="none", regulariser=Proximal(lam, anchor))


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
    """`metalearn.inner.adapt_params` (second order) with every ``segment`` steps checkpointed:
    `inner_loop` with ``segment=``; first order is the plain first-order loop."""
    if first_order:
        return adapt_params(omega, theta0, x, y, steps, first_order=True)
    return inner_loop(omega, theta0, x, y, steps, segment=segment)
