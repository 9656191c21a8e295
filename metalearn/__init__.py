"""metalearn: meta-learning for PyTorch.

Learn the choices ordinary training fixes by hand — the inner optimizer, the architecture,
the initial distribution of the weights — from many small tasks. The public API is
re-exported here (every class of `metalearn.knowledge`, `metalearn.models` and
`metalearn.tasks` that the docs name; the test ``tests/test_exports.py`` keeps it so); see
``docs/architecture.md`` for the layers.
"""

from metalearn.checkpoint import CheckpointLoadError, ResumeEnvironmentWarning, load_checkpoint, save_checkpoint
from metalearn.compile import CompileFallbackWarning
from metalearn.deprecated import renamed_attribute
from metalearn.errors import CheckpointMismatchError, NonFiniteError
from metalearn.evaluate import Evaluation, evaluate, fine_tune
from metalearn.inner import Adapted, InnerProblem, adapt
from metalearn.knowledge import (
    AdaptAll,
    AdaptOnly,
    AdaptPart,
    ArchitecturePart,
    ArchitectureWeights,
    Chain,
    GaussianInit,
    InitPart,
    InnerAdam,
    InnerSGD,
    Learned,
    MetaKnowledge,
    MetaSGD,
    MomentumSGD,
    OptimizerMixture,
    OptimizerPart,
    Params,
    PointInit,
    PrototypeInit,
    ScaledInit,
    SoftChoice,
    anil,
    apply_updates,
    chain,
    check_part,
    higher_rule,
    learned,
    maml,
    meta_sgd,
    param_key,
    proto_maml,
    protonet,
    theta_parameters,
)
from metalearn.models import MLP, BatchNorm, CellConvNet, Conv4, SearchableConvNet
from metalearn.modes import Checkpointed, Implicit, MetaGradientMode, Reptile, Truncated, Unrolled
from metalearn.outer import MetaStep, meta_gradient, meta_loss, meta_step
from metalearn.precision import LossScaler
from metalearn.run_folder import RunFolderInUseError
from metalearn.tasks import (
    ClassAugmentation,
    ClassSplit,
    EpisodicTaskSet,
    ImageFolderDataset,
    LabelledDataset,
    Omniglot,
    RegressionFamily,
    Sinusoid,
    Task,
    TaskBatch,
    TaskSet,
    TensorLabelledDataset,
    rotations,
    split_classes,
    stack_tasks,
)
from metalearn.train import TaskSetWrapWarning, TrainConfig, TrainResult, meta_train

__version__ = "0.1.0"

__all__ = [
    "AdaptAll",
    "AdaptOnly",
    "AdaptPart",
    "Adapted",
    "ArchitecturePart",
    "ArchitectureWeights",
    "BatchNorm",
    "CellConvNet",
    "Chain",
    "CheckpointLoadError",
    "CheckpointMismatchError",
    "Checkpointed",
    "ClassAugmentation",
    "ClassSplit",
    "CompileFallbackWarning",
    "Conv4",
    "EpisodicTaskSet",
    "Evaluation",
    "GaussianInit",
    "ImageFolderDataset",
    "Implicit",
    "InitPart",
    "InnerAdam",
    "InnerProblem",
    "InnerSGD",
    "LabelledDataset",
    "Learned",
    "LossScaler",
    "MLP",
    "MetaGradientMode",
    "MetaKnowledge",
    "MetaSGD",
    "MetaStep",
    "MomentumSGD",
    "NonFiniteError",
    "Omniglot",
    "OptimizerMixture",
    "OptimizerPart",
    "Params",
    "PointInit",
    "PrototypeInit",
    "RegressionFamily",
    "Reptile",
    "ResumeEnvironmentWarning",
    "RunFolderInUseError",
    "ScaledInit",
    "SearchableConvNet",
    "Sinusoid",
    "SoftChoice",
    "Task",
    "TaskBatch",
    "TaskSet",
    "TaskSetWrapWarning",
    "TensorLabelledDataset",
    "TrainConfig",
    "TrainResult",
    "Truncated",
    "Unrolled",
    "adapt",
    "anil",
    "apply_updates",
    "chain",
    "check_part",
    "evaluate",
    "fine_tune",
    "higher_rule",
    "learned",
    "load_checkpoint",
    "maml",
    "meta_gradient",
    "meta_loss",
    "meta_sgd",
    "meta_step",
    "meta_train",
    "param_key",
    "proto_maml",
    "protonet",
    "rotations",
    "save_checkpoint",
    "split_classes",
    "stack_tasks",
    "theta_parameters",
]


def __getattr__(name: str) -> object:
    """A name renamed in `metalearn.deprecated.RENAMED`: the new object, with a `DeprecationWarning`."""
    return renamed_attribute(__name__, name, globals())
