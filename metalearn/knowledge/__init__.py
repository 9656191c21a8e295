"""ω: `MetaKnowledge` and the parts it is made of. Knows nothing of datasets."""

from metalearn.deprecated import renamed_attribute
from metalearn.knowledge.architecture import ArchitectureWeights, with_architecture
from metalearn.knowledge.builtins import AdaptAll, AdaptExcept, AdaptOnly, InnerSGD, MetaSGD, PointInit
from metalearn.knowledge.context import ConcatContext, ContextInit
from metalearn.knowledge.contract import ContractError, ContractReport, check_part
from metalearn.knowledge.heads import PrototypeInit, prototype_head
from metalearn.knowledge.higher_rule import higher_rule
from metalearn.knowledge.inits import GaussianInit, ScaledInit
from metalearn.knowledge.lslr import PerStepLR, PerStepNormWeights, norm_parameter_names
from metalearn.knowledge.meta_knowledge import (
    LossFn,
    MetaKnowledge,
    default_loss,
    native_norm_layers,
    theta_parameters,
)
from metalearn.knowledge.neural_optimizer import NeuralOptimizer
from metalearn.knowledge.optimizers import Choice, InnerAdam, MomentumSGD, OptimizerMixture, geometric_anneal
from metalearn.knowledge.parts import (
    AdaptPart,
    ArchitecturePart,
    InitPart,
    OptimizerPart,
    Params,
    State,
    apply_updates,
    param_key,
)
from metalearn.knowledge.recipes import anil, boil, cavia, maml, maml_plus_plus, meta_sgd, proto_maml, protonet
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
from metalearn.knowledge.soft_choice import SoftChoice

__all__ = [
    "AdaptAll",
    "AdaptExcept",
    "AdaptOnly",
    "AdaptPart",
    "ArchitecturePart",
    "ArchitectureWeights",
    "Chain",
    "Choice",
    "ConcatContext",
    "ContextInit",
    "ContractError",
    "ContractReport",
    "GaussianInit",
    "InitPart",
    "InnerAdam",
    "InnerSGD",
    "Learned",
    "LossFn",
    "MetaKnowledge",
    "MetaSGD",
    "MomentumSGD",
    "NeuralOptimizer",
    "OptimizerMixture",
    "OptimizerPart",
    "Params",
    "PerStepLR",
    "PerStepNormWeights",
    "PointInit",
    "PrototypeInit",
    "ScaledInit",
    "SoftChoice",
    "State",
    "anil",
    "apply_updates",
    "boil",
    "cavia",
    "chain",
    "check_part",
    "default_loss",
    "geometric_anneal",
    "higher_rule",
    "learned",
    "maml",
    "maml_plus_plus",
    "meta_sgd",
    "native_norm_layers",
    "norm_parameter_names",
    "param_key",
    "proto_maml",
    "protonet",
    "prototype_head",
    "scale",
    "scale_by_adam",
    "scale_by_learning_rate",
    "theta_parameters",
    "trace",
    "with_architecture",
]


def __getattr__(name: str) -> object:
    """A name renamed in `metalearn.deprecated.RENAMED`: the new object, with a `DeprecationWarning`."""
    return renamed_attribute(__name__, name, globals())
