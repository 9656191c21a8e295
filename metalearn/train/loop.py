"""`meta_train`: the checks, the run identity, and the short loop over outer steps."""

from __future__ import annotations

import contextlib
import json
import math
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from tqdm import tqdm

from metalearn.checks import check_grad_mode, check_outer_optimizer
from metalearn.compile import CompileFallbackWarning
from metalearn.distributed import check_identical, checksum_due, shard_scope, sharded_meta_step
from metalearn.errors import NonFiniteError
from metalearn.evaluate import omega_device
from metalearn.knowledge.meta_knowledge import MetaKnowledge
from metalearn.modes.multi_step import mode_at_outer_step
from metalearn.outer import MetaStep, _grad_norm, non_finite_params
from metalearn.precision import check_precision
from metalearn.run_folder import open_run_folder
from metalearn.train.config import TrainConfig
from metalearn.train.log import Row
from metalearn.train.loggers import Logger
from metalearn.train.run import Run, TrainResult, reraise_with_step
from metalearn.train.schedule import check_scheduler, scheduler_identity, step_scheduler
from metalearn.train.sources import (
    IndexedSource,
    IterableSource,
    RankBatch,
    check_task_collection,
    describe_tasks,
    open_source,
    step_generator,
    to_device,
    warn_if_wrapping,
)

__all__ = ["meta_train", "schedule_hooks", "set_outer_step"]


def set_outer_step(omega: MetaKnowledge, step: int, hooks: Sequence[Callable[[int], Any]] | None = None) -> None:
    """Tells every part of ω with a schedule (e.g. an annealed temperature) the outer step.

    Parts opt in by defining ``set_outer_step(step)``; it is called before each meta-step,
    so the schedule is a pure function of the step and a resumed run follows it exactly.
    ``hooks``: `schedule_hooks` of ω taken once (`meta_train` takes them at the start of a run,
    as it lists ω's parameters once); ``None`` finds them now.
    """
    for hook in schedule_hooks(omega) if hooks is None else hooks:
        hook(step)


def schedule_hooks(omega: MetaKnowledge) -> list[Callable[[int], Any]]:
    """The ``set_outer_step`` methods of ω's modules that define one (on the instance or its class)."""
    hooks = []
    for module in omega.modules():
        # looked up on the instance's dict and its class: `getattr(module, ...)` would raise and catch
        # nn.Module's AttributeError for every module without the hook
        if "set_outer_step" not in module.__dict__ and not hasattr(type(module), "set_outer_step"):
            continue
        hook = getattr(module, "set_outer_step", None)
        if callable(hook):
            hooks.append(hook)
    return hooks


def _check_omega_finite(omega: MetaKnowledge, step: int, params: list[torch.Tensor] | None = None) -> None:
    """Raises `NonFiniteError` if the outer optimizer step made a parameter of ω NaN/Inf.

    One fused norm over every parameter and one host sync per step; the per-parameter scan for
    the names runs only when that norm is not finite (it may be Inf by overflow alone: then
    nothing is raised)."""
    params = list(omega.parameters()) if params is None else params
    if not params:
        return
    with torch.no_grad():  # the norm of every parameter as one vector: NaN/Inf if any entry is
        if math.isfinite(_grad_norm(params).item()):
            return
    bad = non_finite_params(omega)
    if not bad:
        return
    raise NonFiniteError(
        f"outer step {step}: ω parameter(s) {bad} became NaN/Inf in the outer optimizer step although the "
        f"meta-gradient was finite; no checkpoint was written after step {step}. Lower the outer learning rate "
        "or pass clip_grad_norm, and resume from the last checkpoint",
        step=step,
    )


def _config(run: TrainConfig | None, settings: Mapping[str, Any]) -> TrainConfig:
    """The run's `TrainConfig`: ``run`` itself, or one built from the keyword settings (not both)."""
    if run is None:
        try:
            return TrainConfig(**settings)
        except TypeError as err:
            if "TrainConfig.__init__()" not in str(err):
                raise  # a bad value, already named with its fix
            raise TypeError(
                f"meta_train: {str(err).replace('TrainConfig.__init__() ', '')}; the settings are the "
                "fields of metalearn.train.TrainConfig"
            ) from None
    if not isinstance(run, TrainConfig):
        raise TypeError(f"run must be a metalearn.train.TrainConfig, got {type(run).__name__}")
    if settings:
        raise TypeError(
            f"meta_train got run=TrainConfig(...) and the settings {sorted(settings)}: pass them in the config, "
            "e.g. dataclasses.replace(run, steps=...)"
        )
    return run


def _run_identity(cfg: TrainConfig, tasks: Any, user: Mapping[str, Any] | None, scheduler: Any) -> dict[str, Any]:
    """The identity stored in every checkpoint: the user's config, the config's identity fields, the source."""
    train = {**cfg.identity(), "tasks": describe_tasks(tasks)}
    if scheduler is not None:  # runs without a scheduler keep the identity they always had
        train["scheduler"] = scheduler_identity(scheduler)
    identity = {"user": dict(user or {}), "train": train}
    if cfg.checkpoint_dir is not None:  # stored in every checkpoint: refuse it now, not at the first save
        try:
            json.dumps(identity, allow_nan=False)
        except (TypeError, ValueError) as err:
            raise TypeError(
                f"config must be JSON-serialisable (str/int/float/bool/None, lists, dicts with str keys): {err}"
            ) from None
    return identity


def _sharded_stats(
    run: Run, mine: RankBatch, step: int, device: torch.device, hooks: Sequence[Callable[[int], Any]] | None = None
) -> dict[str, Any]:
    """Meta-step ``step`` on this rank's share of the meta-batch, reduced over the ranks (`metalearn.distributed`)."""
    cfg, shard = run.config, run.shard
    assert shard is not None
    set_outer_step(run.omega, step, hooks)
    return sharded_meta_step(
        shard,
        run.omega,
        run.outer_optimizer,
        to_device(mine.batch, device),
        cfg.inner_steps,
        lo=mine.lo,
        total=mine.total,
        first_order=cfg.first_order,
        batching=cfg.batching,
        clip_grad_norm=cfg.clip_grad_norm,
        generator=step_generator(cfg.seed, step),
        mode=mode_at_outer_step(cfg.gradient_mode, step),  # a scheduled mode (MultiStepLoss) learns the step
        step=step,
        chunk_size=cfg.chunk_size,
        memory_budget=cfg.memory_budget,
        kernels=cfg.kernels,
        precision=cfg.precision,
    )


def _meta_step_of(run: Run) -> MetaStep:
    """The run's `MetaStep`: its settings checked once, its compiled step and loss scale kept across steps."""
    cfg = run.config
    return MetaStep(
        run.omega,
        run.outer_optimizer,
        cfg.inner_steps,
        batching=cfg.batching,
        clip_grad_norm=cfg.clip_grad_norm,
        mode=cfg.gradient_mode,
        compile=cfg.compile,
        # a scheduler changes the lr, which compiled optimizer code holds as a constant: the optimizer
        # would step compiled until the first change and eagerly after, a history a resumed run
        # would not repeat (its first lr is a later one); with a scheduler it steps eagerly throughout
        compile_optimizer=run.scheduler is None,
        precision=cfg.precision,
        chunk_size=cfg.chunk_size,
        memory_budget=cfg.memory_budget,
        kernels=cfg.kernels,
    )


def _one_step(
    run: Run,
    source: IndexedSource | IterableSource,
    step: int,
    device: torch.device,
    stepper: MetaStep | None = None,
    hooks: Sequence[Callable[[int], Any]] | None = None,
) -> Row:
    """Meta-step ``step`` (data, schedule, meta_step, checks, scheduler); returns its log row."""
    cfg, omega = run.config, run.omega
    began = time.perf_counter()
    stepper = stepper if stepper is not None else _meta_step_of(run)
    indices: list[int] | None = None
    try:
        if run.shard is not None:
            mine = source.shard_batch(step, run.shard)
            indices = mine.indices
            stats = _sharded_stats(run, mine, step, device, hooks)
        else:
            batch, indices = source.batch(step)
            set_outer_step(omega, step, hooks)
            # a scheduled mode (MultiStepLoss) learns the outer step
            stats = stepper(to_device(batch, device), generator=step_generator(cfg.seed, step), outer_step=step)
    except NonFiniteError as err:
        raise reraise_with_step(err, step, indices, "meta-training") from err
    _check_omega_finite(omega, step, stepper.params)
    step_scheduler(run.scheduler, stats)
    row: Row = {"kind": "train", "step": step, **stats, "time": time.perf_counter() - began}
    run.emit(row)
    run.result.history.append(row)
    run.result.steps = step + 1
    return row


def _after_step(run: Run, step: int, row: Row, callback: Any) -> tuple[Row | None, bool]:
    """Validation when due, the callback, and the checkpoint; returns the val row and whether to stop."""
    completed, cfg = step + 1, run.config
    due = run.val_tasks is not None and (completed % cfg.val_every == 0 or completed == cfg.steps)
    val_row = run.validate(step) if due else None
    stop = bool(callback(step, row, val_row)) if callback is not None else False
    if run.shard is not None:
        if callback is not None:  # a callback that stops one rank stops them all, after the same step
            stop = run.shard.any(stop, f"agreeing whether to stop after outer step {step}")
        if checksum_due(run.shard, completed):
            check_identical(run.shard, run.omega, step)
    if stop and val_row is None and run.val_tasks is not None:
        run.validate(step)  # the run ends here: its last state is validated too
    if run.checkpoint_due(completed, stop):
        run.checkpoint(completed, row)
    return val_row, stop


def _loop(run: Run, source: IndexedSource | IterableSource, start: int, callback: Any) -> None:
    """Outer steps ``start .. steps - 1`` under a progress bar; closes the log at the end."""
    cfg = run.config
    device = omega_device(run.omega)
    run.open_logs(start)
    stepper = _meta_step_of(run)
    hooks = schedule_hooks(run.omega)  # once per run, like ω's parameter list (`MetaStep`)
    if run.shard is not None and cfg.compile:
        warnings.warn(
            f"compile={cfg.compile!r}: a torch.distributed run's sharded steps run eagerly (the compiled form is "
            "one process's); pass compile=False to silence this",
            CompileFallbackWarning,
            stacklevel=3,
        )
    quiet = not cfg.progress or not run.writes_files  # under torch.distributed, one bar: rank 0's
    label = cfg.progress if isinstance(cfg.progress, str) else "meta-train"
    bar = tqdm(total=cfg.steps, initial=start, disable=quiet, desc=label, unit="step", dynamic_ncols=True)
    try:
        for step in range(start, cfg.steps):
            row = _one_step(run, source, step, device, stepper, hooks)
            val_row, stop = _after_step(run, step, row, callback)
            postfix = {"meta_loss": f"{row['meta_loss']:.4g}"}
            if val_row is not None:
                postfix[f"val_{val_row['metric']}"] = f"{val_row['mean']:.4g}"
            bar.set_postfix(postfix, refresh=False)
            bar.update(1)
            if stop:
                break
    finally:
        bar.close()
        run.close_logs()


def meta_train(
    omega: MetaKnowledge,
    tasks: Any,
    outer_optimizer: torch.optim.Optimizer,
    *,
    run: TrainConfig | None = None,
    config: Mapping[str, Any] | None = None,
    val_tasks: Any = None,
    callback: Any = None,
    scheduler: Any = None,
    loggers: Sequence[Logger] | None = None,
    **settings: Any,
) -> TrainResult:
    """Meta-trains ω for ``steps`` outer steps in total (resuming from ``checkpoint_dir`` if it holds any).

    Call it with the run's settings as keywords (``meta_train(omega, tasks, opt, steps=1000,
    inner_steps=1, meta_batch_size=4, checkpoint_dir=...)``) or as one frozen config
    (``meta_train(omega, tasks, opt, run=TrainConfig(steps=1000, inner_steps=1, meta_batch_size=4))``);
    the settings are the fields of `TrainConfig`, documented there.

    Each step runs `metalearn.outer.meta_step` on the step's meta-batch (see
    `metalearn.train.sources`: a `TaskSet` or list gives tasks ``s*B .. s*B+B-1`` of step ``s``,
    any other iterable is consumed in order); every ``val_every`` steps (and after the last) ω
    is meta-tested on ``val_tasks`` with `metalearn.evaluate.evaluate` (with an `Implicit` mode,
    on its proximal objective); every ``checkpoint_every`` steps (and after the last) a
    checkpoint is written atomically.

    Args:
        omega: ω, trained in place.
        tasks: the source: an endless `TaskSet`, a finite one or a list of tasks (cycled through
            in order; a finite `TaskSet` that wraps around is warned about once,
            `TaskSetWrapWarning`), or any iterable of task batches, e.g. a DataLoader.
        outer_optimizer: any ``torch.optim`` optimizer over ω's parameters.
        run: the run's `TrainConfig` (instead of the keyword settings).
        config: your own run configuration (JSON-serialisable, e.g. dataset and model settings);
            stored in every checkpoint with the config's identity fields, the source's
            description and the scheduler's, and a checkpoint written with another one is refused.
        val_tasks: fixed held-out tasks to validate on, or ``None``.
        callback: called as ``callback(step, train_row, val_row_or_None)`` after each step;
            returning ``True`` stops the run after that step (a checkpoint is written, and the
            validation tasks are scored if that step was not a validation step).
        scheduler: a ``torch.optim.lr_scheduler`` of ``outer_optimizer``, stepped once after each
            outer step (``ReduceLROnPlateau`` with the step's meta-loss) and saved in every checkpoint.
        loggers: where the rows go besides ``log_path`` and the result: `metalearn.train.Logger`
            objects (`TensorBoardLogger`, `CallbackLogger`, your own; a plain callable is wrapped
            in a `CallbackLogger`), each opened with the start step and closed at the end.
        **settings: the fields of `TrainConfig` (``steps``, ``inner_steps``, ``meta_batch_size``, ...).

    Interrupting a run loses at most the steps since its last checkpoint: run the same call
    again to resume; it says ``resumed from step N of M (path)`` (or that there is nothing to do)
    as an INFO record of the ``metalearn.train`` logger and, with ``progress=True``, on stderr.
    The resumed run ends with exactly the ω of an uninterrupted one on the same device, thread
    count and torch version (otherwise `ResumeEnvironmentWarning`) and, for an iterable source,
    when it yields the same items again (see `metalearn.train.sources`).

    Under ``torch.distributed`` (``torchrun``; the ``distributed`` setting, see
    `metalearn.distributed` and ``docs/distributed.md``) every rank adapts its contiguous share of
    each meta-batch, the meta-gradient is all-reduced once per step, ω stays identical on every
    rank, rank 0 writes the log and checkpoints, and an error on one rank is raised on all.

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
            positive and finite, an outer optimizer without ω's parameters, a scheduler of another
            optimizer, a ``seed`` that is not an int, ...): all checked before any file is written;
            ValueError also when a one-shot iterator source runs out.
        IsADirectoryError: ``log_path`` is a folder.
        NotADirectoryError: ``checkpoint_dir`` is a file (or lies under one).
        PermissionError: nothing can be created in ``checkpoint_dir``.
        RunFolderInUseError: another process is running on ``checkpoint_dir``.
        DistributedError: under torch.distributed, another rank died, hangs past the timeout or
            failed (its error is named), or ω diverged across ranks.
        OSError: the disk is full (``errno.ENOSPC``) while writing a checkpoint (the message
            names the last good checkpoint, which is intact) or the log.
    """
    check_grad_mode("meta_train")
    if not isinstance(omega, MetaKnowledge):
        raise TypeError(
            f"omega must be a MetaKnowledge, got {type(omega).__name__}; "
            "wrap the model: MetaKnowledge(model, InnerSGD(lr))"
        )
    check_task_collection("tasks", tasks, iterable=True)
    check_task_collection("val_tasks", val_tasks, optional=True)
    check_outer_optimizer(omega, outer_optimizer)
    cfg = _config(run, settings)
    check_scheduler(scheduler, outer_optimizer)
    check_precision(cfg.precision, omega_device(omega))  # fp16 off CUDA: refused before any file is touched
    identity = _run_identity(cfg, tasks, config, scheduler)
    with shard_scope(cfg.distributed, omega_device(omega)) as shard:
        state = Run(omega, outer_optimizer, cfg, identity, val_tasks, scheduler, loggers, shard=shard)
        warn_if_wrapping(tasks, cfg.steps, cfg.meta_batch_size)
        source = open_source(tasks, cfg.meta_batch_size)
        # the folder is checked, locked and tidied before anything else: a second run on it, or a folder
        # that cannot be written, is refused here rather than after checkpoint_every steps
        with contextlib.ExitStack() as folder:
            _open_folder(state, folder)
            start = state.resume()
            if start >= cfg.steps:
                return state.result
            source.start(start)
            state.restore_rng()
            _loop(state, source, start, callback)
            return state.result


def _open_folder(run: Run, stack: contextlib.ExitStack) -> None:
    """Opens (checks, locks, tidies) the run folder; under torch.distributed on rank 0 only, and a
    refusal there is raised on every rank."""
    def enter() -> None:
        stack.enter_context(open_run_folder(run.ckpt_dir, log_path=run.log.path))

    if run.shard is None:
        enter()
    else:
        run.shard.main_only(enter, "opening checkpoint_dir")
