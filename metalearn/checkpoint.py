"""Checkpoints of a meta-training run: ω, the outer optimizer, every RNG state and the step.

A checkpoint is one file written atomically (a temporary file in the same directory,
flushed and fsync'ed, then ``os.replace``\\ d over the target), so a crash while writing
leaves every earlier checkpoint intact. It is read back with
``torch.load(weights_only=True)``: loading never unpickles code, and a file holding
anything other than tensors and plain containers is refused.

Each checkpoint records the *identity* of the run that wrote it: the user's configuration
(JSON), ω's structure (parameter and buffer names, shapes and dtypes; every module's class
and settings, e.g. ``InnerSGD(lr=0.4)``) and the outer optimizer (class, constructor
hyper-parameters, which ω parameters each group holds). Loading into a run with another
identity raises `CheckpointMismatchError` naming what differs, before anything is changed.

Loading is all-or-nothing: every tensor of the file is checked against ω's ``state_dict``
(names, shapes, dtypes) and the optimizer state against the optimizer before anything is
copied, so a refused file leaves ω and the optimizer bit-identical.

Files are created with the process's normal permissions (``0o666`` less the umask), not the
``0o600`` of ``tempfile.mkstemp``. A write that runs out of space raises an `OSError` with
``errno.ENOSPC`` that names the last good checkpoint; the temporary file is removed (and one
left by a killed process is removed by the next `metalearn.meta_train` on the folder).

Reproducibility: each checkpoint records ``torch.get_num_threads()``, ω's device and the
torch version. A resume is bit-identical to the uninterrupted run when all three match;
with another thread count or device, reductions sum in another order (a Conv-4 drifted by
3e-3 after 12 steps), so `metalearn.meta_train` warns once (`ResumeEnvironmentWarning`)
naming both values. Checkpoints written before these fields existed load as before.

Devices: a file is read onto the CPU (``map_location="cpu"``) and its tensors are then copied
into ω's own tensors and the optimizer's state, which torch puts on the device of the parameter
it belongs to. So a checkpoint lands on whatever device ω is on when it is loaded: a run written
on a GPU resumes on the GPU when ω is moved there first (``omega.to("cuda")``, as the run that
wrote it did), and the same file loads on a machine without one (for meta-testing, or to go on
on the CPU). Reading onto the CPU never needs GPU memory for a second copy of the state, and
never needs the writer's device to exist. A resume on another device than the writer's is
correct but not bit-identical, and warned about (`ResumeEnvironmentWarning`); CUDA random states
are restored only where as many CUDA devices are visible (`restore_rng_state`).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import pickle
import pickletools
import random
import re
import tempfile
import warnings
import zipfile
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, cast

import numpy as np
import torch
from torch import nn

from metalearn.errors import CheckpointMismatchError
from metalearn.run_folder import default_file_mode

__all__ = [
    "CHECKPOINT_FORMAT",
    "CheckpointInfo",
    "CheckpointLoadError",
    "ResumeEnvironmentWarning",
    "capture_rng_state",
    "checkpoint_path",
    "list_checkpoints",
    "latest_checkpoint",
    "load_checkpoint",
    "restore_rng_state",
    "resume_environment_differences",
    "run_identity",
    "save_checkpoint",
]

CHECKPOINT_FORMAT = "metalearn-checkpoint"
_VERSION = 1
_NAME = re.compile(r"^step-(\d+)\.pt$")
_SAFE_PLAIN = (str, int, float, bool, type(None))


class CheckpointLoadError(RuntimeError):
    """A checkpoint file cannot be read: truncated, corrupt, not a metalearn checkpoint,
    holding pickled Python objects that ``weights_only`` loading refuses, or holding tensors
    that do not fit ω or the optimizer (nothing was loaded)."""


class ResumeEnvironmentWarning(UserWarning):
    """A run resumes with another thread count, device or torch version than its checkpoint's:
    it continues correctly, but not bit-identically to an uninterrupted run."""


@dataclass(frozen=True)
class CheckpointInfo:
    """What `load_checkpoint` read besides the weights it loaded.

    Attributes:
        path: the file.
        step: number of outer steps completed when it was written.
        rng_state: as returned by `capture_rng_state` (pass to `restore_rng_state`).
        extra: the ``extra`` dict given to `save_checkpoint`.
        fingerprint: SHA-256 of the run identity that wrote it.
        torch_version: the torch version that wrote it.
        num_threads: ``torch.get_num_threads()`` of the writer (``None`` in older checkpoints).
        device: the device ω was on when written, e.g. ``"cpu"`` (``None`` in older checkpoints).
        scheduler_state: the outer learning-rate scheduler's ``state_dict`` (``None`` if the run had none).
    """

    path: Path
    step: int
    rng_state: dict[str, Any] = field(repr=False)
    extra: dict[str, Any] = field(repr=False)
    fingerprint: str = ""
    torch_version: str = ""
    num_threads: int | None = None
    device: str | None = None
    scheduler_state: dict[str, Any] | None = field(default=None, repr=False)


# -- file names -------------------------------------------------------------------------------


def checkpoint_path(directory: str | os.PathLike, step: int) -> Path:
    """The file name of the checkpoint written after ``step`` completed steps: ``step-00000100.pt``."""
    return Path(directory) / f"step-{step:08d}.pt"


def list_checkpoints(directory: str | os.PathLike) -> list[tuple[int, Path]]:
    """``(step, path)`` of every checkpoint in ``directory``, oldest first (none if it does not exist).

    Temporary files of an interrupted write (``.step-*.tmp``) are not checkpoints.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = []
    for entry in directory.iterdir():
        match = _NAME.match(entry.name)
        if match and entry.is_file():
            found.append((int(match.group(1)), entry))
    return sorted(found)


def latest_checkpoint(directory: str | os.PathLike) -> Path | None:
    """The checkpoint with the most completed steps in ``directory``, or ``None``."""
    found = list_checkpoints(directory)
    return found[-1][1] if found else None


# -- RNG state --------------------------------------------------------------------------------


def capture_rng_state() -> dict[str, Any]:
    """Every global random state: torch CPU, CUDA (if initialised), Python's ``random`` and NumPy's.

    The library itself draws only from explicit generators; the global states are saved so
    that user code (dropout in a model, a callback) also continues identically after a resume.
    """
    version, internal, gauss_next = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    cuda = []
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        cuda = [s.clone() for s in torch.cuda.get_rng_state_all()]
    return {
        "torch": torch.get_rng_state().clone(),
        "cuda": cuda,
        "python": {"version": version, "state": torch.tensor(internal, dtype=torch.int64), "gauss_next": gauss_next},
        "numpy": {
            "name": str(name),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
    }


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Restores the global random states saved by `capture_rng_state`.

    CUDA states are restored only when the same number of CUDA devices is visible;
    otherwise a warning says they were skipped.
    """
    torch.set_rng_state(state["torch"])
    cuda = list(state.get("cuda") or [])
    if cuda:
        if torch.cuda.is_available() and torch.cuda.device_count() == len(cuda):
            torch.cuda.set_rng_state_all(cuda)
        else:
            warnings.warn(
                f"the checkpoint holds the RNG state of {len(cuda)} CUDA device(s) but "
                f"{torch.cuda.device_count() if torch.cuda.is_available() else 0} are visible; "
                "CUDA random states were not restored (CPU states were)",
                stacklevel=2,
            )
    py = state["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["state"].tolist()), py["gauss_next"]))
    npy = state["numpy"]
    np.random.set_state(
        (npy["name"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"], npy["cached_gaussian"])
    )


# -- run identity -----------------------------------------------------------------------------


def _jsonable(value: Any) -> Any:
    """A JSON-able, address-free stand-in for a hyper-parameter value."""
    if isinstance(value, (bool, int, str)) or value is None:
        return value
    if isinstance(value, float):
        return value if np.isfinite(value) else repr(value)
    if isinstance(value, torch.Tensor):
        return _jsonable(value.tolist())
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (torch.dtype, torch.device)):
        return str(value)
    return f"<{type(value).__qualname__}>"


def _module_description(module: nn.Module) -> str:
    return f"{type(module).__qualname__}({module.extra_repr()})"


def _tensor_description(t: torch.Tensor) -> str:
    return f"{list(t.shape)} {str(t.dtype).removeprefix('torch.')}"


def _omega_identity(omega: nn.Module) -> dict[str, Any]:
    identity: dict[str, Any] = {
        "class": type(omega).__qualname__,
        "parameters": {n: _tensor_description(p) for n, p in omega.named_parameters()},
        "buffers": {n: _tensor_description(b) for n, b in omega.named_buffers()},
        "modules": {n or "<root>": _module_description(m) for n, m in omega.named_modules()},
    }
    model = getattr(omega, "model", None)
    if isinstance(model, nn.Module):  # the key is "network", as in every identity saved before
        identity["network"] = {n or "<root>": _module_description(m) for n, m in model.named_modules()}
    adapted_names: Any = getattr(omega, "adapted_names", None)
    if adapted_names is not None:
        identity["adapted_names"] = list(adapted_names)
    if hasattr(omega, "loss"):
        loss = omega.loss
        identity["loss"] = None if loss is None else getattr(loss, "__qualname__", type(loss).__qualname__)
    return identity


def _optimizer_identity(omega: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    names = {id(p): n for n, p in omega.named_parameters()}
    return {
        "class": type(optimizer).__qualname__,
        "defaults": _jsonable(optimizer.defaults),
        "param_groups": [[names.get(id(p), "<not in omega>") for p in g["params"]] for g in optimizer.param_groups],
    }


def run_identity(
    config: Mapping[str, Any] | None, omega: nn.Module, outer_optimizer: torch.optim.Optimizer | None
) -> dict[str, Any]:
    """What a checkpoint must agree with to be loaded: config, ω's structure, outer optimizer.

    Args:
        config: the user's run configuration; must be JSON-serialisable.
        omega: ω (any ``nn.Module``; `MetaKnowledge` adds its adapted names and loss).
        outer_optimizer: the optimizer over ω's parameters, or ``None``.

    Raises:
        TypeError: ``config`` is not JSON-serialisable.
    """
    config = dict(config or {})
    try:
        json.dumps(config, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as err:
        raise TypeError(
            f"the checkpoint config must be JSON-serialisable (str/int/float/bool/None, lists, dicts with str "
            f"keys, finite floats): {err}. Pass plain values, e.g. str(path) instead of a Path"
        ) from err
    return {
        "config": config,
        "omega": _omega_identity(omega),
        "outer_optimizer": None if outer_optimizer is None else _optimizer_identity(omega, outer_optimizer),
    }


def _fingerprint(identity: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


_MISSING = "<absent>"
_WEIGHTS_IDENTITY = ("class", "parameters", "buffers")


def _flatten(value: Any, prefix: str, out: dict[str, Any]) -> None:
    if isinstance(value, Mapping) and value:
        for k, v in value.items():
            _flatten(v, f"{prefix}.{k}" if prefix else str(k), out)
    else:
        out[prefix] = value


def _differences(stored: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """Dotted keys whose values differ. A key that only one side's optimizer defaults has (a
    torch version added a new hyper-parameter) is not a difference."""
    a: dict[str, Any] = {}
    b: dict[str, Any] = {}
    _flatten(stored, "", a)
    _flatten(current, "", b)
    diffs = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key, _MISSING), b.get(key, _MISSING)
        if va == vb:
            continue
        if key.startswith("outer_optimizer.defaults.") and _MISSING in (va, vb):
            continue
        diffs.append(f"{key}: checkpoint has {json.dumps(va)}, this run has {json.dumps(vb)}")
    return diffs


# -- save / load ------------------------------------------------------------------------------


def _check_safe(value: Any, where: str) -> None:
    """Raises TypeError if ``value`` holds anything ``weights_only`` loading would refuse.

    Types are matched exactly: a subclass of ``str`` or ``dict`` pickles as its own class,
    which ``weights_only`` refuses.
    """
    if type(value) in _SAFE_PLAIN or isinstance(value, (torch.Tensor, torch.dtype, torch.device)):
        return
    if type(value) in (dict, OrderedDict):
        for k, v in value.items():
            if type(k) not in (str, int):
                raise TypeError(f"checkpoint key {where}[{k!r}] must be a str or int, not {type(k).__name__}")
            _check_safe(v, f"{where}[{k!r}]")
        return
    if type(value) in (list, tuple, torch.Size):
        for i, v in enumerate(value):
            _check_safe(v, f"{where}[{i}]")
        return
    raise TypeError(
        f"checkpoint entry {where} is a {type(value).__qualname__}; a checkpoint may hold only tensors, numbers, "
        "strings, None and lists/tuples/dicts of them (it is loaded with weights_only=True). Convert it first"
    )


def _fsync_directory(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # e.g. Windows cannot open a directory
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _device_of(omega: nn.Module) -> str:
    for p in omega.parameters():
        return str(p.device)
    for b in omega.buffers():
        return str(b.device)
    return "cpu"


class _RecordingWriter:
    """A file wrapper that keeps the `OSError` of a failed write: torch.save replaces it by its own
    ``RuntimeError: unexpected pos``, which would hide that the disk is full."""

    def __init__(self, file: Any) -> None:
        self._file = file
        self.error: OSError | None = None

    def write(self, data: bytes) -> int:
        try:
            return self._file.write(data)
        except OSError as err:
            self.error = err
            raise

    def flush(self) -> None:
        self._file.flush()


_DISK_FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}


def _disk_full_error(path: Path, err: OSError) -> OSError:
    """An ENOSPC error that says what happened and names the newest checkpoint still intact."""
    good = [p for _, p in list_checkpoints(path.parent)]
    last = f"the last good checkpoint is {good[-1]} (intact)" if good else "there is no earlier checkpoint in it"
    what = "the disk quota is exceeded" if err.errno != errno.ENOSPC else "there is no space left on the device"
    return OSError(
        err.errno,
        f"could not write checkpoint {path}: {what} ({os.strerror(err.errno or errno.ENOSPC)}); the partial file "
        f"was removed and {last}. Free space on the device holding {path.parent} (or pass another checkpoint_dir, or a "
        "smaller keep_last), then run again to resume from it",
    )


def _write_payload(payload: Mapping[str, Any], path: Path) -> None:
    """torch.save to a temporary file in ``path``'s folder, with the default file mode, fsync'ed, renamed."""
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    writer = None
    try:
        if hasattr(os, "fchmod"):
            os.fchmod(fd, default_file_mode())  # mkstemp's 0o600 would make every checkpoint private
        with os.fdopen(fd, "wb") as f:
            writer = _RecordingWriter(f)
            torch.save(payload, cast(IO[bytes], writer))  # torch.save only writes and flushes it
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_name, path)
    except BaseException as err:
        Path(tmp_name).unlink(missing_ok=True)
        cause = writer.error if writer is not None and writer.error is not None else err
        if isinstance(cause, OSError) and cause.errno in _DISK_FULL:
            raise _disk_full_error(path, cause) from cause
        raise


def save_checkpoint(
    path: str | os.PathLike,
    *,
    omega: nn.Module,
    outer_optimizer: torch.optim.Optimizer | None,
    step: int,
    rng_state: Mapping[str, Any] | None = None,
    config: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
    scheduler_state: Mapping[str, Any] | None = None,
) -> Path:
    """Writes a checkpoint atomically: either the whole new file is at ``path`` or nothing changed.

    The file gets the process's default mode (``0o666`` less the umask).

    Args:
        path: the file to write (its directory is created).
        omega: ω; its ``state_dict`` is saved.
        outer_optimizer: the outer optimizer (its ``state_dict``), or ``None``.
        step: number of outer steps completed.
        rng_state: from `capture_rng_state` (captured now if ``None``).
        config: the run configuration (JSON-serialisable); part of the run identity.
        extra: anything else to keep (tensors, numbers, strings and containers of them).
        scheduler_state: the outer learning-rate scheduler's ``state_dict``, or ``None`` (not stored).

    Returns:
        The path written.

    Raises:
        TypeError: ``config`` is not JSON-serialisable or ``extra`` holds other objects.
        OSError: the write failed; with ``errno.ENOSPC`` (or ``EDQUOT``) when the disk (quota) is
            full, naming the last good checkpoint in the folder. The partial file is removed.
    """
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be a non-negative int, got {step!r}")
    path = Path(path)
    identity = run_identity(config, omega, outer_optimizer)
    payload = {
        "format": CHECKPOINT_FORMAT,
        "version": _VERSION,
        "torch_version": str(torch.__version__),
        "num_threads": int(torch.get_num_threads()),
        "device": _device_of(omega),
        "step": step,
        "fingerprint": _fingerprint(identity),
        "identity": json.dumps(identity, sort_keys=True),
        "omega": omega.state_dict(),
        "outer_optimizer": None if outer_optimizer is None else outer_optimizer.state_dict(),
        "rng_state": dict(rng_state) if rng_state is not None else capture_rng_state(),
        "extra": dict(extra or {}),
    }
    if scheduler_state is not None:  # only runs with a scheduler store one: other files stay as they were
        payload["scheduler"] = dict(scheduler_state)
    _check_safe(payload, "checkpoint")
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_payload(payload, path)
    _fsync_directory(path.parent)
    return path


_OBJECT_REFUSAL = ("Unsupported global", "Unsupported class")


def _is_wellformed_pickle(path: Path) -> bool:
    """Whether the file (or the ``data.pkl`` of a torch zip) parses as a pickle, without running it.

    Tells a pickle that weights-only loading refuses (e.g. one with protocol 4's FRAME opcode)
    from garbage bytes, which torch reports with the same "Unsupported operand" words.
    """
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as zf:
                member = next((n for n in zf.namelist() if n.endswith("data.pkl")), None)
                if member is None:
                    return False
                data = zf.read(member)
        else:
            data = path.read_bytes()
        ops = list(pickletools.genops(data))
    except Exception:  # anything that does not parse is not a pickle
        return False
    return bool(ops) and ops[-1][0].name == "STOP"


def _refused_pickle(path: Path, err: BaseException) -> CheckpointLoadError:
    """The file holds pickled objects (or pickle instructions) that weights-only loading refuses."""
    return CheckpointLoadError(
        f"refused to load {path}: it holds pickled Python objects, which checkpoints may not hold, so it was "
        "not loaded. Checkpoints are read with torch.load(weights_only=True) so that loading never runs code; "
        f"only files written by metalearn.save_checkpoint can be resumed from. ({_unpickler_reason(err)})"
    )


def _load_weights_only(path: Path) -> Any:
    """The file's payload, every tensor on the CPU: loading then copies it into ω's tensors on their device."""
    with warnings.catch_warnings():
        # torch warns about the pickle protocol of a foreign file just before refusing it
        warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
        return torch.load(path, map_location="cpu", weights_only=True)


def _read(path: Path) -> dict[str, Any]:
    try:
        payload = _load_weights_only(path)
    except FileNotFoundError:
        raise
    except Exception as err:  # zip/stream errors of a truncated or overwritten file, or a refused pickle
        # torch's wording varies (an unsupported global, an unsupported opcode of a newer pickle protocol,
        # which garbage bytes also give): a named global is an object; otherwise a pickle that parses is one
        refused = isinstance(err, pickle.UnpicklingError) and "Weights only load failed" in str(err)
        if any(m in str(err) for m in _OBJECT_REFUSAL) or (refused and _is_wellformed_pickle(path)):
            raise _refused_pickle(path, err) from err
        raise _corrupt(path, err) from err
    if not (isinstance(payload, dict) and payload.get("format") == CHECKPOINT_FORMAT):
        raise CheckpointLoadError(
            f"{path} is a torch file but not a metalearn checkpoint (no format={CHECKPOINT_FORMAT!r} entry); "
            "pass a file written by metalearn.save_checkpoint"
        )
    if payload.get("version") != _VERSION:
        raise CheckpointLoadError(
            f"{path} is a metalearn checkpoint of format version {payload.get('version')!r}; this metalearn "
            f"reads version {_VERSION}. Load it with the metalearn version that wrote it"
        )
    missing = [k for k in ("step", "identity", "omega", "outer_optimizer", "rng_state", "extra") if k not in payload]
    if missing:
        raise CheckpointLoadError(f"checkpoint {path} lacks {missing}; it is corrupt or was not fully written")
    return payload


def _without_torch_advice(text: str) -> str:
    """``text`` cut before torch's advice (allow-listing globals, or weights_only=False): never pass it on."""
    for marker in (" was not an allowed global", "Please use", "Re-running", "weights_only", "Check the documentation"):
        if marker in text:
            text = text[: text.index(marker)]
    return text.strip().rstrip(".,:;")


def _unpickler_reason(err: BaseException) -> str:
    """What the weights-only unpickler refused, e.g. ``Unsupported global: GLOBAL mod.fn``."""
    reason = _torch_reason(err)
    return f"the unpickler refused: {reason}" if reason else f"the unpickler refused it ({type(err).__name__})"


def _torch_reason(err: BaseException) -> str:
    """The line of torch's message that says what failed, without its advice."""
    text = str(err)
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1]
    for line in text.splitlines():
        reason = _without_torch_advice(line)
        if reason and not reason.startswith("Weights only load failed"):
            return reason
    return ""


def _corrupt(path: Path, err: BaseException) -> CheckpointLoadError:
    return CheckpointLoadError(
        f"cannot read checkpoint {path}: the file is truncated or corrupt ({type(err).__name__}: "
        f"{_torch_reason(err)}). Delete it to resume from the previous checkpoint "
        "in its directory, or start a fresh run"
    )


def _describe_value(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return _tensor_description(value)
    return type(value).__qualname__


def _omega_state_problems(stored: Any, omega: nn.Module) -> list[str]:
    """How the checkpoint's ω tensors differ from ω's own ``state_dict`` (names, shapes, dtypes)."""
    if not isinstance(stored, Mapping):
        return [f"ω's state is a {type(stored).__qualname__}, not a dict of tensors"]
    current = omega.state_dict()
    problems = [f"{k}: missing from the checkpoint" for k in current if k not in stored]
    problems += [f"{k}: in the checkpoint but not in ω" for k in stored if k not in current]
    for name, value in current.items():
        if name not in stored:
            continue
        got = stored[name]
        if isinstance(value, torch.Tensor):
            if not isinstance(got, torch.Tensor) or got.shape != value.shape or got.dtype != value.dtype:
                problems.append(f"{name}: checkpoint has {_describe_value(got)}, ω has {_describe_value(value)}")
    return problems


# state entries that torch.optim keeps with the shape of their parameter
_PARAM_SHAPED_STATE = frozenset(
    {"momentum_buffer", "exp_avg", "exp_avg_sq", "max_exp_avg_sq", "square_avg", "acc_delta", "sum", "exp_inf",
     "prev", "step_size", "ax", "grad_avg"}
)  # fmt: skip


def _optimizer_state_problems(stored: Any, optimizer: torch.optim.Optimizer) -> list[str]:
    """How the checkpoint's optimizer state does not fit ``optimizer``'s parameters."""
    if not (isinstance(stored, Mapping) and isinstance(stored.get("state"), Mapping)):
        return ["the optimizer state is not a torch.optim state_dict (no 'state' dict)"]
    groups = stored.get("param_groups")
    if not isinstance(groups, list) or len(groups) != len(optimizer.param_groups):
        n = len(groups) if isinstance(groups, list) else 0
        return [f"the optimizer state has {n} parameter group(s), the optimizer {len(optimizer.param_groups)}"]
    problems: list[str] = []
    params: dict[Any, torch.Tensor] = {}
    for i, (saved, group) in enumerate(zip(groups, optimizer.param_groups, strict=True)):
        ids = saved.get("params") if isinstance(saved, Mapping) else None
        if not isinstance(ids, list) or len(ids) != len(group["params"]):
            problems.append(f"parameter group {i} holds {len(ids or [])} parameters in the checkpoint, "
                            f"{len(group['params'])} in the optimizer")  # fmt: skip
            continue
        params.update(zip(ids, group["params"], strict=True))
    current_state = optimizer.state_dict()["state"]
    for key, entries in stored["state"].items():
        if key not in params:
            problems.append(f"optimizer state {key!r} belongs to no parameter of the optimizer")
            continue
        if not isinstance(entries, Mapping):
            problems.append(f"optimizer state {key!r} is a {type(entries).__qualname__}, not a dict")
            continue
        param, current = params[key], current_state.get(key, {})
        for name, value in entries.items():
            if not isinstance(value, torch.Tensor):
                continue
            reference = current.get(name)
            if isinstance(reference, torch.Tensor):
                expected = reference.shape
            elif name in _PARAM_SHAPED_STATE:
                expected = param.shape
            else:
                continue
            if value.shape != expected:
                problems.append(f"optimizer state {key!r}.{name}: checkpoint has shape {list(value.shape)}, "
                                f"expected {list(expected)}")  # fmt: skip
    return problems


def _refuse_unfit(path: Path, problems: list[str]) -> None:
    if problems:
        shown = "\n  ".join(problems[:12]) + (f"\n  ... and {len(problems) - 12} more" if len(problems) > 12 else "")
        raise CheckpointLoadError(
            f"checkpoint {path} holds tensors that do not fit this ω / outer optimizer although its recorded "
            f"run identity matches, so the file is damaged or was edited:\n  {shown}\nNothing was loaded: ω "
            "and the optimizer are unchanged. Delete the file to resume from the previous checkpoint"
        )


def _load_all_or_nothing(
    path: Path, payload: Mapping[str, Any], omega: nn.Module, optimizer: torch.optim.Optimizer | None
) -> None:
    """Loads ω (and the optimizer) after checking every tensor; restores both if loading still fails."""
    problems = _omega_state_problems(payload["omega"], omega)
    if optimizer is not None:
        problems += _optimizer_state_problems(payload["outer_optimizer"], optimizer)
    _refuse_unfit(path, problems)
    backup = {k: v.detach().clone() if isinstance(v, torch.Tensor) else v for k, v in omega.state_dict().items()}
    optimizer_backup = None if optimizer is None else optimizer.state_dict()
    try:
        if optimizer is not None:
            optimizer.load_state_dict(payload["outer_optimizer"])
        omega.load_state_dict(payload["omega"])
    except Exception as err:
        omega.load_state_dict(backup)
        if optimizer is not None and optimizer_backup is not None:
            optimizer.load_state_dict(optimizer_backup)
        raise CheckpointLoadError(
            f"checkpoint {path} could not be loaded into ω / the outer optimizer ({type(err).__name__}: {err}); "
            "both were restored to their state before the call. Delete the file to resume from the previous "
            "checkpoint"
        ) from err


def resume_environment_differences(info: CheckpointInfo, omega: nn.Module) -> list[str]:
    """What differs between the checkpoint's writer and this process that breaks bit-identity.

    Compares ``torch.get_num_threads()``, ω's device and the torch version; a field the
    checkpoint does not record (older checkpoints) is not compared.
    """
    now = {"thread count": torch.get_num_threads(), "device": _device_of(omega), "torch": str(torch.__version__)}
    then = {"thread count": info.num_threads, "device": info.device, "torch": info.torch_version or None}
    return [f"{k} {then[k]} in the checkpoint, {now[k]} now" for k in now if then[k] is not None and then[k] != now[k]]


def load_checkpoint(
    path: str | os.PathLike,
    *,
    omega: nn.Module,
    outer_optimizer: torch.optim.Optimizer | None = None,
    config: Mapping[str, Any] | None = None,
) -> CheckpointInfo:
    """Loads a checkpoint into ``omega`` (and ``outer_optimizer``) after checking it belongs to this run.

    Loading is all-or-nothing. Nothing is modified unless the checkpoint's run identity matches: the outer optimizer
    if one is given, and ``config`` and ω's structure (weights and every module's settings,
    e.g. the inner step size) if ``config`` is given. With ``config=None`` (loading ω for
    meta-testing) only ω's class and weights (names, shapes, dtypes) must match, so settings
    such as an init's ``mode`` may differ. Global RNG states are *not* restored here; pass
    ``info.rng_state`` to `restore_rng_state` to continue a run.

    The tensors go to the device ω is on now (and the optimizer state to its parameters'), not
    to the device that wrote the file (``info.device``): move ω first to resume on a GPU.

    Raises:
        FileNotFoundError: no file at ``path``.
        CheckpointLoadError: the file is truncated, corrupt, not a metalearn checkpoint, holds
            pickled objects (``weights_only`` refuses them), or holds tensors that do not fit ω or
            the optimizer (every tensor is checked first: ω and the optimizer are unchanged).
        CheckpointMismatchError: the checkpoint was written by another configuration; the
            message names every difference.
    """
    path = Path(path)
    payload = _read(path)
    try:
        stored = json.loads(payload["identity"])
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointLoadError(f"checkpoint {path} has no readable run identity; it is corrupt") from err
    current = run_identity(config, omega, outer_optimizer)
    stored_omega, current_omega = stored.get("omega") or {}, current["omega"]
    if config is None:  # loading weights only (e.g. for meta-testing): settings such as an init's mode may differ
        stored_omega, current_omega = ({k: d.get(k) for k in _WEIGHTS_IDENTITY} for d in (stored_omega, current_omega))
    compared = {"omega": (stored_omega, current_omega)}
    if config is not None:
        compared["config"] = (stored.get("config"), current["config"])
    if outer_optimizer is not None:
        compared["outer_optimizer"] = (stored.get("outer_optimizer"), current["outer_optimizer"])
    diffs = _differences({k: a for k, (a, _) in compared.items()}, {k: b for k, (_, b) in compared.items()})
    if diffs:
        shown = "\n  ".join(diffs[:12]) + (f"\n  ... and {len(diffs) - 12} more" if len(diffs) > 12 else "")
        raise CheckpointMismatchError(
            f"checkpoint {path} was written by a run with another configuration:\n  {shown}\n"
            "Start the new run in a fresh checkpoint directory, or pass the configuration (and ω, outer "
            "optimizer) the checkpoint was written with. Nothing was loaded."
        )
    if outer_optimizer is not None and payload["outer_optimizer"] is None:
        raise CheckpointMismatchError(
            f"checkpoint {path} holds no outer optimizer state; pass outer_optimizer=None to load only ω"
        )
    _load_all_or_nothing(path, payload, omega, outer_optimizer)
    threads, device = payload.get("num_threads"), payload.get("device")
    return CheckpointInfo(
        path=path,
        step=int(payload["step"]),
        rng_state=payload["rng_state"],
        extra=payload["extra"],
        fingerprint=str(payload.get("fingerprint", "")),
        torch_version=str(payload.get("torch_version", "")),
        num_threads=threads if isinstance(threads, int) and not isinstance(threads, bool) else None,
        device=device if isinstance(device, str) else None,
        scheduler_state=payload.get("scheduler"),
    )
