r"""`SoftChoice`: a learned choice among named candidates, relaxed to a softmax (DARTS).

.. math:: w = \mathrm{softmax}(\ell / T)

One module for every such choice of ω: the inner update rule of `OptimizerMixture` (one
choice) and the op of each edge of a searchable model (`ArchitectureWeights`, one choice per
row). It holds the logits ℓ (meta-parameters, zero at the start: uniform weights), the
temperature T (`AnnealedTemperature`: set, or annealed with the outer step) and a fixed
choice (meta-test: only the chosen candidate runs). T and the fixed choice are saved in the
state dict (buffers ``temperature_saved`` and ``fixed_index``); the Python mirror of the
fixed choice is what a forward reads (no device sync) and is refreshed after
``load_state_dict``.

Shapes: ``rows=None`` is a single choice (``logits`` ``[n]``, ``fixed_index`` a scalar, and
`chosen` / `fix` / `fixed` speak of one name); ``rows=r`` is ``r`` independent choices over the
same candidates (``logits`` ``[r, n]``, ``fixed_index`` ``[r]``, lists of names).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metalearn.knowledge.temperature import AnnealedTemperature

__all__ = ["Choice", "SoftChoice"]


class Choice(NamedTuple):
    """One choice of a `SoftChoice`: the candidate in use and every candidate's weight."""

    name: str
    weights: dict[str, float]


def check_candidate_names(candidates: Sequence[str], who: str) -> tuple[str, ...]:
    """``candidates`` as a tuple of distinct, non-empty names without ``'.'`` (they become keys)."""
    if isinstance(candidates, str):
        raise TypeError(f"{who} candidates must be a sequence of names, e.g. ({candidates!r},), not a string")
    names = tuple(candidates)
    if not names:
        raise ValueError(f"{who} needs at least one candidate")
    if len(set(names)) != len(names):
        raise ValueError(f"{who} candidates must be distinct, got {names}")
    bad = [n for n in names if not isinstance(n, str) or not n or "." in n]
    if bad:
        raise ValueError(f"{who} candidate names must be non-empty strings without '.', got {bad}")
    return names


class SoftChoice(AnnealedTemperature):
    r"""Learned logits over named candidates: softmax weights, an argmax choice, a fixed choice.

    Args:
        candidates: the candidates' names, in the order of the logits' last dimension.
        rows: ``None`` for one choice (logits ``[n]``), or the number of independent choices
            (logits ``[rows, n]``).
        temperature: initial T (> 0).
        anneal: optional schedule ``outer_step -> T``.
        never_chosen: candidates the argmax (`chosen_indices`, `chosen`, ``fix()``) skips;
            an explicit ``fix(...)`` may still name them. At least one candidate must remain.

    Example:
        >>> choice = SoftChoice(["sgd", "adam"])
        >>> choice.probabilities()  # tensor([0.5000, 0.5000], grad_fn=...)  # doctest: +SKIP
        >>> choice.fix("adam"); choice.weights()  # tensor([0., 1.])  # doctest: +SKIP
    """

    native_norm_free = True  # calls no fused norm itself: `metalearn.exact_norms.norm_free`

    fixed_index: Tensor  # a buffer (register_buffer in __init__)

    def __init__(
        self,
        candidates: Sequence[str],
        rows: int | None = None,
        temperature: float = 1.0,
        anneal: Callable[[int], float] | None = None,
        never_chosen: Sequence[str] = (),
    ) -> None:
        who = type(self).__name__
        names = check_candidate_names(candidates, who)
        if rows is not None and rows < 1:
            raise ValueError(f"{who} needs at least one row of choices, got rows={rows}")
        unknown = [n for n in never_chosen if n not in names]
        if isinstance(never_chosen, str) or unknown or len(set(never_chosen)) >= len(names):
            raise ValueError(
                f"never_chosen must be a sequence of candidate names leaving at least one to choose; got "
                f"{never_chosen!r} for candidates {names}"
            )
        super().__init__(temperature, anneal)
        # private so that a subclass may name its own things `candidates` (OptimizerMixture: its rules)
        self._names: tuple[str, ...] = names
        self.rows = rows
        self.never_chosen = tuple(never_chosen)
        shape = (len(names),) if rows is None else (rows, len(names))
        self.logits = nn.Parameter(torch.zeros(shape))
        self.register_buffer("fixed_index", torch.full(shape[:-1], -1, dtype=torch.long))
        self._fixed: tuple[int, ...] | None = None
        self.register_load_state_dict_post_hook(SoftChoice._after_load)

    @staticmethod
    def _after_load(module: SoftChoice, incompatible_keys: Any) -> None:
        index = module.fixed_index.reshape(-1).tolist()
        module._fixed = tuple(index) if all(i >= 0 for i in index) else None

    @property
    def names(self) -> list[str]:
        """The candidates' names, in the order of the logits' last dimension."""
        return list(self._names)

    def follow(self, like: Tensor) -> None:
        """Moves the logits to ``like``'s dtype and device (a part that follows θ's, e.g. at ``bind``)."""
        if (self.logits.dtype, self.logits.device) != (like.dtype, like.device):
            self.logits = nn.Parameter(self.logits.detach().to(dtype=like.dtype, device=like.device))

    def probabilities(self) -> Tensor:
        """softmax(ℓ / T) over the last dimension, differentiable w.r.t. the logits (fixed or not)."""
        return torch.softmax(self.logits / self._temperature, dim=-1)

    def weights(self) -> Tensor:
        """The mixing weights in use: `probabilities`, or one-hot rows once fixed."""
        if self._fixed is None:
            return self.probabilities()
        index = torch.tensor(self._fixed, device=self.logits.device).reshape(self.fixed_index.shape)
        return F.one_hot(index, len(self._names)).to(self.logits.dtype)

    @property
    def fixed_indices(self) -> tuple[int, ...] | None:
        """The fixed candidate index of every row (one entry for a single choice), or ``None``."""
        return self._fixed

    def chosen_indices(self) -> list[int]:
        """Per row: the fixed index, or else the argmax of ℓ over the candidates not in ``never_chosen``."""
        if self._fixed is not None:
            return list(self._fixed)
        w = self.probabilities().detach().reshape(-1, len(self._names))
        allowed = torch.tensor([n not in self.never_chosen for n in self._names], device=w.device)
        return w.masked_fill(~allowed, -1.0).argmax(dim=-1).tolist()

    def chosen(self) -> Choice | list[Choice]:
        """The candidate in use and every candidate's weight (softmax): one `Choice`, or one per row."""
        w = self.probabilities().detach().reshape(-1, len(self._names))
        choices = [
            Choice(self._names[i], {n: float(x) for n, x in zip(self._names, row, strict=True)})
            for i, row in zip(self.chosen_indices(), w, strict=True)
        ]
        return choices[0] if self.rows is None else choices

    def fix(self, choices: str | Sequence[str] | None = None) -> str | list[str]:
        """From now on use only one candidate per row: ``choices`` (a name, or one name per row),
        or else `chosen`'s. Returns the names (a name for a single choice)."""
        if choices is None:
            names = [self._names[i] for i in self.chosen_indices()]
        else:
            names = [choices] if self.rows is None and isinstance(choices, str) else list(choices)
        if len(names) != (self.rows or 1) or (self.rows is not None and isinstance(choices, str)):
            raise ValueError(f"fix needs one name per row ({self.rows or 1}), got {choices!r}")
        unknown = [n for n in names if n not in self._names]
        if unknown:
            raise ValueError(f"unknown candidates {unknown}; candidates: {list(self._names)}")
        self._fixed = tuple(self._names.index(n) for n in names)
        self.fixed_index.copy_(torch.tensor(self._fixed).reshape(self.fixed_index.shape))
        return names[0] if self.rows is None else names

    def unfix(self) -> None:
        """Back to the soft mixture."""
        self._fixed = None
        self.fixed_index.fill_(-1)

    @property
    def fixed(self) -> str | list[str] | None:
        """The fixed name (one per row), or ``None`` while mixing."""
        if self._fixed is None:
            return None
        names = [self._names[i] for i in self._fixed]
        return names[0] if self.rows is None else names

    def extra_repr(self) -> str:
        # configuration only: T and the fixed choice are buffers that change during a run, and a run's
        # identity must not change with them (never_chosen neither: it changes what is derived, not trained)
        rows = "" if self.rows is None else f"rows={self.rows}, "
        return f"{rows}candidates={self._names}, anneal={self.anneal is not None}"
