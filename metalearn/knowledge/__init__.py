"""ω: `MetaKnowledge` and the parts it is made of. Knows nothing of datasets."""

from metalearn.knowledge.architecture import (
    DEFAULT_CANDIDATES,
    SEARCH_OPS,
    ArchitectureWeights,
    CellConvNet,
    MixedOp,
    SearchableConvNet,
    with_architecture,
)
from metalearn.knowledge.builtins import SGD, AdaptAll, AdaptOnly, MetaSGD, PointInit
from metalearn.knowledge.contract import ContractError, ContractReport, check_part
from metalearn.knowledge.heads import PrototypeInit, prototype_head
from metalearn.knowledge.higher_rule import higher_rule
from metalearn.knowledge.inits import GaussianInit, ScaledInit
from metalearn.knowledge.meta_knowledge import LossFn, MetaKnowledge, default_loss, native_norm_layers
from metalearn.knowledge.optimizers import Adam, Choice, MomentumSGD, OptimizerMixture, geometric_anneal
from metalearn.knowledge.parts import (
    AdaptPart,
    ArchitecturePart,
    InitPart,
    OptimizerPart,
    Params,
    State,
    apply_updates,
)
from metalearn.knowledge.recipes import anil, maml, meta_sgd, proto_maml, protonet
from metalearn.knowledge.rules import (
    Chain,
    Learned,
    chain,
    learned,
    scale,
    scale_by_adam,
    scale_by_learning_rate,
    trace,
)

__all__ = [
    "higher_rule",
    "trace",
    "scale_by_learning_rate",
    "scale_by_adam",
    "scale",
    "learned",
    "chain",
    "apply_updates",
    "Learned",
    "Chain",
    "DEFAULT_CANDIDATES",
    "SEARCH_OPS",
    "SGD",
    "Adam",
    "AdaptAll",
    "AdaptOnly",
    "AdaptPart",
    "ArchitecturePart",
    "ArchitectureWeights",
    "CellConvNet",
    "Choice",
    "ContractError",
    "ContractReport",
    "GaussianInit",
    "InitPart",
    "LossFn",
    "MetaKnowledge",
    "MetaSGD",
    "MixedOp",
    "MomentumSGD",
    "OptimizerMixture",
    "OptimizerPart",
    "Params",
    "PointInit",
    "PrototypeInit",
    "ScaledInit",
    "SearchableConvNet",
    "State",
    "anil",
    "check_part",
    "default_loss",
    "geometric_anneal",
    "maml",
    "meta_sgd",
    "native_norm_layers",
    "proto_maml",
    "protonet",
    "prototype_head",
    "with_architecture",
]
