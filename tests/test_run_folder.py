"""The run folder: refusals that change nothing, the lock between processes, temp cleanup, disk full, modes."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import pickle
import shutil
import signal
import socket
import stat
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import pytest
import torch

import metalearn.checkpoint as ckpt
import metalearn.run_folder as run_folder
from metalearn.checkpoint import CheckpointLoadError, ResumeEnvironmentWarning, checkpoint_path
from metalearn.errors import CheckpointMismatchError
from metalearn.knowledge import MetaKnowledge, MetaSGD
from metalearn.models import MLP
from metalearn.run_folder import LOCK_NAME, RunFolderInUseError
from metalearn.tasks import Sinusoid
from metalearn.train import JsonlLog, meta_train

ROOT = Path(__file__).resolve().parents[1]
TASKS = Sinusoid(4, 4, seed=0, length=None)
CONFIG = {"experiment": "run-folder-test"}

# A process that holds a run folder's lock without importing torch (fast to start): it loads
# metalearn/run_folder.py by path, takes the lock, says "locked" and waits for its stdin to close.
HOLDER = textwrap.dedent(
    """
    import importlib.util, sys
    spec = importlib.util.spec_from_file_location("run_folder_child", sys.argv[1])
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    folder = module.lock_run_folder(sys.argv[2])
    print("locked", flush=True)
    sys.stdin.read()
    folder.release()
    """
)


def _omega(model_seed: int = 0) -> tuple[MetaKnowledge, torch.optim.Optimizer]:
    torch.manual_seed(model_seed)
    omega = MetaKnowledge(MLP((1, 8, 8, 1)), optimizer=MetaSGD(0.01))
    return omega, torch.optim.Adam(omega.parameters(), lr=1e-2)


def _subject() -> tuple[MetaKnowledge, torch.optim.Optimizer]:
    """An ω and optimizer with state of their own (one Adam step), to be loaded into."""
    omega, opt = _omega(model_seed=7)
    sum((p**2).sum() for p in omega.parameters()).backward()
    opt.step()
    opt.zero_grad()
    return omega, opt


def _train(omega, opt, ckpt_dir, log, steps, **overrides):
    kw = dict(inner_steps=1, meta_batch_size=2, checkpoint_every=2, keep_last=None, seed=3, progress=False)
    kw.update(overrides)
    kw.setdefault("config", CONFIG)
    return meta_train(omega, TASKS, opt, steps=steps, checkpoint_dir=ckpt_dir, log_path=log, **kw)


def _snapshot(folder: Path) -> dict[str, tuple[bytes | None, int]]:
    """Every path under ``folder`` (hidden ones too): its bytes (None for a folder) and mode."""
    out = {}
    for path in sorted(folder.rglob("*")):
        mode = stat.S_IMODE(path.lstat().st_mode)
        out[path.relative_to(folder).as_posix()] = (None if path.is_dir() else path.read_bytes(), mode)
    return out


def _state(omega, opt) -> tuple[dict, dict]:
    params = {k: v.clone() for k, v in omega.state_dict().items()}
    saved = opt.state_dict()
    state = {k: {n: v.clone() if torch.is_tensor(v) else v for n, v in s.items()} for k, s in saved["state"].items()}
    return params, {"state": state, "groups": saved["param_groups"]}


def _assert_same_state(a, b) -> None:
    (pa, oa), (pb, ob) = a, b
    assert pa.keys() == pb.keys() and all(torch.equal(pa[k], pb[k]) for k in pa)
    assert oa["groups"] == ob["groups"] and oa["state"].keys() == ob["state"].keys()
    for k in oa["state"]:
        for n, v in oa["state"][k].items():
            assert torch.equal(v, ob["state"][k][n]) if torch.is_tensor(v) else v == ob["state"][k][n]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    """A finished 4-step run: ck/step-00000002.pt, ck/step-00000004.pt and log.jsonl (copy before use)."""
    root = tmp_path_factory.mktemp("prepared")
    omega, opt = _omega()
    _train(omega, opt, root / "ck", root / "log.jsonl", 4)
    return root


@pytest.fixture
def run(prepared, tmp_path) -> Path:
    target = tmp_path / "run"
    shutil.copytree(prepared, target)
    return target


def _spawn_holder(folder: Path) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(ROOT / "metalearn" / "run_folder.py"), str(folder)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline().strip() == "locked"
    return proc


# -- the refusal table -----------------------------------------------------------------------------


def _tamper(path: Path, change) -> None:
    payload = torch.load(path, weights_only=True)
    change(payload)
    torch.save(payload, path)


def _resume(run: Path, **overrides):
    omega, opt = overrides.pop("subject")
    return _train(omega, opt, overrides.pop("ckpt_dir", run / "ck"), overrides.pop("log", run / "log.jsonl"), 6,
                  **overrides)  # fmt: skip


def _touch(path: str) -> None:
    Path(path).write_text("code ran")


class _Payload:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (_touch, (self.marker,))


def _pickled_zip(run, mp):
    torch.save({"format": ckpt.CHECKPOINT_FORMAT, "version": 1, "extra": _Payload(str(run.parent / "marker"))},
               checkpoint_path(run / "ck", 4))  # fmt: skip


def _pickled_protocol4(run, mp):
    with open(checkpoint_path(run / "ck", 4), "wb") as f:
        pickle.dump(_Payload(str(run.parent / "marker")), f, protocol=4)


def _pickled_legacy(run, mp):
    torch.save({"extra": _Payload(str(run.parent / "marker"))}, checkpoint_path(run / "ck", 4),
               _use_new_zipfile_serialization=False)  # fmt: skip


def _truncated(run, mp):
    path = checkpoint_path(run / "ck", 4)
    path.write_bytes(path.read_bytes()[:300])


def _not_a_checkpoint(run, mp):
    torch.save(_omega()[0].state_dict(), checkpoint_path(run / "ck", 4))


def _wrong_shape(run, mp):  # the last tensor of ω, so that a copy in order would have overwritten the others
    _tamper(checkpoint_path(run / "ck", 4), lambda p: p["omega"].__setitem__("model.layers.4.bias", torch.zeros(2)))


def _wrong_dtype(run, mp):
    _tamper(checkpoint_path(run / "ck", 4), lambda p: p["omega"].__setitem__(
        "model.layers.4.bias", p["omega"]["model.layers.4.bias"].double()))  # fmt: skip


def _missing_tensor(run, mp):
    _tamper(checkpoint_path(run / "ck", 4), lambda p: p["omega"].pop("model.layers.4.bias"))


def _optimizer_state_shape(run, mp):
    def change(p):
        p["outer_optimizer"]["state"][0]["exp_avg"] = torch.zeros(3, 3)

    _tamper(checkpoint_path(run / "ck", 4), change)


def _optimizer_group_size(run, mp):
    def change(p):
        p["outer_optimizer"]["param_groups"][0]["params"] = p["outer_optimizer"]["param_groups"][0]["params"][:-1]

    _tamper(checkpoint_path(run / "ck", 4), change)


def _lock_is_a_folder(run, mp):
    (run / "ck" / LOCK_NAME).mkdir()


def _other_host_without_os_lock(run, mp):
    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    mp.setattr(fcntl, "flock", no_locks)
    record = {"pid": 1, "host": "elsewhere.example", "started": "2026-01-01T00:00:00+00:00"}
    (run / "ck" / LOCK_NAME).write_text(json.dumps(record))


def _unwritable_probe(run, mp):
    def refuse(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    mp.setattr(run_folder.tempfile, "mkstemp", refuse)


def _read_only_lock(run, mp):
    real_open = os.open

    def read_only(path, flags, *args, **kwargs):
        if str(path).endswith(LOCK_NAME):
            raise OSError(errno.EROFS, "Read-only file system")
        return real_open(path, flags, *args, **kwargs)

    mp.setattr(run_folder.os, "open", read_only)


class _FullFile:
    """A checkpoint file on a disk that fills up after ``after`` bytes (its write raises ENOSPC)."""

    def __init__(self, file, after: int = 1000) -> None:
        self._file, self._left = file, after

    def write(self, data):
        self._left -= len(data)
        if self._left < 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        return self._file.write(data)

    def flush(self):
        self._file.flush()


def _disk_full_while_writing(run, mp):
    # below torch.save, as a real full disk: torch turns the OSError into "unexpected pos"
    init = ckpt._RecordingWriter.__init__
    mp.setattr(ckpt._RecordingWriter, "__init__", lambda self, file: init(self, _FullFile(file)))


def _disk_full_at_fsync(run, mp):
    if not Path("/proc/self/fd").is_dir():
        pytest.skip("needs /proc/self/fd to tell a checkpoint's fsync from others")
    real = os.fsync

    def full(fd):
        if ".step-" in os.readlink(f"/proc/self/fd/{fd}"):  # only the checkpoint's temporary file is on a full disk
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd)

    mp.setattr(ckpt.os, "fsync", full)


def _nothing(run, mp):
    pass


#: (id, damage done to the copied run, call overrides, exception, message fragment, the call trains)
CASES = [
    ("dir-is-a-file", lambda r, m: (r / "afile").write_bytes(b"x"), {"ckpt_dir": "afile"}, NotADirectoryError,
     "is a file, not a folder", False),
    ("dir-under-a-file", lambda r, m: (r / "afile").write_bytes(b"x"), {"ckpt_dir": "afile/sub"}, NotADirectoryError,
     "afile is a file", False),
    ("lock-is-a-folder", _lock_is_a_folder, {}, NotADirectoryError, "lock file", False),
    ("unwritable-probe", _unwritable_probe, {}, PermissionError, "is not writable", False),
    ("read-only-lock", _read_only_lock, {}, PermissionError, "Read-only file system", False),
    ("other-host-no-os-lock", _other_host_without_os_lock, {}, RunFolderInUseError, "elsewhere.example", False),
    ("pickled-objects-zip", _pickled_zip, {}, CheckpointLoadError, "holds pickled Python objects", False),
    ("pickled-protocol-4", _pickled_protocol4, {}, CheckpointLoadError, "holds pickled Python objects", False),
    ("pickled-legacy-format", _pickled_legacy, {}, CheckpointLoadError, "holds pickled Python objects", False),
    ("truncated", _truncated, {}, CheckpointLoadError, "truncated or corrupt", False),
    ("not-a-checkpoint", _not_a_checkpoint, {}, CheckpointLoadError, "not a metalearn checkpoint", False),
    ("tensor-wrong-shape", _wrong_shape, {}, CheckpointLoadError, "model.layers.4.bias: checkpoint has [2]", False),
    ("tensor-wrong-dtype", _wrong_dtype, {}, CheckpointLoadError, "float64, ω has [1] float32", False),
    ("tensor-missing", _missing_tensor, {}, CheckpointLoadError, "missing from the checkpoint", False),
    ("optimizer-state-shape", _optimizer_state_shape, {}, CheckpointLoadError, "exp_avg: checkpoint has shape", False),
    ("optimizer-group-size", _optimizer_group_size, {}, CheckpointLoadError, "parameter group 0 holds", False),
    ("another-configuration", _nothing, {"config": {"experiment": "other"}}, CheckpointMismatchError,
     "config.user.experiment", False),
    ("resume-false", _nothing, {"resume": False}, FileExistsError, "resume=False", False),
    ("fresh-dir-old-log", _nothing, {"ckpt_dir": "new/deeper"}, FileExistsError, "already holds a log", False),
    ("disk-full-writing", _disk_full_while_writing, {}, OSError, "no space left on the device", True),
    ("disk-full-fsync", _disk_full_at_fsync, {}, OSError, "no space left on the device", True),
]  # fmt: skip


@pytest.mark.parametrize(("damage", "overrides", "error", "fragment", "trains"),
                         [c[1:] for c in CASES], ids=[c[0] for c in CASES])  # fmt: skip
def test_a_refused_run_changes_nothing(run, monkeypatch, damage, overrides, error, fragment, trains):
    damage(run, monkeypatch)
    before = _snapshot(run)
    omega, opt = _subject()
    state = _state(omega, opt)
    kwargs = {k: run / v if k == "ckpt_dir" else v for k, v in overrides.items()}
    with pytest.raises(error, match=None) as info:
        _resume(run, subject=(omega, opt), **kwargs)
    message = str(info.value)
    assert fragment in message, message
    assert "weights_only=False" not in message and "set to `False`" not in message
    assert not (run.parent / "marker").exists()  # no pickled code ran
    monkeypatch.undo()
    after = _snapshot(run)
    if trains:  # the steps before the failed write ran and were logged: nothing earlier changed
        assert info.value.errno == errno.ENOSPC and "step-00000004.pt (intact)" in message
        old_log, new_log = before.pop("log.jsonl"), after.pop("log.jsonl")
        assert new_log[0].startswith(old_log[0]) and new_log[1] == old_log[1]
    else:
        _assert_same_state(_state(omega, opt), state)  # ω and the optimizer are bit-identical
    assert after == before  # the same files, bit for bit, with the same modes; no lock or temp file left


# -- the lock --------------------------------------------------------------------------------------


def test_a_second_process_is_refused_naming_the_first(run):
    holder = _spawn_holder(run / "ck")
    try:
        before = _snapshot(run)
        omega, opt = _subject()
        with pytest.raises(RunFolderInUseError) as info:
            _resume(run, subject=(omega, opt))
        message = str(info.value)
        assert f"pid {holder.pid} on host {socket.gethostname()}, started 20" in message
        assert "another checkpoint_dir" in message
        assert _snapshot(run) == before
    finally:
        holder.stdin.close()
        assert holder.wait(timeout=30) == 0
    assert not (run / "ck" / LOCK_NAME).exists()  # released by its holder
    result = _resume(run, subject=_omega())  # now the folder is free
    assert result.resumed_from == 4 and result.steps == 6


def test_two_meta_train_processes_on_one_folder(tmp_path):
    """End to end: a real run holds the folder; a second run is refused and the first finishes intact."""
    child = textwrap.dedent(
        """
        import sys, time
        from pathlib import Path
        import torch
        from metalearn.knowledge import MetaKnowledge, MetaSGD
        from metalearn.models import MLP
        from metalearn.tasks import Sinusoid
        from metalearn.train import meta_train

        root = Path(sys.argv[1])

        def wait(step, row, val):
            if step == 0:
                print("running", flush=True)
                while not (root / "go").exists():
                    time.sleep(0.02)

        torch.manual_seed(0)
        omega = MetaKnowledge(MLP((1, 8, 8, 1)), optimizer=MetaSGD(0.01))
        meta_train(omega, Sinusoid(4, 4, seed=0, length=None), torch.optim.Adam(omega.parameters(), lr=1e-2),
                   steps=4, inner_steps=1, meta_batch_size=2, checkpoint_every=2, keep_last=None, seed=3,
                   progress=False, config={"experiment": "run-folder-test"}, checkpoint_dir=root / "ck",
                   callback=wait)
        """
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-c", child, str(tmp_path)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout.readline().strip() == "running"
        with pytest.raises(RunFolderInUseError, match=f"pid {proc.pid} "):
            _train(*_omega(model_seed=5), tmp_path / "ck", None, 4)
    finally:
        (tmp_path / "go").touch()
        assert proc.wait(timeout=120) == 0
    alone, opt = _omega()
    _train(alone, opt, tmp_path / "alone", None, 4)
    # the first run's weights are its own: the same as the same run alone (not the refused run's)
    written = torch.load(checkpoint_path(tmp_path / "ck", 4), weights_only=True)["omega"]
    assert all(torch.equal(written[k], v) for k, v in alone.state_dict().items())
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["step-00000002.pt", "step-00000004.pt"]


def test_the_lock_of_a_killed_process_is_taken_over(run):
    holder = _spawn_holder(run / "ck")
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait(timeout=30)
    lock = run / "ck" / LOCK_NAME
    assert json.loads(lock.read_text())["pid"] == holder.pid  # the stale lock file stays behind
    seen = []

    def record(step, row, val):
        seen.append(json.loads(lock.read_text())["pid"])

    result = _resume(run, subject=_omega(), callback=record)
    assert result.steps == 6 and seen == [os.getpid(), os.getpid()]
    assert not lock.exists()


def test_the_lock_is_released_when_the_run_raises(run):
    def boom(step, row, val):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _resume(run, subject=_omega(), callback=boom)
    assert not (run / "ck" / LOCK_NAME).exists()
    folder = run_folder.lock_run_folder(run / "ck")  # free again
    folder.release()


def test_without_os_locks_a_lock_file_decides_and_a_dead_holder_is_taken_over(tmp_path, monkeypatch):
    import fcntl

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    lock = tmp_path / LOCK_NAME
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock.write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname()}))
    folder = run_folder.lock_run_folder(tmp_path)
    assert json.loads(lock.read_text())["pid"] == os.getpid()
    with pytest.raises(RunFolderInUseError, match=f"pid {os.getpid()} on host"):
        run_folder.lock_run_folder(tmp_path)  # our own live record: in use
    folder.release()
    assert not lock.exists()


# -- temporary files, modes ------------------------------------------------------------------------


def test_temporary_files_of_killed_writes_are_removed_at_the_next_start(run):
    left = [run / "ck" / ".step-00000006.pt.k3j2_x.tmp", run / ".log.jsonl.a8d7f.tmp"]
    kept = [run / "ck" / ".keep", run / "ck" / "notes.tmp", run / ".other.jsonl.a8d7f.tmp"]
    for path in left + kept:
        path.write_bytes(b"partial")
    _resume(run, subject=_omega())
    assert not any(p.exists() for p in left)
    assert all(p.read_bytes() == b"partial" for p in kept)


def test_the_temporary_names_the_writers_really_use_are_the_ones_removed(run, monkeypatch):
    """Spies on the real writers' temporary names, leaves them behind as a kill would, and starts again."""
    import metalearn.train.log as train_module

    names: list[str] = []
    real = ckpt.tempfile.mkstemp

    def spy(*args, **kwargs):
        fd, name = real(*args, **kwargs)
        names.append(name)
        return fd, name

    monkeypatch.setattr(ckpt.tempfile, "mkstemp", spy)  # tempfile is one module: the log's rewrite is seen too
    assert train_module.tempfile is ckpt.tempfile
    _resume(run, subject=_omega())  # rewrites the log (resume) and writes step 6
    monkeypatch.undo()
    left = [Path(n) for n in names if not Path(n).name.startswith(".metalearn-probe-")]
    assert {p.name.split(".")[1] for p in left} == {"log", "step-00000006"}
    for path in left:
        path.write_bytes(b"partial")  # what a SIGKILL between mkstemp and os.replace leaves
    _resume(run, subject=_omega())
    assert not any(p.exists() for p in left)


@pytest.fixture
def umask_027():
    old = os.umask(0o027)
    try:
        yield
    finally:
        os.umask(old)


def test_files_get_the_process_default_mode_and_the_log_keeps_its_own(tmp_path, umask_027):
    log = tmp_path / "log.jsonl"
    _train(*_omega(), tmp_path / "ck", log, 2)
    assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "ck").iterdir()} == {"step-00000002.pt": 0o640}
    assert stat.S_IMODE(log.stat().st_mode) == 0o640
    log.chmod(0o604)
    _train(*_omega(), tmp_path / "ck", log, 4)  # the resume rewrites the log (atomically, via a temporary file)
    assert stat.S_IMODE(log.stat().st_mode) == 0o604
    assert stat.S_IMODE(checkpoint_path(tmp_path / "ck", 4).stat().st_mode) == 0o640


def test_the_default_mode_follows_the_umask(umask_027):
    assert run_folder.default_file_mode() == 0o640
    os.umask(0o002)
    assert run_folder.default_file_mode() == 0o664


# -- disk full, resume warnings --------------------------------------------------------------------


def test_a_full_disk_while_logging_says_so(tmp_path, monkeypatch):
    log = JsonlLog(tmp_path / "log.jsonl")
    log.open(0)
    log.write({"kind": "train", "step": 0})  # the file is opened by its first line

    class Full:
        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

    real = log._file
    log._file = Full()
    with pytest.raises(OSError, match="no space left on the device") as info:
        log.write({"kind": "train", "step": 1})
    assert info.value.errno == errno.ENOSPC
    real.close()


def _strip(path: Path, *keys: str) -> None:
    _tamper(path, lambda p: [p.pop(k) for k in keys])


def test_resuming_with_another_thread_count_warns_once_naming_both(run):
    threads = torch.get_num_threads()
    torch.set_num_threads(threads + 1)
    try:
        with pytest.warns(ResumeEnvironmentWarning) as caught:
            _resume(run, subject=_omega())
    finally:
        torch.set_num_threads(threads)
    messages = [str(w.message) for w in caught if issubclass(w.category, ResumeEnvironmentWarning)]
    assert len(messages) == 1
    assert f"thread count {threads} in the checkpoint, {threads + 1} now" in messages[0]


def test_resuming_on_another_device_warns_and_same_settings_do_not(run):
    _tamper(checkpoint_path(run / "ck", 4), lambda p: p.__setitem__("device", "cuda:0"))
    fix = r"omega.to\('cuda:0'\) before meta_train"
    with pytest.warns(ResumeEnvironmentWarning, match=rf"device cuda:0 in the checkpoint, cpu now.*{fix}"):
        _resume(run, subject=_omega())
    with warnings.catch_warnings():
        warnings.simplefilter("error", ResumeEnvironmentWarning)
        _resume(run, subject=_omega())  # finished at step 6, written here: nothing to resume, no warning
        fresh, opt = _omega()
        _train(fresh, opt, run / "again", None, 2)
        _train(fresh, opt, run / "again", None, 4)  # same threads, device and torch: silent


def test_an_old_checkpoint_without_the_new_fields_still_resumes_silently(run):
    _strip(checkpoint_path(run / "ck", 4), "num_threads", "device")
    with warnings.catch_warnings():
        warnings.simplefilter("error", ResumeEnvironmentWarning)
        result = _resume(run, subject=_omega())
    assert result.resumed_from == 4
    info = ckpt.load_checkpoint(checkpoint_path(run / "ck", 4), omega=_omega()[0])
    assert info.num_threads is None and info.device is None


def test_disk_full_and_read_only_on_a_real_small_tmpfs(tmp_path):
    """A real ENOSPC and a real read-only mount, in a private mount namespace; skipped where mounts are refused."""
    if sys.platform != "linux" or shutil.which("unshare") is None:
        pytest.skip("needs Linux and unshare(1) to mount a private tmpfs")
    mount = tmp_path / "m"
    mount.mkdir()
    probe = subprocess.run(["unshare", "-m", "sh", "-c", f"mount -t tmpfs -o size=64k tmpfs {mount}"],
                           capture_output=True, text=True)  # fmt: skip
    if probe.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs in a private mount namespace here: {probe.stderr.strip()}")
    script = tmp_path / "tmpfs_script.py"
    script.write_text(TMPFS_SCRIPT)
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    shell = f"mount -t tmpfs -o size=96k tmpfs {mount} && {sys.executable} {script} {mount}"
    proc = subprocess.run(["unshare", "-m", "sh", "-c", shell], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    full, read_only = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert full["errno"] == errno.ENOSPC and "no space left on the device" in full["message"]
    assert "step-00000001.pt (intact)" in full["message"] and full["files"] == ["step-00000001.pt"]
    assert full["first_loads"]
    assert read_only["type"] == "PermissionError" and "is not writable" in read_only["message"]
    assert read_only["files"] == ["step-00000001.pt"]


TMPFS_SCRIPT = textwrap.dedent(
    """
    import json, subprocess, sys
    from pathlib import Path
    import torch
    from metalearn.checkpoint import load_checkpoint
    from metalearn.knowledge import maml
    from metalearn.models import MLP
    from metalearn.tasks import Sinusoid
    from metalearn.train import meta_train

    root = Path(sys.argv[1])

    def attempt():
        torch.manual_seed(0)
        omega = maml(MLP((1, 100, 100, 1)), lr=0.01)  # ~60 kB a checkpoint: the second does not fit in 96 kB
        out = {}
        try:
            meta_train(omega, Sinusoid(2, 2, seed=0, length=None), torch.optim.SGD(omega.parameters(), lr=0.01),
                       steps=3, inner_steps=1, meta_batch_size=1, checkpoint_dir=root / "ck", checkpoint_every=1,
                       keep_last=None, progress=False)
        except OSError as err:
            out = {"type": type(err).__name__, "errno": err.errno, "message": str(err)}
        out["files"] = sorted(p.name for p in (root / "ck").iterdir())
        return out

    full = attempt()
    load_checkpoint(root / "ck" / "step-00000001.pt", omega=maml(MLP((1, 100, 100, 1)), lr=0.01))
    full["first_loads"] = True
    print(json.dumps(full))
    subprocess.run(["mount", "-o", "remount,ro", str(root)], check=True)
    print(json.dumps(attempt()))
    """
)


def test_without_os_locks_an_empty_lock_file_is_stale_only_once_old(tmp_path, monkeypatch):
    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    lock = tmp_path / LOCK_NAME
    lock.write_bytes(b"")  # a holder that was killed before it wrote its record, or one starting right now
    with pytest.raises(RunFolderInUseError, match="has not written its pid yet"):
        run_folder.lock_run_folder(tmp_path)
    an_hour_ago = time.time() - 3600
    os.utime(lock, (an_hour_ago, an_hour_ago))
    run_folder.lock_run_folder(tmp_path).release()
    assert not lock.exists()
