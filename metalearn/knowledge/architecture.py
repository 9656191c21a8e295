r"""A DARTS-style searchable architecture: the choice of operations is meta-knowledge.

Every searchable edge of the network computes a softmax-weighted mixture of candidate
operations, the continuous relaxation of DARTS (Liu, Simonyan & Yang, 2019, "DARTS:
Differentiable Architecture Search"):

.. math::

    \bar o^{(e)}(x) = \sum_i w^{(e)}_i\, o^{(e)}_i(x), \qquad
    w^{(e)} = \mathrm{softmax}\big(\alpha^{(e)} / T\big)

The mixing logits α are meta-parameters, learned in the outer loop from the tasks' val
losses after the inner loop has adapted θ on their train halves. This is DARTS's bilevel
problem with its lower level made a few-shot inner loop (DARTS itself approximates the
lower level by one unrolled gradient step); T-NAS (Lian et al., 2020, "Towards Fast
Adaptation of Neural Architectures with Meta Learning") combines DARTS with MAML in this
way, and Auto-Meta (Kim et al., 2018, "Auto-Meta: Automated Gradient Based Meta Learner
Search") searched few-shot cells with a discrete (progressive) search instead.

The op weights are ordinary model parameters, so ω's `AdaptPart` decides their role: θ,
started from ω's init and adapted in the inner loop (`AdaptAll`), or static, learned in the
outer loop only (e.g. ``AdaptOnly("head")`` adapts just the head).

**Where α live.** θ is run through ``torch.func.functional_call(model, params)`` with
``params`` = the model's ``named_parameters()``, and every such parameter passes through ω's
init (which may sample it, as `GaussianInit` does, or redraw it, as `ScaledInit` does) and
may be adapted. α must do neither: they are one architecture shared by every task. So α are
held by an `ArchitectureWeights` module that the searchable model reads at forward time but
does not register as a submodule: α are not in ``model.named_parameters()``, and every
init, optimizer and adapt part treats the model like a plain one. `MetaKnowledge` registers
the holder (an `ArchitecturePart`) on ω as ``omega.architecture``, which makes α meta-parameters: they are
in ``omega.parameters()`` (for the outer optimizer) and ``omega.state_dict()`` (checkpoints).
Inside the inner loop α are constants captured by the forward, so the meta-gradient reaches
them by ordinary autograd, on the loop path and under ``torch.func.vmap`` alike.

**Meta-test.** `SearchableConvNet.derive` returns the plain network of the argmax ops
(no α, no softmax) carrying the trained weights; `SearchableConvNet.derive_params` maps any
θ (e.g. from `metalearn.evaluate.fine_tune`) onto it. Alternatively `ArchitectureWeights.fix`
keeps ω as it is and runs only the chosen op of each edge (the same outputs as the derived
network), so learned init and optimizer parts are kept for meta-testing.

Example:
    >>> model = SearchableConvNet(num_classes=5, hidden=16, cells=4, image_size=28)
    >>> omega = MetaKnowledge(model, optimizer=SGD(lr=0.1))  # registers α as omega.architecture
    >>> outer = torch.optim.Adam(omega.parameters(), lr=1e-3)  # op weights and α
    >>> # ... meta_train(omega, tasks, outer, ...) ...
    >>> model.chosen_ops()  # doctest: +SKIP
    ['conv3x3', 'conv5x5', 'maxpool3x3', 'conv3x3']
    >>> plain = model.derive()  # an ordinary CellConvNet with the trained weights
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metalearn.knowledge.meta_knowledge import MetaKnowledge
from metalearn.knowledge.optimizers import Choice
from metalearn.knowledge.parts import ArchitecturePart, Params
from metalearn.knowledge.temperature import AnnealedTemperature
from metalearn.models import BatchNorm, conv4_feature_size

__all__ = [
    "DEFAULT_CANDIDATES",
    "SEARCH_OPS",
    "ArchitectureWeights",
    "Cell",
    "CellConvNet",
    "MixedOp",
    "OpFactory",
    "SearchableConvNet",
    "Zero",
    "with_architecture",
]

#: Builds a candidate op: ``factory(channels, stride) -> nn.Module`` mapping ``[N, C, H, W]``
#: to ``[N, C, ceil(H / stride), ceil(W / stride)]``.
OpFactory = Callable[[int, int], nn.Module]


class Zero(nn.Module):
    """The "no connection" op of DARTS: zeros of the output shape.

    Args:
        stride: spatial subsampling of the output.
    """

    def __init__(self, stride: int = 1) -> None:
        super().__init__()
        self.stride = int(stride)

    def forward(self, x: Tensor) -> Tensor:
        if self.stride > 1:
            x = x[..., :: self.stride, :: self.stride]
        return torch.zeros_like(x)

    def extra_repr(self) -> str:
        return f"stride={self.stride}"


def _conv3x3(channels: int, stride: int) -> nn.Module:
    # no bias: every op feeds a batch norm, which would cancel it (its gradient is exactly 0)
    return nn.Conv2d(channels, channels, 3, stride=stride, padding=1, bias=False)


def _conv5x5(channels: int, stride: int) -> nn.Module:
    return nn.Conv2d(channels, channels, 5, stride=stride, padding=2, bias=False)


def _maxpool3x3(channels: int, stride: int) -> nn.Module:
    return nn.MaxPool2d(3, stride=stride, padding=1)


def _avgpool3x3(channels: int, stride: int) -> nn.Module:
    return nn.AvgPool2d(3, stride=stride, padding=1, count_include_pad=False)


def _skip(channels: int, stride: int) -> nn.Module:
    if stride != 1:
        raise ValueError(
            f"the 'skip' op is the identity and cannot have stride {stride}; use stride=1 (SearchableConvNet's "
            "cells reduce with a max-pool after the op) or leave 'skip' out of the candidates"
        )
    return nn.Identity()


def _zero(channels: int, stride: int) -> nn.Module:
    return Zero(stride)


#: The built-in candidate ops by name (read-only). Extend it by passing
#: ``op_factories={**SEARCH_OPS, "name": factory}`` to `MixedOp` / `SearchableConvNet`.
SEARCH_OPS: Mapping[str, OpFactory] = MappingProxyType(
    {
        "conv3x3": _conv3x3,
        "conv5x5": _conv5x5,
        "maxpool3x3": _maxpool3x3,
        "avgpool3x3": _avgpool3x3,
        "skip": _skip,
        "zero": _zero,
    }
)

#: The search space of the issue: two convolutions, a max-pool, the identity and no connection.
DEFAULT_CANDIDATES: tuple[str, ...] = ("conv3x3", "conv5x5", "maxpool3x3", "skip", "zero")


def _check_candidates(candidates: Sequence[str], op_factories: Mapping[str, OpFactory]) -> tuple[str, ...]:
    if isinstance(candidates, str):
        raise TypeError(f"candidates must be a sequence of op names, e.g. ({candidates!r},), not a string")
    names = tuple(candidates)
    if not names:
        raise ValueError(f"a searchable edge needs at least one candidate op; known ops: {sorted(op_factories)}")
    if len(set(names)) != len(names):
        raise ValueError(f"candidate ops must be distinct, got {names}")
    unknown = [n for n in names if n not in op_factories]
    if unknown:
        raise ValueError(
            f"unknown candidate ops {unknown}; known: {sorted(op_factories)}. Add your own with "
            "op_factories={**SEARCH_OPS, 'name': factory} where factory(channels, stride) returns an nn.Module"
        )
    bad = [n for n in names if not n or "." in n]
    if bad:
        raise ValueError(f"op names must be non-empty and contain no '.', got {bad}")
    return names


class MixedOp(nn.Module):
    r"""One searchable edge: :math:`\sum_i w_i\, o_i(x)` over candidate ops :math:`o_i`.

    The op weights are this module's parameters (``ops.<name>.weight``); the mixing weights
    w are an input of `forward`, so the module holds no architecture weights itself.

    Args:
        channels: input and output channels C of every candidate.
        candidates: names of the candidate ops, keys of ``op_factories``.
        stride: spatial stride of every candidate.
        op_factories: where candidate names are looked up; `SEARCH_OPS` by default.
    """

    def __init__(
        self,
        channels: int,
        candidates: Sequence[str] = DEFAULT_CANDIDATES,
        stride: int = 1,
        op_factories: Mapping[str, OpFactory] = SEARCH_OPS,
    ) -> None:
        super().__init__()
        self.candidates = _check_candidates(candidates, op_factories)
        self.channels = int(channels)
        self.stride = int(stride)
        self.ops = nn.ModuleDict({name: op_factories[name](self.channels, self.stride) for name in self.candidates})

    def forward(self, x: Tensor, weights: Tensor | int) -> Tensor:
        """Mixes the candidates' outputs.

        Args:
            x: input ``[N, C, H, W]``.
            weights: the mixing weights ``[len(candidates)]`` (e.g. a softmax), or the index
                of a single candidate to run alone (a fixed choice: exactly that op's output).
        """
        if isinstance(weights, int):
            return self.ops[self.candidates[weights]](x)
        if weights.shape != (len(self.candidates),):
            raise ValueError(
                f"MixedOp over {len(self.candidates)} candidates {self.candidates} needs weights of shape "
                f"[{len(self.candidates)}], got {tuple(weights.shape)}"
            )
        out: Tensor | None = None
        for w, op in zip(weights.unbind(0), self.ops.values(), strict=True):
            if isinstance(op, Zero):  # w * 0 adds nothing; α still enters through the softmax
                continue
            term = w * op(x)
            out = term if out is None else out + term
        if out is None:  # every candidate is the zero op
            return next(iter(self.ops.values()))(x)
        return out

    def extra_repr(self) -> str:
        return f"channels={self.channels}, stride={self.stride}"


class ArchitectureWeights(AnnealedTemperature, ArchitecturePart):
    r"""The architecture weights α of a searchable model: one row of mixing logits per edge.

    .. math:: w^{(e)} = \mathrm{softmax}(\alpha^{(e)} / T)

    α (``logits``, shape ``[edges, len(candidates)]``) start at zero (uniform weights; DARTS
    uses 1e-3-scaled noise instead — copy your own values in if you want it). The temperature
    T is configuration, never a global: set it with `set_temperature`, or give ``anneal``
    (e.g. `metalearn.knowledge.geometric_anneal`) and call `set_outer_step` before each
    meta-step (a `metalearn.train.meta_train` callback can); a low T pushes each edge
    towards one op. T and a fixed choice are kept in the state dict (buffers
    ``temperature_saved`` and ``fixed_index``), as `OptimizerMixture` keeps its own.

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

    def __init__(
        self,
        edges: int,
        candidates: Sequence[str],
        temperature: float = 1.0,
        anneal: Callable[[int], float] | None = None,
        never_chosen: Sequence[str] | None = None,
    ) -> None:
        super().__init__(temperature, anneal)
        if edges < 1:
            raise ValueError(f"ArchitectureWeights needs at least one edge, got edges={edges}")
        self.candidates = _check_candidates(candidates, {n: _zero for n in candidates})
        if never_chosen is None:
            never_chosen = [n for n in ("zero",) if n in self.candidates]
        unknown = [n for n in never_chosen if n not in self.candidates]
        if isinstance(never_chosen, str) or unknown or len(set(never_chosen)) >= len(self.candidates):
            raise ValueError(
                f"never_chosen must be a sequence of candidate names leaving at least one to choose; got "
                f"{never_chosen!r} for candidates {self.candidates}"
            )
        self.never_chosen = tuple(never_chosen)
        self.logits = nn.Parameter(torch.zeros(edges, len(self.candidates)))
        # the Python mirror is what forward reads (no device sync); refreshed after load_state_dict
        self.register_buffer("fixed_index", torch.full((edges,), -1, dtype=torch.long))
        self._fixed: tuple[int, ...] | None = None
        self.register_load_state_dict_post_hook(ArchitectureWeights._after_load)

    @property
    def edges(self) -> int:
        """Number of searchable edges (rows of ``logits``)."""
        return self.logits.shape[0]

    @staticmethod
    def _after_load(module: ArchitectureWeights, incompatible_keys: Any) -> None:
        index = module.fixed_index.tolist()
        module._fixed = tuple(index) if all(i >= 0 for i in index) else None

    def weights(self) -> Tensor:
        """The mixing weights ``[edges, len(candidates)]``: softmax(α / T), or one-hot rows once fixed."""
        if self._fixed is not None:
            index = torch.tensor(self._fixed, device=self.logits.device)
            return F.one_hot(index, len(self.candidates)).to(self.logits.dtype)
        return torch.softmax(self.logits / self._temperature, dim=-1)

    def edge_weights(self) -> list[Tensor] | list[int]:
        """What each edge's `MixedOp` is called with: its weights row, or its op index once fixed."""
        if self._fixed is not None:
            return list(self._fixed)
        return list(self.weights().unbind(0))

    def chosen(self) -> list[Choice]:
        """Per edge: the op in use (the fixed one, or else the argmax of α over the candidates not
        in ``never_chosen``) and every candidate's weight."""
        w = torch.softmax(self.logits.detach() / self._temperature, dim=-1)
        if self._fixed is not None:
            index = list(self._fixed)
        else:
            allowed = torch.tensor([n not in self.never_chosen for n in self.candidates], device=w.device)
            index = w.masked_fill(~allowed, -1.0).argmax(dim=-1).tolist()
        return [
            Choice(self.candidates[i], {n: float(x) for n, x in zip(self.candidates, row, strict=True)})
            for i, row in zip(index, w, strict=True)
        ]

    def fix(self, choices: Sequence[str] | None = None) -> list[str]:
        """From now on run only one op per edge: ``choices`` (names), or else `chosen`'s. Returns the names.

        While fixed, α are not used by the forward (and receive no gradient).
        """
        names = [c.name for c in self.chosen()] if choices is None else list(choices)
        if len(names) != self.edges:
            raise ValueError(f"fix needs one op name per edge ({self.edges}), got {len(names)}: {names}")
        unknown = [n for n in names if n not in self.candidates]
        if unknown:
            raise ValueError(f"unknown ops {unknown}; candidates: {self.candidates}")
        self._fixed = tuple(self.candidates.index(n) for n in names)
        self.fixed_index.copy_(torch.tensor(self._fixed))
        return names

    def unfix(self) -> None:
        """Back to the soft mixture."""
        self._fixed = None
        self.fixed_index.fill_(-1)

    @property
    def fixed(self) -> list[str] | None:
        """The fixed op names, or ``None`` while mixing."""
        return None if self._fixed is None else [self.candidates[i] for i in self._fixed]

    def extra_repr(self) -> str:
        return (
            # configuration only: temperature and fixed choice are buffers that change during a run
            # (never_chosen neither: it changes what is derived, not what is trained, so a run may resume)
            f"edges={self.edges}, candidates={self.candidates}, anneal={self.anneal is not None}"
        )


class Cell(nn.Module):
    """One Conv-4 block with its convolution replaced by ``op``: op, `BatchNorm`, ReLU, max-pool 2.

    Args:
        op: a `MixedOp` (searchable; `forward` then needs its mixing weights) or any module
            mapping ``[N, C, H, W]`` to ``[N, C, H, W]`` (a derived, fixed cell).
        channels: C, for the batch norm.
    """

    def __init__(self, op: nn.Module, channels: int) -> None:
        super().__init__()
        self.op = op
        self.norm = BatchNorm(channels)

    def forward(self, x: Tensor, weights: Tensor | int | None = None) -> Tensor:
        h = self.op(x) if weights is None else self.op(x, weights)
        return torch.relu(F.max_pool2d(self.norm(h), 2))  # == maxpool(relu(.)), 4x less ReLU work


class _CellNetBase(nn.Module):
    """Stem, cells and head shared by the searchable network and its derived plain networks."""

    def _build(
        self,
        num_classes: int,
        in_channels: int,
        hidden: int,
        image_size: int,
        ops: list[nn.Module],
    ) -> None:
        self.num_classes = int(num_classes)
        self.in_channels = int(in_channels)
        self.hidden = int(hidden)
        self.image_size = int(image_size)
        self.feature_size = conv4_feature_size(image_size, hidden, len(ops))
        # a fixed 3x3 conv + batch norm maps the input channels to `hidden`, so that every
        # candidate (including the parameter-free skip, pool and zero) keeps the shape (DARTS's stem)
        self.stem = nn.Sequential(nn.Conv2d(in_channels, hidden, 3, padding=1, bias=False), BatchNorm(hidden))
        self.cells = nn.ModuleList(Cell(op, hidden) for op in ops)
        self.head = nn.Linear(self.feature_size, num_classes) if num_classes > 0 else nn.Identity()


class CellConvNet(_CellNetBase):
    """A plain network of the search space: stem, one fixed op per cell, linear head.

    What `SearchableConvNet.derive` returns; build one directly to (meta-)train a found
    architecture from scratch. Cell ``i`` is [``ops[i]``, `BatchNorm`, ReLU, max-pool 2]; the
    stem is a 3x3 conv (no bias) and a `BatchNorm` mapping ``in_channels`` to ``hidden``.
    Parameter names: ``stem.*``, ``cells.<i>.op.*``, ``cells.<i>.norm.*``, ``head.*``.

    Args:
        num_classes: outputs of the head; 0 gives no head (an embedding network).
        ops: one op name per cell (keys of ``op_factories``).
        in_channels: input channels.
        hidden: channels of the stem and every cell.
        image_size: side of the square input images.
        op_factories: where op names are looked up; `SEARCH_OPS` by default.
    """

    def __init__(
        self,
        num_classes: int,
        ops: Sequence[str],
        in_channels: int = 1,
        hidden: int = 16,
        image_size: int = 28,
        op_factories: Mapping[str, OpFactory] = SEARCH_OPS,
    ) -> None:
        super().__init__()
        if isinstance(ops, str) or not ops:
            raise ValueError(f"ops must be a non-empty sequence of op names (one per cell), got {ops!r}")
        unknown = [n for n in ops if n not in op_factories]
        if unknown:
            raise ValueError(f"unknown ops {unknown}; known: {sorted(op_factories)}")
        self.ops = tuple(ops)
        self._build(num_classes, in_channels, hidden, image_size, [op_factories[n](hidden, 1) for n in self.ops])

    def forward(self, x: Tensor) -> Tensor:
        h = self.stem(x)
        for cell in self.cells:
            h = cell(h)
        return self.head(h.flatten(1))

    def extra_repr(self) -> str:
        return f"ops={self.ops}"


class SearchableConvNet(_CellNetBase):
    """A Conv-4-sized search space: stem, ``cells`` searchable cells, linear head.

    Like the Conv-4 (Finn et al., 2017) with each convolution replaced by a `MixedOp` over
    ``candidates``: cell ``i`` is [`MixedOp` (stride 1), `BatchNorm`, ReLU, max-pool 2],
    after a stem (3x3 conv without bias + `BatchNorm`) that maps ``in_channels`` to
    ``hidden``. Every cell has its own row of α in `architecture`.

    The op weights (``cells.<i>.op.ops.<name>.weight``), norms, stem and head are the
    model's parameters — θ. α are **not** (see the module docs): they live in the
    `ArchitectureWeights` returned by `architecture`, which the forward reads. Call
    `with_architecture` on the `MetaKnowledge` built with this model to make α
    meta-parameters of ω; ``model.parameters()`` alone does not include them.

    Args:
        num_classes: outputs of the head (the number of ways); 0 gives no head.
        in_channels: input channels (1 for Omniglot).
        hidden: channels of the stem and every cell.
        cells: number of searchable cells (each halves the image side).
        image_size: side of the square input images.
        candidates: the candidate op names of every cell.
        op_factories: where op names are looked up; `SEARCH_OPS` by default.
        temperature: initial softmax temperature of α.
        architecture: an existing `ArchitectureWeights` to use (e.g. one shared by two
            models); a new one with ``cells`` edges, α = 0, by default.
    """

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 1,
        hidden: int = 16,
        cells: int = 4,
        image_size: int = 28,
        candidates: Sequence[str] = DEFAULT_CANDIDATES,
        *,
        op_factories: Mapping[str, OpFactory] = SEARCH_OPS,
        temperature: float = 1.0,
        architecture: ArchitectureWeights | None = None,
    ) -> None:
        super().__init__()
        if cells < 1:
            raise ValueError(f"SearchableConvNet needs at least one cell, got cells={cells}")
        candidates = _check_candidates(candidates, op_factories)
        self.candidates = candidates
        self.op_factories = op_factories
        self._build(
            num_classes, in_channels, hidden, image_size,
            [MixedOp(hidden, candidates, 1, op_factories) for _ in range(cells)],
        )
        if architecture is None:
            architecture = ArchitectureWeights(cells, candidates, temperature)
        elif architecture.edges != cells or architecture.candidates != candidates:
            raise ValueError(
                f"the given architecture has {architecture.edges} edges over {architecture.candidates}, but the "
                f"model has {cells} cells over {candidates}; build ArchitectureWeights({cells}, {candidates})"
            )
        # held in a list, not registered: α must not be among the model's parameters (θ)
        self._architecture = [architecture]

    @property
    def architecture(self) -> ArchitectureWeights:
        """The architecture weights α this model reads (not a registered submodule)."""
        return self._architecture[0]

    def _apply(self, fn, recurse=True):  # keeps α on the model's device/dtype
        super()._apply(fn, recurse)
        self.architecture._apply(fn, recurse)
        return self

    def forward(self, x: Tensor) -> Tensor:
        h = self.stem(x)
        for cell, weights in zip(self.cells, self.architecture.edge_weights(), strict=True):
            h = cell(h, weights)
        return self.head(h.flatten(1))

    def chosen_ops(self) -> list[str]:
        """The op of each cell: the fixed one, or else the argmax of its α (not ``zero``: see `ArchitectureWeights`)."""
        return [c.name for c in self.architecture.chosen()]

    def derive_state(self, ops: Sequence[str] | None = None) -> dict[str, str]:
        """Which parameter of this model each parameter of the derived network takes its value from.

        Args:
            ops: the op of each cell; `chosen_ops` by default.

        Returns:
            ``{derived name: searchable name}``, e.g. ``"cells.0.op.weight" ->
            "cells.0.op.ops.conv3x3.weight"``; stem, norms and head keep their names.
        """
        ops = self._ops(ops)
        mapping: dict[str, str] = {}
        for name, _ in self.named_parameters():
            parts = name.split(".")
            if parts[0] == "cells" and parts[2] == "op":  # cells.<i>.op.ops.<candidate>.<rest>
                if parts[4] != ops[int(parts[1])]:
                    continue
                mapping[".".join(["cells", parts[1], "op", *parts[5:]])] = name
            else:
                mapping[name] = name
        return mapping

    def derive_params(self, params: Mapping[str, Tensor], ops: Sequence[str] | None = None) -> Params:
        """θ of the derived network from θ of this one (any leading task dimensions are kept).

        Args:
            params: this model's parameters by name (e.g. ``fine_tune``'s result or
                ``omega.initial_params(...)``); must hold every parameter the derived network uses.
            ops: the op of each cell; `chosen_ops` by default.
        """
        mapping = self.derive_state(ops)
        missing = [s for s in mapping.values() if s not in params]
        if missing:
            raise KeyError(
                f"params lacks {missing}, which the derived network needs; pass every parameter of the model"
            )
        return {d: params[s] for d, s in mapping.items()}

    def derive(self, params: Mapping[str, Tensor] | None = None, ops: Sequence[str] | None = None) -> CellConvNet:
        """The plain network of the chosen ops (no α, no softmax), carrying the weights over.

        With α driven to one-hot (or `ArchitectureWeights.fix` set) this model and the
        derived network compute the same function.

        Args:
            params: the weights to carry over (by this model's names, no task dimension);
                the model's own parameters by default.
            ops: the op of each cell; `chosen_ops` by default.

        Returns:
            A `CellConvNet` on this model's device and dtype, its parameters fresh leaves.
        """
        ops = self._ops(ops)
        source = dict(self.named_parameters()) if params is None else params
        values = self.derive_params(source, ops)
        like = self.stem[0].weight
        derived = CellConvNet(
            self.num_classes, ops, self.in_channels, self.hidden, self.image_size, self.op_factories
        ).to(device=like.device, dtype=like.dtype)
        names = {n for n, _ in derived.named_parameters()}
        if names != set(values):
            raise RuntimeError(
                f"derived parameters {sorted(names ^ set(values))} do not line up with derive_state; "
                "a custom op must name its parameters the same in a MixedOp and alone"
            )
        with torch.no_grad():
            for name, p in derived.named_parameters():
                p.copy_(values[name])
        return derived

    def _ops(self, ops: Sequence[str] | None) -> list[str]:
        ops = self.chosen_ops() if ops is None else list(ops)
        if len(ops) != len(self.cells):
            raise ValueError(f"need one op per cell ({len(self.cells)}), got {ops}")
        unknown = [n for n in ops if n not in self.candidates]
        if unknown:
            raise ValueError(f"ops {unknown} are not candidates of this model ({self.candidates})")
        return ops

    def extra_repr(self) -> str:
        return f"candidates={self.candidates}, architecture=ArchitectureWeights({self.architecture.extra_repr()})"


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
            f"{type(omega.network).__name__} has no architecture weights: with_architecture is for "
            "searchable models such as SearchableConvNet (modules with an ArchitectureWeights 'architecture')"
        )
    return omega
