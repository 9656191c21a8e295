"""Entry checks of the public API: arguments that would silently train nothing, or the wrong way.

Each check raises before any work is done (no inner step, no file, ω unchanged), with an
exception that names the bad value and the fix. They are cheap: plain Python on the
arguments, except `check_labels`, which costs one small reduction (one host sync) and one
forward of one task's inputs per batch of integer targets. This module imports nothing of the package, so any
layer may use it.
"""

from __future__ import annotations

import functools
import math
import os
import warnings
from collections.abc import Callable, Iterable
from numbers import Real
from pathlib import Path
from typing import ParamSpec, TypeVar

import torch
from torch import Tensor, nn

__all__ = [
    "check_clip_grad_norm",
    "check_grad_mode",
    "check_labels",
    "check_log_path",
    "check_outer_optimizer",
    "check_seed",
    "check_steps",
    "inner_steps_keyword",
    "explain_label_error",
    "head_size",
]


def check_grad_mode(caller: str) -> None:
    """Raises `RuntimeError` if autograd is off (``torch.no_grad()`` or ``torch.inference_mode()``).

    Under either, a meta-gradient is silently zero (loop path) or cannot be taken, so ω would
    never change while the run looks healthy.
    """
    if torch.is_inference_mode_enabled():
        raise RuntimeError(
            f"{caller} was called under torch.inference_mode(): no meta-gradient can be taken there, so ω "
            "would never change. Call it outside the inference_mode() block"
        )
    if not torch.is_grad_enabled():
        raise RuntimeError(
            f"{caller} was called under torch.no_grad() (or with torch.set_grad_enabled(False)): the "
            "meta-gradient would be zero and ω would never change. Call it outside the no_grad() block"
        )


def check_steps(name: str, value: object) -> int:
    """``value`` as a step count: an int (not a bool) of at least 0; raises `TypeError` / `ValueError`."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int number of steps, got {value!r} ({type(value).__name__})")
    if value < 0:
        raise ValueError(f"{name} must be at least 0 (0 means no inner steps), got {value}")
    return value


_P = ParamSpec("_P")
_R = TypeVar("_R")


def inner_steps_keyword(fn: Callable[_P, _R]) -> Callable[_P, _R]:
    """Refuses the old keyword ``steps=`` of ``fn`` (renamed ``inner_steps``) with a `TypeError` that names the fix.

    ``steps`` counts outer steps in `meta_train`; the inner count is ``inner_steps`` everywhere, so an
    old call ``evaluate(omega, tasks, steps=3)`` says what to write instead of Python's bare
    "unexpected keyword argument".
    """

    @functools.wraps(fn)
    def refuse_steps(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        if "steps" in kwargs:
            raise TypeError(
                f"{fn.__name__}() takes inner_steps=, not steps= (renamed: steps= is meta_train's outer step "
                f"count); call {fn.__name__}(..., inner_steps={kwargs['steps']!r})"
            )
        return fn(*args, **kwargs)

    return refuse_steps


def check_seed(value: object, name: str = "seed") -> int:
    """``value`` as a seed: an int, not a bool (``True`` is no seed anyone means); raises `TypeError`."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__}); pass e.g. {name}=0")
    return value


def check_clip_grad_norm(value: object) -> float | None:
    """``value`` as a clipping norm: ``None`` or a positive finite number.

    A norm of 0 zeroes every update; a negative one flips every update uphill (torch scales
    by ``max_norm / norm``); NaN/Inf poison or disable clipping.
    """
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"clip_grad_norm must be a positive number or None, got {value!r} ({type(value).__name__})")
    value = float(value)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(
            f"clip_grad_norm must be a positive finite number (the largest total norm of the meta-gradient), "
            f"got {value}; a value <= 0 would zero or reverse every update. Pass e.g. clip_grad_norm=10.0, or None "
            "for no clipping"
        )
    return value


def _optimizer_params(optimizer: torch.optim.Optimizer) -> list[Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"]]


def check_outer_optimizer(omega: nn.Module, optimizer: object) -> None:
    """Checks that the outer optimizer trains ω.

    Raises:
        TypeError: ``optimizer`` is not a ``torch.optim.Optimizer``.
        ValueError: it holds none of ω's parameters, or tensors that are not ω's (ω would
            never change, or another module would be trained instead).

    Warns:
        UserWarning: naming ω parameters (with ``requires_grad``) the optimizer does not hold;
            they get a meta-gradient but are never updated.
    """
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(
            f"outer_optimizer must be a torch.optim.Optimizer over ω's parameters, got {type(optimizer).__name__}; "
            "pass e.g. torch.optim.Adam(omega.parameters(), lr=1e-3)"
        )
    held = {id(p) for p in _optimizer_params(optimizer)}
    named = list(omega.named_parameters())
    mine = {id(p) for _, p in named}
    foreign = [p for p in _optimizer_params(optimizer) if id(p) not in mine]
    if not held & mine:
        raise ValueError(
            f"the outer optimizer holds {len(held)} tensor(s) but none of ω's {len(named)} parameters, so ω would "
            "never change; build it from ω after creating ω, e.g. torch.optim.Adam(omega.parameters(), lr=1e-3) "
            "(not from the model before it was wrapped, or from another ω)"
        )
    if foreign:
        shapes = [tuple(p.shape) for p in foreign[:4]]
        raise ValueError(
            f"the outer optimizer holds {len(foreign)} tensor(s) that are not parameters of ω (shapes {shapes}"
            f"{', ...' if len(foreign) > 4 else ''}); meta-training would step them with no meta-gradient. "
            "Build it from omega.parameters() only"
        )
    missing = [n for n, p in named if p.requires_grad and id(p) not in held]
    if missing:
        shown = ", ".join(missing[:6]) + (", ..." if len(missing) > 6 else "")
        warnings.warn(
            f"the outer optimizer does not hold {len(missing)} trainable ω parameter(s): {shown}; they get a "
            "meta-gradient but never change. Pass omega.parameters() to the optimizer, or set "
            "requires_grad_(False) on those you mean to freeze",
            UserWarning,
            stacklevel=3,
        )


def check_log_path(path: str | os.PathLike | None) -> Path | None:
    """``path`` as a `Path` if it can be a log file: not a folder, and its parent not a file."""
    if path is None:
        return None
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(
            f"log_path {path} is a folder; pass a file path inside it, e.g. log_path={str(path / 'log.jsonl')!r}"
        )
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise NotADirectoryError(f"log_path {path}: {parent} is a file, not a folder; choose another log_path")
            break
    return path


def _first_task_with(bad: Tensor) -> int:
    """Index of the first task (leading dim) of a ``[tasks, ...]`` boolean mask with a True."""
    return int(bad.reshape(bad.shape[0], -1).any(dim=1).nonzero()[0, 0])


def _probe_forward(omega: nn.Module, x: Tensor) -> Tensor:
    """ω's model on ``x`` with no side effect: no graph, the global RNG state restored afterwards
    (dropout draws nothing later code would see), and clones of the model's buffers, so that a
    forward that updates statistics in place (``F.batch_norm`` given running stats) leaves the
    real buffers as they were."""
    devices = [x.device.index or 0] if x.is_cuda else []
    with torch.no_grad(), torch.random.fork_rng(devices=devices):
        model: nn.Module = omega.model  # type: ignore[assignment]  # ω is a MetaKnowledge (not imported here)
        state = {**omega.model_params(), **{n: b.clone() for n, b in model.named_buffers()}}  # type: ignore[operator]
        return omega(state, x)  # type: ignore[operator]


def head_size(omega: nn.Module, x: Tensor) -> int | None:
    """The number of outputs (classes) ω's model gives for inputs ``x`` (one task's, ``[n, ...]``).

    One forward of ``x`` with no side effect (`_probe_forward`); ``None`` if the model cannot
    run on ``x`` alone (the check that needs it is then left to torch).
    """
    try:
        output = _probe_forward(omega, x)
    except Exception:  # noqa: BLE001 - a model that needs more than one task's inputs: no probe
        return None
    if output.ndim == 0:
        return None
    return int(output.shape[1] if output.ndim >= 2 else output.shape[0])


def check_labels(
    omega: nn.Module,
    x: Tensor,
    halves: Iterable[tuple[str, Tensor]],
    batched: bool = True,
    task_offset: int = 0,
) -> None:
    """Raises `ValueError` naming the task if an integer target is outside ``0 .. head size - 1``.

    Negative labels raise a raw torch error in cross-entropy, except ``-100`` (its ignore index),
    which silently drops the example from the loss; labels ``>=`` the head size raise a raw error
    on CPU (after other tasks' gradients were accumulated) and a device-side assert on CUDA.
    The cost, only for integer targets: one reduction over the labels with one host sync, and
    one forward of the first task's inputs (`head_size`) to know the head size. Floating
    targets are skipped (their shape is checked in the loss).

    Args:
        omega: ω (its model gives the head size).
        x: inputs ``[tasks, n, ...]`` if ``batched``, else ``[n, ...]``; the first task's are probed.
        halves: ``(name, targets)`` pairs, e.g. ``[("train", y_train), ("val", y_val)]``;
            targets ``[tasks, n]`` if ``batched``, else ``[n]`` (one task).
        batched: whether inputs and targets have a leading task dimension.
        task_offset: index of the first task, for the message.
    """
    halves = [(name, y) for name, y in halves if not y.is_floating_point() and y.numel() > 0]
    if not halves or halves[0][1].dtype in (torch.bool,) or halves[0][1].is_complex():
        return
    bounds = torch.stack([y.amin() for _, y in halves] + [y.amax() for _, y in halves]).tolist()
    lowest, highest = min(bounds[: len(halves)]), max(bounds[len(halves) :])
    if lowest < 0:
        _raise_for(halves, lambda y: y < 0, batched, task_offset, "")
    head = head_size(omega, x[0] if batched else x)
    if head is not None and head > 1 and highest >= head:
        _raise_for(halves, lambda y: y >= head, batched, task_offset, f", but ω's model has {head} outputs")


def _raise_for(halves, is_bad, batched: bool, task_offset: int, head_note: str) -> None:
    for name, y in halves:
        bad = is_bad(y)
        if not bool(bad.any()):
            continue
        task = _first_task_with(bad) if batched else 0
        labels = y[task] if batched else y
        value = int(labels[is_bad(labels)][0])
        if head_note:
            head = head_note.split()[-2]
            raise ValueError(
                f"task {task + task_offset} has {name} label {value}{head_note} (the head size), so labels must be "
                f"0 .. {int(head) - 1}. Build the model's head with as many outputs as the tasks have ways "
                f"(e.g. Conv4(num_classes=ways)), or draw tasks with at most {head} ways"
            )
        hint = " (-100 is cross-entropy's ignore index: it would silently drop those examples)" if value == -100 else ""
        raise ValueError(
            f"task {task + task_offset} has {name} label {value}{hint}; class labels must be 0 .. ways-1. Relabel "
            "each task's classes 0 .. ways-1 (EpisodicTaskSet does), or cast regression targets to float"
        )


def _is_label_range_error(err: BaseException) -> bool:
    return isinstance(err, (IndexError, RuntimeError)) and "out of bounds" in str(err)


def explain_label_error(
    err: BaseException, omega: nn.Module, x: Tensor, halves: Iterable[tuple[str, Tensor]], batched: bool = True
) -> BaseException:
    """The error to raise for ``err``: a `ValueError` naming the task, the label and ω's head size if
    ``err`` is torch's raw "target out of bounds" error for labels ``>=`` the model's outputs, else ``err``.

    Runs only on the error path: it costs one forward of the first task's inputs ``x`` (no graph).
    """
    if not _is_label_range_error(err):
        return err
    halves = [(name, y) for name, y in halves if not y.is_floating_point() and y.numel() > 0]
    if not halves:
        return err
    try:
        head = int(_probe_forward(omega, x[0] if batched else x).shape[-1])
    except Exception:  # noqa: BLE001 - the explanation must never hide the original error
        return err
    for name, y in halves:
        bad = y >= head
        if bool(bad.any()):
            task = _first_task_with(bad) if batched else 0
            value = int((y[task] if batched else y).amax())
            return ValueError(
                f"task {task} has {name} label {value}, but ω's model has {head} outputs (the head size), so labels "
                f"must be 0 .. {head - 1}. Build the model's head with as many outputs as the tasks have ways "
                f"(e.g. Conv4(num_classes=ways)), or draw tasks with at most {head} ways"
            )
    return err
