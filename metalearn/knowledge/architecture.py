"""The ω part of a searchable architecture: `ArchitectureWeights` α, and `with_architecture`.

The searchable networks themselves (op library, `MixedOp`, `SearchableConvNet`,
`CellConvNet`) are models and live in `metalearn.models.searchable`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import Tensor

from metalearn.knowledge.meta_knowledge import MetaKnowledge
from metalearn.knowledge.parts import ArchitecturePart
from metalearn.knowledge.soft_choice import Choice, SoftChoice

__all__ = ["ArchitectureWeights", "with_architecture"]


class ArchitectureWeights(SoftChoice, ArchitecturePart):
    r"""The architecture weights α of a searchable model: one row of mixing logits per edge.

    .. math:: w^{(e)} = \mathrm{softmax}(\alpha^{(e)} / T)

    α (``logits``, shape ``[edges, len(candidates)]``) start at zero (uniform weights; DARTS
    uses 1e-3-scaled noise instead — copy your own values in if you want it). The temperature
    T is configuration, never a global: set it with `set_temperature`, or give ``anneal``
    (e.g. `metalearn.knowledge.geometric_anneal`) and call `set_outer_step` before each
    meta-step (a `metalearn.train.meta_train` callback can); a low T pushes each edge
    towards one op. T and a fixed choice are kept in the state dict (buffers
    ``temperature_saved`` and ``fixed_index``). All of this is the shared `SoftChoice` with
    one row per edge; this class adds the edge view a searchable model reads (`edge_weights`).

    **Choosing.** The op an edge keeps (`chosen`, `fix`, `SearchableConvNet.derive`) is the
    argmax of its weights over the candidates not in ``never_chosen`` — by default every
    candidate but ``zero``: DARTS derives its cells without the zero op (Liu et al., 2019,
    §2.4), and in a chain of cells a zero cell makes the whole network output a constant.
    The zero op still takes part in the search (its weight scales the other ops down), and
    an explicit ``fix([...])`` may name it.

    Args:
        edges: number of searchable edges.
        candidates: the candidate op names, in the order of the logits' last dimension.
        temperature: initial T (> 0).
        anneal: optional schedule ``outer_step -> T``.
        never_chosen: candidates the argmax skips; ``None``: ``("zero",)`` where ``zero`` is a
            candidate. ``()`` chooses among all.
    """

    native_norm_free = True  # calls no fused norm itself: `metalearn.exact_norms.norm_free`

    def __init__(
        self,
        edges: int,
        candidates: Sequence[str],
        temperature: float = 1.0,
        anneal: Callable[[int], float] | None = None,
        never_chosen: Sequence[str] | None = None,
    ) -> None:
        if edges < 1:
            raise ValueError(f"ArchitectureWeights needs at least one edge, got edges={edges}")
        if never_chosen is None and not isinstance(candidates, str):
            never_chosen = [n for n in ("zero",) if n in candidates]
        super().__init__(candidates, edges, temperature, anneal, () if never_chosen is None else never_chosen)
        self.candidates: tuple[str, ...] = self._names

    @property
    def edges(self) -> int:
        """Number of searchable edges (rows of ``logits``)."""
        return self.logits.shape[0]

    def edge_weights(self) -> list[Tensor] | list[int]:
        """What each edge's `MixedOp` is called with: its weights row, or its op index once fixed."""
        if self.fixed_indices is not None:
            return list(self.fixed_indices)
        return list(self.weights().unbind(0))

    def chosen(self) -> list[Choice]:
        """Per edge: the op in use (the fixed one, or else the argmax of α over the candidates not
        in ``never_chosen``) and every candidate's weight."""
        choices = super().chosen()
        assert isinstance(choices, list)  # one row per edge
        return choices

    def fix(self, choices: str | Sequence[str] | None = None) -> list[str]:
        """From now on run only one op per edge: ``choices`` (names), or else `chosen`'s. Returns the names.

        While fixed, α are not used by the forward (and receive no gradient).
        """
        if choices is not None:
            names = [choices] if isinstance(choices, str) else list(choices)
            if len(names) != self.edges:
                raise ValueError(f"fix needs one op name per edge ({self.edges}), got {len(names)}: {names}")
            unknown = [n for n in names if n not in self.candidates]
            if unknown:
                raise ValueError(f"unknown ops {unknown}; candidates: {self.candidates}")
        fixed = super().fix(choices)
        assert isinstance(fixed, list)
        return fixed

    @property
    def fixed(self) -> list[str] | None:
        """The fixed op names, or ``None`` while mixing."""
        names = super().fixed
        return None if names is None else list(names)

    def extra_repr(self) -> str:
        # configuration only (part of a run's identity): temperature and fixed choice are buffers
        # that change during a run; never_chosen changes what is derived, not what is trained
        return f"edges={self.edges}, candidates={self.candidates}, anneal={self.anneal is not None}"


def with_architecture(omega: MetaKnowledge) -> MetaKnowledge:
    """Checks that ω's model is searchable and its α are registered on ω; returns ω.

    `MetaKnowledge` registers every `ArchitecturePart` of its model as ``omega.architecture``
    when it is built, so α are meta-parameters (in ``omega.parameters()`` and checkpoints)
    without this call; it remains as an explicit assertion for readers of a script.

    Raises:
        ValueError: the model has no searchable architecture.
    """
    if getattr(omega, "architecture", None) is None:
        raise ValueError(
            f"{type(omega.model).__name__} has no architecture weights: with_architecture is for "
            "searchable models such as SearchableConvNet (modules with an ArchitectureWeights 'architecture')"
        )
    return omega
