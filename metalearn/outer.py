r"""The outer loop: the meta-objective over a batch of tasks and one step on ω.

.. math::

    \mathcal{L}_{meta}(\omega) = \frac{1}{B} \sum_{i=1}^{B}
        \mathcal{L}\big(D^{val}_i;\ \theta_K(\omega, D^{train}_i)\big)

A batch of same-shaped tasks runs either as a Python loop over tasks (each task's
meta-gradient is backpropagated as soon as its val loss exists, so only one task's graph is
alive at a time) or as one batched computation under ``torch.func.vmap`` (`run_vmapped`,
which computes every norm from primitives there: `metalearn.exact_norms`). Both give the
same meta-gradient, for any model; ``batching="auto"`` picks the faster for the model and device:
measured on 2 CPU cores, vmap is ~6x faster than the loop for a 1-40-40-1 MLP but ~2x
slower, with ~10x the memory, for the Conv-4 (see ``docs/architecture.md``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor, nn
from torch.func import vmap

from metalearn.checks import (
    check_clip_grad_norm,
    check_grad_mode,
    check_labels,
    check_outer_optimizer,
    check_steps,
    explain_label_error,
)
from metalearn.errors import NonFiniteError
from metalearn.exact_norms import exact_norms
from metalearn.gradients import (
    Checkpointed,
    Implicit,
    MetaGradientMode,
    Reptile,
    Unrolled,
    checkpointed_adapt_params,
    resolve_mode,
)
from metalearn.inner import adapt_params, check_finite_losses, check_finite_task_losses
from metalearn.knowledge.builtins import PointInit
from metalearn.knowledge.meta_knowledge import MetaKnowledge, check_target_shape, default_loss
from metalearn.knowledge.parts import Params
from metalearn.tasks.task import TaskBatch

__all__ = [
    "BATCHING_MODES",
    "MetaStats",
    "choose_batching",
    "meta_gradient",
    "meta_loss",
    "meta_step",
    "metric",
    "random_layers",
    "run_vmapped",
]

BATCHING_MODES = ("auto", "loop", "vmap")
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_DROPOUTS = nn.modules.dropout._DropoutNd


def _task_in_dims(theta0_dims: dict[str, int | None]) -> tuple:
    """vmap's ``in_dims`` for `task_objective`: ω shared, θ0 as given, the task halves mapped, steps/order shared."""
    return (None, theta0_dims, 0, 0, 0, 0, None, None)


def metric(output: Tensor, target: Tensor) -> Tensor:
    """Accuracy for integer class targets, mean squared error otherwise (no gradient)."""
    check_target_shape(output, target)
    output = output.detach()
    if target.is_floating_point():
        return (output - target).square().mean()
    return (output.argmax(-1) == target).to(output.dtype).mean()


def random_layers(model: nn.Module) -> list[str]:
    """Names of the modules of ``model`` that draw random numbers in their forward as it is now
    (dropout with ``p > 0`` and ``RReLU``, in training mode): vmap refuses random operations."""
    return [
        name for name, m in model.named_modules()
        if m.training and ((isinstance(m, _DROPOUTS) and m.p > 0) or isinstance(m, nn.RReLU))
    ]


def choose_batching(omega: MetaKnowledge, device: torch.device, first_order: bool = False) -> str:
    """The faster batching for ω's model on ``device``: ``"loop"`` or ``"vmap"``.

    Both paths give the same meta-gradient for every model: under vmap every norm is computed
    from primitives (`metalearn.exact_norms`), so native ``nn.*Norm`` layers and a model's own
    ``F.batch_norm``/``F.layer_norm``/... calls no longer force the loop. The choice is speed:

    * a model with random layers in training mode (`random_layers`, e.g. ``nn.Dropout``):
      ``"loop"`` (vmap cannot draw per-task random numbers from torch's global generator);
    * on CUDA: ``"vmap"`` (one batched kernel per op instead of one per task);
    * on CPU: ``"loop"`` for convolutional models (compute-bound; vmap's batched
      convolutions were ~2x slower with ~10x the memory on the Conv-4, and 2.6x slower on a
      Conv-4 of native ``nn.Conv2d`` + ``nn.BatchNorm2d``, meta-batch 8), ``"vmap"``
      otherwise (small models are bound by per-op overhead, which batching removes: 6-7x
      faster than the loop for 1-40-40-1 MLPs with ``nn.LayerNorm`` or ``nn.BatchNorm1d``,
      interception included). Measured by ``benchmarks/vmap_norms.py`` (figures in
      docs/architecture.md, "The vmap + batch norm trap").

    ``first_order`` is accepted for callers that know it; the choice no longer depends on it.
    """
    if random_layers(omega.network):
        return "loop"
    if device.type == "cuda":
        return "vmap"
    if any(isinstance(m, _CONVS) for m in omega.network.modules()):
        return "loop"
    return "vmap"


def _resolve_batching(omega: MetaKnowledge, batching: str, device: torch.device, first_order: bool) -> str:
    if batching not in BATCHING_MODES:
        raise ValueError(f"batching must be one of {BATCHING_MODES}, got {batching!r}")
    if batching == "auto":
        return choose_batching(omega, device, first_order)
    if batching == "vmap" and random_layers(omega.network):
        raise ValueError(_random_under_vmap(f"layers {random_layers(omega.network)} draw random numbers"))
    return batching


def _random_under_vmap(what: str) -> str:
    return (
        f"ω's model: {what} in training mode, and torch.func.vmap cannot draw per-task random numbers "
        "from torch's global generator. Use batching='loop' (or 'auto', which picks it for dropout "
        "layers), or put those layers in eval mode (omega.eval(), no dropout) for the vmap path"
    )


def run_vmapped(fn: Callable, in_dims: tuple, *args):
    """``vmap(fn, in_dims)(*args)`` with every norm computed exactly (`metalearn.exact_norms`).

    The one way the library maps a function over a batch's tasks: torch's fused norms give
    wrong second-order meta-gradients under vmap, so the calls are routed to primitives
    while it runs (the backward afterwards needs nothing: its graph holds only primitives).
    A random operation inside (e.g. ``F.dropout`` in a model's own forward) is refused with
    an error naming the fix, instead of torch's raw randomness error.

    Raises:
        ValueError: ``fn`` called a random operation.
    """
    try:
        with exact_norms():
            return vmap(fn, in_dims=in_dims)(*args)
    except RuntimeError as err:
        if "randomness" not in str(err):
            raise
        raise ValueError(_random_under_vmap("a random operation (e.g. F.dropout) was called")) from err


def task_objective(
    omega: MetaKnowledge,
    theta0: Params,
    x_train: Tensor,
    y_train: Tensor,
    x_val: Tensor,
    y_val: Tensor,
    steps: int,
    first_order: bool,
    adapt_fn=adapt_params,
) -> tuple[Tensor, Tensor, Tensor]:
    """One task: adapt on train (with ``adapt_fn``), then (val loss, val metric, inner losses). Pure; vmap-safe."""
    params, losses = adapt_fn(omega, theta0, x_train, y_train, steps, first_order)
    output = omega(params, x_val)
    return default_loss(output, y_val), metric(output, y_val), losses


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


def _theta0_task(theta0: Params, i: int) -> Params:
    return {n: t[i] for n, t in theta0.items()}


def _shared_over_tasks(t: Tensor) -> bool:
    """Whether every task's slice of ``t`` is the same memory (an ``expand`` over the task dim)."""
    return t.ndim > 0 and t.shape[0] > 0 and t.stride(0) == 0


def _vmap_theta0(
    omega: MetaKnowledge, n: int, generator: torch.Generator | None, train: tuple[Tensor, Tensor]
) -> tuple[Params, dict[str, int | None]]:
    """θ0 and its ``in_dims`` for vmap. A tensor shared by every task goes in once, unbatched
    (``in_dims=None``), the rest is mapped over its task dimension.

    Shared: all of `PointInit`'s θ0 (the model's own parameters, taken directly), and any
    tensor with stride 0 over tasks (an ``expand``). Same gradient (the sum over tasks
    happens in vmap's backward instead of ``expand``'s), but the first inner step's forward
    runs as one batched op over every task's examples. ``train`` is the batch's train half,
    for an init that reads it (``uses_train_data``).
    """
    if type(omega.init) is PointInit and not omega.init.uses_train_data:
        params = omega.model_params()
        return params, dict.fromkeys(params)
    theta0 = omega.initial_params(n, generator, train=train)
    shared = {k: _shared_over_tasks(t) for k, t in theta0.items()}
    return (
        {k: (t[0] if shared[k] else t) for k, t in theta0.items()},
        {k: (None if shared[k] else 0) for k in theta0},
    )


def _all_finite(*tensors: Tensor) -> bool:
    """One sync for many tensors: whether every element of every tensor is finite."""
    ok = torch.isfinite(tensors[0]).all()
    for t in tensors[1:]:
        ok = ok & torch.isfinite(t).all()
    return bool(ok)


def _check_losses(inner: Tensor, val_losses: Tensor, by_task: bool) -> None:
    """Raises `NonFiniteError` for the first non-finite inner loss ``[tasks, steps]`` or val loss ``[tasks]``.

    One fused check when everything is finite (the common case). ``by_task`` reports the
    first task with any bad value (inner before val, the order the loop runs them);
    otherwise every inner loss is checked before any val loss.
    """
    if _all_finite(inner, val_losses):
        return
    if by_task:
        bad = ~(torch.isfinite(inner).all(dim=1) & torch.isfinite(val_losses))
        i = int(bad.nonzero()[0, 0])
        check_finite_losses(inner[i], task_offset=i)
        check_finite_task_losses(val_losses[i, None], what="val loss (after adaptation)", task_offset=i)
    check_finite_losses(inner)
    check_finite_task_losses(val_losses, what="val loss (after adaptation)")


def _grad_norm(grads: list[Tensor]) -> Tensor:
    """The 2-norm of all ``grads`` as one vector, computed as ``clip_grad_norm_`` does."""
    if not grads:
        return torch.zeros(())
    get_total_norm = getattr(torch.nn.utils, "get_total_norm", None)  # torch >= 2.6
    if get_total_norm is not None:
        return get_total_norm(grads, 2.0)
    norms = [torch.linalg.vector_norm(g) for g in grads]
    return torch.linalg.vector_norm(torch.stack([n.to(norms[0].device) for n in norms]))


def _check_grads(omega: MetaKnowledge, grad_norm: Tensor) -> None:
    """Raises `NonFiniteError` naming a parameter with a NaN/Inf meta-gradient.

    ``grad_norm`` (the norm of every ω gradient) is NaN/Inf whenever one entry is, so it is
    the only check on the common path; the per-parameter scan runs only when it is not finite
    (it may be Inf by overflow alone, with every entry finite: then nothing is raised).
    """
    if bool(torch.isfinite(grad_norm)):
        return
    for name, p in omega.named_parameters():
        if p.grad is not None and not bool(torch.isfinite(p.grad).all()):
            raise NonFiniteError(
                f"non-finite meta-gradient for ω parameter {name!r}; ω was not updated. "
                "Lower the outer or inner learning rate, or pass clip_grad_norm",
                task=None,
            )


def meta_gradient(
    omega: MetaKnowledge,
    batch: TaskBatch,
    steps: int,
    *,
    first_order: bool = False,
    batching: str = "auto",
    generator: torch.Generator | None = None,
    mode: str | MetaGradientMode = "unrolled",
) -> MetaStats:
    """Adds ∇ω of the mean val loss over ``batch`` to the ``.grad`` of ω's parameters.

    Args:
        omega: the meta-knowledge.
        batch: same-shaped tasks with a leading task dimension.
        steps: inner steps per task.
        first_order: first-order meta-gradient (FOMAML); same as ``mode="first_order"``.
        batching: ``"loop"``, ``"vmap"`` or ``"auto"`` (`choose_batching`). The modes
            ``"checkpointed"``, ``"implicit"`` and ``"reptile"`` always run the loop.
        generator: randomness for a stochastic init.
        mode: how the meta-gradient is obtained: ``"unrolled"`` (default), ``"first_order"``,
            ``"checkpointed"``, ``"implicit"`` (iMAML), ``"reptile"``, or a mode object from
            `metalearn.gradients` (e.g. ``Implicit(lam=2.0, cg_steps=10)``) to set its options.

    Raises:
        NonFiniteError: a NaN/Inf inner loss, val loss or meta-gradient (names task and step).
        RuntimeError: called under ``torch.no_grad()`` or ``torch.inference_mode()``.
        ValueError: a negative ``steps``, an empty batch, targets that do not fit the model's
            output or class labels outside ``0 .. head size - 1`` (names the task), an unknown
            ``batching``.
    """
    check_batch("meta_gradient", omega, batch, steps)
    stats, _ = _explained_meta_gradient(omega, batch, steps, first_order, batching, generator, mode)
    return stats


def check_batch(caller: str, omega: MetaKnowledge, batch: TaskBatch, steps: int, need_grad: bool = True) -> None:
    """The entry checks of a meta-gradient over ``batch``: grad mode on (if ``need_grad``), a step
    count, a non-empty `TaskBatch` and class labels within the head (`check_labels`); before any work."""
    if need_grad:
        check_grad_mode(caller)
    check_steps("steps (inner steps)", steps)
    if not isinstance(omega, MetaKnowledge):
        raise TypeError(
            f"omega must be a MetaKnowledge, got {type(omega).__name__}; wrap the model: MetaKnowledge(model, SGD(lr))"
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
    steps: int,
    first_order: bool,
    batching: str,
    generator: torch.Generator | None,
    mode: str | MetaGradientMode,
) -> tuple[MetaStats, Tensor]:
    """`_meta_gradient`, turning torch's raw "target out of bounds" into an error that names the task,
    the label and the head size (the labels' upper bound needs the head size, known only from a
    forward, so it is checked on the error path; `check_batch` checked the lower bound)."""
    try:
        return _meta_gradient(omega, batch, steps, first_order, batching, generator, mode)
    except (IndexError, RuntimeError) as err:
        explained = explain_label_error(err, omega, batch.train[0], (("train", batch.train[1]), ("val", batch.val[1])))
        if explained is err:
            raise
        raise explained from err


def _meta_gradient(
    omega: MetaKnowledge,
    batch: TaskBatch,
    steps: int,
    first_order: bool,
    batching: str,
    generator: torch.Generator | None,
    gradient_mode: str | MetaGradientMode = "unrolled",
) -> tuple[MetaStats, Tensor]:
    """`meta_gradient`, also returning the norm of ω's gradients (computed once, for the
    finiteness check and for `meta_step`'s report and clipping)."""
    (x_tr, y_tr), (x_val, y_val) = batch.train, batch.val
    n = len(batch)
    how = resolve_mode(gradient_mode, first_order)
    first_order = bool(getattr(how, "first_order", False))
    if not isinstance(how, Unrolled):  # every other mode runs the loop
        if batching not in BATCHING_MODES:
            raise ValueError(f"batching must be one of {BATCHING_MODES}, got {batching!r}")
        if batching == "vmap":
            raise ValueError(f"mode={how.name!r} runs as a loop over tasks; pass batching='loop' or 'auto'")
        mode = "loop"
    else:
        mode = _resolve_batching(omega, batching, x_tr.device, first_order)
    if isinstance(how, (Implicit, Reptile)):
        val_losses, metrics, inner = how.accumulate(omega, batch, steps, metric)
        _check_losses(inner, val_losses, by_task=True)
    elif isinstance(how, Checkpointed):
        val_losses, metrics, inner = _loop_backward(
            omega, batch, steps, False, generator, adapt_fn=partial(checkpointed_adapt_params, segment=how.segment)
        )
    elif mode == "vmap":
        theta0_in, theta0_dims = _vmap_theta0(omega, n, generator, batch.train)
        val_losses, metrics, inner = run_vmapped(
            task_objective, _task_in_dims(theta0_dims), omega, theta0_in, x_tr, y_tr, x_val, y_val, steps, first_order
        )
        _check_losses(inner.detach(), val_losses.detach(), by_task=False)
        val_losses.mean().backward()
    else:
        val_losses, metrics, inner = _loop_backward(omega, batch, steps, first_order, generator)
    grad_norm = _grad_norm([p.grad for p in omega.parameters() if p.grad is not None])
    _check_grads(omega, grad_norm)
    inner = inner.detach()
    summary = [val_losses.detach().mean(), metrics.mean()]
    if steps:
        first = inner[:, 0].mean()
        summary += [first, first if steps == 1 else inner[:, -1].mean()]
    values = torch.stack(summary).tolist() + ([] if steps else [float("nan")] * 2)
    return (
        MetaStats(
            meta_loss=values[0],
            val_metric=values[1],
            inner_loss_first=values[2],
            inner_loss_last=values[3],
            batching=mode,
        ),
        grad_norm,
    )


def _loop_backward(
    omega: MetaKnowledge,
    batch: TaskBatch,
    steps: int,
    first_order: bool,
    generator: torch.Generator | None,
    adapt_fn=adapt_params,
) -> tuple[Tensor, Tensor, Tensor]:
    """The loop path: backpropagates task by task, so only one task's graph is alive at a time.

    With `PointInit`, θ0 of every task is the model's parameters themselves, and each task's
    backward accumulates straight into their ``.grad`` (no extra memory). Any other init is
    sampled once for the batch; each task starts from its own detached leaf copy of its θ0,
    whose gradient is stored in a ``[tasks, ...]`` cotangent, and one final backward carries
    all of them through the init: exact for any init, shared or sampled. The cotangents are
    allocated before the first task, so these long-lived buffers do not land between the
    short-lived graph tensors of a task (which fragments the heap and raises the peak RSS).

    Returns:
        (val losses ``[tasks]``, val metrics ``[tasks]``, inner losses ``[tasks, steps]``).
    """
    (x_tr, y_tr), (x_val, y_val) = batch.train, batch.val
    n = len(batch)
    point = type(omega.init) is PointInit and not omega.init.uses_train_data
    shared = omega.model_params() if point else {}
    theta0 = {} if point else omega.initial_params(n, generator, train=batch.train)
    cotangents = {k: v.new_zeros(v.shape) for k, v in theta0.items() if v.requires_grad}
    got_grad: set[str] = set()
    vals, mets, inners = [], [], []
    for i in range(n):
        leaves = {k: v[i].detach().requires_grad_(v.requires_grad) for k, v in theta0.items()}
        val_loss, met, inner_i = task_objective(
            omega, shared if point else leaves, x_tr[i], y_tr[i], x_val[i], y_val[i], steps, first_order, adapt_fn
        )
        if val_loss.requires_grad:
            (val_loss / n).backward()
        for k, leaf in leaves.items():
            if leaf.grad is not None:
                cotangents[k][i] = leaf.grad
                got_grad.add(k)
        vals.append(val_loss.detach())
        mets.append(met)
        inners.append(inner_i.detach())
        del leaves, val_loss, inner_i  # this task's graph and grads go before the next task's forward
    val_losses, metrics, inner = torch.stack(vals), torch.stack(mets), torch.stack(inners)
    # checked once after the loop (not once per task): reports the same first task and step
    _check_losses(inner, val_losses, by_task=True)
    keys = [k for k in cotangents if k in got_grad]
    if keys:
        torch.autograd.backward([theta0[k] for k in keys], [cotangents[k] for k in keys])
    return val_losses, metrics, inner


def meta_loss(
    omega: MetaKnowledge,
    batch: TaskBatch,
    steps: int,
    *,
    first_order: bool = False,
    batching: str = "auto",
    generator: torch.Generator | None = None,
) -> Tensor:
    """The meta-objective: mean over ``batch`` of the val loss after adaptation, differentiable w.r.t. ω.

    Keeps every task's graph alive until you call ``backward``; `meta_gradient` is the
    memory-lean way to get the same gradient. Raises as `meta_gradient` does for bad inputs.
    """
    check_batch("meta_loss", omega, batch, steps, need_grad=False)  # its value alone may be wanted
    (x_tr, y_tr), (x_val, y_val) = batch.train, batch.val
    n = len(batch)
    mode = _resolve_batching(omega, batching, x_tr.device, first_order)
    if mode == "vmap":
        theta0_in, theta0_dims = _vmap_theta0(omega, n, generator, batch.train)
        val_losses, _, inner = run_vmapped(
            task_objective, _task_in_dims(theta0_dims), omega, theta0_in, x_tr, y_tr, x_val, y_val, steps, first_order
        )
        _check_losses(inner.detach(), val_losses.detach(), by_task=False)
        return val_losses.mean()
    theta0 = omega.initial_params(n, generator, train=batch.train)
    vals, inners = [], []
    for i in range(n):
        val_loss, _, inner_i = task_objective(
            omega, _theta0_task(theta0, i), x_tr[i], y_tr[i], x_val[i], y_val[i], steps, first_order
        )
        vals.append(val_loss)
        inners.append(inner_i.detach())
    val_losses = torch.stack(vals)
    _check_losses(torch.stack(inners), val_losses.detach(), by_task=True)
    return val_losses.mean()


def meta_step(
    omega: MetaKnowledge,
    outer_optimizer: torch.optim.Optimizer,
    batch: TaskBatch,
    steps: int,
    *,
    first_order: bool = False,
    batching: str = "auto",
    clip_grad_norm: float | None = None,
    generator: torch.Generator | None = None,
    mode: str | MetaGradientMode = "unrolled",
) -> dict[str, float | str]:
    """One outer step: zero grads, meta-gradient over ``batch``, optional clipping, optimizer step.

    ``mode`` is as in `meta_gradient` (``"reptile"`` with ``torch.optim.SGD(lr=ε)`` is Reptile's
    θ0 ← θ0 + ε(mean φ − θ0)).

    ω is left untouched if any loss or the meta-gradient is NaN/Inf (`NonFiniteError`).

    Returns:
        ``meta_loss``, ``val_metric``, ``inner_loss_first``, ``inner_loss_last``,
        ``grad_norm`` (before clipping) and ``batching``.

    Raises:
        ValueError: ``clip_grad_norm`` not a positive finite number, an outer optimizer that holds
            none of ω's parameters or tensors that are not ω's, and the bad inputs `meta_gradient`
            refuses; all before ω or its gradients change.
        RuntimeError: called under ``torch.no_grad()`` or ``torch.inference_mode()``.

    Warns:
        UserWarning: the outer optimizer lacks some trainable ω parameters (named).
    """
    check_batch("meta_step", omega, batch, steps)
    clip_grad_norm = check_clip_grad_norm(clip_grad_norm)
    check_outer_optimizer(omega, outer_optimizer)
    outer_optimizer.zero_grad(set_to_none=True)
    stats, grad_norm = _explained_meta_gradient(omega, batch, steps, first_order, batching, generator, mode)
    if clip_grad_norm is not None:
        params = [p for p in omega.parameters() if p.grad is not None]
        clip_with_norm = getattr(torch.nn.utils, "clip_grads_with_norm_", None)  # torch >= 2.6
        if clip_with_norm is not None:
            clip_with_norm(params, float(clip_grad_norm), grad_norm)
        elif params:
            torch.nn.utils.clip_grad_norm_(params, float(clip_grad_norm))
    outer_optimizer.step()
    return {**stats.__dict__, "grad_norm": float(grad_norm)}
