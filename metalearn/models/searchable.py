r"""A DARTS-style searchable network: the op library, the mixed op, the searchable and derived networks.

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
``params`` = the model's parameters, and every such parameter passes through ω's init (which
may sample it, as `GaussianInit` does, or redraw it, as `ScaledInit` does) and may be adapted.
α must do neither: they are one architecture shared by every task. So α are held by an
`ArchitectureWeights` module (an `ArchitecturePart`), registered as the model's
``architecture`` submodule (``.to()``, ``.double()`` and ``state_dict`` reach it as any
module), and *filtered* out of θ: `metalearn.knowledge.theta_parameters` leaves out every
parameter of an `ArchitecturePart`, so every init, optimizer and adapt part treats the model
like a plain one. `MetaKnowledge` lists the part once as ``omega.architecture``, which makes α
meta-parameters: they are in ``omega.parameters()`` (for the outer optimizer) and
``omega.state_dict()`` (checkpoints) under ``architecture.*``. Inside the inner loop α are the
module's own tensors, read by the forward, so the meta-gradient reaches them by ordinary
autograd, on the loop path and under ``torch.func.vmap`` alike.

**Meta-test.** `SearchableConvNet.derive` returns the plain network of the argmax ops
(no α, no softmax) carrying the trained weights; `SearchableConvNet.derive_params` maps any
θ (e.g. ``fine_tune(...).params``, `metalearn.evaluate.fine_tune`) onto it. Alternatively `ArchitectureWeights.fix`
keeps ω as it is and runs only the chosen op of each edge (the same outputs as the derived
network), so learned init and optimizer parts are kept for meta-testing.

Example:
    >>> model = SearchableConvNet(num_classes=5, hidden=16, cells=4, image_size=28)
    >>> omega = MetaKnowledge(model, optimizer=InnerSGD(lr=0.1))  # lists α as omega.architecture
    >>> outer = torch.optim.Adam(omega.parameters(), lr=1e-3)  # op weights and α
    >>> # ... meta_train(omega, tasks, outer, ...) ...
    >>> model.chosen_ops()  # doctest: +SKIP
    ['conv3x3', 'conv5x5', 'maxpool3x3', 'conv3x3']
    >>> plain = model.derive()  # an ordinary CellConvNet with the trained weights
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import TYPE_CHECKING, cast

import torch
from torch import Tensor, nn

from metalearn.models.batchnorm import BatchNorm
from metalearn.models.conv4 import conv4_feature_size
from metalearn.models.pooling import max_pool_2x2

if TYPE_CHECKING:  # ω's part; imported where it is built (models sit below metalearn.knowledge)
    from metalearn.knowledge.architecture import ArchitectureWeights

__all__ = [
    "DEFAULT_CANDIDATES",
    "SEARCH_OPS",
    "Cell",
    "CellConvNet",
    "MixedOp",
    "OpFactory",
    "SearchableConvNet",
    "Zero",
]

Params = dict[str, Tensor]

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
        return torch.relu(max_pool_2x2(self.norm(h)))  # == maxpool(relu(.)), 4x less ReLU work


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
    model's parameters that θ holds. α are the parameters of the registered submodule
    `architecture` (an `ArchitectureWeights`, ``architecture.logits``): ``model.to()``,
    ``.double()`` and ``model.state_dict()`` reach them, but θ leaves them out by a filter
    (`metalearn.knowledge.theta_parameters`; see the module docs). `MetaKnowledge` lists them
    once, as ``omega.architecture``, so they are meta-parameters of ω.

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
            from metalearn.knowledge.architecture import ArchitectureWeights  # ω's part: knowledge sits above models

            architecture = ArchitectureWeights(cells, candidates, temperature)
        elif architecture.edges != cells or architecture.candidates != candidates:
            raise ValueError(
                f"the given architecture has {architecture.edges} edges over {architecture.candidates}, but the "
                f"model has {cells} cells over {candidates}; build ArchitectureWeights({cells}, {candidates})"
            )
        self.architecture = architecture  # registered; θ leaves its α out by a filter (theta_parameters)

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
        for name in self._theta_names():
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
        source = {n: p for n, p in self.named_parameters() if n in self._theta_names()} if params is None else params
        values = self.derive_params(source, ops)
        like = cast(Tensor, self.stem[0].weight)
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

    def _theta_names(self) -> list[str]:
        """This model's parameter names but α's (``architecture.*``): what θ and the derived network hold."""
        return [n for n, _ in self.named_parameters() if not n.startswith("architecture.")]

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
