r"""MAML++'s multi-step loss and derivative-order annealing (Antoniou et al., 2019, "How to train your MAML").

The multi-step loss scores θ after *every* inner step on the val half and meta-trains on

.. math::

    \mathcal{L}_{meta} = \sum_{i=1}^{K} w_i(e)\, \mathcal{L}(D^{val}; \theta_i)

with weights that start uniform, :math:`w_i(0) = 1/K`, and move towards the last step linearly with
the epoch e (`multi_step_weights`); from epoch ``anneal_epochs`` on only the last step's loss is
used, which is MAML's objective. The weights *multiply* the per-step losses.

Derivative-order annealing: first-order meta-gradients for the first ``first_order_epochs`` epochs,
second order afterwards (the paper's "DA").

The epoch is ``outer_step // steps_per_epoch``. `metalearn.train.meta_train` tells the mode the
outer step before each meta-step (`MultiStepLoss.at_outer_step`); a script that calls
`metalearn.meta_step` itself passes ``mode=mode.at_outer_step(step)``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from functools import partial
from typing import Any

from torch import Tensor

from metalearn.inner import adapt_params, inner_loop
from metalearn.knowledge.meta_knowledge import MetaKnowledge, default_loss
from metalearn.knowledge.parts import Params
from metalearn.mapping import metric, task_objective
from metalearn.modes.unrolled import ThroughInnerLoop

__all__ = ["MultiStepLoss", "mode_at_outer_step", "multi_step_objective", "multi_step_weights"]


def _check_int(who: str, name: str, value: object, least: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ValueError(f"{who}: {name} must be an int >= {least}, got {value!r}")


def multi_step_weights(inner_steps: int, epoch: int, anneal_epochs: int) -> list[float] | None:
    r"""The per-step loss weights of MAML++ at ``epoch``, or None once only the last step counts.

    As the paper's official code (``get_per_step_loss_importance_vector``): with K steps and
    A = ``anneal_epochs``, a decay of :math:`r = 1 / (K A)` per epoch and a floor
    :math:`m = 0.03 / K`,

    .. math::

        w_i(e) = \max(1/K - e\,r,\ m) \quad (i < K), \qquad
        w_K(e) = \min(1/K + e\,(K - 1)\,r,\ 1 - (K - 1)\,m)

    for e < A (the weights sum to 1 while the floor does not bind); None for e ≥ A (the plain
    last-step loss, MAML's).

    Args:
        inner_steps: K (≥ 1).
        epoch: e (≥ 0).
        anneal_epochs: A (≥ 0; 0 never uses the multi-step loss).

    Raises:
        ValueError: a negative or non-int argument, or K < 1.
    """
    _check_int("multi_step_weights", "inner_steps", inner_steps, 1)
    _check_int("multi_step_weights", "epoch", epoch, 0)
    _check_int("multi_step_weights", "anneal_epochs", anneal_epochs, 0)
    if epoch >= anneal_epochs:
        return None
    k = inner_steps
    decay = 1.0 / k / anneal_epochs
    floor = 0.03 / k
    weights = [max(1.0 / k - epoch * decay, floor) for _ in range(k - 1)]
    weights.append(min(1.0 / k + epoch * (k - 1) * decay, 1.0 - (k - 1) * floor))
    return weights


def multi_step_objective(
    omega: MetaKnowledge,
    theta0: Params,
    x_train: Tensor,
    y_train: Tensor,
    x_val: Tensor,
    y_val: Tensor,
    inner_steps: int,
    first_order: bool,
    weights: list[float] | None = None,
    kernels: str = "auto",
) -> tuple[Tensor, Tensor, Tensor]:
    r"""One task: :math:`\sum_i w_i \mathcal{L}(D^{val}; \theta_i)`, the last step's val metric, the inner losses.

    ``weights`` None (or no inner step) is `metalearn.mapping.task_objective` exactly; ``kernels`` is
    as in `metalearn.inner.inner_loop`. Pure; vmap-safe.
    """
    if weights is None or inner_steps == 0:
        return task_objective(
            omega, theta0, x_train, y_train, x_val, y_val, inner_steps, first_order,
            adapt_fn=partial(adapt_params, kernels=kernels),
        )
    if len(weights) != inner_steps:
        raise ValueError(f"{len(weights)} multi-step weights for {inner_steps} inner steps; give one per step")
    outputs: list[Tensor] = []

    def score(k: int, params: Params) -> None:
        outputs.append(omega(params, x_val))

    graph = "first_order" if first_order else "full"
    _, losses = inner_loop(
        omega, theta0, x_train, y_train, inner_steps, graph=graph, after_step=score, kernels=kernels
    )
    total = sum(w * default_loss(out, y_val) for w, out in zip(weights, outputs, strict=True))
    return total, metric(outputs[-1], y_val), losses  # type: ignore[return-value]


@dataclass(frozen=True)
class MultiStepLoss(ThroughInnerLoop):
    """MAML++'s multi-step loss with annealed weights, and derivative-order annealing, as a mode.

    Backpropagation through the inner loop (like `metalearn.modes.Unrolled`) of the weighted sum
    of the val losses after every inner step, with `multi_step_weights` at the current epoch.
    The val loss it reports is that weighted sum (the last step's loss from ``anneal_epochs`` on).

    Each part works on its own: ``first_order_epochs=0`` is the multi-step loss alone;
    ``anneal_epochs=0`` is derivative-order annealing alone (from epoch ``first_order_epochs`` on,
    exactly `Unrolled`'s meta-gradient). Defaults are the paper's (15 annealing epochs of 500 outer
    steps); its ``first_order_to_second_order_epoch = E`` is ``first_order_epochs = E + 1``.

    Args:
        anneal_epochs: epochs A of the multi-step loss (`multi_step_weights`).
        steps_per_epoch: outer steps per epoch.
        first_order_epochs: the first epochs whose meta-gradient is first order.
        first_order: first order throughout (FOMAML with the multi-step loss).
        outer_step: the outer step the weights and order are for; set by `at_outer_step`,
            not part of the run identity.
    """

    anneal_epochs: int = 15
    steps_per_epoch: int = 500
    first_order_epochs: int = 0
    first_order: bool = False
    outer_step: int = 0
    name = "multi_step"

    def __post_init__(self) -> None:
        for field_name in ("anneal_epochs", "first_order_epochs", "outer_step"):
            _check_int("MultiStepLoss", field_name, getattr(self, field_name), 0)
        _check_int("MultiStepLoss", "steps_per_epoch", self.steps_per_epoch, 1)

    @property
    def epoch(self) -> int:
        """The epoch of `outer_step`."""
        return self.outer_step // self.steps_per_epoch

    def at_outer_step(self, step: int) -> MultiStepLoss:
        """This mode for outer step ``step`` (a copy; the mode itself never changes)."""
        return replace(self, outer_step=int(step))

    def config(self) -> dict[str, Any]:
        """The options without `outer_step`, which changes every step and is no part of a run's identity."""
        options = asdict(self)
        options.pop("outer_step")
        return {"name": self.name, **options}

    def weights(self, inner_steps: int) -> list[float] | None:
        """The per-step weights at the current epoch (None: the last step's loss only)."""
        if inner_steps == 0:
            return None
        return multi_step_weights(inner_steps, self.epoch, self.anneal_epochs)

    def uses_first_order(self) -> bool:
        """Whether the meta-gradient at the current epoch is first order."""
        return self.first_order or self.epoch < self.first_order_epochs

    def meta_first_order(self) -> bool:
        """`uses_first_order`: the order `accumulate` (`ThroughInnerLoop`'s) differentiates with."""
        return self.uses_first_order()

    def objective_for(self, inner_steps: int, kernels: str) -> Callable[..., tuple[Tensor, Tensor, Tensor]]:
        """`multi_step_objective` with the current epoch's weights: what `accumulate` backpropagates."""
        return partial(multi_step_objective, weights=self.weights(inner_steps), kernels=kernels)


def mode_at_outer_step(mode: Any, step: int) -> Any:
    """``mode.at_outer_step(step)`` for a mode with a schedule (`MultiStepLoss`), else ``mode`` itself."""
    at = getattr(mode, "at_outer_step", None)
    return at(step) if callable(at) else mode
