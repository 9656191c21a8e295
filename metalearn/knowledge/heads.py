r"""Metric-based heads as ω: a linear head initialised from each task's class prototypes.

Prototypical Networks (Snell, Swersky & Zemel, 2017) classify by the squared Euclidean
distance to class prototypes, the means of the embedded train examples of each class:

.. math::

    c_k = \frac{1}{|S_k|} \sum_{(x, y) \in S_k} f_\phi(x), \qquad
    \text{logit}_k(x) = -\lVert f_\phi(x) - c_k \rVert^2
        = 2 c_k^\top f_\phi(x) - \lVert c_k \rVert^2 - \lVert f_\phi(x) \rVert^2 .

The last term is the same for every class, so softmax ignores it: the classifier is a
linear layer with :math:`W_k = 2 c_k`, :math:`b_k = -\lVert c_k \rVert^2`. `PrototypeInit`
returns exactly that layer as the head's θ0, so ProtoNets is this init with zero inner
steps, and Proto-MAML (Triantafillou et al., 2020, "Meta-Dataset") is the same init followed
by K inner steps — all through the ordinary adapt/evaluate API. The meta-gradient flows
through the prototypes into the body φ.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, vmap

from metalearn.knowledge.parts import InitPart, Params

__all__ = ["EMBED_BATCHING", "PrototypeInit", "prototype_head"]

EMBED_BATCHING = ("vmap", "loop")


def prototype_head(embeddings: Tensor, y: Tensor, num_classes: int) -> tuple[Tensor, Tensor]:
    r"""The linear head of the prototype classifier, for one task or a batch of tasks.

    Args:
        embeddings: ``[..., shots, D]`` embedded train inputs.
        y: ``[..., shots]`` integer class labels in ``0..num_classes-1``.
        num_classes: N, the number of classes (ways).

    Returns:
        ``(W, b)`` of shapes ``[..., N, D]`` and ``[..., N]``: :math:`W_k = 2 c_k`,
        :math:`b_k = -\lVert c_k \rVert^2` with :math:`c_k` the mean embedding of class k.
        Differentiable w.r.t. ``embeddings``; every class must have an example.
    """
    onehot = F.one_hot(y, num_classes).to(embeddings.dtype)  # [..., shots, N]
    counts = onehot.sum(-2)  # [..., N]
    prototypes = onehot.transpose(-1, -2) @ embeddings / counts.unsqueeze(-1)  # [..., N, D]
    return 2 * prototypes, -prototypes.square().sum(-1)


class PrototypeInit(InitPart):
    r"""θ0 whose linear head is each task's prototype classifier (ProtoNets, Proto-MAML).

    Every parameter except the head's starts at the model's own value (as `PointInit`:
    they are meta-parameters). The head's ``weight`` and ``bias`` are computed from the
    task's train half: the body embeds its inputs, the class means :math:`c_k` give
    :math:`W_k = 2 c_k`, :math:`b_k = -\lVert c_k \rVert^2` (see the module docstring), so
    with zero inner steps the model is the squared-Euclidean ProtoNets classifier (Snell et
    al., 2017) and with K steps it is Proto-MAML (Triantafillou et al., 2020).

    The model must compute ``head(features(x))``: a ``features`` submodule that maps a batch
    of inputs to ``[batch, D]`` embeddings and a ``nn.Linear(D, N)`` head with a bias, as
    `metalearn.models.Conv4` does. Labels must be ``0..N-1`` and every class must occur in
    each task's train half. The embedding runs per task (under ``torch.func.vmap`` over
    tasks, or a loop), so batch norm statistics stay per task.

    The model's own head parameters are never used: `bind` sets their ``requires_grad`` to
    ``False``, so they get no meta-gradient (they stay in the model and its checkpoints).

    Args:
        head: name of the linear head submodule.
        features: name of the body (embedding) submodule.
        batching: ``"vmap"`` or ``"loop"``: how the embedding runs over a batch's tasks
            (same result up to rounding).

    Example:
        >>> omega = MetaKnowledge(Conv4(num_classes=5), optimizer=InnerSGD(0.1), init=PrototypeInit())
        >>> images = TensorLabelledDataset(torch.randn(100, 1, 28, 28), torch.arange(10).repeat(10))
        >>> batch = EpisodicTaskSet(images, ways=5, shots=1, queries=2, seed=0).batch(range(2))
        >>> stats = meta_step(omega, torch.optim.Adam(omega.parameters()), batch, inner_steps=0)  # ProtoNets
    """

    native_norm_free = True  # calls no fused norm itself: `metalearn.exact_norms.norm_free`

    uses_model_parameters = True
    uses_train_data = True

    def __init__(self, head: str = "head", features: str = "features", batching: str = "vmap") -> None:
        super().__init__()
        if batching not in EMBED_BATCHING:
            raise ValueError(f"PrototypeInit batching must be one of {EMBED_BATCHING}, got {batching!r}")
        self.head = head
        self.features = features
        self.batching = batching
        self._model: nn.Module | None = None  # borrowed at bind (see `model`), never registered here
        self.num_classes = 0  # N and D, from the head at bind
        self.embedding_size = 0

    def bind(self, model: nn.Module) -> None:
        try:
            head = model.get_submodule(self.head)
            body = model.get_submodule(self.features)
        except AttributeError as e:
            raise ValueError(
                f"PrototypeInit needs a model computing {self.head}(features(x)) with submodules "
                f"{self.features!r} and {self.head!r} (as metalearn.models.Conv4): {e}"
            ) from None
        if not isinstance(head, nn.Linear) or head.bias is None:
            raise ValueError(
                f"PrototypeInit needs model.{self.head} to be an nn.Linear with a bias (the prototype "
                f"classifier's W and b), got {head!r}; build the model with a linear head of N outputs"
            )
        del body  # looked up at bind only to give the error above early; `embed` reads it from the model
        for p in head.parameters():
            p.requires_grad_(False)  # replaced by the prototypes: never a meta-parameter
        self.num_classes = head.out_features
        self.embedding_size = head.in_features
        object.__setattr__(self, "_model", model)  # a borrowed reference: not a submodule of the init

    @property
    def model(self) -> nn.Module | None:
        """The model this init is bound to, borrowed from its owner (``None`` before `bind`).

        The init runs the model's body but does not own it: `MetaKnowledge` registers the model
        (so ``omega.to()``, ``.double()`` and ``.eval()`` reach the body) and lists its parameters
        once. Registering it here too would list the body's weights a second time, in the init's
        ``parameters()`` and ``state_dict()``.
        """
        return self._model

    def _body_params(self, model_params: Mapping[str, Tensor]) -> Params:
        prefix = self.features + "."
        return {n[len(prefix):]: p for n, p in model_params.items() if n.startswith(prefix)}

    def embed(self, model_params: Mapping[str, Tensor], x: Tensor) -> Tensor:
        """Embeddings ``[tasks, shots, D]`` of ``x`` ``[tasks, shots, ...]``, each task's batch on its own."""
        if self._model is None:
            raise RuntimeError("PrototypeInit is not bound to a model; use it inside MetaKnowledge(...)")
        body, params = self._model.get_submodule(self.features), self._body_params(model_params)

        def one(xi: Tensor) -> Tensor:
            return functional_call(body, params, (xi,))

        out = vmap(one)(x) if self.batching == "vmap" else torch.stack([one(xi) for xi in x])
        if out.ndim != 3 or out.shape[-1] != self.embedding_size:
            raise ValueError(
                f"model.{self.features} gave embeddings of shape {tuple(out.shape[1:])} per task; "
                f"PrototypeInit needs [shots, {self.embedding_size}] (flatten inside {self.features!r})"
            )
        return out

    def initial_params(
        self,
        model_params: Mapping[str, Tensor],
        n_tasks: int,
        generator: torch.Generator | None,
        *,
        train: tuple[Tensor, Tensor] | None = None,
    ) -> Params:
        if train is None:
            raise ValueError("PrototypeInit computes the head from each task's train half: pass train=(x, y)")
        x, y = train
        self._check_labels(y)
        weight, bias = prototype_head(self.embed(model_params, x), y, self.num_classes)
        out: Params = {}
        for name, p in model_params.items():
            if name == f"{self.head}.weight":
                out[name] = weight.to(p.dtype)
            elif name == f"{self.head}.bias":
                out[name] = bias.to(p.dtype)
            else:
                out[name] = p.expand(n_tasks, *p.shape)
        return out

    def _check_labels(self, y: Tensor) -> None:
        if y.is_floating_point() or y.ndim != 2:
            raise ValueError(
                f"PrototypeInit needs integer class labels of shape [tasks, shots], got {y.dtype} {tuple(y.shape)}"
            )
        n = self.num_classes
        if bool((y < 0).any()) or bool((y >= n).any()):
            raise ValueError(
                f"PrototypeInit: labels must lie in 0..{n - 1} (the head has {n} outputs), got "
                f"{int(y.min())}..{int(y.max())}; build the model with num_classes equal to the ways"
            )
        present = F.one_hot(y, n).sum(-2) > 0
        if not bool(present.all()):
            task = int((~present).any(-1).nonzero()[0, 0])
            missing = (~present[task]).nonzero().flatten().tolist()
            raise ValueError(
                f"PrototypeInit: task {task} has no train example of classes {missing}, so no prototype; "
                f"every task needs at least one example of each of the head's {n} classes"
            )

    def extra_repr(self) -> str:
        return f"head={self.head!r}, features={self.features!r}, batching={self.batching!r}"
