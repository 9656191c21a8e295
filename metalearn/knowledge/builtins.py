"""Built-in parts: point init (MAML), SGD, Meta-SGD step sizes, adapt-all and adapt-some (ANIL)."""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from metalearn.knowledge.parts import AdaptPart, InitPart, Params
from metalearn.knowledge.rules import Learned, _ScaleByLearningRate

__all__ = ["AdaptAll", "AdaptExcept", "AdaptOnly", "InnerSGD", "MetaSGD", "PointInit"]


class PointInit(InitPart):
    """θ0 is the model's own parameters, one point shared by every task (MAML; Finn et al., 2017)."""

    native_norm_free = True  # calls no fused norm itself: `metalearn.exact_norms.norm_free`

    def initial_params(
        self, model_params: Mapping[str, Tensor], n_tasks: int, generator: torch.Generator | None
    ) -> Params:
        return {name: p.expand(n_tasks, *p.shape) for name, p in model_params.items()}


class InnerSGD(_ScaleByLearningRate):
    r"""Plain gradient descent with a fixed step size: :math:`\theta \leftarrow \theta - \alpha \nabla\theta`.

    The rule ``scale_by_learning_rate(lr)``: its update is ``-lr * g``.

    Args:
        lr: the inner step size α (not learned).
    """

    native_norm_free = True  # calls no fused norm itself: `metalearn.exact_norms.norm_free`
    elementwise = True  # updates each entry from that entry alone: `metalearn.task_batched.elementwise`

    def __init__(self, lr: float) -> None:
        if not lr > 0:
            raise ValueError(f"the inner step size must be positive, got lr={lr}")
        super().__init__(lr=float(lr))

    @property
    def lr(self) -> float:
        """The step size α."""
        return self.fixed_values["lr"]


class MetaSGD(_ScaleByLearningRate):
    r"""Learned per-parameter step sizes (Meta-SGD; Li et al., 2017).

    :math:`\theta \leftarrow \theta - \alpha \odot \nabla\theta`, where α has the shape of θ and
    is a meta-parameter. Step sizes are not constrained to be positive, as in the paper. The
    composition ``learned(scale_by_learning_rate(init_lr), "lr", per="entry", constraint="real")``;
    α is stored in ``lrs`` (one entry per adapted parameter, keyed by `param_key`).

    Args:
        init_lr: initial value of every entry of α (``lr=`` is accepted as well).
    """

    native_norm_free = True  # calls no fused norm itself: `metalearn.exact_norms.norm_free`
    elementwise = True  # updates each entry from that entry alone: `metalearn.task_batched.elementwise`

    def __init__(self, init_lr: float | None = None, *, lr: float | None = None) -> None:
        if (init_lr is None) == (lr is None):
            raise TypeError(f"MetaSGD takes the initial step size once, as init_lr or lr; got {init_lr=}, {lr=}")
        value = float(init_lr if init_lr is not None else lr)  # type: ignore[arg-type]
        super().__init__(lr=Learned(value, per="entry", constraint="real"))
        self.init_lr = value

    def extra_repr(self) -> str:
        return f"init_lr={self.init_lr}"


class AdaptAll(AdaptPart):
    """Every parameter adapts (MAML, Meta-SGD)."""

    native_norm_free = True  # calls no fused norm itself: `metalearn.exact_norms.norm_free`

    def select(self, names: list[str]) -> list[str]:
        return list(names)


class AdaptOnly(AdaptPart):
    """Only the parameters whose names match one of ``patterns`` adapt.

    ``AdaptOnly("head.*")`` is ANIL (Raghu et al., 2020): the body is meta-learned and
    frozen in the inner loop, only the head adapts. Patterns are shell-style (``fnmatch``);
    a bare prefix such as ``"head"`` also matches ``"head.weight"``.

    Args:
        patterns: one or more name patterns.
    """

    native_norm_free = True  # calls no fused norm itself: `metalearn.exact_norms.norm_free`

    def __init__(self, *patterns: str | Sequence[str]) -> None:
        super().__init__()
        flat: list[str] = []
        for p in patterns:
            flat.extend([p] if isinstance(p, str) else list(p))
        if not flat:
            raise ValueError('AdaptOnly needs at least one name pattern, e.g. AdaptOnly("head.*")')
        self.patterns = tuple(flat)

    def _matches(self, name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, p) or name.startswith(p + ".") for p in self.patterns)

    def select(self, names: list[str]) -> list[str]:
        chosen = [n for n in names if self._matches(n)]
        if not chosen:
            raise ValueError(
                f"AdaptOnly{self.patterns} matches none of the model's parameters {names}; "
                "pass patterns such as 'head.*' that name the parameters to adapt"
            )
        return chosen

    def extra_repr(self) -> str:
        return ", ".join(repr(p) for p in self.patterns)


class AdaptExcept(AdaptOnly):
    """Every parameter adapts except those whose names match one of ``patterns``.

    ``AdaptExcept("head")`` is BOIL (Oh et al., 2021): the body adapts in the inner loop, the head
    is meta-learned and frozen there (an inner step size of 0 for the head). Patterns as `AdaptOnly`.

    Args:
        patterns: one or more name patterns of the parameters that do *not* adapt.
    """

    native_norm_free = True  # calls no fused norm itself: `metalearn.exact_norms.norm_free`

    def select(self, names: list[str]) -> list[str]:
        if not any(self._matches(n) for n in names):
            raise ValueError(
                f"AdaptExcept{self.patterns} matches none of the model's parameters {names}; "
                "pass patterns such as 'head' that name the parameters to freeze"
            )
        chosen = [n for n in names if not self._matches(n)]
        if not chosen:
            raise ValueError(f"AdaptExcept{self.patterns} freezes every parameter of {names}: nothing would adapt")
        return chosen
