"""The classic methods as compositions of parts: each is a few lines, not a code path.

First-order MAML is `maml` trained with ``first_order=True`` (a property of the
meta-gradient, not of ω).
"""

from __future__ import annotations

from torch import nn

from metalearn.knowledge.builtins import SGD, AdaptOnly, MetaSGD
from metalearn.knowledge.meta_knowledge import MetaKnowledge

__all__ = ["anil", "maml", "meta_sgd"]


def maml(model: nn.Module, lr: float) -> MetaKnowledge:
    """MAML (Finn et al., 2017): a learned point init, fixed-step SGD on every parameter."""
    return MetaKnowledge(model, optimizer=SGD(lr))


def meta_sgd(model: nn.Module, lr: float) -> MetaKnowledge:
    """Meta-SGD (Li et al., 2017): a learned point init and learned per-parameter step sizes."""
    return MetaKnowledge(model, optimizer=MetaSGD(lr))


def anil(model: nn.Module, lr: float, head: str = "head") -> MetaKnowledge:
    """ANIL (Raghu et al., 2020): MAML whose inner loop adapts only the head's parameters."""
    return MetaKnowledge(model, optimizer=SGD(lr), adapt=AdaptOnly(head))
