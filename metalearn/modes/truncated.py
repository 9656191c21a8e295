"""Truncated backpropagation: second order through the last ``k`` inner steps only."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from metalearn.inner import inner_loop
from metalearn.knowledge.meta_knowledge import MetaKnowledge
from metalearn.knowledge.parts import Params
from metalearn.modes.unrolled import ThroughInnerLoop

__all__ = ["Truncated"]


@dataclass(frozen=True)
class Truncated(ThroughInnerLoop):
    r"""Backpropagation through the last ``k`` of the K inner steps; the first K − k are first order.

    In the first K − k steps the inner gradient is a constant (as in FOMAML), so the meta-gradient
    flows through those steps' updates but not through their Hessians; the last ``k`` steps are
    differentiated fully. ``k >= K`` is `Unrolled` exactly and ``k = 0`` is
    ``Unrolled(first_order=True)`` exactly. With plain SGD, the meta-gradient w.r.t. θ0 is the
    gradient of the val loss after the last ``k`` steps w.r.t. their start θ_{K−k}. Memory of the
    double-backward graph grows with ``k`` instead of K. Runs under the loop or vmap.

    Args:
        k: number of final inner steps differentiated to second order (at least 0).
    """

    k: int = 1
    name = "truncated"

    def __post_init__(self) -> None:
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 0:
            raise ValueError(
                f"Truncated(k=...) must be an int of at least 0 (the final inner steps differentiated to second "
                f"order; 0 is first order), got {self.k!r}"
            )

    def adapt_task(
        self, omega: MetaKnowledge, theta0: Params, x: Tensor, y: Tensor, inner_steps: int, first_order: bool,
        *, kernels: str = "auto",
    ) -> tuple[Params, Tensor]:
        first_order_steps = max(inner_steps - self.k, 0)
        return inner_loop(omega, theta0, x, y, inner_steps, first_order_steps=first_order_steps, kernels=kernels)
