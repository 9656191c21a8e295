r"""One way to map a function over the tasks of a batch: a Python loop or ``torch.func.vmap``.

Every per-task computation of the library goes through `map_tasks` (meta-gradient modes,
`metalearn.outer.meta_loss`, `metalearn.evaluate.evaluate`), and its vmap branch through
`run_vmapped`, which computes every norm from primitives while it runs (`metalearn.exact_norms`),
so the loop and vmap give the same result for any model. `choose_batching` picks the faster
for a model and device; `resolve_batching` checks a user's choice against what a mode supports.

`map_chunks` is vmap over chunks of a batch's tasks (`Chunking`): a caller backpropagates each
chunk's share before the next chunk runs, so at most one chunk's graph is alive at a time and the
memory of a meta-batch under vmap is bounded by the chunk size instead of the batch size.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import vmap

from metalearn.exact_norms import ROUTES, exact_norms, norm_free
from metalearn.inner import adapt_params, check_finite_losses, check_finite_task_losses
from metalearn.knowledge.builtins import PointInit
from metalearn.knowledge.meta_knowledge import MetaKnowledge, check_target_shape, default_loss
from metalearn.knowledge.parts import Params
from metalearn.precision import scale_for_backward

__all__ = [
    "AUTO_BUDGET_FRACTION",
    "BATCHING_MODES",
    "Chunking",
    "check_chunk_size",
    "check_losses",
    "choose_batching",
    "chunk_bounds",
    "graph_bytes",
    "map_chunks",
    "map_tasks",
    "metric",
    "needs_norm_routing",
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
    (dropout with ``p > 0``, ``RReLU``, and modules that declare ``random_in_training = True`` such
    as `metalearn.models.DropBlock` with a positive rate, in training mode): vmap refuses random operations."""
    return [name for name, m in model.named_modules() if _is_random(m)]


def _declares(module: nn.Module, flag: str) -> bool:
    """``getattr(module, flag, False)``, without ``nn.Module.__getattr__``'s exception for the common
    module that lacks ``flag`` (it runs for every module at every step)."""
    value = module.__dict__.get(flag, getattr(type(module), flag, False))
    return bool(value)


def choose_batching(omega: MetaKnowledge, device: torch.device, first_order: bool = False) -> str:
    """The faster batching for ω's model on ``device``: ``"loop"`` or ``"vmap"``.

    Both paths give the same meta-gradient for every model: under vmap every norm is computed
    from primitives (`metalearn.exact_norms`), so native ``nn.*Norm`` layers and a model's own
    ``F.batch_norm``/``F.layer_norm``/... calls no longer force the loop. The choice is speed:

    * a model with random layers in training mode (`random_layers`, e.g. ``nn.Dropout``):
      ``"loop"`` (vmap cannot draw per-task random numbers from torch's global generator);
    * on CUDA: ``"vmap"`` (one batched kernel per op instead of one per task);
    * on CPU: ``"loop"`` for convolutional models (compute-bound; torch.func's batched
      convolutions were ~2x slower with ~10x the memory on the Conv-4, and 2.6x slower on a
      Conv-4 of native ``nn.Conv2d`` + ``nn.BatchNorm2d``, meta-batch 8; `metalearn.models.Conv4`'s
      task-batched vmap path, `metalearn.task_batched`, is a little faster than the loop in float32
      but holds a few times its memory, so the loop stays the default; under CPU bf16, where it is
      1.2-1.7x faster, a meta-step's ``auto`` runs it: `metalearn.outer`'s ``_task_batched_pays``), ``"vmap"``
      otherwise (small models are bound by per-op overhead, which batching removes: 6-7x
      faster than the loop for 1-40-40-1 MLPs with ``nn.LayerNorm`` or ``nn.BatchNorm1d``,
      interception included). Measured by ``benchmarks/vmap_norms.py`` (figures in
      docs/architecture.md, "The vmap + batch norm trap").

    ``first_order`` is accepted for callers that know it; the choice no longer depends on it.
    """
    randoms, convolutional = _random_and_convolutional(omega.model)
    if randoms:
        return "loop"
    if device.type == "cuda":
        return "vmap"
    return "loop" if convolutional else "vmap"


def _random_and_convolutional(model: nn.Module) -> tuple[bool, bool]:
    """Whether ``model`` has `random_layers`, and whether it has a convolution: one walk over its
    modules (`choose_batching` runs at every step)."""
    randoms = convolutional = False
    for m in model.modules():
        randoms = randoms or _is_random(m)
        convolutional = convolutional or isinstance(m, _CONVS)
    return randoms, convolutional


def _is_random(m: nn.Module) -> bool:
    """Whether module ``m`` draws random numbers in its forward as it is now (`random_layers`)."""
    return m.training and (
        (isinstance(m, _DROPOUTS) and m.p > 0) or isinstance(m, nn.RReLU)
        or (_declares(m, "random_in_training") and getattr(m, "active", True))
    )


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


def needs_norm_routing(omega: MetaKnowledge, *runners: object) -> bool:
    """Whether a vmapped computation over ω must run under `metalearn.exact_norms.ExactNorms`.

    The mode costs a Python call for every torch call inside the vmap (about a tenth of a
    sinusoid MLP's meta-step), so the library's own callers skip it where nothing inside can call
    one of torch's fused norms: ω's modules (model and parts) are all `norm_free`, ω's inner loss
    is `default_loss` or one of ``torch.nn.functional``'s, and every one of ``runners`` (what else
    runs inside, e.g. the meta-gradient mode) is of a class of this library. A user's own model,
    part, loss or mode subclass keeps the mode: the answer errs only towards routing.

    Example:
        >>> from metalearn import MLP, Conv4, maml
        >>> needs_norm_routing(maml(MLP((1, 40, 1)), lr=0.01))
        False
        >>> needs_norm_routing(maml(Conv4(num_classes=5), lr=0.4))  # its BatchNorm reads kernels= from the mode
        True
    """
    loss = omega.loss
    if loss is not None and not isinstance(loss, nn.Module):
        if getattr(loss, "__module__", None) != "torch.nn.functional" or loss in ROUTES:
            return True
    if not norm_free(omega):
        return True
    return any(not type(r).__module__.startswith("metalearn.") for r in runners)


def run_vmapped(fn: Callable, in_dims: tuple, *args, kernels: str = "auto", route_norms: bool = True):
    """``vmap(fn, in_dims)(*args)`` with every norm computed exactly (`metalearn.exact_norms`).

    The vmap branch of `map_tasks`: torch's fused norms give wrong second-order meta-gradients
    under vmap, so the calls are routed to primitives while it runs (the backward afterwards
    needs nothing: its graph holds only primitives). A random operation inside (e.g.
    ``F.dropout`` in a model's own forward) is refused with an error naming the fix, instead of
    torch's raw randomness error. ``kernels`` picks how batch norm's batch statistics are computed
    (`metalearn.exact_norms.ExactNorms`). ``route_norms=False`` runs without the mode: only for a
    computation that `needs_norm_routing` clears.

    Raises:
        ValueError: ``fn`` called a random operation.
    """
    # a dict whose every entry is shared is one shared argument to vmap: the same mapping, without
    # matching each tensor to its own None at every call
    in_dims = tuple(None if isinstance(d, dict) and not any(v is not None for v in d.values()) else d for d in in_dims)
    try:
        with exact_norms(kernels) if route_norms else nullcontext():
            return vmap(fn, in_dims=in_dims)(*args)
    except RuntimeError as err:
        if "randomness" not in str(err):
            raise
        raise ValueError(_random_under_vmap("a random operation (e.g. F.dropout) was called")) from err


def map_tasks(
    fn: Callable[..., tuple[Tensor, ...]], in_dims: tuple, *args: Any, batching: str, kernels: str = "auto",
    route_norms: bool = True,
) -> tuple[Tensor, ...]:
    """``fn`` applied to every task of a batch; its outputs (a tuple of tensors) stacked over tasks.

    ``in_dims`` says, as for ``vmap``, which ``args`` carry a leading task dimension: ``0`` (a
    tensor, or any sequence for the loop), ``None`` (shared by every task), or a dict of those for
    a dict of tensors (θ0). ``batching="vmap"`` runs `run_vmapped`; ``"loop"`` calls ``fn`` once per
    task, in order, so anything ``fn`` does besides returning (a backward, a ``.grad`` update)
    happens task by task and a task's graph is freed before the next one runs. ``kernels`` reaches
    `run_vmapped` (the norms), as does ``route_norms``; ``fn`` gets its own for the inner updates.
    """
    if batching == "vmap":
        return run_vmapped(fn, in_dims, *args, kernels=kernels, route_norms=route_norms)
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


#: the share of a CUDA device's free memory that ``chunk_size="auto"`` lets one chunk's graphs hold
#: when no ``memory_budget`` is given (the rest is headroom for the backward's own buffers)
AUTO_BUDGET_FRACTION = 0.5


def check_chunk_size(chunk_size: int | str | None, memory_budget: int | None = None) -> None:
    """Raises `ValueError` for a ``chunk_size`` or ``memory_budget`` that `Chunking` cannot use."""
    if chunk_size is not None and chunk_size != "auto":
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(
                f"chunk_size must be a positive int (tasks per chunk under vmap), 'auto' (from a memory budget) "
                f"or None (the whole meta-batch at once), got {chunk_size!r}"
            )
    if memory_budget is None:
        return
    if isinstance(memory_budget, bool) or not isinstance(memory_budget, int) or memory_budget < 1:
        raise ValueError(f"memory_budget must be a positive int (bytes) or None, got {memory_budget!r}")
    if chunk_size != "auto":
        raise ValueError(
            f"memory_budget={memory_budget} is read only with chunk_size='auto' (got chunk_size={chunk_size!r}); "
            "pass chunk_size='auto', or drop memory_budget"
        )


@dataclass(frozen=True)
class Chunking:
    """How many of a meta-batch's tasks run at once under vmap (`map_chunks`).

    Attributes:
        size: tasks per chunk, a positive int (the last chunk takes the rest); ``"auto"``: as many
            as ``memory_budget`` holds, from the graph of the first task, which runs alone as a
            probe (`graph_bytes`); ``None``: the whole batch in one call (no chunking).
        memory_budget: bytes the saved tensors of one chunk's graph may take, for ``size="auto"``.
            ``None``: `AUTO_BUDGET_FRACTION` of the free memory of a CUDA device
            (``torch.cuda.mem_get_info``); on the CPU, no chunking.

    Raises:
        ValueError: a bad ``size`` or ``memory_budget`` (`check_chunk_size`), when it is built.
    """

    size: int | str | None = None
    memory_budget: int | None = None

    def __post_init__(self) -> None:
        check_chunk_size(self.size, self.memory_budget)

    @property
    def active(self) -> bool:
        """Whether the batch may be split (``size`` is not ``None``)."""
        return self.size is not None

    def budget(self, device: torch.device) -> int | None:
        """The bytes ``"auto"`` fills on ``device``: the given budget, a share of a CUDA device's free memory,
        or ``None`` (no chunking) on any other device."""
        if self.memory_budget is not None:
            return self.memory_budget
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            return int(free * AUTO_BUDGET_FRACTION)
        return None


def chunk_bounds(n: int, size: int) -> list[tuple[int, int]]:
    """``(start, stop)`` of consecutive chunks of ``size`` tasks covering ``0 .. n - 1`` (the last may be shorter)."""
    return [(start, min(start + size, n)) for start in range(0, n, size)]


def _chunk_args(in_dims: tuple, args: tuple, start: int, stop: int) -> list[Any]:
    """Tasks ``start .. stop - 1`` of ``args``: 0-dims sliced (views, no copy), shared ones (``None``) as they are."""
    sliced = []
    for dim, arg in zip(in_dims, args, strict=True):
        if isinstance(dim, dict):
            sliced.append({k: (v if dim[k] is None else v[start:stop]) for k, v in arg.items()})
        else:
            sliced.append(arg if dim is None else arg[start:stop])
    return sliced


def _storages(args: Sequence[Any]) -> set[int]:
    """Storage addresses of every tensor in ``args`` (tensors, dicts of them, modules' parameters and buffers)."""
    found: set[int] = set()
    for arg in args:
        if isinstance(arg, nn.Module):
            tensors: list[Any] = [*arg.parameters(), *arg.buffers()]
        elif isinstance(arg, dict):
            tensors = list(arg.values())
        else:
            tensors = [arg]
        found.update(t.untyped_storage().data_ptr() for t in tensors if isinstance(t, Tensor))
    return found


def graph_bytes(outputs: Sequence[Tensor], exclude: Collection[int] = ()) -> int:
    """Bytes of the tensors the autograd graph of ``outputs`` has saved for its backward.

    Walks the graph from the outputs' ``grad_fn`` and adds up every distinct storage a node holds
    in its ``_saved_*`` attributes (``saved_tensors`` for a custom ``autograd.Function``), except
    those whose address is in ``exclude`` (e.g. the inputs,
    which outlive the graph). Device-agnostic and deterministic: the same graph gives the same
    count on the CPU and on CUDA. It is what a chunk's graph keeps alive until its backward; the
    backward's own buffers come on top (hence `AUTO_BUDGET_FRACTION`).
    """
    stack: list[Any] = [t.grad_fn for t in outputs if isinstance(t, Tensor) and t.grad_fn is not None]
    seen: set[Any] = set()
    saved_names: dict[type, list[str]] = {}
    storages: dict[int, int] = {}
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        # built-in nodes expose what they saved as _saved_* attributes; a custom autograd.Function's
        # node (e.g. a fused kernel's) as saved_tensors
        names = saved_names.setdefault(
            type(node), [a for a in dir(node) if a.startswith("_saved_") or a == "saved_tensors"]
        )
        for name in names:
            try:
                value = getattr(node, name)
            except RuntimeError:  # a saved tensor already freed by a backward
                continue
            for t in value if isinstance(value, (tuple, list)) else (value,):
                if isinstance(t, Tensor):
                    storage = t.untyped_storage()
                    if storage.data_ptr() not in exclude:
                        storages[storage.data_ptr()] = storage.nbytes()
        stack.extend(next_node for next_node, _ in node.next_functions)
    return sum(storages.values())


def map_chunks(
    fn: Callable[..., tuple[Tensor, ...]],
    in_dims: tuple,
    *args: Any,
    chunking: Chunking,
    after_chunk: Callable[[tuple[Tensor, ...], int], tuple[Tensor, ...]],
    kernels: str = "auto",
    route_norms: bool = True,
) -> tuple[Tensor, ...]:
    """``fn`` vmapped over consecutive chunks of the batch's tasks (`run_vmapped` per chunk, with
    ``kernels`` and ``route_norms``).

    ``after_chunk(outputs, start)`` is called with each chunk's outputs (still attached to their
    graph) and the index of its first task, before the next chunk runs: the place to backpropagate
    the chunk's share, which frees its graph. It returns what is kept of them (e.g. detached); those
    are concatenated over the chunks, in task order. Under ``chunking.size="auto"`` the first task
    runs alone and its graph's size (`graph_bytes`, inputs excluded) sets the size of the rest:
    ``max(1, budget // bytes per task)``.
    """
    n = _task_count(in_dims, args)
    kept: list[tuple[Tensor, ...]] = []
    size, start = chunking.size, 0
    if size == "auto":
        tensors = [a for a in args if isinstance(a, Tensor)]
        budget = chunking.budget(tensors[0].device if tensors else torch.device("cpu"))
        size = n
        if budget is not None and n > 1:
            probe = run_vmapped(fn, in_dims, *_chunk_args(in_dims, args, 0, 1), kernels=kernels,
                                route_norms=route_norms)
            per_task = graph_bytes(probe, exclude=_storages(args))
            kept.append(after_chunk(probe, 0))
            del probe  # its graph went with its backward
            size, start = max(1, budget // max(per_task, 1)), 1
    assert isinstance(size, int)
    for first, stop in chunk_bounds(n - start, size):
        outputs = run_vmapped(fn, in_dims, *_chunk_args(in_dims, args, start + first, start + stop),
                              kernels=kernels, route_norms=route_norms)
        kept.append(after_chunk(outputs, start + first))
        del outputs
    return tuple(torch.cat(list(column)) for column in zip(*kept, strict=True))


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
    val_loss = default_loss(output, y_val)
    # a regression task's metric is its val loss (the mean squared error) as a value: read off it
    # instead of computed again (four fewer batched ops per step)
    met = val_loss.detach() if y_val.is_floating_point() else metric(output, y_val)
    # the same tensor unless an fp16 meta-step's loss scale is active (`metalearn.precision`)
    return scale_for_backward(val_loss), met, losses


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


def check_losses(inner: Tensor, val_losses: Tensor, by_task: bool, task_offset: int = 0) -> None:
    """Raises `NonFiniteError` for the first non-finite inner loss ``[tasks, steps]`` or val loss ``[tasks]``.

    One fused check when everything is finite (the common case). ``by_task`` reports the
    first task with any bad value (inner before val, the order the loop runs them);
    otherwise every inner loss is checked before any val loss. ``task_offset`` is the index
    of the first of these tasks in the meta-batch (a chunk of it), for the message.
    """
    if _all_finite(inner, val_losses):
        return
    if by_task:
        bad = ~(torch.isfinite(inner).all(dim=1) & torch.isfinite(val_losses))
        i = int(bad.nonzero()[0, 0])
        check_finite_losses(inner[i], task_offset=task_offset + i)
        check_finite_task_losses(val_losses[i, None], what="val loss (after adaptation)", task_offset=task_offset + i)
    check_finite_losses(inner, task_offset=task_offset)
    check_finite_task_losses(val_losses, what="val loss (after adaptation)", task_offset=task_offset)
