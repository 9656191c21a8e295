r"""The outer loop: the meta-objective over a batch of tasks and one step on ω.

.. math::

    \mathcal{L}_{meta}(\omega) = \frac{1}{B} \sum_{i=1}^{B}
        \mathcal{L}\big(D^{val}_i;\ \theta_K(\omega, D^{train}_i)\big)

How the meta-gradient is obtained is the mode's job (`metalearn.modes`: ``mode.accumulate``);
this module checks the inputs, calls the mode, checks the gradient and steps the outer optimizer.
A batch of same-shaped tasks runs, through `metalearn.mapping.map_tasks`, either as a Python loop
over tasks (each task's meta-gradient is backpropagated as soon as its val loss exists, so only
one task's graph is alive at a time) or as one batched computation under ``torch.func.vmap``
(`run_vmapped`, which computes every norm from primitives there: `metalearn.exact_norms`). Both give the
same meta-gradient, for any model; ``batching="auto"`` picks the faster for the model and device:
measured on 2 CPU cores, vmap is ~6x faster than the loop for a 1-40-40-1 MLP but ~2x
slower, with ~10x the memory, for the Conv-4 (see ``docs/architecture.md``).
"""

from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from metalearn.checks import (
    check_clip_grad_norm,
    check_grad_mode,
    check_labels,
    check_outer_optimizer,
    check_steps,
    explain_label_error,
    inner_steps_keyword,
)
from metalearn.compile import (
    CompiledMetaGradient,
    CompiledOuterStep,
    CompileFallbackWarning,
    check_compile,
    compile_blocker,
    compiles_outer_step,
)
from metalearn.errors import NonFiniteError
from metalearn.kernels import check_kernels
from metalearn.knowledge.meta_knowledge import MetaKnowledge
from metalearn.mapping import (
    Chunking,
    check_losses,
    map_tasks,
    needs_norm_routing,
    resolve_batching,
    task_in_dims,
    task_objective,
    vmap_theta0,
)
from metalearn.modes import MetaGradientMode, ThroughInnerLoop, Unrolled, resolve_mode
from metalearn.modes.base import add_grad, with_kernels
from metalearn.modes.multi_step import mode_at_outer_step
from metalearn.precision import LossScaler, autocast, check_precision
from metalearn.tasks.task import TaskBatch

__all__ = [
    "MetaStats",
    "MetaStep",
    "meta_gradient",
    "meta_loss",
    "meta_step",
]


@dataclass(frozen=True)
class MetaStats:
    """What one meta-batch gave (plain floats, detached).

    Attributes:
        meta_loss: mean val loss of the adapted θ over the tasks.
        val_metric: mean val accuracy (classification) or MSE (regression).
        inner_loss_first: mean train loss before the first inner step.
        inner_loss_last: mean train loss before the last inner step.
        batching: the path that ran, ``"loop"`` or ``"vmap"``.
    """

    meta_loss: float
    val_metric: float
    inner_loss_first: float
    inner_loss_last: float
    batching: str


def _grad_norm(grads: list[Tensor]) -> Tensor:
    """The 2-norm of all ``grads`` (or any tensors) as one vector, computed as ``clip_grad_norm_`` does."""
    if not grads:
        return torch.zeros(())
    # one fused call for the per-tensor norms (the values of clip_grad_norm_'s per-tensor norms),
    # without clip_grad_norm_'s grouping of the tensors by device and dtype in Python at every step
    norms = list(torch._foreach_norm(grads))
    if len({n.device for n in norms}) > 1:
        norms = [n.to(norms[0].device) for n in norms]
    return torch.linalg.vector_norm(torch.stack(norms))


def _non_finite_grad(omega: MetaKnowledge) -> str | None:
    """The name of the first ω parameter whose ``.grad`` holds a NaN/Inf, or ``None``.

    Runs only when the gradients' norm is not finite (it may be Inf by overflow alone, with
    every entry finite: then ``None``), so the common path costs no per-parameter check.
    """
    for name, p in omega.named_parameters():
        if p.grad is not None and not bool(torch.isfinite(p.grad).all()):
            return name
    return None


def _raise_non_finite_grad(name: str) -> None:
    raise NonFiniteError(
        f"non-finite meta-gradient for ω parameter {name!r}; ω was not updated. "
        "Lower the outer or inner learning rate, or pass clip_grad_norm",
        task=None,
    )


def non_finite_params(omega: MetaKnowledge) -> list[str]:
    """The names of ω's parameters that hold a NaN or Inf (a scan with one host read per parameter:
    for error paths, after a fused check has failed)."""
    with torch.no_grad():
        return [name for name, p in omega.named_parameters() if not bool(torch.isfinite(p).all())]


def _raise_if_omega_non_finite(omega: MetaKnowledge, err: NonFiniteError) -> None:
    """Raises a `NonFiniteError` naming ω's NaN/Inf parameters, from ``err``, if ω holds any.

    Called only when a step has already failed with ``err`` (no cost otherwise): a NaN in ω itself
    (left by an earlier outer step, or set by the caller) makes the first inner loss of task 0 NaN,
    and ``err`` would point at that task's data instead of at ω."""
    bad = non_finite_params(omega)
    if bad:
        raise NonFiniteError(
            f"ω parameter(s) {bad[:5]}{' ...' if len(bad) > 5 else ''} already hold NaN/Inf (left by an earlier "
            "outer optimizer step, or set directly); the losses became non-finite from there "
            f"({err}). Lower the outer learning rate or pass clip_grad_norm, and restart from a finite ω "
            "(meta_train checks ω after every outer step and names the step)",
            task=None,
            step=None,
        ) from err


def _check_grads(omega: MetaKnowledge, grad_norm: Tensor) -> None:
    """Raises `NonFiniteError` naming a parameter with a NaN/Inf meta-gradient, when ``grad_norm``
    (the norm of every ω gradient, NaN/Inf whenever one entry is) is not finite."""
    if not bool(torch.isfinite(grad_norm)):
        bad = _non_finite_grad(omega)
        if bad is not None:
            _raise_non_finite_grad(bad)


def clip_meta_gradient(params: list[Tensor], clip_grad_norm: float | None, grad_norm: Tensor) -> None:
    """Scales the ``.grad`` of ``params`` to total norm ``clip_grad_norm`` (if given) from their already
    computed norm ``grad_norm`` (`meta_step`, `MetaStep` and the sharded step clip alike)."""
    if clip_grad_norm is None:
        return
    params = [p for p in params if p.grad is not None]
    clip_with_norm = getattr(torch.nn.utils, "clip_grads_with_norm_", None)  # torch >= 2.6
    if clip_with_norm is not None:
        clip_with_norm(params, float(clip_grad_norm), grad_norm)
    elif params:
        torch.nn.utils.clip_grad_norm_(params, float(clip_grad_norm))


@inner_steps_keyword
def meta_gradient(
    omega: MetaKnowledge,
    batch: TaskBatch,
    inner_steps: int,
    *,
    first_order: bool = False,
    batching: str = "auto",
    generator: torch.Generator | None = None,
    mode: str | MetaGradientMode = "unrolled",
    chunk_size: int | str | None = None,
    memory_budget: int | None = None,
    kernels: str = "auto",
) -> MetaStats:
    """Adds ∇ω of the mean val loss over ``batch`` to the ``.grad`` of ω's parameters.

    Args:
        omega: the meta-knowledge.
        batch: same-shaped tasks with a leading task dimension.
        inner_steps: inner steps per task.
        first_order: first-order meta-gradient (FOMAML); same as ``mode="first_order"``.
        batching: ``"loop"``, ``"vmap"`` or ``"auto"`` (`metalearn.mapping.choose_batching`), among the mode's
            ``batchings`` (``"checkpointed"``, ``"implicit"`` and ``"reptile"`` run only the loop).
        generator: randomness for a stochastic init.
        mode: how the meta-gradient is obtained: ``"unrolled"`` (default), ``"first_order"``,
            ``"truncated"``, ``"checkpointed"``, ``"implicit"`` (iMAML), ``"reptile"``, or a
            `metalearn.modes.MetaGradientMode` (e.g. ``Implicit(lam=2.0, cg_steps=10)``,
            ``Truncated(k=2)`` or one of your own); its ``accumulate`` does the work.
        chunk_size: under vmap, run the tasks this many at a time, each chunk's share of the
            meta-gradient backpropagated before the next chunk runs, so memory is bounded by the
            chunk instead of the batch; the same meta-gradient up to rounding. ``"auto"``: as many
            as ``memory_budget`` holds (`metalearn.mapping.Chunking`); ``None``: the whole batch at
            once. The loop holds one task's graph at a time already and ignores it.
        memory_budget: bytes one chunk's graph may hold, for ``chunk_size="auto"`` (default: half
            the free memory of a CUDA device; no chunking on the CPU).
        kernels: how inner updates are applied: ``"auto"`` (fused Triton kernels for CUDA tensors when
            Triton imports), ``"triton"`` or ``"reference"``; see `metalearn.kernels`.

    Raises:
        NonFiniteError: a NaN/Inf inner loss, val loss or meta-gradient (names task and step).
        RuntimeError: called under ``torch.no_grad()`` or ``torch.inference_mode()``.
        ValueError: a negative ``inner_steps``, an empty batch, targets that do not fit the model's
            output or class labels outside ``0 .. head size - 1`` (names the task), an unknown
            ``batching``, a bad ``chunk_size`` / ``memory_budget``, or chunks asked of a mode whose
            vmap path does not run in chunks.
    """
    check_batch("meta_gradient", omega, batch, inner_steps)
    check_kernels(kernels, batch.train[0].device)
    speed = _Speed(chunking=Chunking(chunk_size, memory_budget), kernels=kernels)
    return _explained_meta_gradient(omega, batch, inner_steps, first_order, batching, generator, mode, speed).stats


def check_batch(caller: str, omega: MetaKnowledge, batch: TaskBatch, inner_steps: int, need_grad: bool = True) -> None:
    """The entry checks of a meta-gradient over ``batch``: grad mode on (if ``need_grad``), a step
    count, a non-empty `TaskBatch` and class labels within the head (`check_labels`); before any work."""
    if need_grad:
        check_grad_mode(caller)
    check_steps("inner_steps", inner_steps)
    if not isinstance(omega, MetaKnowledge):
        raise TypeError(
            f"omega must be a MetaKnowledge, got {type(omega).__name__}; "
            "wrap the model: MetaKnowledge(model, InnerSGD(lr))"
        )
    if not isinstance(batch, TaskBatch):
        raise TypeError(
            f"batch must be a TaskBatch (same-shaped tasks stacked), got {type(batch).__name__}; "
            "build one with stack_tasks(tasks) or taskset.batch(indices)"
        )
    if len(batch) == 0:
        raise ValueError("the task batch is empty (0 tasks); give at least one task")
    check_labels(omega, batch.train[0], (("train", batch.train[1]), ("val", batch.val[1])))


def _explained_meta_gradient(
    omega: MetaKnowledge,
    batch: TaskBatch,
    inner_steps: int,
    first_order: bool,
    batching: str,
    generator: torch.Generator | None,
    mode: str | MetaGradientMode,
    speed: _Speed | None = None,
) -> _Gradient:
    """`_meta_gradient`, turning torch's raw "target out of bounds" into an error that names the task,
    the label and the head size (the labels' upper bound needs the head size, known only from a
    forward, so it is checked on the error path; `check_batch` checked the lower bound), and a
    non-finite loss into one that names ω's parameters when ω itself holds NaN/Inf."""
    try:
        return _meta_gradient(omega, batch, inner_steps, first_order, batching, generator, mode, speed)
    except NonFiniteError as err:
        _raise_if_omega_non_finite(omega, err)
        raise
    except (IndexError, RuntimeError) as err:
        explained = explain_label_error(err, omega, batch.train[0], (("train", batch.train[1]), ("val", batch.val[1])))
        if explained is err:
            raise
        raise explained from err


@dataclass(frozen=True)
class _Gradient:
    """What `_meta_gradient` gives: the stats, the norm of ω's gradients (tensor, for clipping, and
    float) and whether every gradient entry is finite."""

    stats: MetaStats
    norm_tensor: Tensor
    norm: float
    finite: bool


@dataclass
class _Speed:
    """How a step runs: precision, loss scale, the compiled meta-gradient (if any), chunks, kernels."""

    precision: str = "float32"
    scaler: LossScaler | None = None
    compiled: CompiledMetaGradient | None = None
    #: under vmap, tasks per chunk (`metalearn.mapping.Chunking`); ``None``: the whole batch at once
    chunking: Chunking | None = None
    #: how inner updates are applied (`metalearn.kernels`)
    kernels: str = "auto"
    #: ω's parameters, listed once by a `MetaStep` (listing walks ω's modules: ~10% of a small step)
    params: list[Tensor] | None = None
    #: the outer optimizer's step compiled (`metalearn.compile.CompiledOuterStep`), or ``None``: its own
    outer_step: CompiledOuterStep | None = None

    def omega_params(self, omega: MetaKnowledge) -> list[Tensor]:
        return self.params if self.params is not None else list(omega.parameters())


def _accumulate(
    omega: MetaKnowledge,
    batch: TaskBatch,
    inner_steps: int,
    how: MetaGradientMode,
    batching: str,
    generator: torch.Generator | None,
    speed: _Speed,
) -> tuple[Tensor, Tensor, Tensor, tuple[list[float], Tensor] | None, str]:
    """The mode's meta-gradient into ω's ``.grad`` (compiled where ``speed`` has it), under the
    precision's autocast and loss scale; the gradients are unscaled afterwards.

    Returns the mode's (val losses, metrics, inner losses); from a compiled step whose gradients
    are all of ω's (every ``.grad`` was empty), its summary: the floats [meta loss, metric, inner loss
    first, last, grad norm] and the norm as a tensor (for clipping), ``None`` otherwise; and the
    batching that ran. The user's ``batching`` is resolved (`MetaGradientMode.resolve_batching`) only
    for an eager step: a compiled one is the vmap `metalearn.outer.MetaStep` resolved when it compiled.
    """
    device = batch.train[0].device
    scaling = speed.scaler.scaling() if speed.scaler is not None else contextlib.nullcontext()
    summary = None
    with autocast(speed.precision, device), scaling:
        out = speed.compiled(batch, inner_steps) if speed.compiled is not None else None
        if out is None:
            resolved = how.resolve_batching(omega, batching, device)
            if batching == "auto" and resolved == "loop" and _task_batched_pays(omega, batch, how, speed):
                resolved = "vmap"
            batching = resolved
            accumulate = with_kernels(how.accumulate, speed.kernels, f"{type(how).__name__}.accumulate")
            chunks = _chunk_option(how, batching, speed.chunking)
            val_losses, metrics, inner = accumulate(omega, batch, inner_steps, batching, generator, **chunks)
        else:
            batching = "vmap"  # the compiled step is one vmap over the tasks
            grads, (val_losses, metrics, inner), step_summary = out
            values = step_summary.tolist()  # the step's one host sync
            if not values.pop():  # a NaN/Inf loss: raised naming it, before ω's .grad is touched
                check_losses(inner, val_losses, by_task=False)
            fresh = all(p.grad is None for p in speed.omega_params(omega))
            for p, g in grads:
                if p.grad is None and g.stride() == p.stride():
                    p.grad = g  # the compiled step's own fresh output, laid out as p: no copy needed
                else:
                    add_grad(p, g)
            summary = (values, step_summary[4]) if fresh and speed.scaler is None else None
    if speed.scaler is not None:
        speed.scaler.unscale_([p.grad for p in speed.omega_params(omega) if p.grad is not None])
    return val_losses, metrics, inner, summary, batching


def _task_batched_pays(omega: MetaKnowledge, batch: TaskBatch, how: MetaGradientMode, speed: _Speed) -> bool:
    """What ``batching="auto"`` adds to `metalearn.mapping.choose_batching` (which keeps convolutional
    models on the loop, for memory): under CPU bf16, the task-batched vmap path where it runs (the
    library's `Conv4`), 1.2-1.7x the loop's speed there, measured (docs/results.md); it holds a few
    times the loop's memory, bounded by a stack of tasks (`Conv4.task_stack_size`), not by the meta-batch."""
    if speed.precision != "bf16" or batch.train[0].device.type != "cpu" or not isinstance(how, ThroughInnerLoop):
        return False
    return how.task_batched_for(omega, batch, speed.chunking, speed.kernels)


def _chunk_option(how: MetaGradientMode, batching: str, chunking: Chunking | None) -> dict[str, Any]:
    """``{"chunking": chunking}`` when chunks apply (vmap), passed only to a mode that takes it (a user's
    mode may not); chunks asked of a mode whose vmap path runs in one piece are refused."""
    if chunking is None or not chunking.active or batching != "vmap":
        return {}
    if not how.chunked_vmap:
        raise ValueError(
            f"mode={how.name or type(how).__name__!r} runs its vmap path in one piece (it does not set "
            f"chunked_vmap), so chunk_size={chunking.size!r} cannot apply; pass chunk_size=None, or "
            "batching='loop' (one task's graph at a time)"
        )
    return {"chunking": chunking}


def _summary(
    val_losses: Tensor, metrics: Tensor, inner: Tensor, inner_steps: int, params: list[Tensor]
) -> tuple[list[float], Tensor]:
    """The floats [meta loss, metric, inner loss first, last, grad norm] of a step (one stacked tensor,
    one host sync) and the norm of the ``.grad`` of ``params`` as a tensor (for clipping)."""
    grad_norm = _grad_norm([p.grad for p in params if p.grad is not None])
    inner = inner.detach()
    summary = [val_losses.detach().mean(), metrics.mean()]
    if inner_steps:
        first = inner[:, 0].mean()
        summary += [first, first if inner_steps == 1 else inner[:, -1].mean()]
    summary.append(grad_norm)
    device, dtype = summary[0].device, summary[0].dtype
    if any(t.dtype != dtype or t.device != device for t in summary):  # e.g. float64 ω's losses, bf16 metrics
        dtype = torch.promote_types(dtype, grad_norm.dtype)
        summary = [t.to(device, dtype) for t in summary]
    values = torch.stack(summary).tolist()
    if not inner_steps:
        values[2:2] = [float("nan")] * 2
    return values, grad_norm


def _meta_gradient(
    omega: MetaKnowledge,
    batch: TaskBatch,
    inner_steps: int,
    first_order: bool,
    batching: str,
    generator: torch.Generator | None,
    gradient_mode: str | MetaGradientMode = "unrolled",
    speed: _Speed | None = None,
) -> _Gradient:
    """`meta_gradient`, also returning the norm of ω's gradients and whether they are finite.

    Lean on purpose (it runs every step): the stats, the gradient norm and its finiteness come
    from one stacked tensor and one ``.tolist()`` (one host sync); the per-parameter scan for
    the name of a non-finite gradient runs only when the norm is not finite. A non-finite
    meta-gradient raises `NonFiniteError`, except under a loss scale (fp16), where the step is
    reported not finite (``False``) and the caller skips it.
    """
    speed = speed if speed is not None else _Speed()
    how = resolve_mode(gradient_mode, first_order)
    val_losses, metrics, inner, compiled, batching = _accumulate(
        omega, batch, inner_steps, how, batching, generator, speed
    )
    # a compiled step summed itself up in its compiled code
    summed = compiled or _summary(val_losses, metrics, inner, inner_steps, speed.omega_params(omega))
    values, grad_norm = summed
    norm = values.pop()
    finite = True
    if not math.isfinite(norm):
        bad = _non_finite_grad(omega)
        finite = bad is None
        if bad is not None and speed.scaler is None:
            _raise_non_finite_grad(bad)
    stats = MetaStats(
        meta_loss=values[0],
        val_metric=values[1],
        inner_loss_first=values[2],
        inner_loss_last=values[3],
        batching=batching,
    )
    return _Gradient(stats, grad_norm, norm, finite)


@inner_steps_keyword
def meta_loss(
    omega: MetaKnowledge,
    batch: TaskBatch,
    inner_steps: int,
    *,
    first_order: bool = False,
    batching: str = "auto",
    generator: torch.Generator | None = None,
) -> Tensor:
    """The meta-objective: mean over ``batch`` of the val loss after adaptation, differentiable w.r.t. ω.

    Keeps every task's graph alive until you call ``backward``; `meta_gradient` is the
    memory-lean way to get the same gradient. Raises as `meta_gradient` does for bad inputs.
    """
    check_batch("meta_loss", omega, batch, inner_steps, need_grad=False)  # its value alone may be wanted
    (x_tr, y_tr), (x_val, y_val) = batch.train, batch.val
    n = len(batch)
    mode = resolve_batching(omega, batching, x_tr.device)
    if mode == "vmap":
        theta0, dims = vmap_theta0(omega, n, generator, batch.train)
    else:
        theta0 = omega.initial_params(n, generator, train=batch.train)
        dims = dict.fromkeys(theta0, 0)
    val_losses, _, inner = map_tasks(
        task_objective, task_in_dims(dims), omega, theta0, x_tr, y_tr, x_val, y_val, inner_steps, first_order,
        batching=mode, route_norms=needs_norm_routing(omega),
    )
    check_losses(inner.detach(), val_losses.detach(), by_task=mode == "loop")
    return val_losses.mean()


@inner_steps_keyword
def meta_step(
    omega: MetaKnowledge,
    outer_optimizer: torch.optim.Optimizer,
    batch: TaskBatch,
    inner_steps: int,
    *,
    first_order: bool = False,
    batching: str = "auto",
    clip_grad_norm: float | None = None,
    generator: torch.Generator | None = None,
    mode: str | MetaGradientMode = "unrolled",
    precision: str = "float32",
    chunk_size: int | str | None = None,
    memory_budget: int | None = None,
    kernels: str = "auto",
) -> dict[str, float | str]:
    """One outer step: zero grads, meta-gradient over ``batch``, optional clipping, optimizer step.

    ``mode``, ``chunk_size``, ``memory_budget`` and ``kernels`` are as in `meta_gradient` (``"reptile"``
    with ``torch.optim.SGD(lr=ε)`` is Reptile's θ0 ← θ0 + ε(mean φ − θ0)). ``precision`` is ``"float32"``
    or ``"bf16"`` (`metalearn.precision`); fp16 (its loss scale is kept across steps) and ``compile=``
    are options of `MetaStep`, which runs many steps with the same settings.

    ω is left untouched if any loss or the meta-gradient is NaN/Inf (`NonFiniteError`).

    Returns:
        ``meta_loss``, ``val_metric``, ``inner_loss_first``, ``inner_loss_last``,
        ``grad_norm`` (before clipping) and ``batching``.

    Raises:
        ValueError: ``clip_grad_norm`` not a positive finite number, an outer optimizer that holds
            none of ω's parameters or tensors that are not ω's, a ``precision`` other than
            ``"float32"``/``"bf16"``, and the bad inputs `meta_gradient` refuses; all before ω or
            its gradients change.
        RuntimeError: called under ``torch.no_grad()`` or ``torch.inference_mode()``.

    Warns:
        UserWarning: the outer optimizer lacks some trainable ω parameters (named).
    """
    check_batch("meta_step", omega, batch, inner_steps)
    clip_grad_norm = check_clip_grad_norm(clip_grad_norm)
    check_outer_optimizer(omega, outer_optimizer)
    if check_precision(precision) == "fp16":
        raise ValueError(
            "meta_step runs one step, but precision='fp16' keeps a loss scale across steps: build "
            "MetaStep(omega, outer_optimizer, inner_steps, precision='fp16') once and call it on each batch"
        )
    check_kernels(kernels, batch.train[0].device)
    speed = _Speed(precision=precision, chunking=Chunking(chunk_size, memory_budget), kernels=kernels)
    return _step(
        omega, outer_optimizer, batch, inner_steps, first_order, batching, clip_grad_norm, generator, mode, speed
    )


def _step(
    omega: MetaKnowledge,
    outer_optimizer: torch.optim.Optimizer,
    batch: TaskBatch,
    inner_steps: int,
    first_order: bool,
    batching: str,
    clip_grad_norm: float | None,
    generator: torch.Generator | None,
    mode: str | MetaGradientMode,
    speed: _Speed,
) -> dict[str, float | str]:
    """`meta_step` after its checks: the meta-gradient, clipping, the optimizer step (skipped, under a
    loss scale, when the meta-gradient is not finite)."""
    outer_optimizer.zero_grad(set_to_none=True)
    got = _explained_meta_gradient(omega, batch, inner_steps, first_order, batching, generator, mode, speed)
    row: dict[str, float | str] = {**got.stats.__dict__, "grad_norm": got.norm}
    if speed.scaler is not None:
        speed.scaler.update(got.finite)
        row.update(loss_scale=speed.scaler.scale, skipped_steps=speed.scaler.skipped)
        if not got.finite:  # fp16 overflow: ω unchanged, this step's gradients dropped
            outer_optimizer.zero_grad(set_to_none=True)
            return row
    clip_meta_gradient(speed.omega_params(omega), clip_grad_norm, got.norm_tensor)
    if speed.outer_step is not None:
        speed.outer_step()
    else:
        outer_optimizer.step()
    return row


class MetaStep:
    """`meta_step` with its settings fixed, called once per batch; holds what lasts across steps.

    The settings are checked once, when it is built (`meta_train` builds one per run): each call
    checks only its batch. Besides `meta_step`'s options it keeps:

    * ``compile``: ``True`` (or a backend name, `metalearn.compile.COMPILE_BACKENDS`) runs the
      meta-gradient, and then the outer optimizer's step if it is one of torch.optim's
      (`metalearn.compile.CompiledOuterStep`), through ``torch.compile`` (`metalearn.compile`),
      compiled at the first call and reused; where it cannot compile, the eager step runs with a
      `CompileFallbackWarning` (given once), as does the optimizer once its settings change (an LR
      scheduler's new lr). `compile_seconds` is the first compiled call's wall time.
      ``compile_optimizer=False`` keeps the optimizer's step eager (`meta_train` passes it with a
      scheduler, so that a resumed run steps as the uninterrupted one did).
    * ``precision``: ``"float32"``, ``"bf16"`` or ``"fp16"`` (CUDA, with the dynamic `LossScaler`
      `loss_scaler`, whose skipped steps are reported in each row as ``skipped_steps``).

    Example:
        >>> from metalearn import MLP, Sinusoid, maml
        >>> omega = maml(MLP((1, 40, 1)), lr=0.01)
        >>> step = MetaStep(omega, torch.optim.Adam(omega.parameters(), 1e-3), inner_steps=1, precision="bf16")
        >>> tasks = Sinusoid(5, 5, seed=0)
        >>> rows = [step(tasks.batch(range(4 * s, 4 * s + 4))) for s in range(3)]
        >>> rows[-1]["batching"], rows[-1]["grad_norm"] > 0
        ('vmap', True)

    Raises:
        TypeError, ValueError: a bad setting (as `meta_step`; a ``compile`` or ``precision`` value
            not listed; fp16 with ω on a device other than CUDA), when it is built.
    """

    def __init__(
        self,
        omega: MetaKnowledge,
        outer_optimizer: torch.optim.Optimizer,
        inner_steps: int,
        *,
        first_order: bool = False,
        batching: str = "auto",
        clip_grad_norm: float | None = None,
        mode: str | MetaGradientMode = "unrolled",
        compile: bool | str = False,
        compile_optimizer: bool = True,
        precision: str = "float32",
        loss_scaler: LossScaler | None = None,
        chunk_size: int | str | None = None,
        memory_budget: int | None = None,
        kernels: str = "auto",
    ) -> None:
        check_steps("inner_steps", inner_steps)
        if not isinstance(omega, MetaKnowledge):
            raise TypeError(
                f"omega must be a MetaKnowledge, got {type(omega).__name__}; "
                "wrap the model: MetaKnowledge(model, InnerSGD(lr))"
            )
        self.clip_grad_norm = check_clip_grad_norm(clip_grad_norm)
        check_outer_optimizer(omega, outer_optimizer)
        device = next((p.device for p in omega.parameters()), torch.device("cpu"))
        self.precision = check_precision(precision, device)
        self.backend = check_compile(compile)
        self.mode = resolve_mode(mode, first_order)
        self.mode.resolve_batching(omega, batching, device)  # refuses a batching the mode cannot run, now
        self.omega, self.outer_optimizer, self.inner_steps = omega, outer_optimizer, inner_steps
        self.batching = batching
        if loss_scaler is None and self.precision == "fp16":
            loss_scaler = LossScaler()
        self.loss_scaler = loss_scaler
        self.params: list[Tensor] = list(omega.parameters())
        check_kernels(kernels, device)
        self._speed = _Speed(
            precision=self.precision, scaler=loss_scaler, params=self.params,
            chunking=Chunking(chunk_size, memory_budget), kernels=kernels,
        )
        self._compile_checked = self.backend is None
        self._compile_optimizer = bool(compile_optimizer)

    @property
    def compile_seconds(self) -> float | None:
        """Wall time of the first compiled call (the cold compiles of the meta-gradient and of the outer
        optimizer's step, and one step), or ``None``."""
        compiled, outer = self._speed.compiled, self._speed.outer_step
        if compiled is None or compiled.compile_seconds is None:
            return None
        outer_seconds = outer.compile_seconds if outer is not None and outer.compile_seconds is not None else 0.0
        return compiled.compile_seconds + outer_seconds

    def _prepare_compile(self, device: torch.device) -> None:
        """At the first call: the compiled meta-gradient, or a `CompileFallbackWarning` saying why not."""
        self._compile_checked = True
        batching = self.mode.resolve_batching(self.omega, self.batching, device)
        why = compile_blocker(self.omega, self.mode, batching, self.precision)
        if why is None and self._speed.chunking is not None and self._speed.chunking.active:
            why = f"chunk_size={self._speed.chunking.size!r} is not compiled (the compiled form is one vmap)"
        if why is None and self._speed.kernels == "triton":
            why = "kernels='triton' is not compiled (the kernels serve eager steps; compiled steps trace the reference)"
        if why is not None:
            warnings.warn(
                f"compile=True: {why}; this run's meta-steps run eagerly. Pass compile=False to silence this",
                CompileFallbackWarning,
                stacklevel=3,
            )
            return
        assert isinstance(self.mode, Unrolled)
        self._speed.compiled = CompiledMetaGradient(self.omega, self.mode, backend=self.backend or "inductor")
        if self._compile_optimizer and compiles_outer_step(self.outer_optimizer):  # a user's own class: eager
            self._speed.outer_step = CompiledOuterStep(self.outer_optimizer, backend=self.backend or "inductor")

    def __call__(
        self, batch: TaskBatch, generator: torch.Generator | None = None, outer_step: int | None = None
    ) -> dict[str, float | str]:
        """One outer step on ``batch``; returns `meta_step`'s row (``loss_scale`` and ``skipped_steps`` too
        under a loss scale). ``outer_step`` tells a mode with a schedule (`metalearn.modes.MultiStepLoss`)
        the step. Raises as `meta_step` does for a bad batch or a NaN/Inf."""
        check_batch("MetaStep", self.omega, batch, self.inner_steps)
        if not self._compile_checked:
            self._prepare_compile(batch.train[0].device)
        return _step(
            self.omega, self.outer_optimizer, batch, self.inner_steps, False, self.batching, self.clip_grad_norm,
            generator, self.mode if outer_step is None else mode_at_outer_step(self.mode, outer_step), self._speed,
        )
