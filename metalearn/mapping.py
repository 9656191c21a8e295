r"""One way to map a function over the tasks of a batch: a Python loop or ``torch.func.vmap``.

Every per-task computation of the library goes through `map_tasks` (meta-gradient modes,
`metalearn.outer.meta_loss`, `metalearn.evaluate.evaluate`), and its vmap branch through
`run_vmapped`, which computes every norm from primitives while it runs (`metalearn.exact_norms`),
so the loop and vmap give the same result for any model. `choose_batching` picks the faster
for a model and device; `resolve_batching` checks a user's choice against what a mode supports.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import vmap

from metalearn.exact_norms import exact_norms
from metalearn.inner import adapt_params, check_finite_losses, check_finite_task_losses
from metalearn.knowledge.builtins import PointInit
from metalearn.knowledge.meta_knowledge import MetaKnowledge, check_target_shape, default_loss
from metalearn.knowledge.parts import Params
from metalearn.precision import scale_for_backward

__all__ = [
    "BATCHING_MODES",
    "check_losses",
    "choose_batching",
    "map_tasks",
    "metric",
    "random_layers",
    "resolve_batching",
    "run_vmapped",
    "task_in_dims",
    "task_objective",
    "vmap_theta0",
]

BATCHING_MODES = ("auto", "loop", "vmap")
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_DROPOUTS = nn.modules.dropout._DropoutNd


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
    if random_layers(omega.model):
        return "loop"
    if device.type == "cuda":
        return "vmap"
    if any(isinstance(m, _CONVS) for m in omega.model.modules()):
        return "loop"
    return "vmap"


def resolve_batching(
    omega: MetaKnowledge,
    batching: str,
    device: torch.device,
    supported: Sequence[str] = ("loop", "vmap"),
    who: str = "",
) -> str:
    """``"loop"`` or ``"vmap"`` for a user's ``batching`` (``"auto"``: `choose_batching`), checked
    before any work against the batchings ``supported`` by the caller (``who`` names it in the error)."""
    if batching not in BATCHING_MODES:
        raise ValueError(f"batching must be one of {BATCHING_MODES}, got {batching!r}")
    if "vmap" not in supported:
        if batching == "vmap":
            raise ValueError(f"{who} runs as a loop over tasks; pass batching='loop' or 'auto'")
        return "loop"
    if batching == "auto":
        return choose_batching(omega, device)
    if batching == "vmap" and random_layers(omega.model):
        raise ValueError(_random_under_vmap(f"layers {random_layers(omega.model)} draw random numbers"))
    return batching


def _random_under_vmap(what: str) -> str:
    return (
        f"ω's model: {what} in training mode, and torch.func.vmap cannot draw per-task random numbers "
        "from torch's global generator. Use batching='loop' (or 'auto', which picks it for dropout "
        "layers), or put those layers in eval mode (omega.eval(), no dropout) for the vmap path"
    )


def run_vmapped(fn: Callable, in_dims: tuple, *args):
    """``vmap(fn, in_dims)(*args)`` with every norm computed exactly (`metalearn.exact_norms`).

    The vmap branch of `map_tasks`: torch's fused norms give wrong second-order meta-gradients
    under vmap, so the calls are routed to primitives while it runs (the backward afterwards
    needs nothing: its graph holds only primitives). A random operation inside (e.g.
    ``F.dropout`` in a model's own forward) is refused with an error naming the fix, instead of
    torch's raw randomness error.

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


def map_tasks(fn: Callable[..., tuple[Tensor, ...]], in_dims: tuple, *args: Any, batching: str) -> tuple[Tensor, ...]:
    """``fn`` applied to every task of a batch; its outputs (a tuple of tensors) stacked over tasks.

    ``in_dims`` says, as for ``vmap``, which ``args`` carry a leading task dimension: ``0`` (a
    tensor, or any sequence for the loop), ``None`` (shared by every task), or a dict of those for
    a dict of tensors (θ0). ``batching="vmap"`` runs `run_vmapped`; ``"loop"`` calls ``fn`` once per
    task, in order, so anything ``fn`` does besides returning (a backward, a ``.grad`` update)
    happens task by task and a task's graph is freed before the next one runs.
    """
    if batching == "vmap":
        return run_vmapped(fn, in_dims, *args)
    outputs = [fn(*_task_args(in_dims, args, i)) for i in range(_task_count(in_dims, args))]
    return tuple(torch.stack(list(column)) for column in zip(*outputs, strict=True))


def _task_count(in_dims: tuple, args: tuple) -> int:
    for dim, arg in zip(in_dims, args, strict=True):
        if isinstance(dim, dict):
            mapped = [arg[k] for k, d in dim.items() if d == 0]
            if mapped:
                return len(mapped[0])
        elif dim == 0:
            return len(arg)
    raise ValueError("map_tasks needs at least one argument with a task dimension (in_dims 0)")


def _task_args(in_dims: tuple, args: tuple, i: int) -> list[Any]:
    """Task ``i``'s slice of ``args``: index 0-dims, pass shared ones (``None``) as they are."""
    sliced = []
    for dim, arg in zip(in_dims, args, strict=True):
        if isinstance(dim, dict):
            sliced.append({k: (v if dim[k] is None else v[i]) for k, v in arg.items()})
        else:
            sliced.append(arg if dim is None else arg[i])
    return sliced


def task_in_dims(theta0_dims: dict[str, int | None]) -> tuple:
    """``in_dims`` for `task_objective`: ω shared, θ0 as given, the task halves mapped, steps/order shared."""
    return (None, theta0_dims, 0, 0, 0, 0, None, None)


def task_objective(
    omega: MetaKnowledge,
    theta0: Params,
    x_train: Tensor,
    y_train: Tensor,
    x_val: Tensor,
    y_val: Tensor,
    inner_steps: int,
    first_order: bool,
    adapt_fn=adapt_params,
) -> tuple[Tensor, Tensor, Tensor]:
    """One task: adapt on train (with ``adapt_fn``), then (val loss, val metric, inner losses). Pure; vmap-safe."""
    params, losses = adapt_fn(omega, theta0, x_train, y_train, inner_steps, first_order)
    output = omega(params, x_val)
    # the same tensor unless an fp16 meta-step's loss scale is active (`metalearn.precision`)
    return scale_for_backward(default_loss(output, y_val)), metric(output, y_val), losses


def _shared_over_tasks(t: Tensor) -> bool:
    """Whether every task's slice of ``t`` is the same memory (an ``expand`` over the task dim)."""
    return t.ndim > 0 and t.shape[0] > 0 and t.stride(0) == 0


def vmap_theta0(
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


def check_losses(inner: Tensor, val_losses: Tensor, by_task: bool) -> None:
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
