"""The classic methods as compositions of parts: each is a few lines, not a code path.

First-order MAML is `maml` trained with ``first_order=True`` (a property of the
meta-gradient, not of ω).
"""

from __future__ import annotations

from torch import nn

from metalearn.knowledge.builtins import AdaptExcept, AdaptOnly, InnerSGD, MetaSGD
from metalearn.knowledge.context import ContextInit
from metalearn.knowledge.heads import PrototypeInit
from metalearn.knowledge.lslr import PerStepLR, PerStepNormWeights, norm_parameter_names
from metalearn.knowledge.meta_knowledge import MetaKnowledge
from metalearn.knowledge.parts import OptimizerPart

__all__ = ["anil", "boil", "cavia", "maml", "maml_plus_plus", "meta_sgd", "proto_maml", "protonet"]


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


def maml_plus_plus(model: nn.Module, lr: float, inner_steps: int, per_step_norms: bool = True) -> MetaKnowledge:
    """MAML++'s ω (Antoniou et al., 2019): learned per-layer per-step step sizes (`PerStepLR`) and
    per-step norm weights and biases (`PerStepNormWeights`, for every norm of ``model``).

    The rest of MAML++ belongs to training, not to ω: the multi-step loss and derivative-order
    annealing are the mode `metalearn.modes.MultiStepLoss`, the cosine annealing of the outer
    learning rate is ``scheduler=torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)``
    (docs/methods.md shows the whole run).

    Args:
        model: the network (e.g. `metalearn.models.Conv4`).
        lr: initial inner step size of every layer and step.
        inner_steps: K, the inner steps of meta-training (the length of the per-step tables).
        per_step_norms: use per-step norm weights (BNWB); ``False``, or a model without norms,
            gives LSLR alone.
    """
    optimizer: OptimizerPart = PerStepLR(lr, inner_steps)
    norms = norm_parameter_names(model) if per_step_norms else []
    if norms:
        optimizer = PerStepNormWeights(optimizer, inner_steps, norms)
    return MetaKnowledge(model, optimizer=optimizer)


def boil(model: nn.Module, lr: float, head: str = "head") -> MetaKnowledge:
    """BOIL (Oh et al., 2021): MAML whose inner loop adapts the body and freezes the head.

    The head is meta-learned but has an inner step size of 0 (`AdaptExcept`), the converse of ANIL.
    """
    return MetaKnowledge(model, optimizer=InnerSGD(lr), adapt=AdaptExcept(head))


def cavia(model: nn.Module, lr: float, context: str = "context") -> MetaKnowledge:
    """CAVIA (Zintgraf et al., 2019): only the context parameters adapt, from 0 for every task.

    ``model`` holds the context parameter ``context`` and reads it, e.g.
    ``ConcatContext(MLP((1 + 4, 40, 40, 1)), num_context=4)``; its other weights are meta-learned
    only (`ContextInit`: θ0 is the model's weights and φ0 = 0).
    """
    return MetaKnowledge(model, optimizer=InnerSGD(lr), init=ContextInit((context,)), adapt=AdaptOnly(context))
