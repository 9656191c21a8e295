r"""The meta-training loop: outer steps on ω, validation, a JSONL log, checkpoints and resume.

Step ``s`` (0-based) meta-trains on tasks ``s*B, ..., s*B + B - 1`` of the task set (taken
modulo its length if it is finite) and derives any randomness of the step (a stochastic
init) from a generator seeded with ``(seed, s)``. Nothing about the data or the per-step
randomness depends on what ran before, so a run stopped after step ``s`` and resumed
from its checkpoint continues exactly as the uninterrupted run would have: on CPU, the final ω,
outer-optimizer and scheduler state are bit-identical. Any other iterable source (a DataLoader)
is consumed in order; see `metalearn.train.sources` for when its resume is exact.

A checkpoint ``step-00000100.pt`` holds the state after 100 completed steps: ω, the outer
optimizer (and scheduler), every global RNG state (for user code such as dropout) and the run
identity (see `metalearn.checkpoint`). The JSONL log has one ``{"kind": "train", "step": s, ...}``
line per step and one ``{"kind": "val", "step": s, ...}`` line per validation; on resume
from a checkpoint after ``c`` steps, lines with ``step >= c`` (written after that
checkpoint, before the run stopped) are dropped and new lines are appended.

Modules: `config` (`TrainConfig`, the frozen settings whose identity fields are the run
identity), `sources` (the meta-batch of each step), `schedule` (the outer LR scheduler),
`log` (the JSONL log), `loggers` (logger objects: JSONL, TensorBoard, a callback), `run` (resume,
validate, checkpoint: the `Run` object) and `loop`
(`meta_train` and the short loop).
"""

from metalearn.train.config import TrainConfig
from metalearn.train.log import JsonlLog
from metalearn.train.loggers import CallbackLogger, JsonlLogger, Logger, TensorBoardLogger, scalars_of
from metalearn.train.loop import meta_train, set_outer_step
from metalearn.train.run import TrainResult
from metalearn.train.sources import TaskSetWrapWarning, batch_for_step, describe_tasks, step_generator, to_device

__all__ = [
    "CallbackLogger",
    "JsonlLog",
    "JsonlLogger",
    "Logger",
    "TensorBoardLogger",
    "TaskSetWrapWarning",
    "TrainConfig",
    "TrainResult",
    "batch_for_step",
    "describe_tasks",
    "meta_train",
    "scalars_of",
    "set_outer_step",
    "step_generator",
    "to_device",
]
