"""Verified, atomic file downloads.

`download_file` streams a URL into a temporary file beside the destination, checks the
number of bytes received (against ``Content-Length`` and an optional expected size) and a
hash of the bytes, and only then renames the temporary file onto the destination with
``os.replace`` (atomic on POSIX and Windows within one file system). On any failure the
temporary file is deleted and a `DownloadError` is raised, so ``dest`` is either the old
file, absent, or the complete verified new file, never a partial one.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import os
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

__all__ = [
    "ChecksumMismatchError",
    "DownloadError",
    "IncompleteDownloadError",
    "default_file_mode",
    "download_file",
    "file_checksum",
]

_LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})
_CHUNK_SIZE = 1 << 16


class DownloadError(OSError):
    """A download failed; the destination file was left untouched."""


class ChecksumMismatchError(DownloadError):
    """The downloaded bytes do not have the expected hash."""


class IncompleteDownloadError(DownloadError):
    """Fewer (or more) bytes arrived than the server or the caller announced."""


def default_file_mode() -> int:
    """The mode ``open()`` gives a new file: ``0o666`` less the process's umask.

    Files written through ``tempfile.mkstemp`` (0o600) are set to it before the rename, so a
    download or cache is as readable as any other file the process writes. (The same helper
    lives in `metalearn.run_folder`; the tasks layer imports nothing above it.)
    """
    umask = None
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/self/status", encoding="ascii") as f:  # Linux: read without changing process state
            for line in f:
                if line.startswith("Umask:"):
                    umask = int(line.split()[1], 8)
    if umask is None:
        umask = os.umask(0o022)
        os.umask(umask)
    return 0o666 & ~umask


def _new_hash(algorithm: str):
    try:
        return hashlib.new(algorithm)
    except (ValueError, TypeError) as exc:
        raise ValueError(
            f"unknown checksum algorithm {algorithm!r}: use one of hashlib's, e.g. 'sha256'"
        ) from exc


def file_checksum(path: str | os.PathLike, algorithm: str = "sha256") -> str:
    """Returns the hex digest of the file at ``path`` with ``hashlib`` algorithm ``algorithm``."""
    digest = _new_hash(algorithm)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _check_url(url: str) -> None:
    parts = urllib.parse.urlsplit(url)
    if parts.scheme == "https":
        return
    if parts.scheme == "http" and parts.hostname in _LOOPBACK_HOSTS:
        return  # a local server (tests, a local mirror): nothing crosses the network
    raise ValueError(
        f"refusing to download {url!r}: only https:// URLs (or http:// on 127.0.0.1/localhost) "
        "are allowed; use the https:// address of the file"
    )


def download_file(
    url: str,
    dest: str | os.PathLike,
    *,
    checksum: tuple[str, str],
    expected_size: int | None = None,
    timeout: float = 60.0,
) -> Path:
    """Downloads ``url`` to ``dest``, verified and atomically.

    The bytes are streamed to a temporary file in ``dest``'s directory while being hashed.
    The download is accepted only if the byte count matches the server's ``Content-Length``
    (when sent) and ``expected_size`` (when given) and the digest matches ``checksum``; the
    temporary file is then flushed to disk and renamed onto ``dest`` with ``os.replace``.

    Args:
        url: ``https://`` address of the file (``http://`` only for loopback hosts).
        dest: where the verified file goes; its parent directory is created if missing.
        checksum: ``(algorithm, hexdigest)``, algorithm as named by ``hashlib`` (e.g.
            ``("sha256", "9f86...")``). There is no way to skip verification.
        expected_size: the exact size in bytes, if known.
        timeout: seconds to wait for the connection and for each read.

    Returns:
        ``dest`` as a `Path`.

    Raises:
        ValueError: an unsupported URL scheme or checksum algorithm.
        IncompleteDownloadError: the transfer ended early or the size is wrong (retry; if it
            persists, the server or the expected size is wrong).
        ChecksumMismatchError: the bytes arrived but their hash is not the expected one
            (the file on the server changed, or it was corrupted in transit).
        DownloadError: any other network or HTTP failure.
    """
    algorithm, expected_digest = checksum
    expected_digest = expected_digest.lower()
    _new_hash(algorithm)  # fail early on an unknown algorithm
    _check_url(url)
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    tmp = Path(tmp_name)
    try:
        if hasattr(os, "fchmod"):
            os.fchmod(fd, default_file_mode())  # mkstemp's 0o600 would make the download private
        with os.fdopen(fd, "wb") as out:
            received, digest, announced = _stream(url, out, algorithm, timeout)
            out.flush()
            os.fsync(out.fileno())
        if announced is not None and received != announced:
            raise IncompleteDownloadError(
                f"download of {url} ended after {received} of {announced} bytes (Content-Length); "
                "the connection was cut. Try again; nothing was written to "
                f"{dest}"
            )
        if expected_size is not None and received != expected_size:
            raise IncompleteDownloadError(
                f"download of {url} gave {received} bytes, expected {expected_size}; "
                f"nothing was written to {dest}. Try again, or check that the URL points to the right file"
            )
        if digest != expected_digest:
            raise ChecksumMismatchError(
                f"{algorithm} of the download of {url} is {digest}, expected {expected_digest}; "
                f"the file is corrupt or not the expected one, so nothing was written to {dest}. "
                "Try again; if it persists, get the file by hand and check its checksum"
            )
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    _fsync_dir(dest.parent)
    return dest


def _stream(url: str, out, algorithm: str, timeout: float) -> tuple[int, str, int | None]:
    """Copies the body of ``url`` into ``out``; returns (bytes received, hex digest, Content-Length)."""
    digest = _new_hash(algorithm)
    received = 0
    request = urllib.request.Request(url, headers={"User-Agent": "torch-metalearn"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            length = response.headers.get("Content-Length")
            announced = int(length) if length is not None and length.strip().isdigit() else None
            while True:
                chunk = response.read(_CHUNK_SIZE)
                if not chunk:
                    break
                out.write(chunk)
                digest.update(chunk)
                received += len(chunk)
    except urllib.error.HTTPError as exc:
        raise DownloadError(f"download of {url} failed: HTTP {exc.code} {exc.reason}") from exc
    except http.client.IncompleteRead as exc:
        raise IncompleteDownloadError(
            f"download of {url} ended early ({exc.expected} bytes missing): the connection was cut; try again"
        ) from exc
    except (urllib.error.URLError, http.client.HTTPException, OSError) as exc:
        raise DownloadError(
            f"download of {url} failed: {exc}. Check the network connection and the URL, then try again"
        ) from exc
    return received, digest.hexdigest(), announced


def _fsync_dir(directory: Path) -> None:
    """Makes a rename durable on POSIX; a no-op where directories cannot be opened."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
