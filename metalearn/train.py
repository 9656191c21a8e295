r"""The meta-training loop: outer steps on ω, validation, a JSONL log, checkpoints and resume.

Step ``s`` (0-based) meta-trains on tasks ``s*B, ..., s*B + B - 1`` of the task set (taken
modulo its length if it is finite) and derives any randomness of the step (a stochastic
init) from a generator seeded with ``(seed, s)``. Nothing about the data or the per-step
randomness depends on what ran before, so a run stopped after step ``s`` and resumed
from its checkpoint continues exactly as the uninterrupted run would have: on CPU, the final ω
and outer-optimizer state are bit-identical.

A checkpoint ``step-00000100.pt`` holds the state after 100 completed steps: ω, the outer
optimizer, every global RNG state (for user code such as dropout) and the run identity
(see `metalearn.checkpoint`). The JSONL log has one ``{"kind": "train", "step": s, ...}``
line per step and one ``{"kind": "val", "step": s, ...}`` line per validation; on resume
from a checkpoint after ``c`` steps, lines with ``step >= c`` (written after that
checkpoint, before the run stopped) are dropped and new lines are appended.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import stat
import tempfile
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
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
from metalearn.checks import check_clip_grad_norm, check_grad_mode, check_log_path, check_outer_optimizer, check_seed
from metalearn.errors import NonFiniteError
from metalearn.evaluate import evaluate, omega_device
from metalearn.gradients import MetaGradientMode, Unrolled, resolve_mode
from metalearn.knowledge.meta_knowledge import MetaKnowledge
from metalearn.outer import BATCHING_MODES, meta_step
from metalearn.run_folder import open_run_folder
from metalearn.tasks.task import Task, TaskBatch, stack_tasks
from metalearn.tasks.taskset import TaskSet, task_seed

__all__ = ["TrainResult", "batch_for_step", "meta_train", "set_outer_step", "step_generator"]

Row = dict[str, Any]
Callback = Callable[[int, Row, Row | None], bool | None]


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


def step_generator(seed: int, step: int) -> torch.Generator:
    """The generator of outer step ``step``: a fresh CPU generator seeded from ``(seed, step)``."""
    return torch.Generator().manual_seed(task_seed(seed, step))


def _step_indices(tasks: TaskSet | Sequence[Task], step: int, batch_size: int) -> list[int]:
    first = step * batch_size
    if isinstance(tasks, TaskSet) and tasks.endless:
        return list(range(first, first + batch_size))
    n = len(tasks)
    return [(first + j) % n for j in range(batch_size)]


def batch_for_step(tasks: TaskSet | Sequence[Task], step: int, batch_size: int) -> TaskBatch:
    """The meta-batch of outer step ``step``: tasks ``step*B ... step*B + B - 1`` (modulo a finite length)."""
    indices = _step_indices(tasks, step, batch_size)
    if isinstance(tasks, TaskSet):
        return tasks.batch(indices)
    return stack_tasks([tasks[i] for i in indices])


def _describe_tasks(tasks: TaskSet | Sequence[Task]) -> dict[str, Any]:
    """The run identity's part for the source tasks: every setting that changes them.

    A `TaskSet` describes itself (`TaskSet.describe`: its class, sizes, seed, length, dataset,
    class pool, augmentation...); a list of tasks is its contents (a digest of every tensor).
    """
    describe = getattr(tasks, "describe", None)
    if callable(describe):
        return {"describe": describe()}
    sha = hashlib.sha256()
    for task in tasks:
        for t in (*task.train, *task.val):
            t = t.detach().cpu().contiguous()
            sha.update(f"{tuple(t.shape)}{t.dtype};".encode())
            sha.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return {"class": type(tasks).__qualname__, "length": len(tasks), "sha256": sha.hexdigest()}


def _check_task_collection(name: str, tasks: object, optional: bool = False) -> None:
    """Raises `TypeError` / `ValueError` for ``tasks`` that are neither a `TaskSet` nor a non-empty
    sequence of `Task` (an empty one would divide by zero in `batch_for_step`)."""
    if optional and tasks is None:
        return
    if isinstance(tasks, TaskSet):
        return
    if isinstance(tasks, TaskBatch) or not isinstance(tasks, Sequence):
        raise TypeError(
            f"{name} must be a TaskSet or a list of Task, got {type(tasks).__name__}"
            + ("; pass list(batch) for a TaskBatch" if isinstance(tasks, TaskBatch) else "")
        )
    if len(tasks) == 0:
        raise ValueError(f"{name} is empty (0 tasks); give at least one task")
    bad = next((i for i, t in enumerate(tasks) if not isinstance(t, Task)), None)
    if bad is not None:
        raise TypeError(f"{name}[{bad}] is a {type(tasks[bad]).__name__}, not a Task; build each with Task(train, val)")


def _finite_or_none(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class _JsonlLog:
    """Append-only JSONL metrics log, made consistent with the checkpoint a run resumes from.

    The file is touched only by the first `write`: a run that fails before its first step
    completes leaves no log (or the old one unchanged).
    """

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._file = None
        self._start: int | None = None

    def check_fresh(self) -> None:
        if self.path is not None and self.path.exists() and self.path.stat().st_size > 0:
            raise FileExistsError(
                f"log_path {self.path} already holds a log, and this run starts from step 0 (no checkpoint to "
                "resume from). Choose another log_path, delete the old log, or pass the checkpoint_dir of the "
                "run that wrote it"
            )

    def open(self, start: int) -> None:
        """Makes the log ready for the lines of steps ``>= start`` (the file is opened at the first write)."""
        self._start = start

    def _open_now(self) -> None:
        assert self.path is not None and self._start is not None
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self._start > 0 and self.path.exists():
            self._keep_before(self._start)
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (closed in close())

    def _keep_before(self, start: int) -> None:
        """Rewrites the log (atomically) without lines of steps ``>= start`` or partial lines."""
        kept = []
        with open(self.path, encoding="utf-8") as f:
            for line in f:
                try:
                    row = json.loads(line)
                except ValueError:
                    continue  # a line cut short by the crash
                if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] < start:
                    kept.append(json.dumps(row) + "\n")
        mode = stat.S_IMODE(os.stat(self.path).st_mode)
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
        try:
            if hasattr(os, "fchmod"):
                os.fchmod(fd, mode)  # the rewritten log keeps the log's mode, not mkstemp's 0o600
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.writelines(kept)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def write(self, row: Row) -> None:
        if self._file is None and self.path is not None and self._start is not None:
            self._open_now()
        if self._file is not None:
            try:
                self._file.write(json.dumps({k: _finite_or_none(v) for k, v in row.items()}, allow_nan=False) + "\n")
                self._file.flush()
            except OSError as err:
                if err.errno not in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
                    raise
                raise OSError(
                    err.errno,
                    f"could not write to the log {self.path}: there is no space left on the device "
                    f"({os.strerror(err.errno)}). Free space, then run again: the run resumes from its last "
                    "checkpoint and the log is cut back to it",
                ) from err

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


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
            stacklevel=3,
        )


def _check_positive(name: str, value: int, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int of at least {minimum}, got {value!r}")


def _check_omega_finite(omega: MetaKnowledge, step: int) -> None:
    params = [p for p in omega.parameters()]
    if not params or bool(torch.stack([torch.isfinite(p).all() for p in params]).all()):
        return
    bad = [n for n, p in omega.named_parameters() if not bool(torch.isfinite(p).all())]
    raise NonFiniteError(
        f"outer step {step}: ω parameter(s) {bad} became NaN/Inf in the outer optimizer step although the "
        f"meta-gradient was finite; no checkpoint was written after step {step}. Lower the outer learning rate "
        "or pass clip_grad_norm, and resume from the last checkpoint",
        step=step,
    )


def _reraise_with_step(err: NonFiniteError, step: int, indices: Sequence[int] | None, what: str) -> NonFiniteError:
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


def set_outer_step(omega: MetaKnowledge, step: int) -> None:
    """Tells every part of ω with a schedule (e.g. an annealed temperature) the outer step.

    Parts opt in by defining ``set_outer_step(step)``; it is called before each meta-step,
    so the schedule is a pure function of the step and a resumed run follows it exactly.
    """
    for module in omega.modules():
        hook = getattr(module, "set_outer_step", None)
        if callable(hook):
            hook(step)


def meta_train(
    omega: MetaKnowledge,
    tasks: TaskSet | Sequence[Task],
    outer_optimizer: torch.optim.Optimizer,
    *,
    steps: int,
    inner_steps: int,
    meta_batch_size: int,
    first_order: bool = False,
    batching: str = "auto",
    clip_grad_norm: float | None = None,
    val_tasks: TaskSet | Sequence[Task] | None = None,
    val_every: int = 500,
    val_inner_steps: int | None = None,
    log_path: str | os.PathLike | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    checkpoint_every: int = 500,
    keep_last: int | None = 2,
    resume: bool = True,
    seed: int = 0,
    config: Mapping[str, Any] | None = None,
    progress: bool = True,
    callback: Callback | None = None,
    mode: str | MetaGradientMode = "unrolled",
) -> TrainResult:
    """Meta-trains ω for ``steps`` outer steps in total (resuming from ``checkpoint_dir`` if it holds any).

    Each step runs `metalearn.outer.meta_step` on the meta-batch `batch_for_step` gives;
    every ``val_every`` steps (and after the last) ω is meta-tested on the fixed
    ``val_tasks`` with `metalearn.evaluate.evaluate`; every ``checkpoint_every`` steps (and
    after the last) a checkpoint is written atomically.

    Args:
        omega: ω, trained in place.
        tasks: the source task set (an endless `TaskSet`, or a finite one / list of tasks,
            cycled through in order).
        outer_optimizer: any ``torch.optim`` optimizer over ω's parameters.
        steps: total outer steps of the run (a resumed run continues up to it).
        inner_steps: inner steps per task.
        meta_batch_size: tasks per outer step (B).
        first_order: first-order meta-gradient (FOMAML).
        batching: ``"auto"``, ``"loop"`` or ``"vmap"`` (see `metalearn.outer.choose_batching`).
        clip_grad_norm: clip the meta-gradient to this total norm (``None``: no clipping).
        val_tasks: fixed held-out tasks to validate on, or ``None``.
        val_every: validate after every this many steps.
        val_inner_steps: inner steps for validation (default ``inner_steps``). With an `Implicit`
            mode validation fine-tunes on its proximal objective (``evaluate(proximal=lam)``).
        log_path: JSONL metrics file, or ``None``.
        checkpoint_dir: where checkpoints go, or ``None`` for none.
        checkpoint_every: write a checkpoint after every this many steps.
        keep_last: keep only this many newest checkpoints (``None`` keeps all).
        resume: continue from the newest checkpoint in ``checkpoint_dir``; if ``False``, a
            ``checkpoint_dir`` that already holds checkpoints is refused.
        seed: seeds the per-step generators (`step_generator`) and validation.
        config: your own run configuration (JSON-serialisable, e.g. dataset and model
            settings); stored in every checkpoint together with the training settings above
            that change the trajectory, and a checkpoint written with another one is refused.
        progress: show a tqdm progress bar.
        callback: called as ``callback(step, train_row, val_row_or_None)`` after each step;
            returning ``True`` stops the run after that step (a checkpoint is written, and the
            validation tasks are scored if that step was not a validation step).
        mode: the meta-gradient mode, as in `metalearn.outer.meta_step` (``"unrolled"``,
            ``"first_order"``, ``"checkpointed"``, ``"implicit"``, ``"reptile"`` or a
            `metalearn.gradients` mode object); part of the run's identity unless ``"unrolled"``.

    Interrupting a run (Ctrl-C, a killed job) loses at most the steps since its last
    checkpoint: run the same call again to resume. The resumed run ends with exactly the ω
    of an uninterrupted one when it runs on the same device, with the same
    ``torch.get_num_threads()`` and torch version as the checkpoint's writer; otherwise it
    warns once (`metalearn.checkpoint.ResumeEnvironmentWarning`, naming both values) and
    continues, correct but not bit-identical.

    The ``checkpoint_dir`` is opened before step 0 (`metalearn.run_folder`): a file or an
    unwritable folder is refused, the folder is locked for this run (a second run on it is
    refused with `metalearn.run_folder.RunFolderInUseError` naming the first; the lock of a
    killed run is taken over), and temporary files of killed writes are removed. The lock is
    released when the call returns or raises.

    Returns:
        A `TrainResult`.

    Raises:
        NonFiniteError: NaN/Inf in an inner loss, val loss, meta-gradient or the updated ω;
            ``step`` is the outer step, ``task`` the task-set index of the task (if known).
            No checkpoint is written of a poisoned ω.
        CheckpointMismatchError: ``checkpoint_dir`` holds a checkpoint of another configuration.
        CheckpointLoadError: its newest checkpoint is corrupt.
        FileExistsError: the run would overwrite checkpoints or a log of another run.
        RuntimeError: called under ``torch.no_grad()`` or ``torch.inference_mode()``.
        TypeError, ValueError: a bad argument (an empty task list, a ``clip_grad_norm`` that is not
            positive and finite, an outer optimizer without ω's parameters, a ``seed`` that is not
            an int, a ``log_path`` that is a folder, ...): all checked before any file is written.
        IsADirectoryError: ``log_path`` is a folder.
        NotADirectoryError: ``checkpoint_dir`` is a file (or lies under one).
        PermissionError: nothing can be created in ``checkpoint_dir``.
        RunFolderInUseError: another process is running on ``checkpoint_dir``.
        OSError: the disk is full (``errno.ENOSPC``) while writing a checkpoint (the message
            names the last good checkpoint, which is intact) or the log.
    """
    check_grad_mode("meta_train")
    if not isinstance(omega, MetaKnowledge):
        raise TypeError(
            f"omega must be a MetaKnowledge, got {type(omega).__name__}; wrap the model: MetaKnowledge(model, SGD(lr))"
        )
    _check_task_collection("tasks", tasks)
    _check_task_collection("val_tasks", val_tasks, optional=True)
    check_outer_optimizer(omega, outer_optimizer)
    clip_grad_norm = check_clip_grad_norm(clip_grad_norm)
    check_seed(seed)
    if batching not in BATCHING_MODES:
        raise ValueError(f"batching must be one of {BATCHING_MODES}, got {batching!r}")
    if val_inner_steps is not None:
        _check_positive("val_inner_steps", val_inner_steps, 0)
    log_file = check_log_path(log_path)
    _check_positive("steps", steps, 0)
    _check_positive("inner_steps", inner_steps, 0)
    _check_positive("meta_batch_size", meta_batch_size)
    _check_positive("val_every", val_every)
    _check_positive("checkpoint_every", checkpoint_every)
    if keep_last is not None:
        _check_positive("keep_last", keep_last)
    gradient_mode = resolve_mode(mode, first_order)
    run_config = {
        "user": dict(config or {}),
        "train": {
            "inner_steps": inner_steps,
            "meta_batch_size": meta_batch_size,
            "first_order": bool(getattr(gradient_mode, "first_order", False)),
            "batching": batching,
            "clip_grad_norm": None if clip_grad_norm is None else float(clip_grad_norm),
            "seed": seed,
            "tasks": _describe_tasks(tasks),
        },
    }
    if not isinstance(gradient_mode, Unrolled):  # unrolled runs keep the identity they had before modes existed
        run_config["train"]["mode"] = gradient_mode.config()
    ckpt_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
    if ckpt_dir is not None:  # stored in every checkpoint: refuse it now, not at the first save
        try:
            json.dumps(run_config, allow_nan=False)
        except (TypeError, ValueError) as err:
            raise TypeError(
                f"config must be JSON-serialisable (str/int/float/bool/None, lists, dicts with str keys): {err}"
            ) from None
    log = _JsonlLog(log_file)
    result = TrainResult(omega=omega, steps=0)

    # the folder is checked, locked and tidied before anything else: a second run on it, or a folder
    # that cannot be written, is refused here rather than after checkpoint_every steps
    with open_run_folder(ckpt_dir, log_path=log.path):
        start = 0
        latest = latest_checkpoint(ckpt_dir) if ckpt_dir is not None else None
        if latest is not None:
            if not resume:
                raise FileExistsError(
                    f"checkpoint_dir {ckpt_dir} already holds checkpoints (newest: {latest.name}) and resume=False; "
                    "pass resume=True to continue that run, or choose an empty checkpoint_dir"
                )
            info = load_checkpoint(latest, omega=omega, outer_optimizer=outer_optimizer, config=run_config)
            _warn_if_not_bit_identical(info, omega)
            restore_rng_state(info.rng_state)
            start = result.resumed_from = result.steps = info.step
            result.last_checkpoint = latest
        else:
            log.check_fresh()
        if start >= steps:
            return result

        device = omega_device(omega)
        val_steps = inner_steps if val_inner_steps is None else val_inner_steps
        # validate on the inner problem the mode trains for (iMAML's is the proximal one)

        def validate(step: int) -> Row:
            began = time.perf_counter()
            try:
                ev = evaluate(omega, val_tasks, val_steps, batching=batching, seed=seed, mode=gradient_mode)
            except NonFiniteError as err:
                raise _reraise_with_step(err, step, None, "validation") from err
            val_row: Row = {
                "kind": "val",
                "step": step,
                "metric": ev.metric,
                "mean": ev.mean,
                "ci95": ev.ci95,
                "n": ev.n,
                "inner_steps": val_steps,
                "time": time.perf_counter() - began,
            }
            log.write(val_row)
            result.validations.append(val_row)
            return val_row

        log.open(start)
        bar = tqdm(total=steps, initial=start, disable=not progress, desc="meta-train", unit="step", dynamic_ncols=True)
        try:
            for step in range(start, steps):
                began = time.perf_counter()
                indices = _step_indices(tasks, step, meta_batch_size)
                batch = batch_for_step(tasks, step, meta_batch_size).to(device)
                set_outer_step(omega, step)
                try:
                    stats = meta_step(
                        omega,
                        outer_optimizer,
                        batch,
                        inner_steps,
                        first_order=first_order,
                        batching=batching,
                        clip_grad_norm=clip_grad_norm,
                        generator=step_generator(seed, step),
                        mode=gradient_mode,
                    )
                except NonFiniteError as err:
                    raise _reraise_with_step(err, step, indices, "meta-training") from err
                _check_omega_finite(omega, step)
                row: Row = {"kind": "train", "step": step, **stats, "time": time.perf_counter() - began}
                log.write(row)
                result.history.append(row)
                completed = step + 1
                result.steps = completed

                due = val_tasks is not None and (completed % val_every == 0 or completed == steps)
                val_row = validate(step) if due else None
                stop = bool(callback(step, row, val_row)) if callback is not None else False
                if stop and val_row is None and val_tasks is not None:
                    validate(step)  # the run ends here: its last state is validated too
                if ckpt_dir is not None and (completed % checkpoint_every == 0 or completed == steps or stop):
                    result.last_checkpoint = save_checkpoint(
                        checkpoint_path(ckpt_dir, completed),
                        omega=omega,
                        outer_optimizer=outer_optimizer,
                        step=completed,
                        rng_state=capture_rng_state(),
                        config=run_config,
                        extra={"meta_loss": float(stats["meta_loss"])},
                    )
                    if keep_last is not None:
                        for _, old in list_checkpoints(ckpt_dir)[:-keep_last]:
                            old.unlink(missing_ok=True)

                postfix = {"meta_loss": f"{stats['meta_loss']:.4g}"}
                if val_row is not None:
                    postfix[f"val_{val_row['metric']}"] = f"{val_row['mean']:.4g}"
                bar.set_postfix(postfix, refresh=False)
                bar.update(1)
                if stop:
                    break
        finally:
            bar.close()
            log.close()
        return result
