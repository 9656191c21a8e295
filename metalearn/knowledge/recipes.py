"""The classic methods as compositions of parts: each is a few lines, not a code path.

First-order MAML is `maml` trained with ``first_order=True`` (a property of the
meta-gradient, not of ω).
"""

from __future__ import annotations

from torch import nn

from metalearn.knowledge.builtins import AdaptOnly, InnerSGD, MetaSGD
from metalearn.knowledge.heads import PrototypeInit
from metalearn.knowledge.meta_knowledge import MetaKnowledge

__all__ = ["anil", "maml", "meta_sgd", "proto_maml", "protonet"]


def maml(model: nn.Module, lr: float) -> MetaKnowledge:
    """MAML (Finn et al., 2017): a learned point init, fixed-step SGD on every parameter."""
    return MetaKnowledge(model, optimizer=InnerSGD(lr))


def meta_sgd(model: nn.Module, lr: float) -> MetaKnowledge:
    """Meta-SGD (Li et al., 2017): a learned point init and learned per-parameter step sizes."""
    return MetaKnowledge(model, optimizer=MetaSGD(lr))


def anil(model: nn.Module, lr: float, head: str = "head") -> MetaKnowledge:
    """ANIL (Raghu et al., 2020): MAML whose inner loop adapts only the head's parameters."""
    return MetaKnowledge(model, optimizer=InnerSGD(lr), adapt=AdaptOnly(head))


def protonet(model: nn.Module, head: str = "head") -> MetaKnowledge:
    """Prototypical Networks (Snell et al., 2017): the head is each task's prototype classifier.

    Use with zero inner steps (``steps=0`` / ``inner_steps=0``): θ0's head is computed from
    the task's train half (`PrototypeInit`) and only the body is meta-learned. The inner
    optimizer is never stepped; the one given is a placeholder. ``model`` must compute
    ``head(features(x))`` with a linear head, as `metalearn.models.Conv4`.
    """
    return MetaKnowledge(model, optimizer=InnerSGD(1.0), init=PrototypeInit(head=head), adapt=AdaptOnly(head))


def proto_maml(model: nn.Module, lr: float, head: str = "head", adapt_all: bool = True) -> MetaKnowledge:
    """Proto-MAML (Triantafillou et al., 2020): MAML whose head starts at the prototype classifier.

    Use with K > 0 inner steps. The head's θ0 is ``W = 2c, b = -||c||²`` from the task's class
    prototypes c (`PrototypeInit`), and the meta-gradient flows through them into the body.
    ``adapt_all`` adapts every parameter in the inner loop (as in the paper); ``False`` adapts
    only the head (an ANIL-style variant).
    """
    return MetaKnowledge(
        model, optimizer=InnerSGD(lr), init=PrototypeInit(head=head), adapt=None if adapt_all else AdaptOnly(head)
    )
