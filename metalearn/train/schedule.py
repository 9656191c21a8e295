"""The outer learning-rate scheduler of a run: checked, described in the identity, stepped once per step."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

__all__ = ["check_scheduler", "scheduler_identity", "step_scheduler"]

_SCHEDULER_METHODS = ("step", "state_dict", "load_state_dict")


def check_scheduler(scheduler: Any, outer_optimizer: torch.optim.Optimizer) -> None:
    """Raises `TypeError` / `ValueError` unless ``scheduler`` is ``None`` or a scheduler of ``outer_optimizer``."""
    if scheduler is None:
        return
    if not all(callable(getattr(scheduler, m, None)) for m in _SCHEDULER_METHODS):
        raise TypeError(
            f"scheduler must be a torch.optim.lr_scheduler (with step, state_dict, load_state_dict), got "
            f"{type(scheduler).__name__}; e.g. scheduler=torch.optim.lr_scheduler.CosineAnnealingLR(outer_optimizer, "
            "T_max=steps)"
        )
    if getattr(scheduler, "optimizer", None) is not outer_optimizer:
        raise ValueError(
            f"scheduler {type(scheduler).__name__} schedules another optimizer than outer_optimizer, so it would "
            "change nothing meta_train steps; build it on the outer optimizer, e.g. "
            f"{type(scheduler).__name__}(outer_optimizer, ...)"
        )


def _plain(value: Any) -> bool:
    if isinstance(value, (list, tuple)):
        return all(_plain(v) for v in value)
    return value is None or isinstance(value, (bool, int, float, str))


def scheduler_identity(scheduler: Any) -> dict[str, Any]:
    """The scheduler's class and settings (its plain public state, less the step counter) for the run identity."""
    state: Mapping[str, Any] = scheduler.state_dict()
    settings = {k: v for k, v in state.items() if not k.startswith("_") and k != "last_epoch" and _plain(v)}
    return {"class": type(scheduler).__qualname__, "settings": settings}


def step_scheduler(scheduler: Any, stats: Mapping[str, Any]) -> None:
    """Steps ``scheduler`` once (``ReduceLROnPlateau`` on the step's meta-loss); nothing if ``None``."""
    if scheduler is None:
        return
    if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        scheduler.step(float(stats["meta_loss"]))
    else:
        scheduler.step()
