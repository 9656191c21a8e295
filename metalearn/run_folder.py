r"""The run folder (a ``checkpoint_dir``): one writer at a time, checked before any work, tidy after a crash.

`open_run_folder` is what `metalearn.meta_train` does before its first step:

1. refuses a ``checkpoint_dir`` that is a file (or lies under one) with `NotADirectoryError`,
   and one it cannot write to with `PermissionError` (found by really creating a probe file:
   permission bits alone say nothing for root, a read-only mount or a full quota);
2. takes an exclusive lock on ``.metalearn.lock`` in the folder and writes the holder's pid,
   host and start time into it; a second run on the same folder gets `RunFolderInUseError`
   naming the first;
3. removes the temporary files (``.*.tmp``) that a killed write left behind.

The lock is released (and its file removed) when the run ends, also on an exception.

What is guaranteed, by file system:

- **Local file systems (Linux, macOS)**: the lock is ``fcntl.flock`` on the lock file. The kernel
  drops it when the holding process dies however it dies (SIGKILL included), so a lock file left
  by a killed run is simply taken over by the next; no pid guessing is involved.
- **NFS**: Linux emulates ``flock`` with NFS byte-range locks, which the server arbitrates across
  clients (NFSv4, or v3 with ``lockd``); a crashed client's locks expire with its lease. A mount
  with ``nolock`` / ``local_lock=flock`` makes the lock local to one client: two hosts could then
  both run. The recorded host names the other machine in the error when the lock is seen.
- **Windows**: ``msvcrt.locking`` on one byte of the lock file (past the record, which stays
  readable); Windows releases it when the process ends.
- **No OS lock** (a file system that answers ``flock`` with ``ENOLCK``/``EOPNOTSUPP``): an
  exclusively created lock file. A lock file whose holder ran on this host and no longer exists
  is taken over (checked with ``os.kill(pid, 0)``); one from another host is refused with the
  path to delete if that run is known to be gone.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import json
import os
import re
import socket
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "LOCK_NAME",
    "RunFolder",
    "RunFolderInUseError",
    "default_file_mode",
    "lock_run_folder",
    "open_run_folder",
    "remove_stale_temp_files",
]

LOCK_NAME = ".metalearn.lock"
_PROBE_PREFIX = ".metalearn-probe-"
_CHECKPOINT_TEMP = re.compile(r"^\.step-\d+\.pt\..+\.tmp$")
_PROBE_TEMP = re.compile(r"^\.metalearn-probe-.+\.tmp$")
_WINDOWS_LOCK_OFFSET = 1 << 20  # the byte locked on Windows: past the record, so the record stays readable
_NO_OS_LOCK = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}
_UNWRITABLE = {errno.EACCES, errno.EPERM, errno.EROFS}


class RunFolderInUseError(RuntimeError):
    """Another process holds the lock of a run folder (``checkpoint_dir``)."""


# -- file modes --------------------------------------------------------------------------------


def _current_umask() -> int:
    """The process's umask: read from /proc where it can be (no change of process state), else set and reset."""
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def default_file_mode() -> int:
    """The mode ``open()`` gives a new file: ``0o666`` less the umask (``tempfile.mkstemp`` uses 0o600)."""
    return 0o666 & ~_current_umask()


def _chmod_fd(fd: int, mode: int) -> None:
    if hasattr(os, "fchmod"):  # not on Windows, where there are no such mode bits to honour
        os.fchmod(fd, mode)


# -- temporary files ---------------------------------------------------------------------------


def remove_stale_temp_files(directory: Path, *, log_path: Path | None = None) -> list[Path]:
    """Deletes temporary files a killed write left: checkpoints' ``.step-*.tmp``, probes, the log's temp.

    Only call it while holding the folder's lock: a live run's temporary file would go too.

    Returns:
        The files removed.
    """
    removed = []
    patterns = [(directory, _CHECKPOINT_TEMP), (directory, _PROBE_TEMP)]
    if log_path is not None:
        patterns.append((log_path.parent, re.compile(rf"^\.{re.escape(log_path.name)}\..+\.tmp$")))
    for folder, pattern in patterns:
        with contextlib.suppress(FileNotFoundError, NotADirectoryError):
            for entry in os.scandir(folder):
                if pattern.match(entry.name) and entry.is_file(follow_symlinks=False):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(entry.path)
                        removed.append(Path(entry.path))
    return removed


# -- checks ------------------------------------------------------------------------------------


def _make_folder(directory: Path) -> list[Path]:
    """Creates ``directory`` (and missing parents); returns those created, deepest last."""
    if directory.exists() and not directory.is_dir():
        raise NotADirectoryError(
            f"checkpoint_dir {directory} is a file, not a folder. Pass a folder (it is created if missing), "
            "or move the file away"
        )
    missing = []
    for candidate in (directory, *directory.parents):
        if candidate.exists():
            if not candidate.is_dir():
                raise NotADirectoryError(
                    f"checkpoint_dir {directory} cannot be created: {candidate} is a file, not a folder. "
                    "Pass a checkpoint_dir whose parents are folders"
                )
            break
        missing.append(candidate)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        _remove_created(missing)
        raise _unwritable(directory, err) from err
    return list(reversed(missing))


def _unwritable(directory: Path, err: OSError) -> OSError:
    reason = os.strerror(err.errno) if err.errno else str(err)
    if err.errno in _UNWRITABLE:
        return PermissionError(
            err.errno,
            f"checkpoint_dir {directory} is not writable ({reason}); no step was run. Pass a checkpoint_dir "
            "this process can create files in, or fix its permissions / remount it read-write",
        )
    return OSError(
        err.errno,
        f"checkpoint_dir {directory} cannot be written ({reason}); no step was run. Pass another "
        "checkpoint_dir, or fix the folder",
    )


def _probe_writable(directory: Path) -> None:
    """Creates and deletes a file in ``directory``: the only test of writability that holds for root too."""
    try:
        fd, name = tempfile.mkstemp(prefix=_PROBE_PREFIX, suffix=".tmp", dir=directory)
    except OSError as err:
        raise _unwritable(directory, err) from err
    os.close(fd)
    os.unlink(name)


def _remove_created(created: list[Path]) -> None:
    """Removes folders this call created, deepest first, as long as they are still empty."""
    for folder in sorted(created, key=lambda p: len(p.parts), reverse=True):
        try:
            folder.rmdir()
        except OSError:
            return


# -- the lock ----------------------------------------------------------------------------------


def _record() -> dict:
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "started_unix": time.time(),
        "argv": [str(a) for a in sys.argv[:4]],
    }


def _read_record(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            data = f.read(64 * 1024).split(b"\0", 1)[0]
        record = json.loads(data.decode("utf-8"))
        return record if isinstance(record, dict) else {}
    except (OSError, ValueError):
        return {}


def _describe_holder(record: dict) -> str:
    if not record:
        return "a process that has not written its pid yet (it is starting)"
    started = record.get("started", "?")
    ago = ""
    if isinstance(record.get("started_unix"), (int, float)):
        ago = f", {max(0.0, time.time() - record['started_unix']):.0f} s ago"
    command = " ".join(record.get("argv") or [])
    return (
        f"pid {record.get('pid', '?')} on host {record.get('host', '?')}, started {started}{ago}"
        + (f" ({command})" if command else "")
    )


def _in_use(directory: Path, lock: Path, record: dict, *, how: str) -> RunFolderInUseError:
    return RunFolderInUseError(
        f"checkpoint_dir {directory} is in use by another run: {_describe_holder(record)}. Two runs writing "
        f"one folder would overwrite each other's checkpoints, so this one did not start ({how}; lock file "
        f"{lock}). Wait for it to finish or stop it, or pass another checkpoint_dir"
    )


_UNWRITTEN_RECORD_S = 60.0  # a lock file still empty after this long was left by a holder killed while starting


def _age(path: Path) -> float:
    try:
        return time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return 0.0


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # exists but is not ours (or we cannot tell): treat as alive
    return True


def _os_lock(fd: int) -> None:
    """Takes the OS lock on ``fd`` without waiting; BlockingIOError if held, OSError if unsupported."""
    if sys.platform == "win32":  # pragma: no cover - exercised on Windows only
        import msvcrt

        os.lseek(fd, _WINDOWS_LOCK_OFFSET, os.SEEK_SET)
        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        except OSError as err:
            raise BlockingIOError(errno.EAGAIN, "locked") from err
        return
    import fcntl

    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)


def _os_unlock(fd: int) -> None:
    if sys.platform == "win32":  # pragma: no cover - exercised on Windows only
        import msvcrt

        os.lseek(fd, _WINDOWS_LOCK_OFFSET, os.SEEK_SET)
        with contextlib.suppress(OSError):
            msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)
        return
    import fcntl

    with contextlib.suppress(OSError):
        fcntl.flock(fd, fcntl.LOCK_UN)


def _write_record(fd: int) -> None:
    data = json.dumps(_record()).encode("utf-8")
    os.lseek(fd, 0, os.SEEK_SET)
    os.ftruncate(fd, 0)
    os.write(fd, data)
    os.fsync(fd)


def _same_file(fd: int, path: Path) -> bool:
    """Whether ``fd`` is still the file at ``path`` (a releasing holder may have deleted it meanwhile)."""
    try:
        a, b = os.fstat(fd), os.stat(path)
    except FileNotFoundError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


@dataclass
class _Lock:
    path: Path
    fd: int | None
    kind: str  # "os" (flock / msvcrt) or "file" (exclusively created, no OS lock)

    def release(self) -> None:
        # delete before unlocking: a process that opened the old file and then gets its lock sees that
        # the file at the path is gone (or another) and opens the new one, so two never hold "the" lock
        with contextlib.suppress(OSError):
            os.unlink(self.path)  # Windows refuses to delete an open file: it stays, unlocked
        if self.fd is not None:
            if self.kind == "os":
                _os_unlock(self.fd)
            os.close(self.fd)
            self.fd = None


def _acquire(directory: Path) -> _Lock:
    lock = directory / LOCK_NAME
    for _ in range(20):  # a retry only when a holder released between our open and our lock
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, default_file_mode())
        except IsADirectoryError as err:
            raise NotADirectoryError(
                f"{lock} is a folder; it must be the lock file of the run folder. Remove it and run again"
            ) from err
        except OSError as err:
            raise _unwritable(directory, err) from err
        try:
            _os_lock(fd)
        except BlockingIOError:
            record = _read_record(lock)
            os.close(fd)
            raise _in_use(directory, lock, record, how="its lock is held") from None
        except OSError as err:
            os.close(fd)
            if err.errno in _NO_OS_LOCK:
                return _acquire_without_os_lock(directory, lock)
            raise
        if not _same_file(fd, lock):
            _os_unlock(fd)
            os.close(fd)
            continue
        # the lock is ours; a record left in the file by a killed holder is simply overwritten
        _write_record(fd)
        return _Lock(lock, fd, "os")
    raise RunFolderInUseError(f"could not take the lock {lock}: other processes keep replacing it")


def _acquire_without_os_lock(directory: Path, lock: Path) -> _Lock:
    """The fallback where the file system has no locks: an exclusively created file, stale if its pid is gone."""
    host = socket.gethostname()
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_EXCL, default_file_mode())
        except FileExistsError:
            record = _read_record(lock)
            pid = record.get("pid")
            dead = record.get("host") == host and isinstance(pid, int) and not _process_alive(pid)
            if dead or (not record and _age(lock) > _UNWRITTEN_RECORD_S):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(lock)  # stale: its holder is gone
                continue
            how = "this file system has no OS locks, so the lock file decides"
            if record and record.get("host") != host:
                how += f"; if that run is known to be gone, delete {lock}"
            raise _in_use(directory, lock, record, how=how) from None
        except OSError as err:
            raise _unwritable(directory, err) from err
        _write_record(fd)
        return _Lock(lock, fd, "file")
    raise RunFolderInUseError(f"could not take the lock {lock}: other processes keep replacing it")


# -- the run folder ----------------------------------------------------------------------------


@dataclass
class RunFolder:
    """A locked run folder; `release` (or leaving `open_run_folder`'s ``with``) gives it back.

    Attributes:
        path: the folder.
        removed_temp_files: temporary files of killed writes removed when it was opened.
    """

    path: Path
    removed_temp_files: list[Path] = field(default_factory=list)
    _lock: _Lock | None = field(default=None, repr=False)
    _created: list[Path] = field(default_factory=list, repr=False)

    def release(self, *, remove_if_empty: bool = False) -> None:
        """Releases the lock; with ``remove_if_empty`` also removes folders that opening created, if empty."""
        if self._lock is not None:
            self._lock.release()
            self._lock = None
        if remove_if_empty:
            _remove_created(self._created)


def lock_run_folder(directory: str | os.PathLike, *, log_path: str | os.PathLike | None = None) -> RunFolder:
    """Checks, creates and locks a run folder, then removes stale temporary files (see the module).

    Args:
        directory: the ``checkpoint_dir``.
        log_path: the run's log, whose rewrite's temporary file is removed too.

    Raises:
        NotADirectoryError: ``directory`` (or a parent) is a file.
        PermissionError: nothing can be created in ``directory``.
        RunFolderInUseError: another process holds its lock; nothing was changed.
    """
    directory = Path(directory)
    created = _make_folder(directory)
    try:
        lock = _acquire(directory)
    except BaseException:
        _remove_created(created)
        raise
    folder = RunFolder(directory, _lock=lock, _created=created)
    try:
        _probe_writable(directory)
        folder.removed_temp_files = remove_stale_temp_files(
            directory, log_path=Path(log_path) if log_path is not None else None
        )
    except BaseException:
        folder.release(remove_if_empty=True)
        raise
    return folder


@contextlib.contextmanager
def open_run_folder(
    directory: str | os.PathLike | None, *, log_path: str | os.PathLike | None = None
) -> Iterator[RunFolder | None]:
    """`lock_run_folder` for a ``with`` block (``None`` passes through: a run without checkpoints).

    On leaving the block the lock is released; if the block raised, folders that opening
    created are removed again while empty, so a refused run leaves nothing behind.
    """
    if directory is None:
        yield None
        return
    folder = lock_run_folder(directory, log_path=log_path)
    try:
        yield folder
    except BaseException:
        folder.release(remove_if_empty=True)
        raise
    folder.release()
