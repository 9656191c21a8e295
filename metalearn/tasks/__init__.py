"""The task layer: tasks, task sets, class splits, datasets. Knows nothing of ω or training."""

from metalearn.deprecated import renamed_attribute
from metalearn.tasks.augment import ClassAugmentation, Rotate90, rotations
from metalearn.tasks.benchmark import BenchmarkFormatError, BenchmarkImages, published_split
from metalearn.tasks.cifar_fs import CIFAR100_ARCHIVE, CIFARFS, FC100
from metalearn.tasks.cub import CUB
from metalearn.tasks.datasets import (
    CachedDataset,
    LabelledDataset,
    StoredInputs,
    TensorLabelledDataset,
    uint8_to_unit,
)
from metalearn.tasks.download import ChecksumMismatchError, DownloadError, IncompleteDownloadError, download_file
from metalearn.tasks.draws import TaskDraws
from metalearn.tasks.episodes import EpisodicTaskSet
from metalearn.tasks.image_folder import ImageFolderDataset
from metalearn.tasks.mini_imagenet import MiniImageNet
from metalearn.tasks.multi_source import EpisodeSource, MetaDatasetSampling, MultiSourceEpisodes
from metalearn.tasks.omniglot import OMNIGLOT_ARCHIVES, Omniglot, OmniglotCharacter, OmniglotFormatError, RemoteFile
from metalearn.tasks.regression import Harmonics, Linear, Polynomial, RegressionFamily, Sinusoid, Step
from metalearn.tasks.splits import ClassSplit, split_classes
from metalearn.tasks.task import Task, TaskBatch, stack_tasks
from metalearn.tasks.taskset import TaskSet, TaskStream, task_seed
from metalearn.tasks.tiered_imagenet import TieredImageNet

__all__ = [
    "BenchmarkFormatError",
    "BenchmarkImages",
    "CIFAR100_ARCHIVE",
    "CIFARFS",
    "CUB",
    "CachedDataset",
    "ChecksumMismatchError",
    "ClassAugmentation",
    "ClassSplit",
    "DownloadError",
    "EpisodeSource",
    "EpisodicTaskSet",
    "FC100",
    "Harmonics",
    "ImageFolderDataset",
    "IncompleteDownloadError",
    "LabelledDataset",
    "Linear",
    "MetaDatasetSampling",
    "MiniImageNet",
    "MultiSourceEpisodes",
    "OMNIGLOT_ARCHIVES",
    "Omniglot",
    "OmniglotCharacter",
    "OmniglotFormatError",
    "Polynomial",
    "RegressionFamily",
    "RemoteFile",
    "Rotate90",
    "Sinusoid",
    "Step",
    "StoredInputs",
    "Task",
    "TaskBatch",
    "TaskDraws",
    "TaskSet",
    "TaskStream",
    "TensorLabelledDataset",
    "TieredImageNet",
    "download_file",
    "published_split",
    "rotations",
    "split_classes",
    "stack_tasks",
    "task_seed",
    "uint8_to_unit",
]


def __getattr__(name: str) -> object:
    """A name renamed in `metalearn.deprecated.RENAMED`: the new object, with a `DeprecationWarning`."""
    return renamed_attribute(__name__, name, globals())
