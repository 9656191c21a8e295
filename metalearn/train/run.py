"""The run object of one `meta_train` call: resume, validate, checkpoint (with rotation), report.

The run folder's lock (`metalearn.run_folder.open_run_folder`) is held by `meta_train` around
everything a `Run` does.
"""

from __future__ import annotations

import logging
import sys
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from metalearn.checkpoint import (
    CheckpointInfo,
    ResumeEnvironmentWarning,
    capture_rng_state,
    checkpoint_path,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    restore_rng_state,
    resume_environment_differences,
    save_checkpoint,
)
from metalearn.errors import NonFiniteError
from metalearn.evaluate import evaluate
from metalearn.knowledge.meta_knowledge import MetaKnowledge
from metalearn.train.config import TrainConfig
from metalearn.train.log import JsonlLog, Row

__all__ = ["Run", "TrainResult", "logger"]

#: The logger of training runs: the resume / nothing-to-do lines are INFO records of it.
logger = logging.getLogger("metalearn.train")


@dataclass
class TrainResult:
    """What `meta_train` did.

    Attributes:
        omega: ω (the object passed in, trained in place).
        steps: outer steps completed in total, including those before a resume.
        resumed_from: completed steps of the checkpoint the run resumed from, or ``None``.
        history: one row per outer step run by this call (as written to the log).
        validations: one row per validation run by this call.
        last_checkpoint: the newest checkpoint written or resumed from, or ``None``.
    """

    omega: MetaKnowledge
    steps: int
    resumed_from: int | None = None
    history: list[Row] = field(default_factory=list)
    validations: list[Row] = field(default_factory=list)
    last_checkpoint: Path | None = None


def reraise_with_step(err: NonFiniteError, step: int, indices: Sequence[int] | None, what: str) -> NonFiniteError:
    """``err`` named with the outer step and the task's task-set index (when the source has indices)."""
    task = err.task
    if task is not None and indices is not None and 0 <= task < len(indices):
        where = f"task {task} of the meta-batch (task-set index {indices[task]})"
        task = indices[task]
    elif task is not None:
        where = f"task {task}"
    else:
        where = "the meta-batch"
    new = NonFiniteError(
        f"outer step {step}, {what}, {where}: {err}. ω was not checkpointed after this; the last good "
        "checkpoint (if any) is intact",
        task=task,
        step=step,
    )
    new.inner_step = err.step  # type: ignore[attr-defined]
    return new


def _warn_if_not_bit_identical(info: CheckpointInfo, omega: MetaKnowledge) -> None:
    """Warns once when the resumed run's thread count, device or torch differ from the checkpoint's."""
    differences = resume_environment_differences(info, omega)
    if differences:
        warnings.warn(
            f"resuming from {info.path} with another {', '.join(differences)}: the run continues correctly, but "
            "not bit-identically to an uninterrupted run (reductions sum in another order; a Conv-4 drifted by "
            "3e-3 in 12 steps). For a bit-identical resume, run with the checkpoint's settings (e.g. "
            "torch.set_num_threads, the same device)",
            ResumeEnvironmentWarning,
            stacklevel=4,
        )


class Run:
    """The state one `meta_train` call works on besides ω: identity, log, result, checkpoints."""

    def __init__(
        self,
        omega: MetaKnowledge,
        outer_optimizer: torch.optim.Optimizer,
        config: TrainConfig,
        identity: Mapping[str, Any],
        val_tasks: Any,
        scheduler: Any = None,
    ) -> None:
        self.omega, self.outer_optimizer, self.config = omega, outer_optimizer, config
        self.identity, self.val_tasks, self.scheduler = dict(identity), val_tasks, scheduler
        self.log = JsonlLog(config.log_path)  # type: ignore[arg-type]  # a Path after TrainConfig checked it
        self.result = TrainResult(omega=omega, steps=0)
        self.ckpt_dir: Path | None = config.checkpoint_dir  # type: ignore[assignment]
        self._rng_state: dict[str, Any] | None = None

    def say(self, message: str) -> None:
        """One line for the user: an INFO record of `logger`, and a line above the progress bar."""
        logger.info(message)
        if self.config.progress:
            tqdm.write(message, file=sys.stderr)

    def resume(self) -> int:
        """Loads the newest checkpoint (if any) and returns the completed steps to start after."""
        latest = latest_checkpoint(self.ckpt_dir) if self.ckpt_dir is not None else None
        if latest is None:
            self.log.check_fresh()
            return 0
        if not self.config.resume:
            raise FileExistsError(
                f"checkpoint_dir {self.ckpt_dir} already holds checkpoints (newest: {latest.name}) and resume=False; "
                "pass resume=True to continue that run, or choose an empty checkpoint_dir"
            )
        info = load_checkpoint(latest, omega=self.omega, outer_optimizer=self.outer_optimizer, config=self.identity)
        if self.scheduler is not None:
            self.scheduler.load_state_dict(info.scheduler_state)
        _warn_if_not_bit_identical(info, self.omega)
        self._rng_state = info.rng_state
        self.result.resumed_from = self.result.steps = info.step
        self.result.last_checkpoint = latest
        steps = self.config.steps
        if info.step >= steps:
            self.say(f"nothing to do: {latest} holds step {info.step} of {steps} (pass a larger steps to train on)")
        else:
            self.say(f"resumed from step {info.step} of {steps} ({latest})")
        return info.step

    def restore_rng(self) -> None:
        """Restores the global RNG states of the checkpoint resumed from (after the source has started:
        a DataLoader draws its seeds from the global RNG when iterated, as it did at the run's start)."""
        if self._rng_state is not None:
            restore_rng_state(self._rng_state)
            self._rng_state = None

    def validate(self, step: int) -> Row:
        """Meta-tests ω on the validation tasks; logs and returns the row."""
        began = time.perf_counter()
        cfg = self.config
        inner_steps = cfg.validation_inner_steps
        try:  # the mode names the inner problem meta-test solves (iMAML's: the proximal one)
            ev = evaluate(
                self.omega, self.val_tasks, inner_steps, batching=cfg.batching, seed=cfg.seed, mode=cfg.gradient_mode,
                kernels=cfg.kernels,
            )
        except NonFiniteError as err:
            raise reraise_with_step(err, step, None, "validation") from err
        row: Row = {
            "kind": "val",
            "step": step,
            "metric": ev.metric,
            "mean": ev.mean,
            "ci95": ev.ci95,
            "n": ev.n,
            "inner_steps": inner_steps,
            "time": time.perf_counter() - began,
        }
        self.log.write(row)
        self.result.validations.append(row)
        return row

    def checkpoint_due(self, completed: int, stop: bool) -> bool:
        """Whether a checkpoint is written after ``completed`` steps (every N, the last, a stop)."""
        cfg = self.config
        return self.ckpt_dir is not None and (completed % cfg.checkpoint_every == 0 or completed == cfg.steps or stop)

    def checkpoint(self, completed: int, stats: Mapping[str, Any]) -> None:
        """Writes the checkpoint of ``completed`` steps atomically, then drops the oldest beyond ``keep_last``."""
        assert self.ckpt_dir is not None
        self.result.last_checkpoint = save_checkpoint(
            checkpoint_path(self.ckpt_dir, completed),
            omega=self.omega,
            outer_optimizer=self.outer_optimizer,
            step=completed,
            rng_state=capture_rng_state(),
            config=self.identity,
            extra={"meta_loss": float(stats["meta_loss"])},
            scheduler_state=None if self.scheduler is None else self.scheduler.state_dict(),
        )
        keep_last = self.config.keep_last
        if keep_last is not None:
            for _, old in list_checkpoints(self.ckpt_dir)[:-keep_last]:
                old.unlink(missing_ok=True)
