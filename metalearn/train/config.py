"""`TrainConfig`: every setting of a `meta_train` run, frozen; the trajectory-changing ones are its identity.

A field marked ``identity`` in its metadata changes what the run computes (inner steps, batch size,
meta-gradient mode, ...) and is stored in every checkpoint; a checkpoint written with other values
is refused on resume. The other fields say how long to run and where to write (steps, log and
checkpoint paths, validation and checkpoint intervals), so a run may be resumed with other values
of them (e.g. a larger ``steps``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from metalearn.checks import check_clip_grad_norm, check_log_path, check_seed
from metalearn.compile import check_compile
from metalearn.distributed import DistributedOptions, distributed_options
from metalearn.kernels import check_kernels
from metalearn.mapping import BATCHING_MODES, check_chunk_size
from metalearn.modes import MetaGradientMode, resolve_mode
from metalearn.precision import check_precision

__all__ = ["TrainConfig"]

_OMIT = object()  # an identity value that is not stored (keeps older runs' identity unchanged)


def _plain(config: TrainConfig, value: Any) -> Any:
    return value


def _resolved_first_order(config: TrainConfig, value: Any) -> bool:
    return bool(config.gradient_mode.first_order)


def _mode_identity(config: TrainConfig, value: Any) -> Any:
    identity = config.gradient_mode.run_identity()
    return _OMIT if identity is None else identity


def _unless_float32(config: TrainConfig, value: Any) -> Any:
    return _OMIT if value == "float32" else value  # float32 runs keep the identity they always had


def _identity(to_json: Any = _plain) -> dict[str, Any]:
    return {"identity": to_json}


def _check_count(name: str, value: object, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int of at least {minimum}, got {value!r}")


@dataclass(frozen=True)
class TrainConfig:
    """The settings of one `metalearn.train.meta_train` run (nanoGPT-style: one frozen config).

    Attributes:
        steps: total outer steps of the run (a resumed run continues up to it).
        inner_steps: inner steps per task.
        meta_batch_size: tasks per outer step (B).
        first_order: first-order meta-gradient (FOMAML); same as ``mode="first_order"``.
        batching: ``"auto"``, ``"loop"`` or ``"vmap"`` (see `metalearn.mapping.choose_batching`).
        clip_grad_norm: clip the meta-gradient to this total norm (``None``: no clipping).
        seed: seeds the per-step generators (`metalearn.train.step_generator`) and validation.
        mode: the meta-gradient mode (``"unrolled"``, ``"first_order"``, ``"checkpointed"``,
            ``"implicit"``, ``"reptile"`` or a `metalearn.modes` mode object).
        val_every: validate after every this many steps.
        val_inner_steps: inner steps for validation (default ``inner_steps``).
        log_path: JSONL metrics file, or ``None``.
        checkpoint_dir: where checkpoints go, or ``None`` for none.
        checkpoint_every: write a checkpoint after every this many steps.
        keep_last: keep only this many newest checkpoints (``None`` keeps all).
        resume: continue from the newest checkpoint in ``checkpoint_dir``; if ``False``, a
            ``checkpoint_dir`` that already holds checkpoints is refused.
        progress: show a tqdm progress bar (and write the resume line through it); a string shows
            it with that label (e.g. ``"maml K=5"``: several runs in a row stay apart).
        distributed: run on ``torch.distributed`` (`metalearn.distributed`): ``None`` uses an
            initialised process group if there is one, ``True``/``False`` force it on/off, or
            `metalearn.DistributedOptions` (timeout, ω checksum interval, bucket size). Not part of
            the identity: a run may resume with another world size (same tasks, other summation order).
        chunk_size: under vmap, tasks per chunk (``"auto"``: from ``memory_budget``; ``None``: the
            whole meta-batch at once); see `metalearn.outer.meta_gradient`. Not part of the
            identity: it changes memory, not the result (beyond rounding), so a run that ran out
            of memory can resume with smaller chunks.
        memory_budget: bytes of one chunk's graph for ``chunk_size="auto"`` (``None``: half the
            free memory of a CUDA device; no chunking on the CPU).
        kernels: how inner updates are applied: ``"auto"`` (fused Triton kernels for CUDA tensors when
            Triton imports), ``"triton"`` or ``"reference"`` (`metalearn.kernels`). Not part of the
            identity: every choice computes the same updates, up to floating-point rounding.
        compile: run the meta-gradient through ``torch.compile`` (``True``, or a backend name in
            `metalearn.compile.COMPILE_BACKENDS`); falls back to the eager step with a
            `metalearn.compile.CompileFallbackWarning` where it cannot compile (`metalearn.outer.MetaStep`).
            Not part of the identity: the compiled step computes the same meta-gradient.
        precision: ``"float32"``, ``"bf16"`` (CPU, CUDA) or ``"fp16"`` (CUDA, loss-scaled): the inner
            and outer loop under autocast, ω and the outer optimizer in float32 (`metalearn.precision`).
            Part of the identity (other than float32, which keeps older runs' identity).
        gradient_mode: the resolved mode object (derived from ``mode`` and ``first_order``).

    Raises:
        TypeError, ValueError: a bad value, named with the fix, when the config is built.
    """

    steps: int
    inner_steps: int = field(metadata=_identity())
    meta_batch_size: int = field(metadata=_identity())
    first_order: bool = field(default=False, metadata=_identity(_resolved_first_order))
    batching: str = field(default="auto", metadata=_identity())
    clip_grad_norm: float | None = field(default=None, metadata=_identity())
    seed: int = field(default=0, metadata=_identity())
    mode: str | MetaGradientMode = field(default="unrolled", metadata=_identity(_mode_identity))
    val_every: int = 500
    val_inner_steps: int | None = None
    log_path: str | os.PathLike | None = None
    checkpoint_dir: str | os.PathLike | None = None
    checkpoint_every: int = 500
    keep_last: int | None = 2
    resume: bool = True
    progress: bool | str = True
    distributed: bool | DistributedOptions | None = None
    chunk_size: int | str | None = None
    memory_budget: int | None = None
    kernels: str = "auto"
    compile: bool | str = False
    precision: str = field(default="float32", metadata=_identity(_unless_float32))
    gradient_mode: MetaGradientMode = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # the order of the checks is the order meta_train always had (the bad-input matrix relies on it)
        self._normalise("clip_grad_norm", check_clip_grad_norm(self.clip_grad_norm))
        check_seed(self.seed)
        if self.batching not in BATCHING_MODES:
            raise ValueError(f"batching must be one of {BATCHING_MODES}, got {self.batching!r}")
        if self.val_inner_steps is not None:
            _check_count("val_inner_steps", self.val_inner_steps, 0)
        self._normalise("log_path", check_log_path(self.log_path))
        _check_count("steps", self.steps, 0)
        _check_count("inner_steps", self.inner_steps, 0)
        _check_count("meta_batch_size", self.meta_batch_size)
        _check_count("val_every", self.val_every)
        _check_count("checkpoint_every", self.checkpoint_every)
        if self.keep_last is not None:
            _check_count("keep_last", self.keep_last)
        check_compile(self.compile)
        check_precision(self.precision)
        self._normalise("gradient_mode", resolve_mode(self.mode, self.first_order))
        check_kernels(self.kernels)
        if self.checkpoint_dir is not None:
            self._normalise("checkpoint_dir", Path(self.checkpoint_dir))
        if not isinstance(self.progress, (bool, str)):
            raise TypeError(f"progress must be a bool or a label (str), got {self.progress!r}")
        distributed_options(self.distributed)  # a bad value is refused when the config is built
        check_chunk_size(self.chunk_size, self.memory_budget)

    def _normalise(self, name: str, value: Any) -> None:
        object.__setattr__(self, name, value)  # frozen: only __post_init__ sets derived values

    @property
    def validation_inner_steps(self) -> int:
        """Inner steps of validation: ``val_inner_steps``, or ``inner_steps`` when that is ``None``."""
        return self.inner_steps if self.val_inner_steps is None else self.val_inner_steps

    def identity(self) -> dict[str, Any]:
        """The identity fields as stored in a checkpoint's ``train`` entry (derived from the fields)."""
        out = {}
        for f in fields(self):
            to_json = f.metadata.get("identity")
            if to_json is not None:
                value = to_json(self, getattr(self, f.name))
                if value is not _OMIT:
                    out[f.name] = value
        return out
