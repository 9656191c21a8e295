"""Verified, atomic downloads against a loopback HTTP server (never the internet)."""

from __future__ import annotations

import hashlib
import http.server
import threading
from pathlib import Path

import pytest
import torch
from omniglot_fixture import write_omniglot

from metalearn.tasks.download import (
    ChecksumMismatchError,
    DownloadError,
    IncompleteDownloadError,
    download_file,
    file_checksum,
)
from metalearn.tasks.omniglot import OMNIGLOT_ARCHIVES, Omniglot, RemoteFile

BODY = bytes(range(256)) * 1000  # 256,000 bytes: several read chunks


class LoopbackServer:
    """Serves ``routes[path] = (body, mode)`` on 127.0.0.1; counts the requests per path.

    Modes: ``"ok"``; ``"truncate"`` (announces the full Content-Length, sends half, closes);
    ``"corrupt"`` (one byte flipped); ``"missing"`` (404).
    """

    def __init__(self) -> None:
        self.routes: dict[str, tuple[bytes, str]] = {}
        self.requests: dict[str, int] = {}
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                server.requests[self.path] = server.requests.get(self.path, 0) + 1
                if self.path not in server.routes or server.routes[self.path][1] == "missing":
                    self.send_error(404)
                    return
                body, mode = server.routes[self.path]
                sent = body
                if mode == "corrupt":
                    sent = bytearray(body)
                    sent[len(sent) // 3] ^= 0x01
                    sent = bytes(sent)
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(sent[: len(sent) // 2] if mode == "truncate" else sent)
                self.wfile.flush()
                self.close_connection = True

            def log_message(self, *args) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.02,), daemon=True)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}{path}"


@pytest.fixture
def server():
    s = LoopbackServer()
    s.thread.start()
    yield s
    s.httpd.shutdown()
    s.httpd.server_close()
    s.thread.join(timeout=5)


def sha256(data: bytes) -> tuple[str, str]:
    return ("sha256", hashlib.sha256(data).hexdigest())


def listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# -- download_file ----------------------------------------------------------------------------


def test_download_verifies_and_writes(server, tmp_path):
    server.routes["/f.bin"] = (BODY, "ok")
    dest = tmp_path / "sub" / "f.bin"
    out = download_file(server.url("/f.bin"), dest, checksum=sha256(BODY), expected_size=len(BODY))
    assert out == dest and dest.read_bytes() == BODY
    assert listing(dest.parent) == ["f.bin"]  # no temporary file left
    assert file_checksum(dest) == sha256(BODY)[1]
    md5 = hashlib.md5(BODY).hexdigest()
    download_file(server.url("/f.bin"), tmp_path / "g.bin", checksum=("MD5", md5.upper()))
    assert (tmp_path / "g.bin").read_bytes() == BODY


def test_wrong_checksum_leaves_nothing(server, tmp_path):
    server.routes["/f.bin"] = (BODY, "ok")
    with pytest.raises(ChecksumMismatchError, match=r"sha256 .* expected 0+;.*nothing was written"):
        download_file(server.url("/f.bin"), tmp_path / "f.bin", checksum=("sha256", "0" * 64))
    assert listing(tmp_path) == []


def test_corrupted_transfer_is_rejected(server, tmp_path):
    server.routes["/f.bin"] = (BODY, "corrupt")
    with pytest.raises(ChecksumMismatchError, match="corrupt"):
        download_file(server.url("/f.bin"), tmp_path / "f.bin", checksum=sha256(BODY), expected_size=len(BODY))
    assert listing(tmp_path) == []


def test_transfer_cut_short_is_rejected(server, tmp_path):
    server.routes["/f.bin"] = (BODY, "truncate")
    with pytest.raises(IncompleteDownloadError, match="ended"):
        download_file(server.url("/f.bin"), tmp_path / "f.bin", checksum=sha256(BODY))
    assert listing(tmp_path) == []


def test_wrong_size_is_rejected_before_the_hash(server, tmp_path):
    server.routes["/f.bin"] = (BODY, "ok")
    with pytest.raises(IncompleteDownloadError, match=f"gave {len(BODY)} bytes, expected {len(BODY) + 1}"):
        download_file(server.url("/f.bin"), tmp_path / "f.bin", checksum=sha256(BODY), expected_size=len(BODY) + 1)
    assert listing(tmp_path) == []


def test_failure_keeps_an_existing_destination(server, tmp_path):
    server.routes["/f.bin"] = (BODY, "truncate")
    dest = tmp_path / "f.bin"
    dest.write_bytes(b"previous version")
    with pytest.raises(IncompleteDownloadError):
        download_file(server.url("/f.bin"), dest, checksum=sha256(BODY))
    assert dest.read_bytes() == b"previous version" and listing(tmp_path) == ["f.bin"]


def test_http_error_is_a_download_error(server, tmp_path):
    with pytest.raises(DownloadError, match="HTTP 404"):
        download_file(server.url("/absent"), tmp_path / "f.bin", checksum=sha256(BODY))
    assert listing(tmp_path) == []


def test_bad_arguments_fail_before_any_request(server, tmp_path):
    server.routes["/f.bin"] = (BODY, "ok")
    with pytest.raises(ValueError, match="unknown checksum algorithm"):
        download_file(server.url("/f.bin"), tmp_path / "f.bin", checksum=("sha257", "00"))
    with pytest.raises(ValueError, match="only https://"):
        download_file("http://example.com/f.bin", tmp_path / "f.bin", checksum=sha256(BODY))
    with pytest.raises(ValueError, match="only https://"):
        download_file("ftp://127.0.0.1/f.bin", tmp_path / "f.bin", checksum=sha256(BODY))
    assert server.requests == {} and listing(tmp_path) == []


# -- Omniglot(download=True) ------------------------------------------------------------------


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> Path:
    """A folder with the fixture zips that the loopback server serves (read-only)."""
    folder = tmp_path_factory.mktemp("served")
    write_omniglot(folder)
    return folder


@pytest.fixture
def mirror(server, served) -> dict[str, RemoteFile]:
    """The fixture archives served by the loopback server, with their real sha256 and size."""
    sources = {}
    for name in ("images_background", "images_evaluation"):
        path = served / f"{name}.zip"
        data = path.read_bytes()
        server.routes[f"/{name}.zip"] = (data, "ok")
        sources[name] = RemoteFile(server.url(f"/{name}.zip"), sha256(data), len(data))
    return sources


def test_omniglot_downloads_missing_archives(server, mirror, served, tmp_path):
    root = tmp_path / "data" / "omniglot"
    data = Omniglot(root, download=True, sources=mirror)
    local = Omniglot(served, cache_dir=tmp_path / "cache")
    assert torch.equal(data.images, local.images) and data.characters == local.characters
    assert listing(root) == [".metalearn_cache", "images_background.zip", "images_evaluation.zip"]
    Omniglot(root, download=True, sources=mirror)  # present now: not fetched again
    assert server.requests == {"/images_background.zip": 1, "/images_evaluation.zip": 1}


def test_omniglot_fetches_only_what_the_split_needs(server, mirror, tmp_path):
    Omniglot(tmp_path / "root", split="evaluation", download=True, sources=mirror)
    assert server.requests == {"/images_evaluation.zip": 1}


def test_omniglot_corrupted_download_leaves_nothing(server, mirror, tmp_path):
    server.routes["/images_evaluation.zip"] = (server.routes["/images_evaluation.zip"][0], "corrupt")
    root = tmp_path / "root"
    with pytest.raises(ChecksumMismatchError):
        Omniglot(root, split="evaluation", download=True, sources=mirror)
    assert listing(root) == []


def test_omniglot_truncated_download_leaves_nothing(server, mirror, tmp_path):
    server.routes["/images_background.zip"] = (server.routes["/images_background.zip"][0], "truncate")
    root = tmp_path / "root"
    with pytest.raises(IncompleteDownloadError):
        Omniglot(root, split="background", download=True, sources=mirror)
    assert listing(root) == []


def test_known_archives_are_the_originals():
    """The table points at brendenlake/omniglot over HTTPS with the published md5 and sizes."""
    assert set(OMNIGLOT_ARCHIVES) == {"images_background", "images_evaluation"}
    background, evaluation = OMNIGLOT_ARCHIVES["images_background"], OMNIGLOT_ARCHIVES["images_evaluation"]
    for name, remote in OMNIGLOT_ARCHIVES.items():
        assert remote.url == f"https://raw.githubusercontent.com/brendenlake/omniglot/master/python/{name}.zip"
    assert background.checksum == ("md5", "68d2efa1b9178cc56df9314c21c6e718") and background.size == 9_464_212
    assert evaluation.checksum == ("md5", "6b91aef0f799c5bb55b94e3f2daec811") and evaluation.size == 6_462_886
    with pytest.raises(TypeError):
        OMNIGLOT_ARCHIVES["images_background"] = background  # a constant, not a setting


def test_a_download_gets_the_process_default_mode(server, tmp_path):
    import os
    import stat

    server.routes["/f.bin"] = (BODY, "ok")
    old = os.umask(0o027)
    try:
        dest = download_file(server.url("/f.bin"), tmp_path / "f.bin", checksum=sha256(BODY))
    finally:
        os.umask(old)
    assert stat.S_IMODE(dest.stat().st_mode) == 0o640  # not tempfile.mkstemp's 0o600
