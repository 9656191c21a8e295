"""Logger objects: where a run's rows go besides its `TrainResult` (a JSONL file, TensorBoard, your code).

`meta_train` sends every row it makes to each logger of ``loggers=[...]``: one
``{"kind": "train", "step": s, ...}`` row per outer step (the keys `metalearn.outer.meta_step`
returns, plus ``time``, the step's seconds) and one ``{"kind": "val", "step": s, "metric": ...,
"mean": ..., "ci95": ..., ...}`` row per validation. A logger is three methods::

    class PrintLogger(Logger):
        def log(self, row):
            if row["kind"] == "val":
                print(row["step"], row["mean"])

``open(start)`` is called once before the first row with the step the run starts from (``> 0``
when it resumes from a checkpoint: rows of steps ``>= start`` the killed run wrote are stale,
and a logger that keeps history cuts them, as `JsonlLogger` and `TensorBoardLogger` do);
``close()`` once at the end, also when the run raises. Loggers open their files at the first
row, so a run refused before its first step leaves nothing behind. ``log_path=`` is a
`JsonlLogger` written for you.
"""

from __future__ import annotations

import math
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from metalearn.train.log import JsonlLog, Row

__all__ = ["CallbackLogger", "JsonlLogger", "Logger", "TensorBoardLogger", "check_loggers", "scalars_of"]


class Logger(ABC):
    """Receives a run's rows. Subclass it and define `log`; `open` and `close` are optional."""

    def open(self, start: int) -> None:  # noqa: B027 (optional hook: most loggers need no set-up)
        """Called once before the first row; ``start`` is the first step this run makes."""

    @abstractmethod
    def log(self, row: Row) -> None:
        """Receives one train or val row (a dict of JSON-serialisable values)."""

    def close(self) -> None:  # noqa: B027 (optional hook)
        """Called once when the run ends (or raises)."""


class JsonlLogger(Logger):
    """The JSONL log (one JSON object per line), cut back to the checkpoint a run resumes from.

    Args:
        path: the file; its folder is created at the first row.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self._log = JsonlLog(Path(path))

    @property
    def path(self) -> Path:
        """The log file."""
        assert self._log.path is not None
        return self._log.path

    def check_fresh(self) -> None:
        """Raises `FileExistsError` if a run starting from step 0 would append to another run's log."""
        self._log.check_fresh()

    def open(self, start: int) -> None:
        self._log.open(start)

    def log(self, row: Row) -> None:
        self._log.write(row)

    def close(self) -> None:
        self._log.close()


class CallbackLogger(Logger):
    """Calls ``fn(row)`` for each row: the hook for any other tracker (wandb, MLflow, a queue).

    Example::

        import wandb
        run = wandb.init(project="maml")
        meta_train(..., loggers=[CallbackLogger(lambda row: run.log(scalars_of(row), step=row["step"]))])
    """

    def __init__(self, fn: Callable[[Row], Any]) -> None:
        if not callable(fn):
            raise TypeError(f"CallbackLogger needs a callable, got {type(fn).__name__}")
        self.fn = fn

    def log(self, row: Row) -> None:
        self.fn(row)


def scalars_of(row: Mapping[str, Any]) -> dict[str, float]:
    """The row's numbers as ``{"train/meta_loss": ..., "val/accuracy": ..., ...}`` tags.

    Train rows give ``train/<key>`` for each finite number but ``step`` (``time`` becomes
    ``train/seconds_per_step``); val rows give ``val/<metric>`` (the mean), ``val/<metric>_ci95``
    and ``val/seconds``. Strings, ``None`` (NaN as logged) and booleans are left out.
    """
    kind = row.get("kind", "train")
    if kind == "val":
        metric = str(row.get("metric", "metric"))
        pairs: dict[str, Any] = {
            f"val/{metric}": row.get("mean"),
            f"val/{metric}_ci95": row.get("ci95"),
            "val/seconds": row.get("time"),
        }
    else:
        pairs = {}
        for key, value in row.items():
            if key in ("kind", "step"):
                continue
            pairs["train/seconds_per_step" if key == "time" else f"{kind}/{key}"] = value
    return {
        tag: float(v)
        for tag, v in pairs.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))
    }


class TensorBoardLogger(Logger):
    """The run's scalars as TensorBoard events (`scalars_of` names them), at the row's step.

    Needs the ``tensorboard`` package (``pip install tensorboard``, or the ``tensorboard`` extra).
    A resumed run purges the events of steps ``>= start`` that the killed run wrote, so the
    curves show each step once. View with ``tensorboard --logdir LOG_DIR``.

    Args:
        log_dir: the folder of the event files (created at the first row).
        flush_secs: how often the writer flushes to disk.

    Raises:
        ImportError: at construction, when tensorboard is not installed (the message says how).
    """

    def __init__(self, log_dir: str | os.PathLike, flush_secs: int = 30) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as err:  # torch raises this when the tensorboard package is missing
            raise ImportError(
                "TensorBoardLogger needs the tensorboard package: pip install tensorboard "
                "(or the project's 'tensorboard' extra)"
            ) from err
        self._writer_type = SummaryWriter
        self.log_dir = Path(log_dir)
        self.flush_secs = flush_secs
        self._writer: Any = None
        self._start = 0

    def open(self, start: int) -> None:
        self._start = start

    def log(self, row: Row) -> None:
        if self._writer is None:  # at the first row: a run refused before its first step writes nothing
            purge = self._start if self._start > 0 else None
            self._writer = self._writer_type(str(self.log_dir), purge_step=purge, flush_secs=self.flush_secs)
        step = int(row.get("step", 0))
        for tag, value in scalars_of(row).items():
            self._writer.add_scalar(tag, value, step)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def check_loggers(loggers: Iterable[Any] | None) -> list[Logger]:
    """The ``loggers=`` argument as a list of `Logger` (a plain callable becomes a `CallbackLogger`).

    Raises:
        TypeError: not a list of loggers (names the bad item and the fix).
    """
    if loggers is None:
        return []
    if isinstance(loggers, (Logger, str, bytes)) or not isinstance(loggers, Iterable):
        raise TypeError(
            f"loggers must be a list of Logger objects, got {type(loggers).__name__}; "
            "e.g. loggers=[TensorBoardLogger('runs/tb')]"
        )
    out: list[Logger] = []
    for i, item in enumerate(loggers):
        if isinstance(item, Logger):
            out.append(item)
        elif callable(item):
            out.append(CallbackLogger(item))
        else:
            raise TypeError(
                f"loggers[{i}] is a {type(item).__name__}, not a Logger; subclass metalearn.train.Logger "
                "(define log(row)) or pass a callable, which is wrapped in a CallbackLogger"
            )
    return out
