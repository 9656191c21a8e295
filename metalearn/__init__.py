"""metalearn: meta-learning for PyTorch.

Learn the choices ordinary training fixes by hand — the inner optimizer, the architecture,
the initial distribution of the weights — from many small tasks. The public API is
re-exported here; see ``docs/architecture.md`` for the layers.
"""

from metalearn.checkpoint import CheckpointLoadError, ResumeEnvironmentWarning, load_checkpoint, save_checkpoint
from metalearn.errors import CheckpointMismatchError, NonFiniteError
from metalearn.evaluate import Evaluation, evaluate, fine_tune
from metalearn.inner import Adapted, InnerProblem, adapt
from metalearn.knowledge import (
    SGD,
    AdaptAll,
    AdaptOnly,
    AdaptPart,
    InitPart,
    MetaKnowledge,
    MetaSGD,
    OptimizerPart,
    Params,
    PointInit,
    PrototypeInit,
    anil,
    maml,
    meta_sgd,
    proto_maml,
    protonet,
)
from metalearn.models import MLP, BatchNorm, Conv4
from metalearn.modes import Checkpointed, Implicit, MetaGradientMode, Reptile, Truncated, Unrolled
from metalearn.outer import meta_gradient, meta_loss, meta_step
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
    TensorDataset,
    rotations,
    split_classes,
    stack_tasks,
)
from metalearn.train import TrainResult, meta_train

__version__ = "0.1.0"

__all__ = [
    "MLP",
    "SGD",
    "AdaptAll",
    "AdaptOnly",
    "AdaptPart",
    "Adapted",
    "BatchNorm",
    "CheckpointLoadError",
    "CheckpointMismatchError",
    "Checkpointed",
    "ClassAugmentation",
    "ClassSplit",
    "Conv4",
    "EpisodicTaskSet",
    "Evaluation",
    "ImageFolderDataset",
    "Implicit",
    "InnerProblem",
    "InitPart",
    "LabelledDataset",
    "MetaGradientMode",
    "MetaKnowledge",
    "MetaSGD",
    "NonFiniteError",
    "Omniglot",
    "OptimizerPart",
    "Params",
    "PointInit",
    "PrototypeInit",
    "RegressionFamily",
    "Reptile",
    "ResumeEnvironmentWarning",
    "RunFolderInUseError",
    "Sinusoid",
    "Task",
    "TaskBatch",
    "TaskSet",
    "TensorDataset",
    "TrainResult",
    "Truncated",
    "Unrolled",
    "adapt",
    "anil",
    "evaluate",
    "fine_tune",
    "maml",
    "meta_gradient",
    "meta_loss",
    "meta_sgd",
    "meta_step",
    "meta_train",
    "load_checkpoint",
    "save_checkpoint",
    "proto_maml",
    "protonet",
    "rotations",
    "split_classes",
    "stack_tasks",
]
