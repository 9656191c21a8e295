"""Meta-gradient modes: how ∇ω of the meta-objective is obtained (or replaced), one class per file.

`metalearn.outer.meta_gradient` takes ``mode=`` one of these (or its name in `MODE_NAMES`):

* `Unrolled` (``"unrolled"``; ``"first_order"`` is ``Unrolled(first_order=True)``): backpropagation
  through the K inner steps (MAML; Finn et al., 2017). Memory grows with K. Loop or vmap.
* `Truncated` (``"truncated"`` is ``Truncated(k=1)``): backpropagation through the last ``k`` inner
  steps, the earlier ones first order. Loop or vmap.
* `Checkpointed` (``"checkpointed"``): the same exact second-order meta-gradient as `Unrolled`,
  with ``torch.utils.checkpoint`` around every ``segment`` inner steps. Loop.
* `Implicit` (``"implicit"``): iMAML's implicit meta-gradient by conjugate gradient; meta-test
  solves its proximal inner problem. Loop.
* `Reptile` (``"reptile"``): ``θ0.grad = mean(θ0 − φ_K)``. Loop.
* `MultiStepLoss` (``"multi_step"``): MAML++'s multi-step loss with annealed weights and
  derivative-order annealing (Antoniou et al., 2019), scheduled by the outer step. Loop or vmap.

`Implicit` and `Reptile` give a gradient to θ0 only, so they accept only an ω whose meta-parameters
are the model's own parameters (`PointInit`, no Meta-SGD step sizes, no learned loss, no
architecture parameters): any other meta-parameter would silently get no gradient, so it is
refused with an error.

A mode of your own subclasses `MetaGradientMode` (or `ThroughInnerLoop`, to change only how one
task's inner loop runs) and is passed as ``mode=`` like the built-ins (docs/extending.md).
"""

from __future__ import annotations

from metalearn.modes.base import MetaGradientMode
from metalearn.modes.checkpointed import Checkpointed
from metalearn.modes.implicit import Implicit, conjugate_gradient
from metalearn.modes.multi_step import MultiStepLoss, mode_at_outer_step, multi_step_weights
from metalearn.modes.reptile import Reptile
from metalearn.modes.truncated import Truncated
from metalearn.modes.unrolled import ThroughInnerLoop, Unrolled

__all__ = [
    "MODE_NAMES",
    "Checkpointed",
    "Implicit",
    "MetaGradientMode",
    "MultiStepLoss",
    "Reptile",
    "ThroughInnerLoop",
    "Truncated",
    "Unrolled",
    "conjugate_gradient",
    "mode_at_outer_step",
    "multi_step_weights",
    "resolve_mode",
]

MODE_NAMES = ("unrolled", "first_order", "truncated", "checkpointed", "implicit", "reptile", "multi_step")


def resolve_mode(mode: str | MetaGradientMode, first_order: bool = False) -> MetaGradientMode:
    """The mode object for ``mode`` (a name in `MODE_NAMES` or a `MetaGradientMode`), checked against ``first_order``.

    ``first_order=True`` (the older keyword) means ``Unrolled(first_order=True)``; it may be
    combined only with ``mode="unrolled"`` or ``"first_order"``.
    """
    if isinstance(mode, str):
        if mode not in MODE_NAMES:
            raise ValueError(f"mode must be one of {MODE_NAMES} or a metalearn.modes mode object, got {mode!r}")
        mode = {
            "unrolled": Unrolled(),
            "first_order": Unrolled(first_order=True),
            "truncated": Truncated(),
            "checkpointed": Checkpointed(),
            "implicit": Implicit(),
            "reptile": Reptile(),
            "multi_step": MultiStepLoss(),
        }[mode]
    if not isinstance(mode, MetaGradientMode):
        raise TypeError(
            f"mode must be a name in {MODE_NAMES} or a MetaGradientMode (Unrolled, Truncated, Checkpointed, "
            f"Implicit, Reptile or your own subclass); got {type(mode).__name__}"
        )
    if first_order:
        if not isinstance(mode, Unrolled):
            raise ValueError(
                f"first_order=True means mode='first_order' (FOMAML) and cannot be combined with mode={mode.name!r}; "
                "pass only one of them"
            )
        return Unrolled(first_order=True)
    return mode
