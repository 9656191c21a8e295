"""The exact second-order meta-gradient with gradient checkpointing of the inner loop."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from metalearn.inner import inner_loop
from metalearn.knowledge.meta_knowledge import MetaKnowledge
from metalearn.knowledge.parts import Params
from metalearn.modes.unrolled import ThroughInnerLoop

__all__ = ["Checkpointed"]


@dataclass(frozen=True)
class Checkpointed(ThroughInnerLoop):
    """Exact second-order meta-gradient with gradient checkpointing of every ``segment`` inner steps.

    ``torch.utils.checkpoint`` (non-reentrant) wraps every ``segment`` steps: only the θ_k at
    segment boundaries are kept; the graph inside a segment (activations and the double-backward
    graph of the inner gradient) is recomputed during the backward, so peak memory is one
    segment's graph plus K copies of θ, at the cost of about one more forward pass per inner step.
    Runs as a loop over tasks (checkpointing does not compose with ``torch.func`` transforms).

    Args:
        segment: inner steps per checkpointed segment (1: keep only θ_k between steps).
    """

    segment: int = 1
    name = "checkpointed"
    batchings: ClassVar[tuple[str, ...]] = ("loop",)

    def __post_init__(self) -> None:
        if self.segment < 1:
            raise ValueError(f"Checkpointed(segment=...) must be at least 1, got {self.segment}")

    def adapt_task(
        self, omega: MetaKnowledge, theta0: Params, x: Tensor, y: Tensor, inner_steps: int, first_order: bool,
        *, kernels: str = "auto",
    ) -> tuple[Params, Tensor]:
        return inner_loop(omega, theta0, x, y, inner_steps, segment=self.segment, kernels=kernels)
