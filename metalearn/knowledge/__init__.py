"""ω: `MetaKnowledge` and the parts it is made of. Knows nothing of datasets."""

from metalearn.knowledge.builtins import SGD, AdaptAll, AdaptOnly, MetaSGD, PointInit
from metalearn.knowledge.meta_knowledge import LossFn, MetaKnowledge, default_loss, native_norm_layers
from metalearn.knowledge.parts import AdaptPart, InitPart, OptimizerPart, Params, State
from metalearn.knowledge.recipes import anil, maml, meta_sgd

__all__ = [
    "SGD",
    "AdaptAll",
    "AdaptOnly",
    "AdaptPart",
    "InitPart",
    "LossFn",
    "MetaKnowledge",
    "MetaSGD",
    "OptimizerPart",
    "Params",
    "PointInit",
    "State",
    "anil",
    "default_loss",
    "maml",
    "meta_sgd",
    "native_norm_layers",
]
