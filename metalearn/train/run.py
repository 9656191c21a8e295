"""The run object of one `meta_train` call: resume, validate, checkpoint (with rotation), report.

The run folder's lock (`metalearn.run_folder.open_run_folder`) is held by `meta_train` around
everything a `Run` does.
"""

from __future__ import annotations

import logging
import sys
import time
import warnings
from collections.abc import Iterable, Mapping, Sequence
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
from metalearn.distributed import Shard
from metalearn.errors import NonFiniteError
from metalearn.evaluate import evaluate
from metalearn.knowledge.meta_knowledge import MetaKnowledge
from metalearn.train.config import TrainConfig
from metalearn.train.log import JsonlLog, Row
from metalearn.train.loggers import Logger, check_loggers

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


def _warn_if_not_bit_identical(info: CheckpointInfo, omega: MetaKnowledge, shard: Shard | None = None) -> None:
    """Warns once when the resumed run's thread count, device, torch or world size differ from the checkpoint's."""
    differences = resume_environment_differences(info, omega)
    then, now = int(info.extra.get("world_size", 1)), 1 if shard is None else shard.world_size
    if then != now:  # same tasks, but each rank's share and the order of the sums change
        differences.append(f"world size {then} in the checkpoint, {now} now")
    if differences:
        move = any(d.startswith("device ") for d in differences)
        warnings.warn(
            f"resuming from {info.path} with another {', '.join(differences)}: the run continues correctly, but "
            "not bit-identically to an uninterrupted run (reductions sum in another order; a Conv-4 drifted by "
            "3e-3 in 12 steps). For a bit-identical resume, run with the checkpoint's settings (e.g. "
            "torch.set_num_threads, the same device"
            + (f": omega.to({info.device!r}) before meta_train)" if move else ")"),
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
        loggers: Iterable[Any] | None = None,
        shard: Shard | None = None,
    ) -> None:
        self.omega, self.outer_optimizer, self.config = omega, outer_optimizer, config
        self.identity, self.val_tasks, self.scheduler = dict(identity), val_tasks, scheduler
        self.shard = shard
        # under torch.distributed only rank 0 writes the log and the checkpoints (and feeds the loggers)
        self.writes_files = shard is None or shard.is_main
        log_path = config.log_path if self.writes_files else None
        self.log = JsonlLog(log_path)  # type: ignore[arg-type]  # a Path after TrainConfig checked it
        loggers_ = check_loggers(loggers)  # checked on every rank: a bad value fails everywhere alike
        self.loggers: list[Logger] = loggers_ if self.writes_files else []
        self.result = TrainResult(omega=omega, steps=0)
        self.ckpt_dir: Path | None = config.checkpoint_dir  # type: ignore[assignment]
        self._rng_state: dict[str, Any] | None = None

    def say(self, message: str) -> None:
        """One line for the user: an INFO record of `logger`, and a line above the progress bar."""
        if not self.writes_files:
            return  # one line per run, from rank 0
        logger.info(message)
        if self.config.progress:
            tqdm.write(message, file=sys.stderr)

    def open_logs(self, start: int) -> None:
        """Readies the JSONL log and every logger for the rows of steps ``>= start``."""
        self.log.open(start)
        for logger_ in self.loggers:
            logger_.open(start)

    def emit(self, row: Row) -> None:
        """Sends one row to the JSONL log and to every logger."""
        self.log.write(row)
        for logger_ in self.loggers:
            logger_.log(row)

    def close_logs(self) -> None:
        """Closes the JSONL log and every logger (all of them, even if one raises)."""
        try:
            self.log.close()
        finally:
            for logger_ in self.loggers:
                logger_.close()

    def resume(self) -> int:
        """Loads the newest checkpoint (if any) and returns the completed steps to start after.

        Under torch.distributed rank 0 reads the checkpoint and every rank takes ω, the outer
        optimizer and the scheduler from it (`sync_from_main`), so all ranks resume from the same
        file, also without a shared file system, and start bit-identical."""
        if self.shard is None:
            return self._resume_here()
        start = self.shard.main_only(self._resume_here, "resuming from checkpoint_dir")
        self.sync_from_main()
        return start

    def sync_from_main(self) -> None:
        """Every rank takes rank 0's ω, outer optimizer, scheduler and resume record (one broadcast)."""
        assert self.shard is not None
        state = None
        if self.shard.is_main:
            state = {
                "omega": {k: v.detach().cpu() for k, v in self.omega.state_dict().items()},
                "optimizer": _to_cpu(self.outer_optimizer.state_dict()),
                "scheduler": None if self.scheduler is None else self.scheduler.state_dict(),
                "resumed_from": self.result.resumed_from,
                "last_checkpoint": self.result.last_checkpoint,
            }
        state = self.shard.broadcast_object(state, "taking ω and the outer optimizer from rank 0")
        if self.shard.is_main:
            return
        self.omega.load_state_dict(state["omega"])
        self.outer_optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        self.result.resumed_from = state["resumed_from"]
        self.result.steps = state["resumed_from"] or 0
        self.result.last_checkpoint = state["last_checkpoint"]

    def _resume_here(self) -> int:
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
        _warn_if_not_bit_identical(info, self.omega, self.shard)
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
                progress="validate" if cfg.progress and self.writes_files else False,
                distributed=False if self.shard is None else self.shard,
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
        self.emit(row)
        self.result.validations.append(row)
        return row

    def checkpoint_due(self, completed: int, stop: bool) -> bool:
        """Whether a checkpoint is written after ``completed`` steps (every N, the last, a stop)."""
        cfg = self.config
        return self.ckpt_dir is not None and (completed % cfg.checkpoint_every == 0 or completed == cfg.steps or stop)

    def checkpoint(self, completed: int, stats: Mapping[str, Any]) -> None:
        """Writes the checkpoint of ``completed`` steps atomically, then drops the oldest beyond ``keep_last``.

        Under torch.distributed rank 0 writes it while the others wait (a failed write raises on every rank)."""
        if self.shard is None:
            self.result.last_checkpoint = self._write_checkpoint(completed, stats)
        else:
            self.result.last_checkpoint = self.shard.main_only(
                lambda: self._write_checkpoint(completed, stats), f"writing the checkpoint of step {completed}"
            )

    def _write_checkpoint(self, completed: int, stats: Mapping[str, Any]) -> Path:
        assert self.ckpt_dir is not None
        extra: dict[str, Any] = {"meta_loss": float(stats["meta_loss"])}
        if self.shard is not None:  # a resume with another world size is warned about
            extra["world_size"] = self.shard.world_size
        path = save_checkpoint(
            checkpoint_path(self.ckpt_dir, completed),
            omega=self.omega,
            outer_optimizer=self.outer_optimizer,
            step=completed,
            rng_state=capture_rng_state(),
            config=self.identity,
            extra=extra,
            scheduler_state=None if self.scheduler is None else self.scheduler.state_dict(),
        )
        keep_last = self.config.keep_last
        if keep_last is not None:
            for _, old in list_checkpoints(self.ckpt_dir)[:-keep_last]:
                old.unlink(missing_ok=True)
        return path


def _to_cpu(value: Any) -> Any:
    """``value`` (an optimizer ``state_dict``) with every tensor on the CPU, for a broadcast."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_cpu(v) for v in value)
    return value
