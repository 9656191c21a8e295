"""The JSONL metrics log of a training run, cut back to the checkpoint a run resumes from."""

from __future__ import annotations

import errno
import json
import math
import os
import stat
import tempfile
from pathlib import Path
from typing import Any

__all__ = ["JsonlLog", "Row"]

Row = dict[str, Any]


def _finite_or_none(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class JsonlLog:
    """Append-only JSONL metrics log, made consistent with the checkpoint a run resumes from.

    The file is touched only by the first `write`: a run that fails before its first step
    completes leaves no log (or the old one unchanged).
    """

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._file: Any = None
        self._start: int | None = None

    def check_fresh(self) -> None:
        """Raises `FileExistsError` if a run starting from step 0 would append to another run's log."""
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
        assert self.path is not None
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
        """Appends one line (NaN/Inf written as ``null``); opens the file at the first call."""
        if self._file is None and self.path is not None and self._start is not None:
            self._open_now()
        if self._file is None:
            return
        try:
            self._file.write(json.dumps({k: _finite_or_none(v) for k, v in row.items()}, allow_nan=False) + "\n")
            self._file.flush()
        except OSError as err:
            if err.errno not in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
                raise
            raise OSError(
                err.errno,
                f"could not write to the log {self.path}: there is no space left on the device "
                f"({os.strerror(err.errno or errno.ENOSPC)}). Free space, then run again: the run resumes from its "
                "last checkpoint and the log is cut back to it",
            ) from err

    def close(self) -> None:
        """Closes the file (if it was opened)."""
        if self._file is not None:
            self._file.close()
            self._file = None
